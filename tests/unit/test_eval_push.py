"""The evaluator's Cloud Run push endpoint (services/evaluator/app.py) on the real local adapters:
Pub/Sub push semantics (2xx acks, anything else is redelivered), dead letters, redelivery handled
once, a redelivery while the first delivery still runs, and the OIDC check of the push token
against a key of our own whose certificate a local HTTP server publishes as Google does.

The app runs a small handler of the test's own on the `training` topic: what is tested is the
transport, not an evaluation (tests/unit/test_evaluation.py)."""
import base64
import datetime
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from shared.domain import events as ev
from shared.domain.recipe import load_recipe
from shared.platform.config import Settings
from shared.platform.push import CLAIMS, Claim, OidcVerifier
from shared.platform.runtime import LEDGER, Retry, Service, ledger_key
from shared.platform.topology import dlq_subscription

from services.evaluator.app import create_app

RECIPE = load_recipe("tiny-sft")
SUBSCRIPTION = ev.subscription_name("evaluator", ev.TRAINING)
AUDIENCE = "https://evaluator-abc123-ew.a.run.app/pubsub/push"
PUSHER = "pubsub-push@acme-ml.iam.gserviceaccount.com"


class Handler:
    """The test's TrainingCompleted handler: records each call and does what `behave` says."""

    def __init__(self):
        self.calls: list[str] = []
        self.behave = lambda event, ctx: None

    def __call__(self, event, ctx):
        self.calls.append(event.run_id)
        return self.behave(event, ctx)


@pytest.fixture
def handler():
    return Handler()


@pytest.fixture
def client(adapters, handler):
    service = Service(name="evaluator", handlers={ev.TrainingCompleted: handler})
    return create_app(adapters, service=service).test_client()


def completed(run_id: str = "run-1") -> ev.TrainingCompleted:
    return ev.TrainingCompleted(run_id=run_id, recipe=RECIPE, dataset_uri="file:///d/", adapter_uri="file:///a/",
                                metrics={"train_loss": 1.0}, steps=3)


def push_body(event=None, *, message_id: str = "m-1", attempt: int | None = None) -> dict:
    data, attributes = ev.encode(event or completed())
    message = {"data": base64.b64encode(data).decode(), "attributes": attributes, "messageId": message_id,
               "publishTime": "2026-11-28T00:00:00Z"}
    body = {"message": message, "subscription": f"projects/acme-ml/subscriptions/{SUBSCRIPTION}"}
    if attempt is not None:  # beside the message, as Pub/Sub sends it on a subscription with a dead-letter policy
        body["deliveryAttempt"] = attempt
    return body


def dead_letters(adapters) -> list:
    return adapters.bus.pull(dlq_subscription(ev.TRAINING), max_messages=10, timeout_s=0.5)


def test_healthz(client):
    resp = client.get("/healthz")
    assert resp.status_code == 200
    assert resp.get_json() == {"service": "evaluator", "status": "ok"}


def test_a_handled_push_is_acked_recorded_and_its_outputs_published(client, adapters, handler):
    sub = "test.evaluations"
    adapters.bus.create_subscription(sub, ev.EVALUATIONS, Settings().subscription_policy())
    out = ev.EvaluationCompleted(run_id="run-1", recipe=RECIPE, dataset_uri="file:///d/", adapter_uri="file:///a/",
                                 scores={}, passed=False, reasons=["test"], report_uri="file:///r/")
    handler.behave = lambda event, ctx: [out]
    resp = client.post("/pubsub/push", json=push_body())
    assert resp.status_code == 204, resp.get_data(as_text=True)
    assert handler.calls == ["run-1"]
    assert adapters.docs.get(LEDGER, ledger_key("evaluator", completed().event_id)) is not None
    [msg] = adapters.bus.pull(sub, timeout_s=2)
    assert msg.attributes["type"] == "EvaluationCompleted" and msg.attributes["run_id"] == "run-1"
    assert adapters.docs.query(CLAIMS) == []  # the claim is released


def test_redelivery_is_handled_once(client, handler):
    assert client.post("/pubsub/push", json=push_body()).status_code == 204
    # Pub/Sub redelivers the same message (e.g. the first answer came too late) …
    assert client.post("/pubsub/push", json=push_body(attempt=2)).status_code == 204
    # … or the producer published the same event twice: same event_id, another messageId.
    assert client.post("/pubsub/push", json=push_body(message_id="m-2")).status_code == 204
    assert handler.calls == ["run-1"]


def test_a_failing_handler_is_nacked_and_the_redelivery_succeeds(client, adapters, handler):
    def fail_once(event, ctx):
        if len(handler.calls) == 1:
            raise RuntimeError("GPU fell off the bus")
    handler.behave = fail_once
    assert client.post("/pubsub/push", json=push_body(attempt=1)).status_code == 503
    assert client.post("/pubsub/push", json=push_body(attempt=2)).status_code == 204
    assert handler.calls == ["run-1", "run-1"]
    assert dead_letters(adapters) == []


