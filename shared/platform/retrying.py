"""Retries of transient ObjectStore / DocStore failures (ports.TransientError), wrapped around the
adapters once in bootstrap. The Google clients retry their own transient errors; this is the same
for anything an adapter (or the fault injector, shared/platform/faults.py) reports as transient. What still
fails after `deadline_s` reaches the handler: the runtime redelivers the message, and dead-letters
it after the subscription's last attempt with the error as the reason."""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, TypeVar, cast

from google.api_core.retry import exponential_sleep_generator, if_exception_type, retry_target

from shared.platform.ports import ObjectNotFound, TransientError

log = logging.getLogger("ftpipe.retry")
T = TypeVar("T")
Guard = Callable[..., Any]    # guard(call name, fn, *args, **kwargs) -> what fn returns

STORE_CALLS = frozenset({"write", "upload_file", "read", "download_file", "stat", "list", "delete"})
DOCS_CALLS = frozenset({"get", "set", "merge", "create", "delete", "transaction", "query"})


class Guarded:
    """`inner` with the calls named in `calls` passed through `guard(call, fn, *args, **kwargs)`;
    every other attribute is `inner`'s own."""

    def __init__(self, inner, calls: frozenset[str], guard: Guard):
        self._inner, self._calls, self._guard = inner, calls, guard

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name in self._calls:
            return functools.partial(self._guard, name, attr)
        return attr


def guarded(inner: T, calls: frozenset[str], guard: Guard) -> T:
    """`inner` behind a Guarded proxy, typed as what it stands in for (the proxy has every attribute
    of `inner`, through __getattr__)."""
    return cast(T, Guarded(inner, calls, guard))


def retrying(inner: T, calls: frozenset[str], what: str, deadline_s: float) -> T:
    def on_error(exc: Exception) -> None:
        log.warning("%s call failed, retrying: %s", what, exc)

    def guard(call: str, fn, *args, **kwargs):
        failed = []

        def attempt():
            try:
                return fn(*args, **kwargs)
            except TransientError as exc:
                failed.append(exc)
                raise
            except ObjectNotFound:
                # The failure may have been the reply's, after the delete was done (chaos: lost_reply).
                if call == "delete" and failed:
                    return None
                raise

        return retry_target(attempt, if_exception_type(TransientError),
                            exponential_sleep_generator(0.05, 2.0, 2.0), timeout=deadline_s, on_error=on_error,
                            exception_factory=_last_error)
    return guarded(inner, calls, guard)


def _last_error(errors: list[Exception], reason, timeout) -> tuple[Exception, None]:
    # The error itself, not api_core's RetryError around it: it becomes the dead letter's reason.
    return errors[-1], None
