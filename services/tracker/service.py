"""The tracker service: every event of every topic into the lineage documents."""
from __future__ import annotations

from shared.domain import events as ev
from shared.platform.runtime import Context, Service
from shared.platform.topology import SERVICE_TOPICS

from services.tracker.lineage import record


def on_event(event: ev.Event, ctx: Context):
    record(ctx.docs, event)
    return []


SERVICE = Service(
    name="tracker",
    handlers={cls: on_event for topic in SERVICE_TOPICS["tracker"] for cls in ev.events_on(topic)},
    max_messages=4,
    skip_cancelled=False,
)
