"""The service runtime: one way for every service to subscribe, check the ledger, run its handler,
publish, record and ack (DESIGN.md, "Delivery and idempotency").

A service maps event classes to handlers (`{ev.JobSubmitted: on_job}`); its topics are those of
the classes. Handlers are plain functions `handler(event, ctx) -> iterable of events to publish`. They raise
`Retry` to be redelivered later (e.g. a run leased by another worker) and `Reject` for input that
can never succeed (dead-lettered with the reason). Anything else is retried with backoff and
dead-lettered after the subscription's max delivery attempts.
"""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from pydantic import ValidationError

from shared.domain import events as ev
from shared.platform.config import Adapters
from shared.platform.ports import Message
from shared.platform.scheduling import PriorityPicker, class_subscription
from shared.platform.topology import SERVICE_TOPICS, priority_classes

LEDGER = "processed"
CANCELLATIONS = "cancellations"
# Set on a replayed dead letter: only the subscription that dead-lettered it processes it again.
REPLAY_FOR = "replay_for"
IDLE_POLL_S = 0.5              # a prioritized service's workers look again this often when all is empty


class Retry(Exception):
    def __init__(self, reason: str, delay_s: float | None = None):
        super().__init__(reason)
        self.delay_s = delay_s


class Reject(Exception):
    """Permanent failure: the message goes to the dead-letter topic with this reason."""


@dataclass
class Context:
    service: str
    adapters: Adapters
    message: Message
    stopping: threading.Event
    log: logging.LoggerAdapter
    topic: str = ""   # where the message arrived: for a door event, the door (whose tenant it is)

    @property
    def bus(self):
        return self.adapters.bus

    @property
    def store(self):
        return self.adapters.store

    @property
    def docs(self):
        return self.adapters.docs

    @property
    def settings(self):
        return self.adapters.settings

    def publish(self, event: ev.Event) -> None:
        publish_event(self.adapters.bus, event)

    def cancelled(self, run_id: str) -> bool:
        return is_cancelled(self.adapters.docs, run_id)


Handler = Callable[[Any, Context], Iterable[ev.Event] | None]


class ServiceDefinitionError(TypeError):
    """A service's handlers cannot work as written (raised when the service is defined or started)."""


@dataclass(frozen=True)
class Service:
    name: str
    # event class -> handler; other events on the service's topics are acknowledged and skipped.
    handlers: Mapping[type[ev.AnyEvent], Handler]
    max_messages: int = 1
    max_lease_s: float = 3600.0
    on_start: Callable[[Adapters], None] | None = None
    # Work services skip the events of cancelled runs; the tracker still records them.
    skip_cancelled: bool = True

    def __post_init__(self) -> None:
        # A typo used to be acked and skipped silently, forever: now the service does not start.
        known = {*ev.EVENT_TYPES.values(), ev.ObjectFinalized}
        for key, handler in self.handlers.items():
            if key not in known:
                raise ServiceDefinitionError(
                    f"service {self.name!r}: handler key {key!r} is not an event class; key handlers by the "
                    f"classes of shared/domain/events.py, e.g. {{ev.JobSubmitted: on_job}} (known: "
                    f"{', '.join(sorted(c.__name__ for c in known))})")
            if not callable(handler):
                raise ServiceDefinitionError(f"service {self.name!r}: the handler of {key.__name__} is not callable")
        if not self.handlers:
            raise ServiceDefinitionError(f"service {self.name!r} handles no event")

    @property
    def topics(self) -> tuple[str, ...]:
        """The topics the service consumes, in the order of its handlers (tenants' doors apart: door_topics)."""
        return tuple(dict.fromkeys(cls.topic for cls in self.handlers if not cls.door))

    def door_topics(self, settings) -> tuple[str, ...]:
        """The tenants' door topics it consumes (Settings.job_doors), where it handles a door event."""
        if not any(cls.door for cls in self.handlers):
            return ()
        return tuple(ev.door_topic(tenant) for tenant in settings.job_doors)

    def handler_for(self, topic: str, event: ev.AnyEvent) -> Handler | None:
        cls = type(event)
        arrived_right = ev.door_tenant(topic) is not None if cls.door else cls.topic == topic
        return self.handlers.get(cls) if arrived_right else None


