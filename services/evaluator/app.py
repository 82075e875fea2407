"""The evaluator on Cloud Run: a Flask app that takes the `training` topic's Pub/Sub push
deliveries and runs the same handler as the local pull subscriber (main.py), through the same
runtime (ledger, retries, dead letters).

    gunicorn --bind :$PORT --workers 1 --threads 1 --timeout 0 'services.evaluator.app:create_app()'

One request at a time per instance (an evaluation fills the GPU; Cloud Run `--concurrency 1`), and
no gunicorn worker timeout: Cloud Run's request timeout bounds a request instead.

Answers: 204 acks (handled, a duplicate, a skipped event, or a malformed body, which is
dead-lettered because it would fail the same way again); 503 when the handler asks for a retry or
fails (Pub/Sub redelivers with the subscription's backoff, and dead-letters after its max delivery
attempts); 429 while another delivery of the same message is still being handled; 401 / 403 for a
push whose OIDC token is missing, invalid or someone else's (nothing is handled).

Long evaluations: Pub/Sub waits at most 600 s (the push subscription's ack deadline) for the answer,
then redelivers, possibly to another instance, while the first one is still working. The first
delivery holds a claim on the message (shared/platform/push.py) that it renews every third of
`ack_deadline_s` for up to the service's max lease; a redelivery that finds the claim live gets 429
and comes back after the retry backoff, one that finds it expired (the instance died) takes it over
and evaluates. When the evaluation ends the ledger records it, so the next redelivery is acked as a
duplicate; the late answer of the first request is ignored by Pub/Sub. So an evaluation runs once
however long it takes, provided the subscription's retries outlast it: with the maximum backoff of
600 s, `max_delivery_attempts` x 600 s must exceed the longest evaluation, or Pub/Sub dead-letters
the message while it still runs (its EvaluationCompleted is still published; `ftpipe dlq replay`
of that dead letter is acked as a duplicate).
"""
from __future__ import annotations

import logging
import uuid

from flask import Flask, request

from shared.domain import events as ev
from shared.platform.config import Adapters, Settings, bootstrap
from shared.platform.logs import configure_logging
from shared.platform.push import AuthError, Claim, OidcVerifier, PushedMessage, Undecodable
from shared.platform.runtime import KeepLeased, Service, dead_letter, handle_message, ledger_key

from services.evaluator.service import SERVICE

log = logging.getLogger("ftpipe.evaluator.push")


def create_app(adapters: Adapters | None = None, settings: Settings | None = None, verifier=None,
               service: Service = SERVICE) -> Flask:
    """The push app for `service` (one topic). Adapters default to those of `settings` (default:
    from the environment). The token check is `verifier` (a callable of the Authorization header
    that raises AuthError), else an OidcVerifier from the settings where `settings.verify_push`
    (the gcp profile, or FTPIPE_PUSH_AUTH), else none: locally the pull subscriber is the path."""
    settings = settings or (adapters.settings if adapters else Settings.from_env())
    if adapters is None:
        configure_logging(settings.log_format, settings.log_level)
        adapters = bootstrap(settings, service=service.name)
    if len(service.topics) != 1:
        raise ValueError(f"a push endpoint serves one topic; service {service.name!r} handles {list(service.topics)}")
    [topic] = service.topics
    subscription = ev.subscription_name(service.name, topic)
    if verifier is None and settings.verify_push:
        verifier = OidcVerifier(settings.push_audience, settings.push_service_account)

    app = Flask(__name__)

    @app.get("/healthz")
    def healthz():
        return {"service": service.name, "status": "ok"}

    @app.post("/pubsub/push")
    def push():
        if verifier is not None:
            try:
                verifier(request.headers.get("Authorization"))
            except AuthError as exc:
                log.warning("push refused (%d): %s", exc.status, exc.reason, extra={"service": service.name})
                return {"error": exc.reason}, exc.status
        body = request.get_json(silent=True)
        try:
            msg = PushedMessage.parse(body)
        except ev.MalformedMessage as exc:
            dead_letter(adapters, topic, subscription, Undecodable(body if body is not None else request.get_data()),
                        f"malformed: {exc}")
            log.error("malformed push dead-lettered: %s", exc, extra={"service": service.name})
            return "", 204
        claim = Claim(adapters.docs, ledger_key(subscription, msg.message_id), uuid.uuid4().hex,
                      settings.ack_deadline_s)
        if (left := claim.take()) is not None:
            return {"error": f"message {msg.message_id} is being handled by another delivery "
                             f"(its claim has {left:.0f}s left); retry later"}, 429
        msg.on_extend = claim.extend
        try:
            with KeepLeased(msg, settings.ack_deadline_s, service.max_lease_s):
                outcome = handle_message(service, adapters, topic, msg)
        finally:
            claim.release()
        if msg.nacked:
            return {"outcome": outcome}, 503
        return "", 204

    return app
