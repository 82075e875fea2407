"""The registry as 2nd-gen Cloud Functions — `on_evaluation`, a CloudEvent handler on the
`evaluations` topic, and `approve`, the authenticated HTTP approval step — and, locally, one
process that pulls `evaluations` with the same handler and serves the approval endpoint at /approve
on its port (a free one, advertised in <state>/services/registry.json).

Deploy: `gcloud functions deploy registry --gen2 --entry-point on_evaluation --trigger-topic evaluations`
and `gcloud functions deploy registry-approve --gen2 --entry-point approve --trigger-http --no-allow-unauthenticated`
(FTPIPE_APPROVAL_AUDIENCE: its URL; FTPIPE_ADMINS: the break-glass admins; who may approve is
the callers' roles, shared/domain/access.py).
"""
from __future__ import annotations

import functools

import functions_framework

from shared.domain import events as ev
from shared.platform.auth import authenticator
from shared.platform.config import Settings, bootstrap
from shared.platform.logs import configure_logging
from shared.platform.main import serve
from shared.platform.push import PushedMessage, Undecodable
from shared.platform.runtime import dead_letter, handle_message

from services.registry_fn.approval import create_app, respond
from services.registry_fn.service import SERVICE


@functools.cache
def _adapters():
    settings = Settings.from_env()
    configure_logging(settings.log_format, settings.log_level)
    return bootstrap(settings, service=SERVICE.name)


@functools.cache
def _authenticator():
    settings = _adapters().settings
    return authenticator(settings, _adapters().docs, audience=settings.approval_audience)


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


@functions_framework.http
def approve(request):
    adapters = _adapters()
    return respond(adapters.docs, adapters.bus, _authenticator(), request, adapters.settings.admins)


def approval_app(adapters):
    """Locally the registry process serves the approval step itself; in the cloud it is its own
    function (above), and the process serves /healthz alone."""
    settings = adapters.settings
    if settings.in_cloud:
        return None
    return create_app(adapters.docs, adapters.bus,
                      authenticator(settings, adapters.docs, audience=settings.approval_audience), settings.admins)


if __name__ == "__main__":
    serve(SERVICE, http_app=approval_app)
