"""The registry's manual approval step over real HTTP: the app both the Cloud Function `approve`
and the local registry process serve, the function as functions-framework loads it, and the local
process itself — refused without the token, with a wrong one, or for anyone without the approver role
(locally a named token, in the cloud a Google ID token whose email holds the role); the approver recorded
is who the token says, never the body."""
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from shared.domain import access, model_registry as reg
from shared.domain.access import Caller
from shared.platform.auth import local_token, oidc_authenticator, token_authenticator
from shared.platform.config import Settings, bootstrap
from tests.unit.test_eval_push import google_keys, token  # noqa: F401  (a fixture, and ID tokens it signs)
from tests.unit.test_registry_ops import NAME, add

from services.registry_fn.approval import create_app


@pytest.fixture
def candidate(adapters):
    add(adapters, "r1")
    return add(adapters, "r2", approval=True)


def post(client, body, token_value=None, path="/approve"):
    headers = {"Authorization": f"Bearer {token_value}"} if token_value else {}
    return client.post(path, data=json.dumps(body) if not isinstance(body, str) else body, headers=headers,
                       content_type="application/json")


ADMIN = Caller(subject="token:stack", admin=True)


def test_approval_needs_an_approver_token_and_records_who_approved(adapters, candidate):
    client = create_app(adapters.docs, adapters.bus,
                        token_authenticator(adapters.docs, local_token(adapters.settings.state_dir))).test_client()
    body = {"name": NAME, "version": candidate, "note": "reviewed the card", "approver": "mallory"}
    secret = access.create_token(adapters.docs, ADMIN, "ann", "approver", "default")
    submitter = access.create_token(adapters.docs, ADMIN, "sam", "submitter", "default")
    elsewhere = access.create_token(adapters.docs, ADMIN, "otto", "approver", "other-team")

    refused = post(client, body)
    assert refused.status_code == 401 and refused.get_json()["status"] == 401
    assert "Authorization: Bearer" in refused.get_json()["error"]
    assert post(client, body, "not-the-token").get_json()["status"] == 401
    resp = post(client, {"name": "no-such-model", "version": "9.9"}, submitter)   # refused before any lookup
    assert resp.status_code == 403 and "you need approver" in resp.get_json()["error"], resp.get_json()
    resp = post(client, body, elsewhere)   # an approver, but not of a tenant that owns the model
    assert resp.status_code == 403 and "approver in tenant default" in resp.get_json()["error"]
    assert reg.get_version(adapters.docs, NAME, candidate)["status"] == "candidate"

    for bad, message in [("{not json", "must be a JSON object"), ({"name": NAME, "version": 1.2}, "'version' must be"),
                         ({"version": candidate}, "'name' must be"), ({**body, "note": 3}, "'note' must be")]:
        resp = post(client, bad, secret)
        assert resp.status_code == 400 and message in resp.get_json()["error"], resp.get_json()
    assert client.get("/approve", headers={"Authorization": f"Bearer {secret}"}).status_code == 405
    resp = post(client, {**body, "version": "9.9"}, secret)
    assert resp.status_code == 404 and "has no version '9.9'" in resp.get_json()["error"]

    resp = post(client, body, secret, path="/")
    assert resp.status_code == 200, resp.get_json()
    doc = resp.get_json()
    assert doc["status"] == "promoted" and doc["aliases"] == ["production", "staging"]
    assert doc["approval"]["approver"] == "token:ann" and doc["approval"]["note"] == "reviewed the card"
    resp = post(client, {**body, "version": "1.1"}, secret)
    assert resp.status_code == 409 and "does not wait for approval" in resp.get_json()["error"]


def test_in_the_cloud_only_approvers_id_tokens_pass(adapters, candidate, google_keys):  # noqa: F811
    signer, impostor, certs_url = google_keys
    audience = "https://registry-approve-abc.a.run.app"
    authenticate = oidc_authenticator(audience, certs_url=certs_url)
    access.grant(adapters.docs, ADMIN, "ann@example.com", "approver", "default")
    client = create_app(adapters.docs, adapters.bus, authenticate).test_client()
    body = {"name": NAME, "version": candidate}
    assert post(client, body, token(impostor, aud=audience, email="ann@example.com")).status_code == 401
    resp = post(client, body, token(signer, aud=audience, email="bob@example.com"))
    assert resp.status_code == 403 and "you need approver" in resp.get_json()["error"]
    resp = post(client, body, token(signer, aud=audience, email="ann@example.com"))
    assert resp.status_code == 200 and resp.get_json()["approval"]["approver"] == "ann@example.com"


def test_the_cloud_function_entry_point(tmp_path, monkeypatch):
    """functions-framework loads services/registry_fn/main.py's `approve` as an HTTP function."""
    import functions_framework

    state = tmp_path / "fn-state"
    for var in ("FTPIPE_PROFILE", "FTPIPE_BUCKET", "FTPIPE_LOG_FORMAT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FTPIPE_STATE", str(state))
    monkeypatch.setenv("FTPIPE_LOG_LEVEL", "WARNING")
    monkeypatch.setenv("FUNCTION_TARGET", "approve")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setitem(sys.modules, "main", None)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    adapters = bootstrap(Settings(state_dir=state))
    try:
        add(adapters, "r1", approval=True)
        app = functions_framework.create_app(target="approve", source="services/registry_fn/main.py",
                                             signature_type="http")
        module = sys.modules["main"]
        client = app.test_client()
        assert post(client, {"name": NAME, "version": "1.1"}, path="/").status_code == 401
        resp = post(client, {"name": NAME, "version": "1.1"}, local_token(state), path="/")
        assert resp.status_code == 200 and resp.get_json()["status"] == "promoted"
    finally:
        if module._adapters.cache_info().currsize:
            module._adapters().close()
        adapters.close()
        root.handlers[:], root.level = handlers, level


def test_the_local_registry_process_serves_the_approval_endpoint(tmp_path):
    state = tmp_path / "state"
    adapters = bootstrap(Settings(state_dir=state))
    add(adapters, "r1", approval=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTPIPE_")}
    proc = subprocess.Popen([sys.executable, "-m", "services.registry_fn.main"], env={**env, "FTPIPE_STATE": str(state)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        where = state / "services" / "registry.json"
        deadline = time.monotonic() + 60
        while not where.is_file():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the registry did not start its approval endpoint"
            time.sleep(0.1)
        url = json.loads(where.read_text())["url"]
        request = urllib.request.Request(url, data=json.dumps({"name": NAME, "version": "1.1"}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401
        request.add_header("Authorization", f"Bearer {local_token(state)}")
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert json.load(resp)["status"] == "promoted"
        assert reg.get_model(adapters.docs, NAME)["aliases"]["production"] == "1.1"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        adapters.close()
