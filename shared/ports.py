"""Ports: the three small interfaces every service depends on. Adapters live in shared/adapters/
and are chosen once, from settings, in shared/config.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence


# ---------------------------------------------------------------- bus

class Message(Protocol):
    """One delivery of a message. `delivery_attempt` starts at 1 and grows with each redelivery."""
    data: bytes
    attributes: Mapping[str, str]
    message_id: str
    delivery_attempt: int

    def ack(self) -> None: ...
    def nack(self, delay_s: float | None = None) -> None: ...
    def extend(self, seconds: float) -> None: ...


class Subscription(Protocol):
    """A running streaming pull: messages flow to the callback on worker threads until stop()."""
    def stop(self, timeout: float | None = None) -> None: ...
    def wait(self, timeout: float | None = None) -> None: ...


@dataclass(frozen=True)
class SubscriptionPolicy:
    ack_deadline_s: int = 60
    max_delivery_attempts: int = 5           # then the message goes to the dead-letter topic
    min_backoff_s: float = 1.0               # nack backoff grows from min to max
    max_backoff_s: float = 60.0
    retention_s: int = 7 * 24 * 3600


class Bus(Protocol):
    def create_topic(self, topic: str) -> None: ...            # idempotent
    def create_subscription(self, subscription: str, topic: str, policy: SubscriptionPolicy,
                            dead_letter_topic: str | None = None) -> None: ...  # idempotent
    def publish(self, topic: str, data: bytes, attributes: Mapping[str, str]) -> str: ...
    def subscribe(self, subscription: str, callback: Callable[[Message], None], *,
                  max_messages: int = 1, max_lease_s: float = 3600.0) -> Subscription: ...
    def pull(self, subscription: str, max_messages: int = 10, timeout_s: float = 1.0) -> list[Message]: ...
    def close(self) -> None: ...


# ---------------------------------------------------------------- object store

class PreconditionFailed(Exception):
    """A write/delete precondition (if_generation_match) did not hold."""


class ObjectNotFound(KeyError):
    pass


class InvalidObjectName(ValueError):
    pass


@dataclass(frozen=True)
class ObjectInfo:
    bucket: str
    name: str
    generation: int
    size: int
    md5_hash: str = ""          # base64, as GCS reports it
    content_type: str = "application/octet-stream"
    updated: str = ""           # RFC 3339


class ObjectStore(Protocol):
    """Buckets of objects. if_generation_match=0 means "only if absent"."""
    def write(self, bucket: str, name: str, data: bytes, *, if_generation_match: int | None = None,
              content_type: str | None = None) -> ObjectInfo: ...
    def upload_file(self, bucket: str, name: str, path: str, *, if_generation_match: int | None = None,
                    content_type: str | None = None) -> ObjectInfo: ...
    def read(self, bucket: str, name: str) -> bytes: ...
    def download_file(self, bucket: str, name: str, path: str) -> ObjectInfo: ...
    def stat(self, bucket: str, name: str) -> ObjectInfo | None: ...
    def list(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]: ...
    def delete(self, bucket: str, name: str, *, if_generation_match: int | None = None) -> None: ...
    def url(self, bucket: str, name: str) -> str: ...          # gs://bucket/name or file:///…
    def parse_url(self, url: str) -> tuple[str, str]: ...     # inverse of url()


# ---------------------------------------------------------------- doc store

Where = tuple[str, str, Any]          # (field, op, value); op in == != < <= > >= in
OrderBy = tuple[str, str]             # (field, "asc" | "desc")


class Transaction(Protocol):
    def get(self, collection: str, doc_id: str) -> dict | None: ...
    def set(self, collection: str, doc_id: str, data: dict) -> None: ...
    def merge(self, collection: str, doc_id: str, data: dict) -> None: ...
    def delete(self, collection: str, doc_id: str) -> None: ...


class DocStore(Protocol):
    def get(self, collection: str, doc_id: str) -> dict | None: ...
    def set(self, collection: str, doc_id: str, data: dict) -> None: ...
    def merge(self, collection: str, doc_id: str, data: dict) -> None: ...   # deep-merges maps
    def create(self, collection: str, doc_id: str, data: dict) -> bool: ...  # False if it exists
    def delete(self, collection: str, doc_id: str) -> None: ...
    def transaction(self, fn: Callable[[Transaction], Any]) -> Any: ...     # retried on contention
    def query(self, collection: str, where: Sequence[Where] = (), order_by: Sequence[OrderBy] = (),
              limit: int | None = None) -> list[tuple[str, dict]]: ...
    def close(self) -> None: ...
