"""Fault injection at the adapter boundary, for the chaos suite (chaos/, RELIABILITY.md).

`FTPIPE_FAULTS` (a comma-separated plan) makes bootstrap wrap the real adapters once, in every
service process alike; no handler knows. Terms:

  redeliver        the first ack of every delivery a process receives is lost (it becomes a nack):
                   every message is delivered at least twice, the second time with the same id
  duplicate        every publish goes out twice (a publisher retrying after a lost response)
  reorder=S        the first delivery of every message is put back with a random delay of up to
                   S seconds, so messages arrive late and out of order
  store=P          each ObjectStore call fails (before it acts) with probability P (1 = always)
  store_prefix=X   ... only calls on object names under X
  docs=P           each DocStore call fails (before it acts) with probability P
  lost_reply=P     each ObjectStore and DocStore call acts, then fails with probability P: the
                   "ambiguous" failure (the write or the transaction happened, the caller is told
                   it did not), so the retry repeats work that is already done
  seed=N           the random choices' seed (default 0): a plan replays the same choices

Injected failures are ports.TransientError, which shared/platform/retrying.py retries; what outlasts the
retries reaches the runtime (redelivery, then the dead-letter topic). Each injection is logged
at WARNING with "injected fault", which the chaos suite counts.
"""
from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass, fields
from typing import cast

from shared.platform.ports import Bus, DocStore, ObjectStore, TransientError
from shared.platform.retrying import DOCS_CALLS, STORE_CALLS, guarded

log = logging.getLogger("ftpipe.faults")


class InjectedFault(TransientError):
    pass


@dataclass(frozen=True)
class FaultPlan:
    redeliver: bool = False
    duplicate: bool = False
    reorder: float = 0.0
    store: float = 0.0
    store_prefix: str = ""
    docs: float = 0.0
    lost_reply: float = 0.0
    seed: int = 0

    @classmethod
    def parse(cls, text: str) -> "FaultPlan":
        kinds = {f.name: str(f.type) for f in fields(cls)}  # annotations are strings here (__future__)
        values: dict = {}
        for term in (t.strip() for t in text.split(",")):
            if not term:
                continue
            key, eq, raw = term.partition("=")
            key = key.strip()
            if key not in kinds:
                raise ValueError(f"FTPIPE_FAULTS: unknown term {key!r}; known: {', '.join(kinds)}")
            kind = kinds[key]
            try:
                if kind == "bool":
                    if eq:
                        raise ValueError
                    values[key] = True
                else:
                    values[key] = {"float": float, "int": int, "str": str}[kind](raw.strip())
            except ValueError:
                raise ValueError(f"FTPIPE_FAULTS: {term!r}: " + (f"{key} takes no value" if kind == "bool"
                                                                 else f"{key} needs a {kind} value, e.g. {key}=1")) from None
        for key in ("store", "docs", "lost_reply"):
            if not 0 <= values.get(key, 0) <= 1:
                raise ValueError(f"FTPIPE_FAULTS: {key}={values[key]} is a probability: give 0..1")
        return cls(**values)


def inject(plan: FaultPlan, bus: Bus, store: ObjectStore, docs: DocStore) -> tuple[Bus, ObjectStore, DocStore]:
    """The adapters with the plan's faults (each wrapper only when the plan asks for it)."""
    rng = random.Random(plan.seed)
    lock = threading.Lock()

    def chance(p: float) -> bool:
        with lock:
            return rng.random() < p

    def uniform(hi: float) -> float:
        with lock:
            return rng.uniform(0, hi)

    def failing(what: str, p: float, prefix: str = ""):
        def guard(call: str, fn, *args, **kwargs):
            name = kwargs.get("name", args[1] if len(args) > 1 else "") if what == "store" else ""
            if (not prefix or str(name).startswith(prefix)) and chance(p):
                log.warning("injected fault: %s.%s %s", what, call, name)
                raise InjectedFault(f"injected {what} fault on {call}({name}) (FTPIPE_FAULTS)")
            return fn(*args, **kwargs)
        return guard

    def losing_reply(what: str, p: float):
        def guard(call: str, fn, *args, **kwargs):
            result = fn(*args, **kwargs)
            if chance(p):
                log.warning("injected fault: %s.%s reply lost", what, call)
                raise InjectedFault(f"injected lost reply of {what}.{call} (it did act) (FTPIPE_FAULTS)")
            return result
        return guard

    if plan.lost_reply:
        store = guarded(store, STORE_CALLS, losing_reply("store", plan.lost_reply))
        docs = guarded(docs, DOCS_CALLS, losing_reply("docs", plan.lost_reply))
    if plan.store:
        store = guarded(store, STORE_CALLS, failing("store", plan.store, plan.store_prefix))
    if plan.docs:
        docs = guarded(docs, DOCS_CALLS, failing("docs", plan.docs))
    if plan.redeliver or plan.duplicate or plan.reorder:
        bus = cast(Bus, FaultyBus(bus, plan, uniform))  # a proxy: what it does not override is the inner bus's
    return bus, store, docs


class FaultyBus:
    def __init__(self, inner, plan: FaultPlan, uniform):
        self._inner, self._plan, self._uniform = inner, plan, uniform
        self._seen: set[tuple[str, str]] = set()     # (subscription, message id) delivered here before
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def publish(self, topic, data, attributes):
        message_id = self._inner.publish(topic, data, attributes)
        if self._plan.duplicate:
            log.warning("injected fault: duplicate publish on %s", topic)
            self._inner.publish(topic, data, attributes)
        return message_id

    def _first(self, subscription: str, msg) -> bool:
        with self._lock:
            key = (subscription, msg.message_id)
            first = key not in self._seen
            self._seen.add(key)
            return first

    def _admit(self, subscription: str, msg):
        """The delivery as the handler sees it, or None when the plan puts it back for later."""
        first = self._first(subscription, msg)
        if first and self._plan.reorder:
            delay = self._uniform(self._plan.reorder)
            log.warning("injected fault: delivery of %s on %s delayed %.1fs", msg.message_id, subscription, delay)
            msg.nack(delay)
            return None
        return LosingAck(msg, subscription) if self._plan.redeliver else msg

    def subscribe(self, subscription, callback, **kwargs):
        def faulty(msg):
            admitted = self._admit(subscription, msg)
            if admitted is not None:
                callback(admitted)
        return self._inner.subscribe(subscription, faulty, **kwargs)

    def pull(self, subscription, max_messages=10, timeout_s=1.0):
        got = self._inner.pull(subscription, max_messages=max_messages, timeout_s=timeout_s)
        return [m for m in (self._admit(subscription, msg) for msg in got) if m is not None]


class LosingAck:
    """A delivery whose first ack in this process is lost: the bus hands the message out again."""
    _lost: set[tuple[str, str]] = set()
    _lock = threading.Lock()

    def __init__(self, inner, subscription: str):
        self._inner, self._key = inner, (subscription, inner.message_id)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def ack(self) -> None:
        with self._lock:
            lose = self._key not in self._lost
            self._lost.add(self._key)
        if lose:
            log.warning("injected fault: ack of %s on %s lost", self._key[1], self._key[0])
            self._inner.nack(0)
        else:
            self._inner.ack()
