"""The registry as a 2nd-gen Cloud Function (functions-framework CloudEvent handler on the
`evaluations` topic), and as a local pull subscriber with the same handler.

Deploy: `gcloud functions deploy registry --gen2 --entry-point on_evaluation --trigger-topic evaluations`.
"""
from __future__ import annotations

import base64
import binascii
import functools
import json

import functions_framework

from shared import events as ev
from shared.config import Settings, bootstrap
from shared.logs import configure_logging
from shared.main import serve
from shared.runtime import dead_letter, handle_message

from services.registry_fn.registry import SERVICE


class PushedMessage:
    """A Pub/Sub message delivered inside a CloudEvent: acking is returning normally; a nack raises
    so that Eventarc redelivers with its retry policy."""

    def __init__(self, message: dict):
        self.data = base64.b64decode(message.get("data", ""))
        self.attributes = message.get("attributes") or {}
        self.message_id = message.get("messageId") or message.get("message_id", "")
        self.delivery_attempt = int(message.get("deliveryAttempt") or 1)

    @classmethod
    def from_cloud_event(cls, data) -> "PushedMessage":
        """The Pub/Sub message inside a `messagePublished` CloudEvent, or MalformedMessage."""
        message = data.get("message") if isinstance(data, dict) else None
        if not isinstance(message, dict):
            raise ev.MalformedMessage("CloudEvent data has no Pub/Sub 'message' object")
        attributes = message.get("attributes") or {}
        if not isinstance(attributes, dict) or not all(isinstance(v, str) for v in attributes.values()):
            raise ev.MalformedMessage("Pub/Sub message attributes must be a map of strings")
        try:
            base64.b64decode(message.get("data", ""), validate=True)
            return cls(message)
        except (binascii.Error, TypeError, ValueError) as exc:
            raise ev.MalformedMessage(f"Pub/Sub message data is not valid base64 (or a field is invalid): {exc}") from exc

    def ack(self) -> None:
        pass

    def nack(self, delay_s: float | None = None) -> None:
        raise RuntimeError("handler asked for redelivery")

    def extend(self, seconds: float) -> None:
        pass


class _Undecodable:
    """A push delivery that is not a usable Pub/Sub message: kept whole for the dead-letter topic."""

    def __init__(self, data):
        raw = data if isinstance(data, (bytes, str)) else json.dumps(data, default=str)
        self.data = raw.encode() if isinstance(raw, str) else raw
        message = data.get("message") if isinstance(data, dict) else None
        attributes = message.get("attributes") if isinstance(message, dict) else None
        self.attributes = ({k: v for k, v in attributes.items() if isinstance(v, str)}
                           if isinstance(attributes, dict) else {})


@functools.cache
def _adapters():
    settings = Settings.from_env()
    configure_logging(settings.log_format, settings.log_level)
    return bootstrap(settings)


@functions_framework.cloud_event
def on_evaluation(cloud_event) -> None:
    adapters = _adapters()
    try:
        msg = PushedMessage.from_cloud_event(cloud_event.data)
    except ev.MalformedMessage as exc:
        # Redelivering it would fail the same way: dead-letter it with the reason and return (acked).
        dead_letter(adapters, ev.EVALUATIONS, ev.subscription_name(SERVICE.name, ev.EVALUATIONS),
                    _Undecodable(cloud_event.data), f"malformed: {exc}")
        return
    handle_message(SERVICE, adapters, ev.EVALUATIONS, msg)


if __name__ == "__main__":
    serve(SERVICE)
