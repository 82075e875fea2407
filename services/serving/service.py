"""The serving process's subscriber on the `models` topic: the registry's changes reach the server
without a restart.

- any change to a model: its cached documents are dropped, so the next request reads the registry;
- ModelPromoted to production: the version is loaded now, before its first request;
- ModelQuarantined / ModelArchived: the version leaves memory and local disk, and requests for it
  are refused from then on (a generation already running finishes).

A version this server cannot serve (another base model, not a LoRA adapter) is logged and skipped:
retrying would not change that.
"""
from __future__ import annotations

import logging

from shared.domain import events as ev
from shared.platform.runtime import Context, Service

from services.serving.engine import Engine
from services.serving.routing import Router, ServingError

SERVICE_NAME = "serving"
_log = logging.getLogger("ftpipe.serving")


def on_model_event(event: ev.Event, router: Router, engine: Engine) -> str:
    """Apply one `models` event; returns what was done (for logs and tests)."""
    router.view.invalidate(event.model_name)
    label = f"{event.model_name}@{event.version}"
    if isinstance(event, (ev.ModelQuarantined, ev.ModelArchived)):
        return f"dropped {label}" if engine.drop(event.model_name, event.version) else "nothing loaded"
    if isinstance(event, ev.ModelPromoted) and event.alias == "production":
        try:
            target = router.version(event.model_name, event.version)
            loaded = engine.preload(target)
        except ServingError as exc:
            _log.warning("promoted version not loaded: %s", exc, extra={"model": label})
            return "not servable here"
        return f"loaded {label}" if loaded else "loaded already"
    return "refreshed"


def make_service(router: Router, engine: Engine) -> Service:
    def handle(event: ev.Event, ctx: Context):
        outcome = on_model_event(event, router, engine)
        ctx.log.info("models event: %s", outcome)
        return []

    # The registry's events belong to runs; a cancelled run's promotion still changes what serves.
    return Service(name=SERVICE_NAME, handlers=dict.fromkeys(ev.events_on(ev.MODELS), handle), skip_cancelled=False)
