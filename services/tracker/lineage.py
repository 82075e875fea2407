"""Lineage: every event folded into documents that the CLI, the read API and dashboards read.

runs/{run_id}                     the run record (status, sub_state, counts, metrics, scores, model)
run_events/{run_id}:{seq}         every event of a run, with a per-run monotonic sequence number
metrics/{run_id}:{step}           one row per training step (deterministic ids: never duplicated)
datasets/{dataset_id}             prepared datasets and the runs that used them
"""
from __future__ import annotations

import hashlib
import time

from shared import events as ev
from shared.documents import deep_merge

RUNS, RUN_EVENTS, METRICS, DATASETS, SEEN = "runs", "run_events", "metrics", "datasets", "run_event_ids"
TERMINAL = ("succeeded", "failed", "cancelled")
# A run only moves forward through these, whatever order the bus delivers events in.
# A dataset held for privacy sign-off waits (status "queued") between preparation and training.
_STAGES = ["preparing_data", "awaiting_privacy_review", "waiting_for_capacity", "training", "evaluating", "registering", "done"]


def _progress(run: dict, status: str, sub_state: str) -> dict:
    if run.get("status") in TERMINAL:
        return {}
    if status not in TERMINAL and _STAGES.index(sub_state) < _STAGES.index(run.get("sub_state", "preparing_data")):
        return {}
    return {"status": status, "sub_state": sub_state}


def fold(run: dict, event: ev.Event, now: float) -> dict:
    """The changes `event` makes to its run record (a pure function: tests call it directly)."""
    recipe = getattr(event, "recipe", None)
    update: dict = {}
    if recipe is not None:
        update.update(recipe={"name": recipe.name, "version": recipe.version, "hash": recipe.hash},
                      model_name=recipe.model_name, base_model=recipe.base_model)
    match event:
        case ev.JobSubmitted():
            update.update(_progress(run, "validating", "preparing_data"), tenant=event.tenant, source=event.source,
                          input_uri=event.dataset_uri)
        case ev.DatasetAwaitingReview():
            update.update(_progress(run, "queued", "awaiting_privacy_review"),
                          dataset={"id": event.dataset_id, "uri": event.dataset_uri, "counts": event.counts},
                          privacy_review={"status": "awaiting", "pii": event.pii, "requested_at": now,
                                          "event": event.model_dump(mode="json")},
                          **_estimates(event))
        case ev.DatasetPrepared():
            update.update(_progress(run, "queued", "waiting_for_capacity"),
                          dataset={"id": event.dataset_id, "uri": event.dataset_uri, "counts": event.counts},
                          **_estimates(event))
            if event.privacy_signoff is not None:
                update["privacy_review"] = {"status": "approved", "signoff": event.privacy_signoff}
        case ev.DatasetRejected():
            update.update(_progress(run, "failed", "done"), error=event.reason,
                          dataset={"counts": event.counts, "report_uri": event.report_uri})
            if run.get("privacy_review", {}).get("status") == "awaiting":
                update["privacy_review"] = {"status": "rejected", "reason": event.reason}
        case ev.TrainingStarted():
            update.update(_progress(run, "running", "training"),
                          training={"started_at": run.get("training", {}).get("started_at", now),
                                    "resumed_from_step": event.resumed_from_step})
        case ev.TrainingProgress():
            last = event.metrics[-1]
            if last.step >= run.get("training", {}).get("step", 0):
                started = run.get("training", {}).get("started_at", now)
                training = {"step": last.step, "latest": last.model_dump(exclude_none=True)}
                if event.total_steps:
                    training["total_steps"] = event.total_steps
                    training["progress"] = round(last.step / event.total_steps, 4)
                    elapsed = now - started
                    if last.step:
                        training["eta_s"] = round(elapsed / last.step * (event.total_steps - last.step), 1)
                update["training"] = training
        case ev.CheckpointSaved():
            update["checkpoints"] = {str(event.step): {"uri": event.uri, "metrics": event.metrics}}
        case ev.TrainingAlert():
            update["alerts"] = {event.step_key(): {"step": event.step, "kind": event.kind, "message": event.message,
                                                   "stop": event.stop, "at": now}}
        case ev.TrainingCompleted():
            update.update(_progress(run, "running", "evaluating"), final_metrics=event.metrics,
                          adapter_uri=event.adapter_uri, training={"step": event.steps, "progress": 1.0})
        case ev.TrainingFailed():
            update.update(_progress(run, "cancelled" if event.cancelled else "failed", "done"), error=event.reason)
        case ev.EvaluationCompleted():
            update.update(_progress(run, "running", "registering"),
                          evaluation={"passed": event.passed, "scores": event.scores, "reasons": event.reasons,
                                      "report_uri": event.report_uri})
        case ev.ModelRegistered():
            update.update(_progress(run, "succeeded", "done"),
                          model={"name": event.model_name, "version": event.version, "status": event.status,
                                 "uri": event.uri})
    return update


