"""Privacy sign-offs, shared by the CLI and the tracker's API that record them (`ftpipe privacy
approve|reject`, `POST /api/privacy/<run>/approve|reject`: both call `approve` / `reject` here), the
trainer that requires them and the registry that copies them into the model bundle.

Datasets of recipes with `data.privacy_review: true` wait as "awaiting privacy review" (the tracker
folds DatasetAwaitingReview into the run) until an approver decides. A sign-off lives in two
places: the DocStore (`privacy_signoffs/{run_id}`, written only by `approve` / `reject`, the
authority; the first decision wins) and the dataset's manifest.json (`privacy_signoff`, the record
that travels with the data). Training a recipe with `data.privacy_review` needs both to agree and
the split files to be the ones whose hashes the manifest holds: a prepared folder submitted
directly cannot skip the review.

approve publishes DatasetPrepared with the sign-off in its `privacy_signoff` field. Its event id is
the run's ordinary DatasetPrepared id and the sign-off document is reused, so approving twice
republishes the identical event, which every consumer's ledger drops. reject publishes
DatasetRejected with the reviewer's reason.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

from shared.domain import events as ev
from shared.domain.access import AccessDenied, Caller, require
from shared.domain.datasets import SPLITS
from shared.domain.model_policy import get_policy
from shared.domain.recipe import Recipe
from shared.domain.runs import RUNS
from shared.domain.tenants import DEFAULT_TENANT
from shared.platform.ports import Bus, DocStore, ObjectNotFound, ObjectStore, PreconditionFailed
from shared.platform.runtime import publish_event
from shared.platform.storage import file_sha256

SIGNOFFS = "privacy_signoffs"
MANIFEST = "manifest.json"
SPLIT_FILES = tuple(f"{name}.jsonl" for name in SPLITS)
AWAITING = "awaiting_privacy_review"


class SignoffMissing(Exception):
    """Training would use data no approver signed off; the message says why and what to do."""


class ReviewError(ValueError):
    """A sign-off decision that cannot be made; the message says why and what to do. `status` is the
    HTTP status the tracker's API answers with (400 missing approver or reason, 404 no such run,
    409 not awaiting review or already decided the other way)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def awaiting(docs: DocStore) -> list[dict]:
    """Runs whose dataset waits for review, oldest request first, with what the reviewer needs to see."""
    rows = []
    for _, run in docs.query(RUNS, where=[("sub_state", "==", AWAITING)]):
        review = run.get("privacy_review") or {}
        pii = review.get("pii") or {}
        rows.append({"run_id": run["run_id"], "recipe": run.get("recipe"), "tenant": run.get("tenant"),
                     "dataset": run.get("dataset", {}), "pii": pii, "pii_counts": pii.get("counts", {}),
                     "residual_rate": pii.get("residual_rate"), "requested_at": review.get("requested_at"),
                     "cost_estimate": run.get("cost_estimate")})
    rows.sort(key=lambda r: r.get("requested_at") or 0)
    return rows


def _decide(docs: DocStore, caller: Caller, run_id: str, decision: dict) -> dict:
    """Record a decision once; returns the one recorded (an earlier one wins). The caller must be an
    approver of the run's tenant and, where the model's policy asks for four eyes, not its submitter."""
    to = f"decide the privacy review of run {run_id}"
    require(caller, "approver", to=to)
    run = docs.get(RUNS, run_id)
    if run is None:
        raise ReviewError(f"no run {run_id}; `ftpipe privacy list` shows the runs awaiting review", status=404)
    require(caller, "approver", run.get("tenant") or DEFAULT_TENANT, to=to)
    policy = get_policy(docs, run.get("model_name") or "-")
    if policy is not None and policy.four_eyes and (run.get("source") or {}).get("by") == caller.subject:
        raise AccessDenied(403, f"to {to}: you submitted it, and model {run.get('model_name')}'s policy asks for four "
                                "eyes; another approver must review it")
    existing = docs.get(SIGNOFFS, run_id)
    if existing is not None:
        return existing
    review = run.get("privacy_review") or {}
    if run.get("sub_state") != AWAITING or "event" not in review:
        raise ReviewError(f"run {run_id} is not awaiting privacy review (status {run.get('status')}, "
                          f"{run.get('sub_state')}); `ftpipe privacy list` shows the runs that are", status=409)
    pii = review.get("pii") or {}
    doc = {"run_id": run_id, **decision, "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "at_ts": time.time(), "dataset_id": review["event"]["dataset_id"],
           "dataset_uri": review["event"]["dataset_uri"], "pii_counts_seen": pii.get("counts", {}),
           "residual_rate_seen": pii.get("residual_rate"), "event": review["event"]}
    if not docs.create(SIGNOFFS, run_id, doc):
        return docs.get(SIGNOFFS, run_id) or doc  # decided by another caller first (signoffs are never deleted)
    return doc


def _public(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k not in ("event", "at_ts")}


