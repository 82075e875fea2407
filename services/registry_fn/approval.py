"""The manual approval step: `POST {"name", "version", "note"}` by an authenticated person approves
a candidate version (recipe `registry.approval`), which then goes to production
(shared/domain/model_registry.py: approve).

In Google Cloud it is the HTTP Cloud Function `approve` (services/registry_fn/main.py) behind IAM:
the caller's Google ID token is verified again here. Locally the registry process serves the same app
on its port (<state>/services/registry.json), and callers show a bearer token (`ftpipe tokens create`,
or the stack's own in <state>/auth-token). Either way the caller must hold `approver` (checked before
the body is read) in a tenant that owns the model, and not be the run's submitter where the model's
policy asks for four eyes (shared/domain/model_registry.py). The approver recorded is the caller's
identity, never a name from the body.
"""
from __future__ import annotations

from flask import Flask, Request, Response, jsonify

from shared.domain import model_registry
from shared.domain.access import caller_of, require
from shared.platform.auth import Authenticator
from shared.platform.push import AuthError


def _error(status: int, message: str) -> Response:
    response = jsonify({"error": message, "status": status})
    response.status_code = status
    return response


def respond(docs, bus, authenticate: Authenticator, request: Request, admins: tuple[str, ...] = ()) -> Response:
    """Answer one approval request: the approved version document, or a JSON error."""
    if request.method != "POST":
        return _error(405, 'approve with POST {"name": MODEL, "version": "MAJOR.MINOR", "note": TEXT}')
    try:
        caller = require(caller_of(docs, authenticate(request.headers), admins), "approver", to="approve a version")
    except AuthError as exc:
        return _error(exc.status, exc.reason)
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return _error(400, 'the body must be a JSON object {"name": MODEL, "version": "MAJOR.MINOR", "note": TEXT}')
    name, version, note = body.get("name"), body.get("version"), body.get("note", "")
    for field, value in (("name", name), ("version", version)):
        if not isinstance(value, str) or not value:
            # a JSON number would lose the version: 1.10 arrives as 1.1
            return _error(400, f"'{field}' must be a non-empty string, e.g. "
                               + ('"support-bot"' if field == "name" else '"1.2"'))
    if not isinstance(note, str):
        return _error(400, "'note' must be a string")
    try:
        doc = model_registry.approve(docs, bus, name, version, caller=caller, note=note)
    except model_registry.RegistryError as exc:
        return _error(exc.status, str(exc))
    except AuthError as exc:
        return _error(exc.status, exc.reason)
    return jsonify(doc)


def create_app(docs, bus, authenticate: Authenticator, admins: tuple[str, ...] = ()) -> Flask:
    """The approval endpoint as its own app (the local registry process serves it): POST / or /approve."""
    app = Flask(__name__)

    def view():
        from flask import request

        return respond(docs, bus, authenticate, request, admins)

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
    app.add_url_rule("/", "approve", view, methods=methods)
    app.add_url_rule("/approve", "approve_path", view, methods=methods)
    # the registry process's side-car: probed like every other (shared/platform/main.py)
    app.add_url_rule("/healthz", "healthz", lambda: {"service": "registry", "status": "ok"})
    return app
