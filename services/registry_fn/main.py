"""The registry as a 2nd-gen Cloud Function (functions-framework CloudEvent handler on the
`evaluations` topic), and as a local pull subscriber with the same handler.

Deploy: `gcloud functions deploy registry --gen2 --entry-point on_evaluation --trigger-topic evaluations`.
"""
from __future__ import annotations

import base64
import functools

import functions_framework

from shared import events as ev
from shared.config import Settings, bootstrap
from shared.logs import configure_logging
from shared.main import serve
from shared.runtime import handle_message

from services.registry_fn.registry import SERVICE


class PushedMessage:
    """A Pub/Sub message delivered inside a CloudEvent: acking is returning normally; a nack raises
    so that Eventarc redelivers with its retry policy."""

    def __init__(self, message: dict):
        self.data = base64.b64decode(message.get("data", ""))
        self.attributes = message.get("attributes") or {}
        self.message_id = message.get("messageId") or message.get("message_id", "")
        self.delivery_attempt = int(message.get("deliveryAttempt") or 1)

    def ack(self) -> None:
        pass

    def nack(self, delay_s: float | None = None) -> None:
        raise RuntimeError("handler asked for redelivery")

    def extend(self, seconds: float) -> None:
        pass


@functools.cache
def _adapters():
    settings = Settings.from_env()
    configure_logging(settings.log_format, settings.log_level)
    return bootstrap(settings)


@functions_framework.cloud_event
def on_evaluation(cloud_event) -> None:
    handle_message(SERVICE, _adapters(), ev.EVALUATIONS, PushedMessage(cloud_event.data["message"]))


if __name__ == "__main__":
    serve(SERVICE)