def test_a_retry_is_nacked(client, handler):
    def retry(event, ctx):
        raise Retry("run leased elsewhere")
    handler.behave = retry
    resp = client.post("/pubsub/push", json=push_body())
    assert resp.status_code == 503 and resp.get_json() == {"outcome": "nacked"}


def test_a_failure_on_the_last_attempt_is_dead_lettered_and_acked(client, adapters, handler):
    def fail(event, ctx):
        raise RuntimeError("always broken")
    handler.behave = fail
    assert client.post("/pubsub/push", json=push_body(attempt=adapters.settings.max_delivery_attempts)).status_code == 204
    [msg] = dead_letters(adapters)
    assert "always broken" in msg.attributes["dead_letter_reason"]
    assert msg.attributes["dead_letter_source"] == SUBSCRIPTION


def _body(message: dict) -> dict:
    return {"message": message, "subscription": "s"}


ATTRS = {"type": "TrainingCompleted", "schema_version": "1"}


@pytest.mark.parametrize("payload, reason", [
    (b"{not json", "no Pub/Sub 'message' object"),
    (json.dumps({"not": "a push"}).encode(), "no Pub/Sub 'message' object"),
    (json.dumps(_body({"data": "%%% not base64 %%%", "attributes": ATTRS, "messageId": "m"})).encode(), "base64"),
    (json.dumps(_body({"data": "", "attributes": ATTRS})).encode(), "no messageId"),
    (json.dumps(_body({"data": "", "attributes": ["a"], "messageId": "m"})).encode(), "attributes"),
    (json.dumps(_body({"data": base64.b64encode(b"{}").decode(), "messageId": "m",
                       "attributes": {"type": "Nope", "schema_version": "1"}})).encode(), "unknown message type 'Nope'"),
])
def test_a_malformed_push_is_dead_lettered_and_acked(client, adapters, handler, payload, reason):
    resp = client.post("/pubsub/push", data=payload, headers={"Content-Type": "application/json"})
    assert resp.status_code == 204, resp.get_data(as_text=True)
    [msg] = dead_letters(adapters)
    assert reason in msg.attributes["dead_letter_reason"]
    assert msg.attributes["dead_letter_source"] == SUBSCRIPTION
    assert handler.calls == []


def test_a_redelivery_while_the_first_delivery_runs_is_refused(client, adapters, handler):
    """Pub/Sub redelivers a push unanswered after the ack deadline while the evaluation still runs:
    the redelivery finds the first one's claim and is nacked (429), not evaluated a second time."""
    statuses = []
    handler.behave = lambda event, ctx: statuses.append(
        client.post("/pubsub/push", json=push_body(attempt=2)).status_code)
    assert client.post("/pubsub/push", json=push_body()).status_code == 204
    assert statuses == [429]
    assert handler.calls == ["run-1"]
    assert client.post("/pubsub/push", json=push_body(attempt=3)).status_code == 204  # then a duplicate
    assert handler.calls == ["run-1"]


def test_the_claim_of_a_dead_delivery_expires_and_a_redelivery_takes_over(client, adapters, handler):
    key = ledger_key(SUBSCRIPTION, "m-1")
    assert Claim(adapters.docs, key, "instance-that-died", ttl_s=30).take() is None
    assert client.post("/pubsub/push", json=push_body(attempt=2)).status_code == 429
    Claim(adapters.docs, key, "instance-that-died", ttl_s=30).extend(0.01)  # as if 30 s had passed
    time.sleep(0.05)
    assert client.post("/pubsub/push", json=push_body(attempt=3)).status_code == 204
    assert handler.calls == ["run-1"]


def test_a_long_handler_keeps_its_claim_alive(adapters, handler):
    """The claim lasts ack_deadline_s and is renewed every third of it while the handler runs."""
    settings = Settings(state_dir=adapters.settings.state_dir, ack_deadline_s=10)
    service = Service(name="evaluator", handlers={ev.TrainingCompleted: handler})
    app = create_app(adapters, settings, service=service).test_client()
    seen = []

    def slow(event, ctx):
        first = adapters.docs.query(CLAIMS)[0][1]["expires_at"]
        time.sleep(4)  # one renewal at 10/3 s
        seen.append(adapters.docs.query(CLAIMS)[0][1]["expires_at"] - first)
    handler.behave = slow
    assert app.post("/pubsub/push", json=push_body()).status_code == 204
    assert seen and seen[0] >= 3


# ------------------------------------------------------------------ OIDC

