"""The embedded bus: Pub/Sub semantics on one SQLite file (WAL), safe across OS processes.

Fan-out happens at publish time (one delivery row per subscription, like Pub/Sub: a subscription
sees only what is published after it exists). A pull leases a delivery until its ack deadline; an
unacked delivery becomes visible again when the lease expires; nack applies exponential backoff;
after `max_delivery_attempts` deliveries the message is moved to the dead-letter topic. A
subscription with an AttributeFilter gets a delivery row only for the messages the filter matches.
"""
from __future__ import annotations

import json
import logging
import random
import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from shared.platform.ports import AttributeFilter, SubscriptionPolicy

log = logging.getLogger("ftpipe.bus")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS topics (name TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS subscriptions (
  name TEXT PRIMARY KEY, topic TEXT NOT NULL, policy TEXT NOT NULL, dead_letter_topic TEXT, filter TEXT);
CREATE TABLE IF NOT EXISTS messages (
  id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, data BLOB NOT NULL,
  attributes TEXT NOT NULL, publish_time REAL NOT NULL);
CREATE TABLE IF NOT EXISTS deliveries (
  subscription TEXT NOT NULL, message_id INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
  visible_at REAL NOT NULL, lease TEXT, PRIMARY KEY (subscription, message_id));
CREATE INDEX IF NOT EXISTS deliveries_ready ON deliveries (subscription, visible_at);
"""


class SqliteBus:
    def __init__(self, path: str | Path, *, poll_interval_s: float = 0.1):
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.poll_interval_s = poll_interval_s
        self._local = threading.local()
        conn = self._conn()
        conn.executescript(_SCHEMA)
        if "filter" not in {row[1] for row in conn.execute("PRAGMA table_info(subscriptions)")}:
            conn.execute("ALTER TABLE subscriptions ADD COLUMN filter TEXT")  # a bus file from before filters

    # ------------------------------------------------------------ plumbing
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    class _Tx:
        def __init__(self, conn):
            self.conn = conn

        def __enter__(self):
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type, *_):
            self.conn.execute("ROLLBACK" if exc_type else "COMMIT")

    def _tx(self):
        return self._Tx(self._conn())

    # ------------------------------------------------------------ admin
    def create_topic(self, topic: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO topics(name) VALUES (?)", (topic,))

    def create_subscription(self, subscription: str, topic: str, policy: SubscriptionPolicy,
                            dead_letter_topic: str | None = None, filter: AttributeFilter | None = None) -> None:
        stored_filter = _filter_json(filter)
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO topics(name) VALUES (?)", (topic,))
            if dead_letter_topic:
                db.execute("INSERT OR IGNORE INTO topics(name) VALUES (?)", (dead_letter_topic,))
            row = db.execute("SELECT topic, filter FROM subscriptions WHERE name=?", (subscription,)).fetchone()
            if row and row[0] != topic:
                raise ValueError(f"subscription {subscription!r} already exists on topic {row[0]!r}, not {topic!r}")
            if row and row[1] != stored_filter:
                raise ValueError(
                    f"subscription {subscription!r} already exists with filter {_expression(row[1])!r}, not "
                    f"{_expression(stored_filter)!r}; a filter is fixed at creation (as on Pub/Sub): with the "
                    f"stack down, delete {self.path} (its undelivered messages go with it) and start again")
            db.execute(
                "INSERT INTO subscriptions(name, topic, policy, dead_letter_topic, filter) VALUES (?,?,?,?,?) "
                "ON CONFLICT(name) DO UPDATE SET policy=excluded.policy, dead_letter_topic=excluded.dead_letter_topic",
                (subscription, topic, json.dumps(policy.__dict__), dead_letter_topic, stored_filter))

    def _policy(self, db, subscription: str) -> tuple[SubscriptionPolicy, str | None]:
        row = db.execute("SELECT policy, dead_letter_topic FROM subscriptions WHERE name=?", (subscription,)).fetchone()
        if row is None:
            raise KeyError(f"no subscription named {subscription!r}")
        return SubscriptionPolicy(**json.loads(row[0])), row[1]

    # ------------------------------------------------------------ publish
    def publish(self, topic: str, data: bytes, attributes: Mapping[str, str]) -> str:
        with self._tx() as db:
            return str(self._publish(db, topic, data, attributes))

    def _publish(self, db, topic: str, data: bytes, attributes: Mapping[str, str]) -> int:
        if db.execute("SELECT 1 FROM topics WHERE name=?", (topic,)).fetchone() is None:
            raise KeyError(f"no topic named {topic!r}")
        now = time.time()
        cur = db.execute("INSERT INTO messages(topic, data, attributes, publish_time) VALUES (?,?,?,?)",
                         (topic, bytes(data), json.dumps(dict(attributes)), now))
        matching = [(name, cur.lastrowid, now) for name, stored in
                    db.execute("SELECT name, filter FROM subscriptions WHERE topic=?", (topic,))
                    if stored is None or _load_filter(stored).matches(attributes)]
        db.executemany("INSERT INTO deliveries(subscription, message_id, visible_at) VALUES (?,?,?)", matching)
        if not matching:  # like Pub/Sub: nobody (left) to deliver it to
            db.execute("DELETE FROM messages WHERE id=?", (cur.lastrowid,))
        return cur.lastrowid

    # ------------------------------------------------------------ pull / ack
    def pull(self, subscription: str, max_messages: int = 10, timeout_s: float = 1.0) -> list["LocalMessage"]:
        deadline = time.monotonic() + timeout_s
        while True:
            got = self._lease(subscription, max_messages)
            if got or time.monotonic() >= deadline:
                return got
            time.sleep(self.poll_interval_s)

    def _lease(self, subscription: str, max_messages: int) -> list["LocalMessage"]:
        now = time.time()
        out = []
        with self._tx() as db:
            policy, dlt = self._policy(db, subscription)
            self._expire(db, subscription, policy, now)
            rows = db.execute(
                "SELECT d.message_id, d.attempts, m.data, m.attributes, m.publish_time FROM deliveries d "
                "JOIN messages m ON m.id = d.message_id WHERE d.subscription=? AND d.visible_at<=? "
                "ORDER BY d.message_id LIMIT ?", (subscription, now, max_messages)).fetchall()
            for message_id, attempts, data, attrs, publish_time in rows:
                if attempts >= policy.max_delivery_attempts and dlt:  # its last lease expired
                    self._dead_letter(db, subscription, message_id, attempts, dlt)
                    continue
                lease = uuid.uuid4().hex
                db.execute("UPDATE deliveries SET attempts=attempts+1, visible_at=?, lease=? "
                           "WHERE subscription=? AND message_id=?",
                           (now + policy.ack_deadline_s, lease, subscription, message_id))
                out.append(LocalMessage(bus=self, subscription=subscription, lease=lease, data=bytes(data),
                                        attributes=json.loads(attrs), message_id=str(message_id),
                                        delivery_attempt=attempts + 1, publish_time=publish_time,
                                        _policy=policy))
        return out

    def _dead_letter(self, db, subscription: str, message_id: int, attempts: int, dlt: str) -> None:
        data, attrs = db.execute("SELECT data, attributes FROM messages WHERE id=?", (message_id,)).fetchone()
        attributes = json.loads(attrs)
        attributes.setdefault("dead_letter_reason", f"not acknowledged after {attempts} delivery attempts")
        attributes.setdefault("dead_letter_source", subscription)
        self._publish(db, dlt, data, attributes)
        db.execute("DELETE FROM deliveries WHERE subscription=? AND message_id=?", (subscription, message_id))
        log.warning("message %s on %s dead-lettered to %s after %d attempts", message_id, subscription, dlt, attempts)

    def _expire(self, db, subscription: str, policy: SubscriptionPolicy, now: float) -> None:
        """Retention: unacknowledged messages older than the policy's retention are dropped."""
        db.execute("DELETE FROM deliveries WHERE subscription=? AND message_id IN "
                   "(SELECT id FROM messages WHERE publish_time < ?)", (subscription, now - policy.retention_s))

    def _settle(self, subscription: str, message_id: str, lease: str, *, visible_at: float | None) -> bool:
        """Ack (visible_at None) or make visible again at visible_at; stale leases are ignored."""
        with self._tx() as db:
            if visible_at is None:
                cur = db.execute("DELETE FROM deliveries WHERE subscription=? AND message_id=? AND lease=?",
                                 (subscription, int(message_id), lease))
                if cur.rowcount and db.execute("SELECT 1 FROM deliveries WHERE message_id=?", (int(message_id),)).fetchone() is None:
                    db.execute("DELETE FROM messages WHERE id=?", (int(message_id),))
                return bool(cur.rowcount)
            cur = db.execute("UPDATE deliveries SET visible_at=? WHERE subscription=? AND message_id=? AND lease=?",
                             (visible_at, subscription, int(message_id), lease))
            return bool(cur.rowcount)

    def _nack(self, subscription: str, message_id: str, lease: str, visible_at: float) -> None:
        with self._tx() as db:
            row = db.execute("SELECT attempts FROM deliveries WHERE subscription=? AND message_id=? AND lease=?",
                             (subscription, int(message_id), lease)).fetchone()
            if row is None:
                return  # stale lease: the message was already redelivered elsewhere
            policy, dlt = self._policy(db, subscription)
            if row[0] >= policy.max_delivery_attempts and dlt:
                self._dead_letter(db, subscription, int(message_id), row[0], dlt)
            else:
                db.execute("UPDATE deliveries SET visible_at=?, lease=NULL WHERE subscription=? AND message_id=?",
                           (visible_at, subscription, int(message_id)))

    # ------------------------------------------------------------ streaming
    def subscribe(self, subscription: str, callback: Callable, *, max_messages: int = 1,
                  max_lease_s: float = 3600.0) -> "StreamingPull":
        with self._tx() as db:
            self._policy(db, subscription)  # fail fast on a missing subscription
        return StreamingPull(self, subscription, callback, max_messages, max_lease_s)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _filter_json(f: AttributeFilter | None) -> str | None:
    return None if f is None else json.dumps({"key": f.key, "values": list(f.values), "or_missing": f.or_missing})


def _load_filter(stored: str) -> AttributeFilter:
    raw = json.loads(stored)
    return AttributeFilter(raw["key"], tuple(raw["values"]), raw["or_missing"])


def _expression(stored: str | None) -> str:
    return "(none)" if stored is None else _load_filter(stored).expression()


@dataclass
class LocalMessage:
    bus: SqliteBus
    subscription: str
    lease: str
    data: bytes
    attributes: dict[str, str]
    message_id: str
    delivery_attempt: int
    publish_time: float
    _policy: SubscriptionPolicy
    settled: bool = field(default=False)

    def ack(self) -> None:
        self.settled = True
        self.bus._settle(self.subscription, self.message_id, self.lease, visible_at=None)

    def nack(self, delay_s: float | None = None) -> None:
        if delay_s is None:
            p = self._policy
            delay_s = min(p.max_backoff_s, p.min_backoff_s * 2 ** (self.delivery_attempt - 1))
        self.settled = True
        self.bus._nack(self.subscription, self.message_id, self.lease, time.time() + delay_s)

    def extend(self, seconds: float) -> None:
        if not self.settled:
            self.bus._settle(self.subscription, self.message_id, self.lease, visible_at=time.time() + seconds)


class StreamingPull:
    """Pulls on a background thread, runs the callback on up to `max_messages` worker threads, and
    keeps extending the leases of messages whose callback is still running (up to max_lease_s) —
    the same contract as google-cloud-pubsub's streaming pull with flow control."""

    def __init__(self, bus: SqliteBus, subscription: str, callback, max_messages: int, max_lease_s: float):
        self._bus, self._sub, self._callback = bus, subscription, callback
        self._max, self._max_lease_s = max_messages, max_lease_s
        self._stop = threading.Event()
        self._inflight: dict[str, tuple[LocalMessage, float]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_messages, thread_name_prefix=f"sub-{subscription}")
        self._thread = threading.Thread(target=self._run, name=f"pull-{subscription}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last_extend = 0.0
        while not self._stop.is_set():
            try:
                with self._lock:
                    free = self._max - len(self._inflight)
                got = self._bus._lease(self._sub, free) if free > 0 else []
                for msg in got:
                    with self._lock:
                        self._inflight[msg.message_id] = (msg, time.monotonic())
                    self._pool.submit(self._deliver, msg)
                if time.monotonic() - last_extend > 1.0:
                    self._extend_leases()
                    last_extend = time.monotonic()
                if not got:
                    self._stop.wait(self._bus.poll_interval_s * (1 + random.random()))
            except sqlite3.OperationalError as exc:  # a locked database under heavy load: try again
                log.warning("bus pull on %s failed, retrying: %s", self._sub, exc)
                self._stop.wait(0.5)

    def _extend_leases(self) -> None:
        with self._lock:
            inflight = list(self._inflight.values())
        for msg, started in inflight:
            if time.monotonic() - started < self._max_lease_s:
                msg.extend(msg._policy.ack_deadline_s)

    def _deliver(self, msg: LocalMessage) -> None:
        try:
            self._callback(msg)
        except Exception:  # the callback owns error handling; an escape is a bug, so redeliver
            log.exception("callback for %s raised; nacking", self._sub)
            if not msg.settled:
                msg.nack()
        finally:
            with self._lock:
                self._inflight.pop(msg.message_id, None)

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self._pool.shutdown(wait=True)

    def wait(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
