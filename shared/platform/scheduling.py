"""Priority classes for workers that hold one long job at a time (the trainer).

Every event with a recipe carries the run's priority (`scheduling.priority`) in the `priority`
attribute (shared/domain/events.py). A prioritized service has one filtered subscription per class on each
of its topics (shared/platform/topology.py), so a worker with a free slot chooses the class before it takes
a message: it pulls only what it will work on, and nothing is nacked to wait — every redelivery
counts toward the dead-letter limit, so waiting by nack-and-redeliver would dead-letter a job that
waits long. A message without the attribute is batch.

The policy (`PriorityPicker`): try the classes from the highest down and take the first message
found. A class that was not tried because a class before it gave a message has been passed over;
after `starvation_limit` passes in a row it is tried first (when several are due, the one passed
over most often first, then the higher). A class that is tried — found empty, or taken from —
starts again at 0. So a lower class never starves behind a steady stream of higher work.
"""
from __future__ import annotations

import threading
from typing import Callable, Sequence, TypeVar

from shared.domain import events as ev
from shared.domain.recipe import PRIORITIES
from shared.platform.ports import AttributeFilter

CLASSES: tuple[str, ...] = tuple(reversed(PRIORITIES))   # highest first: production, interactive, batch
DEFAULT_CLASS = PRIORITIES[0]                           # batch: also what an unmarked message is

T = TypeVar("T")


def class_subscription(service: str, topic: str, priority: str) -> str:
    """`trainer.jobs` for batch (the default class keeps the service's plain name), `trainer.jobs.production`…"""
    base = ev.subscription_name(service, topic)
    return base if priority == DEFAULT_CLASS else f"{base}.{priority}"


def class_filter(priority: str) -> AttributeFilter:
    return AttributeFilter(ev.PRIORITY, (priority,), or_missing=priority == DEFAULT_CLASS)


class PriorityPicker:
    """Which class a free slot takes from next (module docstring). Thread-safe: the workers of one
    process share one picker."""

    def __init__(self, classes: Sequence[str] = CLASSES, starvation_limit: int = 3):
        if starvation_limit < 1:
            raise ValueError(f"starvation_limit must be at least 1, got {starvation_limit}")
        self.classes = tuple(classes)
        self.starvation_limit = starvation_limit
        self.passed_over = {c: 0 for c in self.classes}
        self._lock = threading.Lock()

    def order(self) -> list[str]:
        due = [c for c in self.classes if self.passed_over[c] >= self.starvation_limit]
        due.sort(key=lambda c: -self.passed_over[c])  # stable: ties keep priority order
        return due + [c for c in self.classes if c not in due]

    def take(self, pull: Callable[[str], T | None]) -> tuple[str, T] | None:
        """Try the classes in order with `pull(class)` (a message, or None when it has none);
        return the first class that gave one and what it gave, or None when all are empty."""
        with self._lock:
            tried = []
            taken = None
            for c in self.order():
                tried.append(c)
                if (item := pull(c)) is not None:
                    taken = (c, item)
                    break
            for c in self.classes:
                self.passed_over[c] = 0 if c in tried else self.passed_over[c] + 1
            return taken