def check_topology(service: Service) -> None:
    """A service named in shared/platform/topology.py must handle events on exactly the topics it is
    subscribed to there: a handler on another topic would never be called, and a subscription
    without a handler would acknowledge every message unread."""
    expected = SERVICE_TOPICS.get(service.name)
    if expected is None or set(service.topics) == set(expected):
        return
    raise ServiceDefinitionError(
        f"service {service.name!r} handles events on {sorted(service.topics)} but shared/platform/topology.py "
        f"subscribes it to {sorted(expected)}; change its handlers or SERVICE_TOPICS so they agree")


def publish_event(bus, event: ev.Event) -> str:
    data, attributes = ev.encode(event)
    return bus.publish(event.topic, data, attributes)


def is_cancelled(docs, run_id: str) -> bool:
    return bool(run_id) and docs.get(CANCELLATIONS, run_id) is not None


def ledger_key(service: str, event_id: str) -> str:
    # Firestore ids cannot hold '/', and storage event ids do.
    return hashlib.sha256(f"{service}\x1f{event_id}".encode()).hexdigest()


# The dead-lettered message's own id (its copy on the dead-letter topic gets a new one): what
# `ftpipe dlq replay` tells the run record, which knows the message by the notice.
DEAD_LETTER_MESSAGE_ID = "dead_letter_message_id"


def dead_letter(adapters: Adapters, topic: str, subscription: str, msg: Message, reason: str) -> None:
    """Move the message to the topic's dead-letter topic with the reason, and tell the tracker its
    run is stuck (the notice first: its id is deterministic, so a retry after a crash repeats both safely)."""
    reason = reason[:1000]
    run_id = msg.attributes.get("run_id", "")
    kind = msg.attributes.get("type") or msg.attributes.get("eventType") or "unknown"
    if run_id and kind != ev.MessageDeadLettered.type:  # the tracker failing on a notice must not loop
        try:
            notice = ev.MessageDeadLettered(run_id=run_id, message_id=msg.message_id, message_type=kind[:100],
                                            source_topic=topic, subscription=subscription, reason=reason)
        except ValidationError:  # a poison message's run_id attribute can be anything
            notice = None
        if notice is not None:
            publish_event(adapters.bus, notice)
    attributes = {**msg.attributes, "dead_letter_reason": reason, "dead_letter_source": subscription,
                  DEAD_LETTER_MESSAGE_ID: msg.message_id}
    adapters.bus.publish(ev.dead_letter_topic(topic), msg.data, attributes)


