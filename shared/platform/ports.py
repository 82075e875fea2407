"""Ports: the three small interfaces every service depends on. Adapters live in shared/platform/adapters/
and are chosen once, from settings, in shared/platform/config.py."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

# ---------------------------------------------------------------- bus

class Message(Protocol):
    """One delivery of a message. `delivery_attempt` starts at 1 and grows with each redelivery.
    (Read-only to its consumers: properties, so an adapter may hold them in any form.)"""
    @property
    def data(self) -> bytes: ...
    @property
    def attributes(self) -> Mapping[str, str]: ...
    @property
    def message_id(self) -> str: ...
    @property
    def delivery_attempt(self) -> int: ...

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


_ATTRIBUTE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_EQUALS_TERM = re.compile(r'attributes\.(?P<key>[A-Za-z_][A-Za-z0-9_]*) = "(?P<value>[^"\\]*)"')
_MISSING_TERM = re.compile(r"NOT attributes:(?P<key>[A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True)
class AttributeFilter:
    """A subscription filter: deliver only the messages whose attribute `key` is one of `values`,
    or, with `or_missing`, that lack the attribute. It is the subset of Pub/Sub's filter language
    that ftpipe needs (`expression()`); the SQLite bus applies the same rule. A message a filter
    rejects never reaches that subscription (Pub/Sub acknowledges it itself). As on Pub/Sub, a
    subscription's filter is fixed when it is created."""
    key: str
    values: tuple[str, ...]
    or_missing: bool = False

    def __post_init__(self):
        if not _ATTRIBUTE_KEY.match(self.key):
            raise ValueError(f"filter attribute {self.key!r}: use letters, digits and '_', not starting with a digit")
        if not self.values and not self.or_missing:
            raise ValueError(f"filter on {self.key!r} matches nothing: give values or or_missing=True")
        for value in self.values:
            if '"' in value or "\\" in value:
                raise ValueError(f"filter value {value!r} on {self.key!r}: quotes and backslashes are not supported")

    def matches(self, attributes: Mapping[str, str]) -> bool:
        if self.key not in attributes:
            return self.or_missing
        return attributes[self.key] in self.values

    def expression(self) -> str:
        """In Pub/Sub's filter syntax, e.g. `attributes.priority = "batch" OR NOT attributes:priority`."""
        terms = [f'attributes.{self.key} = "{value}"' for value in self.values]
        if self.or_missing:
            terms.append(f"NOT attributes:{self.key}")
        return " OR ".join(terms)

    @classmethod
    def parse(cls, expression: str) -> "AttributeFilter | None":
        """The inverse of expression(); None for a filter outside that subset."""
        keys, values, or_missing = set(), [], False
        for term in expression.split(" OR "):
            if m := _EQUALS_TERM.fullmatch(term.strip()):
                keys.add(m["key"])
                values.append(m["value"])
            elif m := _MISSING_TERM.fullmatch(term.strip()):
                keys.add(m["key"])
                or_missing = True
            else:
                return None
        if len(keys) != 1:
            return None
        return cls(keys.pop(), tuple(values), or_missing)


class Bus(Protocol):
    def create_topic(self, topic: str) -> None: ...            # idempotent
    def create_subscription(self, subscription: str, topic: str, policy: SubscriptionPolicy,
                            dead_letter_topic: str | None = None,
                            filter: AttributeFilter | None = None) -> None: ...  # idempotent; filter fixed
    def publish(self, topic: str, data: bytes, attributes: Mapping[str, str]) -> str: ...
    def subscribe(self, subscription: str, callback: Callable[[Message], None], *,
                  max_messages: int = 1, max_lease_s: float = 3600.0) -> Subscription: ...
    def pull(self, subscription: str, max_messages: int = 10, timeout_s: float = 1.0) -> Sequence[Message]: ...
    def close(self) -> None: ...


# ---------------------------------------------------------------- object store

class PreconditionFailed(Exception):
    """A write/delete precondition (if_generation_match) did not hold."""


class ObjectNotFound(KeyError):
    pass


class InvalidObjectName(ValueError):
    pass


class TransientError(Exception):
    """A store or document-store call that failed for a reason that may pass (unavailable, timed
    out). Callers go through shared/platform/retrying.py, which retries these for a while before letting
    them reach the runtime (which then redelivers, and dead-letters after the last attempt)."""


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