@pytest.fixture(scope="module")
def google_keys():
    """Our own RS256 key, its certificate served as Google serves its certs (a {kid: PEM} map), and
    a second key whose signatures nobody publishes."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID
    from google.auth import crypt

    def key_and_cert():
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-signer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        return crypt.RSASigner.from_string(pem, key_id="kid-1"), cert.public_bytes(serialization.Encoding.PEM).decode()

    signer, cert = key_and_cert()
    impostor, _ = key_and_cert()
    certs = json.dumps({"kid-1": cert}).encode()

    class Certs(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(certs)))
            self.end_headers()
            self.wfile.write(certs)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Certs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield signer, impostor, f"http://127.0.0.1:{server.server_address[1]}/oauth2/v1/certs"
    server.shutdown()


def token(signer, **claims) -> str:
    from google.auth import jwt

    now = int(time.time())
    payload = {"iss": "https://accounts.google.com", "aud": AUDIENCE, "iat": now - 10, "exp": now + 3600,
               "sub": "1234567890", "email": PUSHER, "email_verified": True, **claims}
    return jwt.encode(signer, payload).decode()


@pytest.fixture
def secured(adapters, handler, google_keys):
    signer, impostor, certs_url = google_keys
    service = Service(name="evaluator", handlers={ev.TrainingCompleted: handler})
    verifier = OidcVerifier(AUDIENCE, PUSHER, certs_url=certs_url)
    return create_app(adapters, verifier=verifier, service=service).test_client(), signer, impostor


def test_a_push_with_a_valid_token_is_handled(secured, handler):
    client, signer, _ = secured
    resp = client.post("/pubsub/push", json=push_body(), headers={"Authorization": f"Bearer {token(signer)}"})
    assert resp.status_code == 204, resp.get_data(as_text=True)
    assert handler.calls == ["run-1"]


@pytest.mark.parametrize("make_header, status, reason", [
    (lambda s, i: None, 401, "missing 'Authorization: Bearer <token>'"),
    (lambda s, i: "Basic dXNlcjpwYXNz", 401, "missing 'Authorization: Bearer <token>'"),
    (lambda s, i: "Bearer not-a-jwt", 401, "invalid token"),
    (lambda s, i: f"Bearer {token(s, aud='https://someone-else.run.app/')}", 401, "invalid token"),
    (lambda s, i: f"Bearer {token(s, iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)}", 401, "expired"),
    (lambda s, i: f"Bearer {token(s, iss='https://evil.example.com')}", 401, "is not Google"),
    (lambda s, i: f"Bearer {token(i)}", 401, "invalid token"),  # same kid, signed by another key
    (lambda s, i: f"Bearer {token(s, email='intruder@acme-ml.iam.gserviceaccount.com')}", 403,
     "expected the push subscription's service account"),
    (lambda s, i: f"Bearer {token(s, email_verified=False)}", 403, "verified: False"),
], ids=["missing", "not-bearer", "garbage", "wrong-audience", "expired", "wrong-issuer", "wrong-key",
        "wrong-signer-email", "unverified-email"])
def test_a_push_without_a_valid_token_is_refused_and_nothing_handled(secured, adapters, handler, make_header,
                                                                      status, reason):
    client, signer, impostor = secured
    header = make_header(signer, impostor)
    resp = client.post("/pubsub/push", json=push_body(), headers={"Authorization": header} if header else {})
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert reason in resp.get_json()["error"]
    assert handler.calls == []
    assert dead_letters(adapters) == []


def test_unreachable_certificates_are_a_retryable_failure(adapters, handler, google_keys):
    signer, _, _ = google_keys
    service = Service(name="evaluator", handlers={ev.TrainingCompleted: handler})
    verifier = OidcVerifier(AUDIENCE, PUSHER, certs_url="http://127.0.0.1:9/certs")  # discard port: refused
    resp = create_app(adapters, verifier=verifier, service=service).test_client().post(
        "/pubsub/push", json=push_body(), headers={"Authorization": f"Bearer {token(signer)}"})
    assert resp.status_code == 503 and "certificates" in resp.get_json()["error"]
    assert handler.calls == []


def test_the_token_check_follows_the_settings(adapters, handler):
    service = Service(name="evaluator", handlers={ev.TrainingCompleted: handler})
    with pytest.raises(ValueError, match="FTPIPE_PUSH_AUDIENCE"):
        create_app(adapters, Settings(profile="gcp"), service=service)  # cloud: on, and it needs the audience
    on = create_app(adapters, Settings(push_auth=True, push_audience=AUDIENCE), service=service).test_client()
    assert on.post("/pubsub/push", json=push_body()).status_code == 401
    off = create_app(adapters, Settings(profile="gcp", push_auth=False), service=service).test_client()
    assert off.post("/pubsub/push", json=push_body()).status_code == 204
    assert handler.calls == ["run-1"]