def handle_message(service: Service, adapters: Adapters, topic: str, msg: Message,
                   stopping: threading.Event | None = None, subscription: str | None = None) -> str:
    """Process one delivery (from `subscription`, by default the service's one on the topic) end
    to end; returns what happened (for logs and tests)."""
    subscription = subscription or ev.subscription_name(service.name, topic)
    log = logging.getLogger(f"ftpipe.{service.name}")
    base = {"service": service.name, "topic": topic, "message_id": msg.message_id, "attempt": msg.delivery_attempt}
    target = msg.attributes.get(REPLAY_FOR)
    if target and target != subscription:
        msg.ack()  # a dead letter replayed for another subscription of this topic
        return "ignored"
    try:
        event = ev.decode(msg.data, msg.attributes)
    except ev.MalformedMessage as exc:
        log.error("malformed message dead-lettered: %s", exc, extra=base)
        dead_letter(adapters, topic, subscription, msg, f"malformed: {exc}")
        msg.ack()
        return "dead-lettered"
    extra = {**base, "run_id": event.run_id or None, "event_id": event.event_id, "type": event.type}
    handler = service.handler_for(topic, event)
    if handler is None:
        msg.ack()
        return "ignored"
    key = ledger_key(service.name, event.event_id)
    try:
        duplicate = adapters.ledger.get(LEDGER, key) is not None
        cancelled = not duplicate and service.skip_cancelled and is_cancelled(adapters.docs, event.run_id)
    except Exception as exc:  # the document store is down: as a failed handler (retry, then dead-letter)
        return _failed(adapters, topic, subscription, msg, exc, log, extra)
    if duplicate:
        log.info("duplicate delivery acknowledged", extra=extra)
        msg.ack()
        return "duplicate"
    if cancelled:
        log.info("run is cancelled; skipping", extra=extra)
        msg.ack()
        return "cancelled"
    ctx = Context(service.name, adapters, msg, stopping or threading.Event(), logging.LoggerAdapter(log, extra), topic)
    started = time.monotonic()
    try:
        outputs = list(handler(event, ctx) or ())
    except Retry as exc:
        log.info("will retry: %s", exc, extra=extra)
        msg.nack(exc.delay_s)
        return "nacked"
    except (Reject, ev.MalformedMessage) as exc:
        log.error("rejected, dead-lettered: %s", exc, extra=extra)
        dead_letter(adapters, topic, subscription, msg, f"rejected: {exc}")
        msg.ack()
        return "dead-lettered"
    except Exception as exc:  # a bug or a transient fault: retry, then dead-letter
        return _failed(adapters, topic, subscription, msg, exc, log, extra)
    try:
        for out in outputs:
            publish_event(adapters.bus, out)
        adapters.ledger.set(LEDGER, key, {"service": service.name, "event_id": event.event_id, "run_id": event.run_id,
                                        "at": time.time(), "outputs": [o.event_id for o in outputs]})
    except Exception as exc:  # a redelivery publishes the same ids again and records them
        return _failed(adapters, topic, subscription, msg, exc, log, extra)
    msg.ack()
    log.info("handled in %.1fs", time.monotonic() - started, extra=extra)
    return "acked"


def _failed(adapters: Adapters, topic: str, subscription: str, msg: Message, exc: Exception, log, extra) -> str:
    """A delivery that failed for a reason a retry may cure: nacked (redelivered with backoff), or
    on the subscription's last attempt dead-lettered with the error as the reason."""
    if msg.delivery_attempt >= adapters.settings.max_delivery_attempts:
        log.error("failed on the last attempt; dead-lettered: %s: %s", type(exc).__name__, exc, exc_info=exc, extra=extra)
        dead_letter(adapters, topic, subscription, msg, f"handler failed {msg.delivery_attempt} times: {type(exc).__name__}: {exc}")
        msg.ack()
        return "dead-lettered"
    log.warning("failed; will retry: %s: %s", type(exc).__name__, exc, exc_info=exc, extra=extra)
    msg.nack()
    return "nacked"


def run_service(service: Service, adapters: Adapters, *, stop: threading.Event | None = None) -> None:
    """Consume the service's topics in this thread until SIGTERM/SIGINT (or `stop`): for tests and
    tools that want a consumer alone. A service's process starts with shared/platform/main.py's `serve`."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    prepare_service(service, adapters)
    finish = start_consuming(service, adapters, stop, {"handled": 0})
    stop.wait()
    finish()


def prepare_service(service: Service, adapters: Adapters) -> None:
    """What comes before the first message: the start-up checks, then the service's own preparation."""
    check_topology(service)
    if service.on_start:
        service.on_start(adapters)