def _estimates(event) -> dict:
    out = {}
    if event.tokens:
        out["tokens"] = event.tokens
    if event.cost_estimate:
        out["cost_estimate"] = event.cost_estimate
    return out


def record(docs, event: ev.Event) -> bool:
    """Fold one event into the lineage documents, exactly once per event_id. False if seen before."""
    if not event.run_id:
        return False
    seen_key = hashlib.sha256(event.event_id.encode()).hexdigest()

    def apply(txn) -> bool:
        if txn.get(SEEN, seen_key) is not None:
            return False
        run = txn.get(RUNS, event.run_id) or {"run_id": event.run_id, "status": "validating",
                                              "sub_state": "preparing_data", "created_at": time.time(), "seq": 0}
        dataset = None
        if isinstance(event, ev.DatasetPrepared):
            dataset = txn.get(DATASETS, event.dataset_id) or {"id": event.dataset_id, "uri": event.dataset_uri,
                                                              "counts": event.counts, "runs": []}
        now = time.time()
        seq = run.get("seq", 0) + 1
        run = deep_merge(run, fold(run, event, now))
        run.update(seq=seq, updated_at=now, last_event=event.type)
        txn.set(RUNS, event.run_id, run)
        txn.set(RUN_EVENTS, f"{event.run_id}:{seq:06d}", {"run_id": event.run_id, "seq": seq, "type": event.type,
                                                           "event_id": event.event_id, "at": now,
                                                           "summary": summarise(event)})
        txn.set(SEEN, seen_key, {"run_id": event.run_id, "seq": seq})
        if isinstance(event, ev.TrainingProgress):
            for row in event.metrics:
                txn.set(METRICS, f"{event.run_id}:{row.step:08d}",
                        {"run_id": event.run_id, **row.model_dump(exclude_none=True)})
        if dataset is not None:
            if event.run_id not in dataset["runs"]:
                dataset["runs"].append(event.run_id)
            txn.set(DATASETS, event.dataset_id, dataset)
        return True

    return docs.transaction(apply)


def summarise(event: ev.Event) -> str:
    match event:
        case ev.DatasetAwaitingReview():
            return f"dataset {event.dataset_id} awaiting privacy review: " + ", ".join(
                f"{k}={v}" for k, v in event.counts.items())
        case ev.DatasetPrepared():
            return f"dataset {event.dataset_id}: " + ", ".join(f"{k}={v}" for k, v in event.counts.items())
        case ev.DatasetRejected() | ev.TrainingFailed():
            return event.reason
        case ev.TrainingProgress():
            last = event.metrics[-1]
            return f"steps {event.metrics[0].step}-{last.step}, loss {last.loss:.4f}"
        case ev.CheckpointSaved():
            return f"checkpoint at step {event.step}"
        case ev.TrainingAlert():
            return f"{'stopped' if event.stop else 'alert'} at step {event.step}: {event.message}"
        case ev.TrainingStarted():
            return f"training from step {event.resumed_from_step}"
        case ev.EvaluationCompleted():
            return ("gate passed" if event.passed else "gate failed") + ": " + "; ".join(event.reasons)
        case ev.ModelRegistered():
            return f"{event.model_name} {event.version} {event.status}"
    return event.type
