"""The Bus port on Cloud Pub/Sub (google-cloud-pubsub), also used against the Pub/Sub emulator.

Clients follow the environment: with PUBSUB_EMULATOR_HOST set, google-cloud-pubsub talks to the
emulator over an insecure channel with anonymous credentials; `emulator_host=` does the same
explicitly without touching os.environ (tests). Topic and subscription names are short names
(`jobs`, `trainer.jobs`) resolved in `project_id`; Pub/Sub requires 3-255 characters of
[A-Za-z0-9-_.~+%], starting with a letter.

Dead-lettering. Cloud Pub/Sub and the official emulator (0.8.20, checked by
tests/contract/test_google_adapters_smoke.py) both honour a subscription's dead-letter policy and
fill `delivery_attempt`; but the server only accepts max_delivery_attempts in 5..100, and marks
what it dead-letters with its own attributes (CloudPubSubDeadLetterSource*). To keep the contract
of the SQLite bus — any max_delivery_attempts N >= 1; the Nth nack dead-letters at once; the copy
carries the original attributes plus `dead_letter_reason` and `dead_letter_source` — the adapter
also dead-letters itself. N is stored on the subscription (label `ftpipe-max-delivery-attempts`)
and the server-side policy gets clamp(N, 5, 100) attempts. Then:
- a nack (with or without delay) of delivery attempt >= N publishes a copy to the dead-letter
  topic and acks the original (the callback raising counts as a nack);
- a delivery whose attempt is > N (possible when N < 5 and the deadlines lapsed) never reaches
  the callback: it is dead-lettered the same way;
- an Nth attempt whose ack deadline lapses (N >= 5) is dead-lettered by the server, with the
  server's attributes (CloudPubSubDeadLetterSourceSubscription, ...DeliveryCount) instead.
A consumer that cannot read the subscription (no pubsub.subscriptions.get) leaves it all to the
server policy.

Filters. A subscription's AttributeFilter becomes its Pub/Sub `filter` expression, and Pub/Sub
acknowledges the messages that do not match without delivering them. The emulator of the SDK
installed here (528) stores a filter but delivers every message anyway (filtering came to the
emulator in SDK 555), so the adapter applies the filter too: a delivery the subscription's filter
does not match is acknowledged and never handed out — what Pub/Sub itself does, and a no-op there.

`delivery_attempt` is only filled by Pub/Sub on subscriptions with a dead-letter policy. Without
one, the adapter counts deliveries per message id in-process: exact for a single consumer process,
an undercount when several processes share the subscription.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.subscriber.scheduler import ThreadScheduler
from google.protobuf import duration_pb2, field_mask_pb2

from shared.platform.ports import AttributeFilter, Message, SubscriptionPolicy

log = logging.getLogger("ftpipe.bus.pubsub")

MAX_ATTEMPTS_LABEL = "ftpipe-max-delivery-attempts"
SERVER_MIN_DELIVERY_ATTEMPTS = 5     # Pub/Sub rejects dead-letter policies outside 5..100
SERVER_MAX_DELIVERY_ATTEMPTS = 100
MAX_ACK_DEADLINE_S = 600             # modify_ack_deadline / ack_deadline_seconds upper bound
_SUB_INFO_TTL_S = 60.0


def _duration(seconds: float) -> duration_pb2.Duration:
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=int(round((seconds - whole) * 1e9)))


def _deadline_s(seconds: float) -> int:
    """Pub/Sub ack deadlines are whole seconds in 0..600; round a fractional request up."""
    return max(0, min(MAX_ACK_DEADLINE_S, int(math.ceil(seconds))))


@dataclass(frozen=True)
class _SubInfo:
    path: str
    max_attempts: int | None        # the ftpipe limit (label), None = leave it to the server
    dead_letter_topic: str | None   # full path
    fetched_at: float
    filter: AttributeFilter | None = None


class _AttemptCounter:
    """Fallback delivery counter for subscriptions without a dead-letter policy (bounded LRU)."""

    def __init__(self, size: int = 50_000):
        self._size = size
        self._counts: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._lock = threading.Lock()

    def next(self, subscription: str, message_id: str) -> int:
        key = (subscription, message_id)
        with self._lock:
            count = self._counts.pop(key, 0) + 1
            self._counts[key] = count
            while len(self._counts) > self._size:
                self._counts.popitem(last=False)
            return count

    def forget(self, subscription: str, message_id: str) -> None:
        with self._lock:
            self._counts.pop((subscription, message_id), None)


class PubSubMessage:
    """One delivery (port `Message`), from a streaming pull (`raw` is the library's Message) or a
    synchronous pull (settled with unary RPCs on the subscription)."""

    def __init__(self, bus: "PubSubBus", subscription: str, *, data: bytes, attributes: Mapping[str, str],
                 message_id: str, delivery_attempt: int, publish_time: float, ack_id: str,
                 raw: Any | None = None, info: "_SubInfo | None" = None):
        self._bus = bus
        self._info = info
        self.subscription = subscription
        self.data = data
        self.attributes = dict(attributes)
        self.message_id = message_id
        self.delivery_attempt = delivery_attempt
        self.publish_time = publish_time
        self.ack_id = ack_id
        self._raw = raw
        self.settled = False

    def __repr__(self) -> str:
        return f"PubSubMessage({self.subscription}, id={self.message_id}, attempt={self.delivery_attempt})"

    def ack(self) -> None:
        if self.settled:
            return
        self.settled = True
        self._bus._attempts.forget(self.subscription, self.message_id)
        if self._raw is not None:
            self._raw.ack()
        else:
            self._bus._subscriber.acknowledge(
                request={"subscription": self._bus._sub_path(self.subscription), "ack_ids": [self.ack_id]})

    def nack(self, delay_s: float | None = None) -> None:
        """Redeliver later. Without a delay: a plain nack, and the subscription's retry policy
        (exponential backoff between min_backoff_s and max_backoff_s) spaces the redeliveries.

        With a delay: Pub/Sub has no per-message "redeliver in N seconds"; a nack (ack deadline 0)
        only gets the subscription-wide backoff. Setting this delivery's ack deadline to `delay_s`
        and letting it lapse gives the per-message delay, and a lapsed deadline counts as a failed
        delivery attempt exactly like a nack, so dead-lettering still counts it. Capped at 600 s
        (the largest ack deadline Pub/Sub accepts). On a streaming pull the message is also
        dropped from the library's lease management, or the leaser would keep extending it.

        The nack of the last allowed attempt dead-letters the message instead (module docstring)."""
        if self.settled:
            return
        if self._bus._dead_letter_on_nack(self):
            return
        self._nack(delay_s)

    def _nack(self, delay_s: float | None) -> None:
        self.settled = True
        seconds = 0 if delay_s is None else _deadline_s(delay_s)
        if self._raw is not None:
            if seconds == 0:
                self._raw.nack()
            else:
                self._raw.drop()                          # stop the automatic lease extension
                self._raw.modify_ack_deadline(seconds)    # ... and let the deadline lapse in `seconds`
        else:
            self._bus._subscriber.modify_ack_deadline(
                request={"subscription": self._bus._sub_path(self.subscription), "ack_ids": [self.ack_id],
                         "ack_deadline_seconds": seconds})

    def extend(self, seconds: float) -> None:
        """Push this delivery's ack deadline to `seconds` from now (at most 600). On a streaming
        pull the library already extends leases while the callback runs (up to max_lease_s)."""
        if self.settled:
            return
        seconds = _deadline_s(seconds)
        if self._raw is not None:
            self._raw.modify_ack_deadline(seconds)
        else:
            self._bus._subscriber.modify_ack_deadline(
                request={"subscription": self._bus._sub_path(self.subscription), "ack_ids": [self.ack_id],
                         "ack_deadline_seconds": seconds})


class PubSubSubscription:
    """A running streaming pull (port `Subscription`)."""

    def __init__(self, bus: "PubSubBus", subscription: str, future, executor: ThreadPoolExecutor):
        self._bus, self.subscription, self._future, self._executor = bus, subscription, future, executor

    def stop(self, timeout: float | None = None) -> None:
        """Stop pulling; waits (up to `timeout`) for running callbacks to finish. Messages received
        but not yet handed to a callback are nacked by the library."""
        self._future.cancel()
        try:
            self._future.result(timeout=timeout)
        except FutureTimeout:
            log.warning("subscription %s did not stop within %ss", self.subscription, timeout)
        except Exception:  # the stream's own failure, already logged by the library
            pass
        self._bus._forget_subscription(self)

    def wait(self, timeout: float | None = None) -> None:
        """Block until the stream stops (stop() or a fatal error, which is raised) or `timeout`."""
        try:
            self._future.result(timeout=timeout)
        except FutureTimeout:
            return
        except gexc.Cancelled:
            return


class PubSubBus:
    def __init__(self, project_id: str, *, emulator_host: str | None = None,
                 publisher: pubsub_v1.PublisherClient | None = None,
                 subscriber: pubsub_v1.SubscriberClient | None = None,
                 publish_timeout_s: float = 60.0):
        self.project_id = project_id
        self.publish_timeout_s = publish_timeout_s
        self.emulator_host = emulator_host or os.environ.get("PUBSUB_EMULATOR_HOST")
        if emulator_host:
            publisher = publisher or _emulator_publisher(emulator_host)
            subscriber = subscriber or _emulator_subscriber(emulator_host)
        self._publisher = publisher or pubsub_v1.PublisherClient()
        self._subscriber = subscriber or pubsub_v1.SubscriberClient()
        self._attempts = _AttemptCounter()
        self._sub_info: dict[str, _SubInfo] = {}
        self._lock = threading.Lock()
        self._running: list[PubSubSubscription] = []
        self._closed = False

    # ------------------------------------------------------------ names
    def _topic_path(self, topic: str) -> str:
        return topic if topic.startswith("projects/") else self._publisher.topic_path(self.project_id, topic)

    def _sub_path(self, subscription: str) -> str:
        if subscription.startswith("projects/"):
            return subscription
        return self._subscriber.subscription_path(self.project_id, subscription)

    # ------------------------------------------------------------ admin
    def create_topic(self, topic: str) -> None:
        try:
            self._publisher.create_topic(request={"name": self._topic_path(topic)})
        except gexc.AlreadyExists:
            pass

    def create_subscription(self, subscription: str, topic: str, policy: SubscriptionPolicy,
                            dead_letter_topic: str | None = None, filter: AttributeFilter | None = None) -> None:
        """Create (or bring up to date) a pull subscription. Idempotent. The topic and the
        dead-letter topic are created when missing. On Cloud Pub/Sub the dead-letter topic also
        needs the Pub/Sub service agent to be allowed to publish to it and subscribe to the source
        (Terraform grants that); the emulator has no IAM. Pub/Sub cannot change a subscription's
        filter, so an existing one with another filter is an error."""
        self.create_topic(topic)
        if dead_letter_topic:
            self.create_topic(dead_letter_topic)
        sub = self._subscription_resource(subscription, topic, policy, dead_letter_topic)
        expression = filter.expression() if filter else ""
        try:
            self._subscriber.create_subscription(request={**sub, "filter": expression})
        except gexc.AlreadyExists:
            existing = self._subscriber.get_subscription(request={"subscription": sub["name"]})
            if existing.topic != sub["topic"]:
                raise ValueError(f"subscription {subscription!r} already exists on topic "
                                 f"{existing.topic!r}, not {sub['topic']!r}") from None
            if existing.filter != expression:
                raise ValueError(f"subscription {subscription!r} already exists with filter {existing.filter or '(none)'!r}, "
                                 f"not {expression or '(none)'!r}; Pub/Sub cannot change a filter: delete it "
                                 f"(gcloud pubsub subscriptions delete {subscription}; its undelivered messages go "
                                 "with it) and create it again") from None
            self._update_subscription(sub)
        with self._lock:
            self._sub_info.pop(subscription, None)

    def _subscription_resource(self, subscription: str, topic: str, policy: SubscriptionPolicy,
                               dead_letter_topic: str | None) -> dict:
        ack_deadline = min(MAX_ACK_DEADLINE_S, max(1, int(policy.ack_deadline_s)))
        if not self.emulator_host:
            ack_deadline = max(10, ack_deadline)  # Cloud Pub/Sub's minimum; the emulator takes less
        sub: dict[str, Any] = {
            "name": self._sub_path(subscription),
            "topic": self._topic_path(topic),
            "ack_deadline_seconds": ack_deadline,
            # Pub/Sub keeps unacked messages 10 minutes .. 7 days.
            "message_retention_duration": _duration(min(7 * 24 * 3600, max(600, int(policy.retention_s)))),
            "labels": {},
            "dead_letter_policy": None,
            "retry_policy": None,
        }
        if policy.min_backoff_s > 0 or policy.max_backoff_s > 0:
            lo = min(600.0, max(0.0, policy.min_backoff_s))
            sub["retry_policy"] = {"minimum_backoff": _duration(lo),
                                   "maximum_backoff": _duration(min(600.0, max(lo, policy.max_backoff_s)))}
        if dead_letter_topic:
            n = max(1, int(policy.max_delivery_attempts))
            sub["labels"] = {MAX_ATTEMPTS_LABEL: str(n)}
            server_max = min(SERVER_MAX_DELIVERY_ATTEMPTS, max(SERVER_MIN_DELIVERY_ATTEMPTS, n))
            sub["dead_letter_policy"] = {"dead_letter_topic": self._topic_path(dead_letter_topic),
                                         "max_delivery_attempts": server_max}
        return {k: v for k, v in sub.items() if v is not None}

    def _update_subscription(self, sub: dict) -> None:
        paths = ["ack_deadline_seconds", "message_retention_duration", "dead_letter_policy", "retry_policy", "labels"]
        body = dict(sub)
        # An absent policy in the mask clears it, which is what an unchanged-by-now policy means.
        for attempt_paths in (paths, [p for p in paths if p != "labels"]):
            try:
                self._subscriber.update_subscription(
                    request={"subscription": body, "update_mask": field_mask_pb2.FieldMask(paths=attempt_paths)})
                return
            except gexc.InvalidArgument as exc:
                # The emulator cannot update labels ("labels is not a known Subscription field").
                if "labels" in attempt_paths and "labels" in str(exc):
                    log.debug("subscription %s: labels not updatable here: %s", sub["name"], exc)
                    continue
                raise

    def _info(self, subscription: str) -> _SubInfo:
        with self._lock:
            info = self._sub_info.get(subscription)
        if info is not None and time.monotonic() - info.fetched_at < _SUB_INFO_TTL_S:
            return info
        path = self._sub_path(subscription)
        try:
            sub = self._subscriber.get_subscription(request={"subscription": path})
        except gexc.NotFound:
            raise KeyError(f"no subscription named {subscription!r} in project {self.project_id!r}") from None
        except gexc.PermissionDenied:
            # A consumer may hold roles/pubsub.subscriber only (no subscriptions.get): the
            # server-side dead-letter policy then does the dead-lettering on its own.
            log.warning("cannot read subscription %s; dead-lettering left to the server policy", path)
            info = _SubInfo(path, None, None, time.monotonic())
        else:
            dlt = sub.dead_letter_policy.dead_letter_topic or None
            label = sub.labels.get(MAX_ATTEMPTS_LABEL)
            info = _SubInfo(path, int(label) if (label and dlt) else None, dlt, time.monotonic(),
                            AttributeFilter.parse(sub.filter) if sub.filter else None)
        with self._lock:
            self._sub_info[subscription] = info
        return info

    # ------------------------------------------------------------ publish
    def publish(self, topic: str, data: bytes, attributes: Mapping[str, str]) -> str:
        attrs = {str(k): str(v) for k, v in (attributes or {}).items()}
        future = self._publisher.publish(self._topic_path(topic), bytes(data), **attrs)
        try:
            return future.result(timeout=self.publish_timeout_s)
        except gexc.NotFound:
            raise KeyError(f"no topic named {topic!r} in project {self.project_id!r}") from None

    # ------------------------------------------------------------ deliveries
    def _wrap(self, subscription: str, *, data: bytes, attributes: Mapping[str, str], message_id: str,
              delivery_attempt: int | None, publish_time, ack_id: str, raw=None,
              info: _SubInfo | None = None) -> PubSubMessage:
        if not delivery_attempt:  # no dead-letter policy: Pub/Sub leaves it empty
            delivery_attempt = self._attempts.next(subscription, message_id)
        ts = publish_time.timestamp() if publish_time is not None and hasattr(publish_time, "timestamp") else time.time()
        return PubSubMessage(self, subscription, data=bytes(data), attributes=dict(attributes),
                             message_id=message_id, delivery_attempt=int(delivery_attempt), publish_time=ts,
                             ack_id=ack_id, raw=raw, info=info)

    def _dead_letter(self, dead_letter_topic: str, msg: PubSubMessage, failed_attempts: int) -> None:
        """Publish a copy of `msg` to the subscription's dead-letter topic, then ack `msg`. If the
        copy cannot be published the message is nacked instead (the server policy remains)."""
        attributes = dict(msg.attributes)
        attributes.setdefault("dead_letter_reason", f"not acknowledged after {failed_attempts} delivery attempts")
        attributes.setdefault("dead_letter_source", msg.subscription)
        try:
            self._publisher.publish(dead_letter_topic, msg.data, **attributes).result(timeout=self.publish_timeout_s)
        except Exception:
            log.exception("could not dead-letter message %s from %s; nacking it", msg.message_id, msg.subscription)
            msg._nack(None)
            return
        msg.ack()
        log.warning("message %s on %s dead-lettered to %s after %d attempts", msg.message_id, msg.subscription,
                    dead_letter_topic.rsplit("/", 1)[-1], failed_attempts)

    def _filtered_out(self, info: _SubInfo, msg: PubSubMessage) -> bool:
        """A delivery the subscription's filter does not match (module docstring): ack it."""
        if info.filter is None or info.filter.matches(msg.attributes):
            return False
        msg.ack()
        return True

    def _dead_letter_if_exhausted(self, info: _SubInfo, msg: PubSubMessage) -> bool:
        """A delivery beyond the last allowed attempt: dead-letter it instead of handing it out."""
        if info.max_attempts is None or info.dead_letter_topic is None or msg.delivery_attempt <= info.max_attempts:
            return False
        self._dead_letter(info.dead_letter_topic, msg, msg.delivery_attempt - 1)
        return True

    def _dead_letter_on_nack(self, msg: PubSubMessage) -> bool:
        info = msg._info
        if info is None or info.max_attempts is None or info.dead_letter_topic is None:
            return False
        if msg.delivery_attempt < info.max_attempts:
            return False
        self._dead_letter(info.dead_letter_topic, msg, msg.delivery_attempt)
        return True

    def pull(self, subscription: str, max_messages: int = 10, timeout_s: float = 1.0) -> list[PubSubMessage]:
        """Synchronous pull: up to `max_messages`, waiting up to `timeout_s` for the first one."""
        info = self._info(subscription)
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            remaining = deadline - time.monotonic()
            try:
                resp = self._subscriber.pull(
                    request={"subscription": info.path, "max_messages": max_messages},
                    timeout=max(1.0, remaining))
                received = list(resp.received_messages)
            except (gexc.DeadlineExceeded, gexc.ServiceUnavailable):
                received = []
            except gexc.NotFound:
                raise KeyError(f"no subscription named {subscription!r}") from None
            out = []
            for rm in received:
                m = rm.message
                msg = self._wrap(subscription, data=m.data, attributes=m.attributes, message_id=m.message_id,
                                 delivery_attempt=rm.delivery_attempt, publish_time=m.publish_time, ack_id=rm.ack_id,
                                 info=info)
                if not self._filtered_out(info, msg) and not self._dead_letter_if_exhausted(info, msg):
                    out.append(msg)
            if out or time.monotonic() >= deadline:
                return out
            # The emulator (and Pub/Sub under low traffic) answers an empty pull at once.
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def subscribe(self, subscription: str, callback: Callable[[Message], None], *,
                  max_messages: int = 1, max_lease_s: float = 3600.0) -> PubSubSubscription:
        """Streaming pull. Flow control keeps at most `max_messages` outstanding; the library
        extends each lease while its callback runs, up to `max_lease_s` (after which the message is
        released and Pub/Sub redelivers it). A callback that raises gets its message nacked."""
        info = self._info(subscription)  # fails fast on a missing subscription

        def _on_message(raw) -> None:
            msg = self._wrap(subscription, data=raw.data, attributes=raw.attributes, message_id=raw.message_id,
                             delivery_attempt=raw.delivery_attempt, publish_time=raw.publish_time,
                             ack_id=raw.ack_id, raw=raw, info=info)
            if self._filtered_out(info, msg) or self._dead_letter_if_exhausted(info, msg):
                return
            try:
                callback(msg)
            except Exception:  # the callback owns error handling; an escape is a bug, so redeliver
                log.exception("callback for %s raised; nacking message %s", subscription, msg.message_id)
                if not msg.settled:
                    msg.nack()

        flow = pubsub_v1.types.FlowControl(max_messages=max(1, max_messages), max_lease_duration=max_lease_s)
        executor = ThreadPoolExecutor(max_workers=max(1, max_messages), thread_name_prefix=f"sub-{subscription}")
        future = self._subscriber.subscribe(info.path, _on_message, flow_control=flow,
                                            scheduler=ThreadScheduler(executor),
                                            await_callbacks_on_shutdown=True)
        sub = PubSubSubscription(self, subscription, future, executor)
        with self._lock:
            self._running.append(sub)
        return sub

    def _forget_subscription(self, sub: PubSubSubscription) -> None:
        with self._lock:
            if sub in self._running:
                self._running.remove(sub)

    # ------------------------------------------------------------ admin helpers (tests, `ftpipe dlq`)
    def delete_subscription(self, subscription: str) -> None:
        try:
            self._subscriber.delete_subscription(request={"subscription": self._sub_path(subscription)})
        except gexc.NotFound:
            pass

    def delete_topic(self, topic: str) -> None:
        try:
            self._publisher.delete_topic(request={"topic": self._topic_path(topic)})
        except gexc.NotFound:
            pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            running = list(self._running)
        for sub in running:
            sub.stop(timeout=10)
        try:
            self._publisher.stop()      # flushes pending batches
            self._publisher.transport.close()
        except Exception:
            pass
        try:
            self._subscriber.close()
        except Exception:
            pass


def _emulator_publisher(host: str) -> pubsub_v1.PublisherClient:
    import grpc
    from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

    return pubsub_v1.PublisherClient(transport=PublisherGrpcTransport(channel=grpc.insecure_channel(host)))


def _emulator_subscriber(host: str) -> pubsub_v1.SubscriberClient:
    import grpc
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

    return pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=grpc.insecure_channel(host)))
