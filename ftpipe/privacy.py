"""Privacy sign-off: datasets of recipes with `data.privacy_review: true` wait as "awaiting privacy
review" (the tracker folds DatasetAwaitingReview into the run) until an approver signs off here.

approve: the sign-off (who, when, the PII figures and residual rate seen) goes into the DocStore
(privacy_signoffs/{run_id}, first decision wins) and into the dataset's manifest.json
(`privacy_signoff`, see shared/privacy.py); then DatasetPrepared is published with the sign-off in
its `privacy_signoff` field. Its event id is the run's ordinary DatasetPrepared id and the
sign-off document is reused, so approving twice republishes the identical event, which every
consumer's ledger drops. reject: DatasetRejected with the reviewer's reason.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone

from shared import events as ev
from shared.privacy import SIGNOFFS, SignoffMissing, record_in_manifest
from shared.runtime import publish_event

from ftpipe.client import RUNS, Client, ClientError

AWAITING = "awaiting_privacy_review"


def awaiting(client: Client) -> list[dict]:
    """Runs whose dataset waits for review, with what the reviewer needs to see."""
    rows = []
    for _, run in client.adapters.docs.query(RUNS, where=[("sub_state", "==", AWAITING)]):
        review = run.get("privacy_review") or {}
        pii = review.get("pii") or {}
        rows.append({"run_id": run["run_id"], "recipe": run.get("recipe"), "dataset": run.get("dataset", {}),
                     "pii": pii, "pii_counts": pii.get("counts", {}), "residual_rate": pii.get("residual_rate"),
                     "requested_at": review.get("requested_at"), "cost_estimate": run.get("cost_estimate")})
    rows.sort(key=lambda r: r.get("requested_at") or 0)
    return rows


def _request(client: Client, run_id: str) -> tuple[dict, dict | None]:
    run = client.run(run_id)
    if run is None:
        raise ClientError(f"no run {run_id}; `ftpipe privacy list` shows the runs awaiting review")
    return run, client.adapters.docs.get(SIGNOFFS, run_id)


def _decide(client: Client, run_id: str, decision: dict) -> dict:
    """Record a decision once; returns the one recorded (an earlier one wins)."""
    run, existing = _request(client, run_id)
    if existing is not None:
        return existing
    review = run.get("privacy_review") or {}
    if run.get("sub_state") != AWAITING or "event" not in review:
        raise ClientError(f"run {run_id} is not awaiting privacy review (status {run.get('status')}, "
                          f"{run.get('sub_state')}); `ftpipe privacy list` shows the runs that are")
    pii = review.get("pii") or {}
    doc = {"run_id": run_id, **decision, "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "at_ts": time.time(), "dataset_id": review["event"]["dataset_id"],
           "dataset_uri": review["event"]["dataset_uri"], "pii_counts_seen": pii.get("counts", {}),
           "residual_rate_seen": pii.get("residual_rate"), "event": review["event"]}
    if not client.adapters.docs.create(SIGNOFFS, run_id, doc):
        return client.adapters.docs.get(SIGNOFFS, run_id)
    return doc


def _public(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k not in ("event", "at_ts")}


def approve(client: Client, run_id: str, approver: str, note: str | None = None) -> dict:
    if not approver.strip():
        raise ClientError("--approver must name who signs off")
    doc = _decide(client, run_id, {"decision": "approved", "approver": approver.strip(), "note": note})
    if doc["decision"] != "approved":
        raise ClientError(f"run {run_id} was already rejected by {doc.get('approver')}: {doc.get('note')}")
    signoff = _public(doc)
    requested = doc["event"]
    try:
        record_in_manifest(client.adapters.store, requested["dataset_uri"], signoff)
    except SignoffMissing as exc:
        raise ClientError(str(exc)) from exc
    fields = {k: v for k, v in requested.items() if k != "pii"}
    publish_event(client.adapters.bus, ev.DatasetPrepared(**fields, privacy_signoff=signoff))
    return signoff


def reject(client: Client, run_id: str, reason: str, approver: str) -> dict:
    if not reason.strip():
        raise ClientError("--reason must say why the dataset is rejected")
    doc = _decide(client, run_id, {"decision": "rejected", "approver": approver, "note": reason.strip()})
    if doc["decision"] != "rejected":
        raise ClientError(f"run {run_id} was already approved by {doc.get('approver')}")
    requested = doc["event"]
    from shared.recipe import Recipe

    publish_event(client.adapters.bus, ev.DatasetRejected(
        run_id=run_id, recipe=Recipe.model_validate(requested["recipe"]),
        reason=f"privacy review rejected by {doc['approver']}: {doc['note']}",
        counts=requested.get("counts", {}), report_uri=requested["dataset_uri"]))
    return _public(doc)
