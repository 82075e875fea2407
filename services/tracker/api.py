"""The tracker's JSON API under /api (the dashboard builds on it; docs/tracker-api.md documents every
route). Every /api route needs the caller's identity from the authenticator the app is given
(shared/platform/auth.py: a named bearer token locally, IAP in the cloud) and the role ROUTE_ROLES names for
it (shared/domain/access.py), checked before the route looks anything up; /healthz needs nothing. Reads show
the tenants the caller views. Writes go through the same functions as the CLI: shared/domain/jobs.py (submit,
cancel), shared/domain/privacy.py (sign-off) and shared/domain/model_registry.py (approve, promote, rollback,
archive, quarantine, reevaluate), which check the caller's role in the tenant the target belongs to and record the caller
as the actor. Errors are JSON: {"error": "...", "status": N}.
"""
from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import Mapping
from urllib.parse import urlparse

from flask import Flask, abort, g, jsonify, request
from werkzeug.exceptions import HTTPException

from shared.domain import access, jobs, model_policy, model_registry, privacy
from shared.domain.access import Caller, require
from shared.domain.recipe import RecipeError, available_recipes, load_recipe
from shared.domain.tenant_stats import TENANT_STATS
from shared.platform.auth import Authenticator
from shared.platform.config import Adapters
from shared.platform.ports import ObjectNotFound
from shared.platform.push import AuthError

from services.tracker import aggregates
from services.tracker.lineage import DATASETS, METRICS, RECIPES, RUN_EVENTS, RUNS
from services.tracker.web import dashboard_blueprint

MAX_LIMIT = 500
MAX_ROWS = 10_000          # metric or event rows in one answer; pollers page on with after_step / after_seq
MAX_COMPARED = 10
# Runs filter on these query parameters (field of the run document each one matches).
RUN_FILTERS = (("status", "status"), ("recipe", "recipe.name"), ("tenant", "tenant"), ("model", "model_name"),
               ("dataset", "dataset.id"))
RUN_ORDER = ("created_at", "updated_at", "status")
# Metric names as both document stores accept them in a field path (shared/platform/adapters/sqlite_docs.py).
_METRIC_ORDER = re.compile(r"(final_metrics|evaluation\.scores\.candidate)\.[A-Za-z0-9_-]+")
_RECIPE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
# The least role each /api route needs in some tenant, checked before the route runs (the route's domain
# function then checks the role in the target's own tenant). A route missing here is refused (500), and
# tests/unit/test_tracker_api.py fails on it.
ROUTE_ROLES = {
    ("POST", "/api/runs"): "submitter",
    ("POST", "/api/runs/<run_id>/cancel"): "submitter",
    ("POST", "/api/models/<name>/<version>/<action>"): "approver",
    ("POST", "/api/models/<name>/rollback"): "approver",
    ("POST", "/api/privacy/<run_id>/approve"): "approver",
    ("POST", "/api/privacy/<run_id>/reject"): "approver",
    ("PUT", "/api/models/<name>/policy"): "admin",
}
READ_ROLE = "viewer"   # every GET under /api not listed above


class BadRequest(ValueError):
    """A query or body the API cannot take; the message says what is allowed."""


def _limit(args: Mapping[str, str], default: int) -> int:
    text = args.get("limit", str(default))
    try:
        limit = int(text)
    except ValueError:
        raise BadRequest(f"limit must be an integer between 1 and {MAX_LIMIT}, got {text!r}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be an integer between 1 and {MAX_LIMIT}, got {limit}")
    return limit


def _order(text: str) -> tuple[str, str]:
    field = text.removeprefix("-")
    if field not in RUN_ORDER and not _METRIC_ORDER.fullmatch(field):
        raise BadRequest(f"order_by must be one of {', '.join(RUN_ORDER)}, final_metrics.NAME or "
                         f"evaluation.scores.candidate.NAME (NAME: letters, digits, _ and -; e.g. "
                         f"final_metrics.val_loss), prefix '-' for descending; got {text!r}")
    return field, "desc" if text.startswith("-") else "asc"


def query_runs(docs, args: Mapping[str, str], visible: list[str] | None = None) -> list[dict]:
    """Run documents matching the filters, in `order_by` order (default: creation), at most `limit`,
    of the `visible` tenants (None: all). Ordering by a field leaves out the runs that lack it — a
    metric a failed or running run has not got — on every DocStore (Firestore does; the SQLite store
    does the same), so "the five runs with the lowest validation loss" are five that have one."""
    where = [(field, "==", args[param]) for param, field in RUN_FILTERS if args.get(param)]
    if visible is not None:
        if args.get("tenant") and args["tenant"] not in visible:
            return []
        if not args.get("tenant"):
            if not visible:
                return []
            where.append(("tenant", "in", visible[:30]))   # Firestore's limit for `in`
    order = _order(args.get("order_by", "created_at"))
    rows = docs.query(RUNS, where=where, order_by=[order], limit=_limit(args, 50))
    return [aggregates.public_run(doc) for _, doc in rows]


