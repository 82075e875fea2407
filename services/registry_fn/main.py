"""The registry as a 2nd-gen Cloud Function (functions-framework CloudEvent handler on the
`evaluations` topic), and as a local pull subscriber with the same handler.

Deploy: `gcloud functions deploy registry --gen2 --entry-point on_evaluation --trigger-topic evaluations`.
"""
from __future__ import annotations

import functools

import functions_framework

from shared import events as ev
from shared.config import Settings, bootstrap
from shared.logs import configure_logging
from shared.main import serve
from shared.push import PushedMessage, Undecodable
from shared.runtime import dead_letter, handle_message

from services.registry_fn.registry import SERVICE


@functools.cache
def _adapters():
    settings = Settings.from_env()
    configure_logging(settings.log_format, settings.log_level)
    return bootstrap(settings)


@functions_framework.cloud_event
def on_evaluation(cloud_event) -> None:
    adapters = _adapters()
    try:
        msg = PushedMessage.parse(cloud_event.data)
    except ev.MalformedMessage as exc:
        # Redelivering it would fail the same way: dead-letter it with the reason and return (acked).
        dead_letter(adapters, ev.EVALUATIONS, ev.subscription_name(SERVICE.name, ev.EVALUATIONS),
                    Undecodable(cloud_event.data), f"malformed: {exc}")
        return
    handle_message(SERVICE, adapters, ev.EVALUATIONS, msg)
    if msg.nacked:  # an exception is the function's nack: Eventarc redelivers with its retry policy
        raise RuntimeError("handler asked for redelivery")


if __name__ == "__main__":
    serve(SERVICE)
