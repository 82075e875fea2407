"""The tracker service: every event of every topic into the lineage documents."""
from __future__ import annotations

from shared import events as ev
from shared.runtime import Context, Service
from shared.topology import SERVICE_TOPICS

from services.tracker.lineage import record


def on_event(event: ev.Event, ctx: Context):
    record(ctx.docs, event)
    return []


SERVICE = Service(
    name="tracker",
    handlers={topic: {kind: on_event for kind, cls in ev.EVENT_TYPES.items() if cls.topic == topic}
              for topic in SERVICE_TOPICS["tracker"]},
    max_messages=4,
    skip_cancelled=False,
)
