"""The tracker's JSON API under /api (the dashboard builds on it; docs/tracker-api.md documents every
route). Every /api route needs the caller's identity from the authenticator the app is given
(shared/platform/auth.py: the bearer token of <state>/auth-token locally, IAP in the cloud); /healthz needs
nothing. Writes go through the same functions as the CLI: shared/domain/jobs.py (submit, cancel),
shared/domain/privacy.py (sign-off) and shared/domain/model_registry.py (approve, promote, rollback, archive,
quarantine, reevaluate), with the caller's email as the actor. Errors are JSON: {"error": "...", "status": N}.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Mapping
from urllib.parse import urlparse

from flask import Flask, abort, g, jsonify, request
from werkzeug.exceptions import HTTPException

from shared.domain import jobs, model_registry, privacy
from shared.domain.recipe import RecipeError, available_recipes, load_recipe
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


def query_runs(docs, args: Mapping[str, str]) -> list[dict]:
    """Run documents matching the filters, in `order_by` order (default: creation), at most `limit`.
    Ordering by a field leaves out the runs that lack it — a metric a failed or running run has not
    got — on every DocStore (Firestore does; the SQLite store does the same), so "the five runs with
    the lowest validation loss" are five that have one."""
    where = [(field, "==", args[param]) for param, field in RUN_FILTERS if args.get(param)]
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

    @app.before_request
    def authenticated():
        if not request.path.startswith("/api/"):
            return
        g.identity = authenticate(request.headers)
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
        return {"email": g.identity.email, "via": g.identity.via}

    # ------------------------------------------------------------------ runs
    def run_or_404(run_id: str) -> dict:
        doc = docs.get(RUNS, run_id)
        if doc is None:
            abort(404, f"no run {run_id}; GET /api/runs lists them")
        return doc

    def recipe_of(run_id: str) -> dict | None:
        return (docs.get(RECIPES, run_id) or {}).get("recipe")

    def metric_rows(run_id: str, after_step: int) -> list[dict]:
        return [m for _, m in docs.query(METRICS, where=[("run_id", "==", run_id), ("step", ">", after_step)],
                                         order_by=[("step", "asc")], limit=MAX_ROWS)]

    @app.get("/api/runs")
    def runs():
        return jsonify(query_runs(docs, request.args))

    @app.get("/api/runs/<run_id>")
    def run(run_id: str):
        doc = aggregates.public_run(run_or_404(run_id))
        doc["events"] = [e for _, e in docs.query(RUN_EVENTS, where=[("run_id", "==", run_id)],
                                                  order_by=[("seq", "asc")], limit=MAX_ROWS)]
        doc["hyperparameters"] = aggregates.hyperparameters(recipe_of(run_id))
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
            run_id = jobs.submit(store, bus, bucket, {**job, "dataset": str(path)},
                                 source={"submitted": upload.filename, "by": g.identity.email, "from": "dashboard"})
        return jsonify(run_id=run_id), 201

    @app.post("/api/runs/<run_id>/cancel")
    def cancel(run_id: str):
        return jsonify(aggregates.public_run(jobs.cancel(docs, run_id)))

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
        return jsonify([aggregates.dataset_view(doc) for _, doc in rows])

    @app.get("/api/datasets/<dataset_id>")
    def dataset(dataset_id: str):
        doc = docs.get(DATASETS, dataset_id)
        if doc is None:
            abort(404, f"no dataset {dataset_id}; GET /api/datasets lists them")
        return jsonify(aggregates.dataset_view(doc, privacy.read_manifest(store, doc["uri"])))

    # ------------------------------------------------------------------ models
    @app.get("/api/models")
    def models():
        return jsonify(model_registry.list_models(docs))

    @app.get("/api/models/<name>")
    def model(name: str):
        return jsonify(model_registry.get_model(docs, name))

    @app.get("/api/models/<name>/<version>")
    def model_version(name: str, version: str):
        doc = model_registry.get_version(docs, name, version)
        bundle_bucket, folder = store.parse_url(doc["uri"])
        try:  # the version's artefact bundle (services/registry_fn): written last, so absent only mid-registration
            bundle = json.loads(store.read(bundle_bucket, f"{folder.rstrip('/')}/bundle.json"))
        except ObjectNotFound:
            bundle = None
        return jsonify({**doc, "bundle": bundle, "evaluation": doc.get("evaluation") or (bundle or {}).get("evaluation")})

    @app.post("/api/models/<name>/<version>/<action>")
    def model_action(name: str, version: str, action: str):
        body, actor = _body(), g.identity.email
        if action == "approve":
            return jsonify(model_registry.approve(docs, bus, name, version, approver=actor, note=_text(body, "note")))
        if action == "promote":
            return jsonify(model_registry.promote(docs, bus, name, version, alias=_text(body, "alias", default="production"),
                                                  actor=actor, reason="manual"))
        if action in ("archive", "quarantine"):
            change = getattr(model_registry, action)
            return jsonify(change(docs, bus, name, version, actor=actor, reason=_text(body, "reason", required=True)))
        if action == "reevaluate":
            return jsonify(model_registry.reevaluate(docs, bus, name, version, actor=actor))
        abort(404, f"no action {action!r} on a model version; one of approve, promote, archive, quarantine, reevaluate")

    @app.post("/api/models/<name>/rollback")
    def rollback(name: str):
        body = _body()
        return jsonify(model_registry.rollback(docs, bus, name, alias=_text(body, "alias", default="production"),
                                               to=_text(body, "to") or None, actor=g.identity.email))

    @app.get("/api/lineage/<name>/<version>")
    def lineage(name: str, version: str):
        doc = model_registry.get_version(docs, name, version)
        run = docs.get(RUNS, doc["run_id"]) if doc.get("run_id") else None
        dataset_id = ((run or {}).get("dataset") or {}).get("id")
        return jsonify(aggregates.lineage_graph(doc, run, docs.get(DATASETS, dataset_id) if dataset_id else None))

    # ------------------------------------------------------------------ tenants, privacy, recipes
    @app.get("/api/tenants")
    def tenants():
        return jsonify(aggregates.tenants(doc for _, doc in docs.query(RUNS)))

    @app.get("/api/privacy")
    def awaiting_review():
        return jsonify(privacy.awaiting(docs))

    @app.post("/api/privacy/<run_id>/approve")
    def privacy_approve(run_id: str):
        note = _text(_body(), "note") or None
        return jsonify(privacy.approve(docs, store, bus, run_id, approver=g.identity.email, note=note))

    @app.post("/api/privacy/<run_id>/reject")
    def privacy_reject(run_id: str):
        reason = _text(_body(), "reason", required=True)
        return jsonify(privacy.reject(docs, bus, run_id, reason=reason, approver=g.identity.email))

    @app.get("/api/recipes")
    def recipes():
        return jsonify([aggregates.recipe_form(load_recipe(name)) for name in available_recipes()])

    app.register_blueprint(dashboard_blueprint())  # / and /assets: no auth, the page asks for the token
    return app
