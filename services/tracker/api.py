"""The tracker's JSON read API (the dashboard builds on it)."""
from __future__ import annotations

from flask import Flask, abort, jsonify, request
from werkzeug.exceptions import HTTPException

from services.tracker.lineage import METRICS, RUN_EVENTS, RUNS

_SORTABLE = {"created_at", "updated_at", "status", "final_metrics.val_loss", "final_metrics.train_loss"}


def create_app(docs) -> Flask:
    app = Flask("ftpipe-tracker")

    @app.errorhandler(HTTPException)
    def json_error(exc: HTTPException):
        # A JSON API answers errors in JSON too: {"error": "what is wrong and how to fix it"}.
        return jsonify(error=exc.description, status=exc.code), exc.code

    @app.get("/healthz")
    def health():
        return {"status": "ok"}

    @app.get("/runs")
    def runs():
        where = [(field, "==", request.args[param]) for param, field in
                 (("status", "status"), ("recipe", "recipe.name"), ("tenant", "tenant"), ("model", "model_name"))
                 if param in request.args]
        order = request.args.get("order_by", "created_at")
        field = order.removeprefix("-")
        if field not in _SORTABLE:
            abort(400, f"order_by must be one of {sorted(_SORTABLE)} (prefix '-' for descending), got {order!r}")
        try:
            limit = min(int(request.args.get("limit", 50)), 500)
        except ValueError:
            abort(400, f"limit must be an integer between 1 and 500, got {request.args['limit']!r}")
        if limit < 1:
            abort(400, f"limit must be an integer between 1 and 500, got {limit}")
        rows = docs.query(RUNS, where=where, order_by=[(field, "desc" if order.startswith("-") else "asc")],
                          limit=limit)
        return jsonify([doc for _, doc in rows])

    @app.get("/runs/<run_id>")
    def run(run_id: str):
        doc = docs.get(RUNS, run_id)
        if doc is None:
            abort(404, f"no run {run_id}")
        doc["events"] = [e for _, e in docs.query(RUN_EVENTS, where=[("run_id", "==", run_id)], order_by=[("seq", "asc")])]
        doc["metrics"] = [m for _, m in docs.query(METRICS, where=[("run_id", "==", run_id)], order_by=[("step", "asc")])]
        return jsonify(doc)

    return app