def _after(name: str) -> int:
    text = request.args.get(name, "-1")
    try:
        return int(text)
    except ValueError:
        abort(400, f"{name} must be an integer, got {text!r}")


def _body() -> dict:
    """The JSON object a write route takes (an empty body is an empty object)."""
    if not request.get_data():
        return {}
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        abort(400, "the body must be a JSON object, e.g. {\"note\": \"checked\"}")
    return body


def _text(body: dict, key: str, *, required: bool = False, default: str = "") -> str:
    value = body.get(key, default)
    if not isinstance(value, str):
        abort(400, f"'{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        abort(400, f"'{key}' is required: say why")
    return value.strip()


def create_app(adapters: Adapters, authenticate: Authenticator) -> Flask:
    """The API over `adapters`; `authenticate` (shared/platform/auth.py) says who calls each /api route."""
    docs, store, bus, bucket = adapters.docs, adapters.store, adapters.bus, adapters.settings.bucket
    app = Flask("ftpipe-tracker")
    # werkzeug refuses a longer body from its Content-Length (413) before reading any of it
    app.config["MAX_CONTENT_LENGTH"] = adapters.settings.max_upload_bytes

    @app.errorhandler(413)
    def too_large(exc: HTTPException):
        limit = adapters.settings.max_upload_bytes
        return error(413, f"the request is larger than this API takes ({limit:,} bytes, FTPIPE_MAX_UPLOAD_BYTES); "
                          "drop a bigger dataset into the bucket (ftpipe drop FILE --recipe R) instead")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        # A JSON API answers errors in JSON too: {"error": "what is wrong and how to fix it"}.
        return jsonify(error=exc.description, status=exc.code), exc.code

    def error(status: int, message: str):
        return jsonify(error=message, status=status), status

    app.register_error_handler(AuthError, lambda exc: error(exc.status, exc.reason))
    app.register_error_handler(BadRequest, lambda exc: error(400, str(exc)))
    app.register_error_handler(RecipeError, lambda exc: error(400, str(exc)))
    app.register_error_handler(jobs.JobError, lambda exc: error(exc.status, str(exc)))
    app.register_error_handler(privacy.ReviewError, lambda exc: error(exc.status, str(exc)))
    app.register_error_handler(model_registry.RegistryError, lambda exc: error(exc.status, str(exc)))

    app.register_error_handler(model_policy.PolicyError, lambda exc: error(exc.status, str(exc)))

    @app.before_request
    def authenticated():
        if not request.path.startswith("/api/"):
            return
        g.caller = access.caller_of(docs, authenticate(request.headers), adapters.settings.admins)
        rule = request.url_rule.rule if request.url_rule is not None else None
        role = ROUTE_ROLES.get((request.method, rule or ""), READ_ROLE if request.method in ("GET", "HEAD") else None)
        if role is None and rule is not None:
            abort(500, f"{request.method} {rule} has no role in ROUTE_ROLES: refused until it has one")
        # before the route looks anything up: a caller without the role learns nothing of what exists
        require(g.caller, role or READ_ROLE, to=f"{request.method} {request.path}")
        # A browser sends its cookies (IAP's, in the cloud) with a form another site posts here;
        # the Origin it sends with every POST says whose page that was.
        origin = request.headers.get("Origin")
        if request.method not in ("GET", "HEAD", "OPTIONS") and origin and urlparse(origin).netloc != request.host:
            abort(403, f"a write from another site's page ({origin}) is refused; use the dashboard at {request.host_url}")

    @app.get("/healthz")
    def health():
        return {"status": "ok"}

    @app.get("/api/whoami")
    def whoami():
        return g.caller.public()

    def caller() -> Caller:
        return g.caller

    def visible(tenant: str | None) -> bool:
        tenants = caller().tenants("viewer")
        return tenants is None or (tenant or jobs.DEFAULT_TENANT) in tenants

    # ------------------------------------------------------------------ runs
    def run_or_404(run_id: str) -> dict:
        doc = docs.get(RUNS, run_id)
        if doc is None or not visible(doc.get("tenant")):   # another tenant's run is not there for this caller
            abort(404, f"no run {run_id}; GET /api/runs lists them")
        return doc

    def recipe_of(run_id: str) -> dict | None:
        return (docs.get(RECIPES, run_id) or {}).get("recipe")

    def metric_rows(run_id: str, after_step: int) -> list[dict]:
        return [m for _, m in docs.query(METRICS, where=[("run_id", "==", run_id), ("step", ">", after_step)],
                                         order_by=[("step", "asc")], limit=MAX_ROWS)]

    @app.get("/api/runs")
    def runs():
        return jsonify(query_runs(docs, request.args, caller().tenants("viewer")))

    @app.get("/api/runs/<run_id>")
    def run(run_id: str):
        doc = aggregates.public_run(run_or_404(run_id))
        doc["events"] = [e for _, e in docs.query(RUN_EVENTS, where=[("run_id", "==", run_id)],
                                                  order_by=[("seq", "asc")], limit=MAX_ROWS)]
        doc["hyperparameters"] = aggregates.hyperparameters(recipe_of(run_id))
        doc["caller_may"] = {"cancel": caller().may("submitter", doc.get("tenant") or jobs.DEFAULT_TENANT)}
        return jsonify(doc)

    @app.get("/api/runs/<run_id>/metrics")
    def run_metrics(run_id: str):
        run_or_404(run_id)
        return jsonify(metric_rows(run_id, _after("after_step")))

    @app.get("/api/runs/<run_id>/events")
    def run_events(run_id: str):
        run_or_404(run_id)
        after = _after("after_seq")
        return jsonify([e for _, e in docs.query(RUN_EVENTS, where=[("run_id", "==", run_id), ("seq", ">", after)],
                                                 order_by=[("seq", "asc")], limit=MAX_ROWS)])

    @app.post("/api/runs")
    def submit():
        upload = request.files.get("file")
        if upload is None or not upload.filename:
            abort(400, "a multipart form with the dataset in 'file', the recipe's name in 'recipe', and optionally "
                       "'overrides' (a JSON object of dotted keys) and 'tenant'")
        recipe = request.form.get("recipe", "")
        if not _RECIPE_NAME.fullmatch(recipe):
            abort(400, f"'recipe' must name a recipe (GET /api/recipes lists them), got {recipe!r}")
        try:
            overrides = json.loads(request.form.get("overrides") or "{}")
        except ValueError as exc:
            abort(400, f"'overrides' is not JSON: {exc}")
        job = {"recipe": recipe, "overrides": overrides}
        if request.form.get("tenant"):
            job["tenant"] = request.form["tenant"]
        with tempfile.TemporaryDirectory(prefix="ftpipe-upload-") as tmp:
            path = Path(tmp) / jobs.safe_name(upload.filename)
            upload.save(path)
            run_id = jobs.submit(docs, store, bus, bucket, caller(), {**job, "dataset": str(path)},
                                 source={"submitted": upload.filename, "from": "dashboard"})
        return jsonify(run_id=run_id), 201

    @app.post("/api/runs/<run_id>/cancel")
    def cancel(run_id: str):
        return jsonify(aggregates.public_run(jobs.cancel(docs, caller(), run_id)))

    @app.get("/api/compare")
    def compare():
        ids = [r for r in request.args.get("runs", "").split(",") if r]
        if not 2 <= len(ids) <= MAX_COMPARED or len(set(ids)) != len(ids):
            abort(400, f"runs must list 2 to {MAX_COMPARED} different run ids, comma-separated, e.g. ?runs=run-a,run-b")
        found = [run_or_404(r) for r in ids]
        return jsonify(aggregates.compare(found, {r: recipe_of(r) for r in ids},
                                          {r: metric_rows(r, -1) for r in ids}))

    # ------------------------------------------------------------------ datasets
    @app.get("/api/datasets")
    def datasets():
        rows = docs.query(DATASETS, order_by=[("created_at", "desc")], limit=_limit(request.args, 50))
        return jsonify([aggregates.dataset_view(doc) for _, doc in rows if visible(doc.get("tenant"))])

    @app.get("/api/datasets/<dataset_id>")
    def dataset(dataset_id: str):
        doc = docs.get(DATASETS, dataset_id)
        if doc is None or not visible(doc.get("tenant")):
            abort(404, f"no dataset {dataset_id}; GET /api/datasets lists them")
        return jsonify(aggregates.dataset_view(doc, privacy.read_manifest(store, doc["uri"])))

    # ------------------------------------------------------------------ models
    def model_visible(name: str) -> bool:
        return any(visible(t) for t in owners(name))

    def visible_model_or_404(name: str) -> None:
        if not model_visible(name):
            abort(404, f"no model {name!r}; GET /api/models lists them")

    @app.get("/api/models")
    def models():
        return jsonify([m for m in model_registry.list_models(docs) if model_visible(m["name"])])

    def owners(name: str) -> tuple[str, ...]:
        policy = model_policy.get_policy(docs, name)
        return policy.owners if policy else (jobs.DEFAULT_TENANT,)

    @app.get("/api/models/<name>")
    def model(name: str):
        visible_model_or_404(name)
        # what the dashboard offers this caller (the server decides again on each action)
        may = {"approve": any(caller().may("approver", t) for t in owners(name)), "admin": caller().admin}
        return jsonify({**model_registry.get_model(docs, name), "caller_may": may})

    @app.get("/api/models/<name>/policy")
    def policy(name: str):
        visible_model_or_404(name)
        found = model_policy.get_policy(docs, name)
        if found is None:
            abort(404, f"model {name!r} has no policy; an admin sets one with PUT /api/models/{name}/policy")
        return jsonify(found.public())

    @app.put("/api/models/<name>/policy")
    def set_policy(name: str):
        body = _body()
        unknown = set(body) - set(model_policy.ModelPolicy.model_fields)
        if unknown:
            abort(400, f"unknown policy fields {sorted(unknown)}; fields: {', '.join(model_policy.ModelPolicy.model_fields)}")
        return jsonify(model_policy.set_policy(docs, caller(), name, **body).public())

    @app.get("/api/models/<name>/<version>")
    def model_version(name: str, version: str):
        visible_model_or_404(name)
        doc = model_registry.get_version(docs, name, version)
        bundle_bucket, folder = store.parse_url(doc["uri"])
        try:  # the version's artefact bundle (services/registry_fn): written last, so absent only mid-registration
            raw = store.read(bundle_bucket, f"{folder.rstrip('/')}/bundle.json")
        except ObjectNotFound:
            raw = None
        bundle = json.loads(raw) if raw is not None else None
        # Whether the bucket's bundle.json is the one the registry recorded (None: no digest recorded);
        # the adapter files are checked where they are used (serving, export), not on every read.
        matches = (hashlib.sha256(raw).hexdigest() == doc["bundle_sha256"]) if raw is not None and \
            doc.get("bundle_sha256") else None
        return jsonify({**doc, "bundle": bundle, "bundle_matches_registry": matches,
                        "evaluation": doc.get("evaluation") or (bundle or {}).get("evaluation")})

    @app.post("/api/models/<name>/<version>/<action>")
    def model_action(name: str, version: str, action: str):
        body, who = _body(), caller()
        if action == "approve":
            return jsonify(model_registry.approve(docs, bus, name, version, caller=who, note=_text(body, "note")))
        if action == "promote":
            return jsonify(model_registry.promote(docs, bus, name, version, alias=_text(body, "alias", default="production"),
                                                  caller=who, reason="manual"))
        if action in ("archive", "quarantine"):
            change = getattr(model_registry, action)
            return jsonify(change(docs, bus, name, version, caller=who, reason=_text(body, "reason", required=True)))
        if action == "reevaluate":
            return jsonify(model_registry.reevaluate(docs, bus, name, version, caller=who))
        abort(404, f"no action {action!r} on a model version; one of approve, promote, archive, quarantine, reevaluate")

    @app.post("/api/models/<name>/rollback")
    def rollback(name: str):
        body = _body()
        return jsonify(model_registry.rollback(docs, bus, name, alias=_text(body, "alias", default="production"),
                                               to=_text(body, "to") or None, caller=caller()))

    @app.get("/api/lineage/<name>/<version>")
    def lineage(name: str, version: str):
        visible_model_or_404(name)
        doc = model_registry.get_version(docs, name, version)
        run = docs.get(RUNS, doc["run_id"]) if doc.get("run_id") else None
        dataset_id = ((run or {}).get("dataset") or {}).get("id")
        return jsonify(aggregates.lineage_graph(doc, run, docs.get(DATASETS, dataset_id) if dataset_id else None))

    # ------------------------------------------------------------------ tenants, privacy, recipes
    @app.get("/api/tenants")
    def tenants():
        return jsonify([t for t in aggregates.tenant_rows(doc for _, doc in docs.query(TENANT_STATS))
                        if visible(t.get("tenant"))])

    @app.get("/api/privacy")
    def awaiting_review():
        return jsonify([{**r, "caller_may": {"decide": caller().may("approver", r.get("tenant") or jobs.DEFAULT_TENANT)}}
                        for r in privacy.awaiting(docs) if visible(r.get("tenant"))])

    @app.post("/api/privacy/<run_id>/approve")
    def privacy_approve(run_id: str):
        note = _text(_body(), "note") or None
        return jsonify(privacy.approve(docs, store, bus, run_id, caller=caller(), note=note))

    @app.post("/api/privacy/<run_id>/reject")
    def privacy_reject(run_id: str):
        reason = _text(_body(), "reason", required=True)
        return jsonify(privacy.reject(docs, bus, run_id, reason=reason, caller=caller()))

    @app.get("/api/recipes")
    def recipes():
        return jsonify([aggregates.recipe_form(load_recipe(name)) for name in available_recipes()])

    app.register_blueprint(dashboard_blueprint())  # / and /assets: no auth, the page asks for the token
    return app