def approve(docs: DocStore, store: ObjectStore, bus: Bus, run_id: str, *, caller: Caller,
            note: str | None = None) -> dict:
    """Sign the run's dataset off (module docstring); returns the sign-off recorded, with the
    caller as its approver."""
    doc = _decide(docs, caller, run_id, {"decision": "approved", "approver": caller.subject, "note": note})
    if doc["decision"] != "approved":
        raise ReviewError(f"run {run_id} was already rejected by {doc.get('approver')}: {doc.get('note')}",
                          status=409)
    signoff = _public(doc)
    requested = doc["event"]
    try:
        record_in_manifest(store, requested["dataset_uri"], signoff)
    except SignoffMissing as exc:
        raise ReviewError(str(exc), status=409) from exc
    fields = {k: v for k, v in requested.items() if k != "pii"}
    publish_event(bus, ev.DatasetPrepared(**fields, privacy_signoff=signoff))
    return signoff


def reject(docs: DocStore, bus: Bus, run_id: str, *, reason: str, caller: Caller) -> dict:
    """Refuse the run's dataset (module docstring); returns the decision recorded."""
    if not reason.strip():
        raise ReviewError("a rejection must say why (--reason TEXT)")
    doc = _decide(docs, caller, run_id, {"decision": "rejected", "approver": caller.subject, "note": reason.strip()})
    if doc["decision"] != "rejected":
        raise ReviewError(f"run {run_id} was already approved by {doc.get('approver')}", status=409)
    requested = doc["event"]
    publish_event(bus, ev.DatasetRejected(
        run_id=run_id, recipe=Recipe.model_validate(requested["recipe"]),
        reason=f"privacy review rejected by {doc['approver']}: {doc['note']}",
        counts=requested.get("counts", {}), report_uri=requested["dataset_uri"]))
    return _public(doc)


def _manifest_name(dataset_uri: str, store: ObjectStore) -> tuple[str, str]:
    bucket, prefix = store.parse_url(dataset_uri)
    return bucket, f"{prefix.rstrip('/')}/{MANIFEST}"


def read_manifest(store: ObjectStore, dataset_uri: str) -> dict | None:
    bucket, name = _manifest_name(dataset_uri, store)
    try:
        return json.loads(store.read(bucket, name))
    except (ObjectNotFound, ValueError):
        return None


def record_in_manifest(store: ObjectStore, dataset_uri: str, signoff: dict) -> dict:
    """Write the sign-off into the dataset's manifest.json (compare-and-swap on the object's
    generation, so a concurrent writer is never overwritten). The first approval of a dataset stays;
    returns the sign-off the manifest holds."""
    bucket, name = _manifest_name(dataset_uri, store)
    for _ in range(5):
        info = store.stat(bucket, name)
        if info is None:
            raise SignoffMissing(f"{store.url(bucket, name)} does not exist: not a dataset prepared by ftpipe")
        manifest = json.loads(store.read(bucket, name))
        if manifest.get("privacy_signoff"):
            return manifest["privacy_signoff"]
        manifest["privacy_signoff"] = signoff
        try:
            store.write(bucket, name, json.dumps(manifest, indent=2, sort_keys=True).encode(),
                        if_generation_match=info.generation, content_type="application/json")
            return signoff
        except PreconditionFailed:
            continue
    raise SignoffMissing(f"{store.url(bucket, name)} kept changing while the sign-off was recorded; try again")


def approved_signoff(docs: DocStore, dataset_id: str) -> dict | None:
    """The first approval of this dataset recorded by `ftpipe privacy approve`, if any."""
    found = [doc for _, doc in docs.query(SIGNOFFS, where=[("dataset_id", "==", dataset_id),
                                                             ("decision", "==", "approved")])]
    found.sort(key=lambda d: d.get("at_ts") or 0)
    return found[0] if found else None


def verify_signed_off(docs: DocStore, data_dir: Path) -> dict:
    """The sign-off for a downloaded dataset folder, after checking that an approver signed off this
    dataset and that its split files are the reviewed ones; raises SignoffMissing otherwise."""
    how = ("drop the raw data so that preprocess prepares it and an approver signs it off "
           "(`ftpipe privacy approve RUN`), then train on that dataset")
    path = data_dir / MANIFEST
    if not path.is_file():
        raise SignoffMissing(f"the recipe requires a privacy sign-off (data.privacy_review) and this dataset has no "
                             f"{MANIFEST}, so no approver has seen its PII report; {how}")
    manifest = json.loads(path.read_text())
    dataset_id = manifest.get("dataset_id")
    approval = approved_signoff(docs, dataset_id) if dataset_id else None
    if approval is None or not manifest.get("privacy_signoff"):
        raise SignoffMissing(f"the recipe requires a privacy sign-off (data.privacy_review) and dataset "
                             f"{dataset_id or '(unnamed)'} has none; {how}")
    for name in SPLIT_FILES:
        expected = (manifest.get("files") or {}).get(name, {}).get("sha256")
        if not (data_dir / name).is_file() or expected != file_sha256(data_dir / name):
            raise SignoffMissing(f"{name} of dataset {dataset_id} is not the file the approver signed off "
                                 f"(its sha256 differs from the manifest's); {how}")
    return manifest["privacy_signoff"]