def start_consuming(service: Service, adapters: Adapters, stop: threading.Event,
                    counters: dict[str, int]) -> Callable[[], None]:
    """Subscribe to every topic of the service (or start its priority workers); handled messages
    are counted in `counters`. Returns the call that stops taking messages and waits for the
    in-flight ones, once `stop` is set."""
    log = logging.getLogger(f"ftpipe.{service.name}")

    def callback_for(topic: str):
        def callback(msg: Message) -> None:
            if stop.is_set():  # shutting down: let another worker take it
                msg.nack(0)
                return
            handle_message(service, adapters, topic, msg, stop)
            counters["handled"] += 1
        return callback

    classes = priority_classes(service.name)
    subscriptions = [] if classes else [
        adapters.bus.subscribe(ev.subscription_name(service.name, topic), callback_for(topic),
                               max_messages=service.max_messages, max_lease_s=service.max_lease_s)
        for topic in (*service.topics, *service.door_topics(adapters.settings))]
    workers = start_priority_workers(service, adapters, classes, stop, counters) if classes else []
    log.info("service started", extra={"service": service.name, "topics": ",".join(service.topics), "pid": os.getpid()})

    def finish() -> None:
        log.info("stopping: finishing in-flight work", extra={"service": service.name})
        for sub in subscriptions:
            sub.stop()
        for worker in workers:
            worker.join()
        log.info("service stopped", extra={"service": service.name})
    return finish


def start_priority_workers(service: Service, adapters: Adapters, classes: tuple[str, ...], stop: threading.Event,
                           counters: dict) -> list[threading.Thread]:
    """`service.max_messages` worker threads, each taking one message at a time from the priority
    class that PriorityPicker chooses (shared/platform/scheduling.py) with a synchronous pull, and keeping it
    leased while the handler runs, as a streaming pull would."""
    log = logging.getLogger(f"ftpipe.{service.name}")
    picker = PriorityPicker(classes, adapters.settings.priority_starvation_limit)
    sources = {c: [(topic, class_subscription(service.name, topic, c)) for topic in service.topics] for c in classes}

    def pull(priority: str):
        for topic, subscription in sources[priority]:
            if got := adapters.bus.pull(subscription, max_messages=1, timeout_s=0):
                return topic, subscription, got[0]
        return None

    def work() -> None:
        while not stop.is_set():
            try:
                taken = picker.take(pull)
            except Exception:  # the bus is briefly unavailable: try again
                log.exception("pull failed; retrying", extra={"service": service.name})
                stop.wait(IDLE_POLL_S)
                continue
            if taken is None:
                stop.wait(IDLE_POLL_S)
                continue
            priority, (topic, subscription, msg) = taken
            if stop.is_set():  # shutting down: let another worker take it
                msg.nack(0)
                return
            log.info("took a %s message", priority, extra={"service": service.name, "subscription": subscription,
                                                           "message_id": msg.message_id})
            try:
                with KeepLeased(msg, adapters.settings.ack_deadline_s, service.max_lease_s):
                    handle_message(service, adapters, topic, msg, stop, subscription)
            except Exception:  # handle_message owns error handling; an escape is a bug, so redeliver
                log.exception("handling failed; nacking", extra={"service": service.name, "message_id": msg.message_id})
                msg.nack()
            counters["handled"] += 1

    workers = [threading.Thread(target=work, name=f"{service.name}-worker-{i}", daemon=True)
               for i in range(service.max_messages)]
    for worker in workers:
        worker.start()
    return workers


class KeepLeased:
    """Extends a pulled message's ack deadline every third of it while the block runs, for up to
    `max_lease_s` (then the bus redelivers it, as after a streaming pull's max lease)."""

    def __init__(self, msg: Message, ack_deadline_s: float, max_lease_s: float):
        self.msg, self.ack_deadline_s, self.max_lease_s = msg, ack_deadline_s, max_lease_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"lease-{msg.message_id}")

    def _run(self) -> None:
        until = time.monotonic() + self.max_lease_s
        while not self._done.wait(self.ack_deadline_s / 3) and time.monotonic() < until:
            try:
                self.msg.extend(self.ack_deadline_s)
            except Exception:  # transient: the next beat comes well before the deadline
                logging.getLogger("ftpipe.runtime").warning("could not extend the lease of %s", self.msg.message_id)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
