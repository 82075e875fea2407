"""Lineage: every event folded into documents that the CLI, the read API and dashboards read.

runs/{run_id}                     the run record (status, sub_state, counts, metrics, cost, scores,
                                  model; `source` and `input_uri`: the drop or upload that started it;
                                  `dataset.id`: the dataset it trained on)
run_events/{run_id}:{seq}         every event of a run, with a per-run monotonic sequence number
metrics/{run_id}:{step}           one row per training step (deterministic ids: never duplicated)
run_recipes/{run_id}              the run's resolved recipe (what compare diffs), written once
datasets/{dataset_id}             prepared datasets: counts per stage, PII figures, tokens, cost
                                  estimate, privacy review, and the runs that used them
tenant_stats/{tenant}             the tenant's runs by status, GPU-hours and cost, kept in the same
                                  transaction as each run change (shared/domain/tenant_stats.py)

The model version of a run is the registry's (model_versions/{name}@{version}, shared/domain/model_registry.py);
the run document keeps a copy of its name, version and status, folded from the `models` events.
"""
from __future__ import annotations

import hashlib
import time

from shared.domain import events as ev
from shared.domain.jobs import RUNS, TERMINAL
from shared.domain.tenant_stats import apply_change as count_tenant_change
from shared.platform.documents import deep_merge

RUN_EVENTS, METRICS, DATASETS, SEEN, RECIPES = "run_events", "metrics", "datasets", "run_event_ids", "run_recipes"
# A run only moves forward through these, whatever order the bus delivers events in.
# A dataset held for privacy sign-off waits (status "queued") between preparation and training.
_STAGES = ["preparing_data", "awaiting_privacy_review", "waiting_for_capacity", "training", "evaluating", "registering", "done"]


def _progress(run: dict, status: str, sub_state: str) -> dict:
    stuck = (run.get("dead_letter") or {}).get("active")
    if run.get("status") in TERMINAL and not stuck:
        return {}
    at = _STAGES.index(run.get("sub_state", "preparing_data"))
    if status not in TERMINAL and (_STAGES.index(sub_state) < at or (stuck and _STAGES.index(sub_state) == at)):
        # A run failed by a dead letter moves on only past the stage it stopped at (after `ftpipe dlq
        # replay`): an event of that stage may be one published before the message was given up.
        return {}
    if stuck:
        return {"status": status, "sub_state": sub_state, "dead_letter": {"active": False}, "error": None}
    return {"status": status, "sub_state": sub_state}


def fold(run: dict, event: ev.Event, now: float) -> dict:
    """The changes `event` makes to its run record (a pure function: tests call it directly)."""
    recipe = getattr(event, "recipe", None)
    update: dict = {}
    if recipe is not None:
        hardware = recipe.hardware
        update.update(recipe={"name": recipe.name, "version": recipe.version, "hash": recipe.hash},
                      model_name=recipe.model_name, base_model=recipe.base_model,
                      hardware={"gpu": hardware.gpu, "gpus": hardware.total_gpus,
                                "price_per_gpu_hour": hardware.gpu_price})
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
                if isinstance(getattr(last, "cost", None), (int, float)):
                    update["cost"] = _spent(run, update, last.cost)
        case ev.CheckpointSaved():
            update["checkpoints"] = {str(event.step): {"uri": event.uri, "metrics": event.metrics}}
        case ev.TrainingAlert():
            update["alerts"] = {event.step_key(): {"step": event.step, "kind": event.kind, "message": event.message,
                                                   "stop": event.stop, "at": now}}
        case ev.TrainingCompleted():
            update.update(_progress(run, "running", "evaluating"), final_metrics=event.metrics,
                          adapter_uri=event.adapter_uri, training={"step": event.steps, "progress": 1.0, "eta_s": 0})
            if "cost" in event.metrics:
                update["cost"] = _spent(run, update, event.metrics["cost"])
        case ev.TrainingFailed():
            update.update(_progress(run, "cancelled" if event.cancelled else "failed", "done"), error=event.reason)
        case ev.EvaluationCompleted():
            update.update(_progress(run, "running", "registering"),
                          evaluation={"passed": event.passed, "held": event.held, "scores": event.scores,
                                      "reasons": event.reasons, "report_uri": event.report_uri, "error": None})
        case ev.EvaluationErrored():
            # No progress: the dead letter that comes with it fails the run (MessageDeadLettered), and a
            # re-evaluation's verdict moves it on from there.
            update["evaluation"] = {"error": event.error, "attempts": event.attempts}
        case ev.ModelRegistered():
            # An unevaluated version is no outcome of the run: it waits, failed by the dead letter.
            if event.status != "unevaluated":
                update.update(_progress(run, "succeeded", "done"))
            update["model"] = {"name": event.model_name, "version": event.version, "uri": event.uri}
            if event.change:  # registered again (a re-evaluation): ordered among the version's changes
                update["model"] = _model(run, event, event.status)
            elif (run.get("model") or {}).get("status") is None:  # a later change that arrived first stands
                update["model"]["status"] = event.status
        case ev.ModelApproved():
            update["model"] = _model(run, event, "approved", approval={"approver": event.approver,
                                                                        "note": event.note, "at": now})
        case ev.ModelPromoted():
            change = {"at": now, "reason": event.reason, "actor": event.actor, "previous_version": event.previous_version}
            update["model"] = _model(run, event, "promoted" if event.alias == "production" else None,
                                     promotions={event.alias: change})
        case ev.ModelQuarantined():
            update["model"] = _model(run, event, "quarantined", status_reason="; ".join(event.reasons),
                                     actor=event.actor)
        case ev.ModelArchived():
            update["model"] = _model(run, event, "archived", status_reason=event.reason, actor=event.actor)
        case ev.MessageDeadLettered():
            dead_letter = run.get("dead_letter") or {}
            stuck = dead_letter.get("active")  # failed by an earlier dead letter (another subscription's copy)
            # A finished run stays as it ended (e.g. serving failed on its promotion), and a message
            # already replayed by `ftpipe dlq replay` (shared/domain/jobs.mark_replayed) no longer fails it.
            ended = run.get("status") in TERMINAL and not stuck
            active = not ended and event.message_id not in dead_letter.get("replayed", {})
            update["dead_letter"] = {"active": active, "at": now, "message_id": event.message_id,
                                     "topic": event.source_topic, "subscription": event.subscription,
                                     "message_type": event.message_type, "reason": event.reason,
                                     "previous_status": dead_letter["previous_status"] if stuck else run.get("status")}
            if active:
                update.update(status="failed", error=f"{event.message_type} dead-lettered by {event.subscription}: "
                              f"{event.reason}. Fix the cause, then `ftpipe dlq replay --topic {event.source_topic}`")
    return update


def _model(run: dict, event, status: str | None, **details) -> dict:
    """The run's copy of its model version after a registry change (the registry's documents are
    the authority; this copy lets the runs list show and filter by it). The version's changes are
    numbered (`change`): one delivered after a later one leaves the status as the later one set it."""
    out = {"name": event.model_name, "version": event.version, "uri": event.uri, **details}
    if status is not None and event.change is not None and event.change >= (run.get("model") or {}).get("change", -1):
        out.update(status=status, change=event.change)
    return out


def _spent(run: dict, update: dict, usd: float) -> dict:
    """What the run has cost so far (the trainer's figure: training seconds x GPUs x price per
    GPU-hour, services/trainer/monitor.py) and the GPU-hours that are, at the recipe's price."""
    price = (update.get("hardware") or run.get("hardware") or {}).get("price_per_gpu_hour")
    out = {"so_far_usd": round(float(usd), 6)}
    if price:  # unknown without a price (a recipe may set 0 for its own hardware)
        out["gpu_hours"] = round(float(usd) / price, 6)
    return out


def _estimates(event) -> dict:
    out = {}
    if event.tokens:
        out["tokens"] = event.tokens
    if event.cost_estimate:
        out["cost_estimate"] = event.cost_estimate
        estimate = {k: event.cost_estimate[v] for k, v in (("estimate_usd", "cost"), ("estimate_gpu_hours", "gpu_hours"))
                    if event.cost_estimate.get(v) is not None}
        if estimate:
            out["cost"] = estimate
    return out


def fold_dataset(dataset: dict | None, run: dict, event: ev.Event, now: float) -> dict | None:
    """The dataset document after `event` (None: the event says nothing of a dataset). `run` is the
    run document before the event."""
    if isinstance(event, (ev.DatasetPrepared, ev.DatasetAwaitingReview)):
        doc = deep_merge(dataset or {"id": event.dataset_id, "created_at": now, "runs": []},
                         {"uri": event.dataset_uri, "counts": event.counts, "tenant": event.tenant,
                          "recipe": {"name": event.recipe.name, "version": event.recipe.version},
                          "updated_at": now, **_estimates(event)})
        doc.pop("cost", None)  # the run's; the dataset keeps the estimate itself
        if event.run_id not in doc["runs"]:
            doc["runs"].append(event.run_id)
        if isinstance(event, ev.DatasetAwaitingReview):
            doc["pii"] = event.pii
            if (doc.get("privacy_review") or {}).get("status") != "approved":
                doc["privacy_review"] = {"status": "awaiting", "run_id": event.run_id, "requested_at": now}
        elif event.privacy_signoff is not None:
            doc["privacy_review"] = {"status": "approved", "run_id": event.run_id, "signoff": event.privacy_signoff}
        return doc
    if isinstance(event, ev.DatasetRejected) and dataset is not None \
            and (run.get("privacy_review") or {}).get("status") == "awaiting":
        return {**dataset, "privacy_review": {"status": "rejected", "run_id": event.run_id, "reason": event.reason},
                "updated_at": now}
    return None


def _dataset_id(run: dict, event: ev.Event) -> str | None:
    if isinstance(event, (ev.DatasetPrepared, ev.DatasetAwaitingReview)):
        return event.dataset_id
    if isinstance(event, ev.DatasetRejected):
        return (run.get("dataset") or {}).get("id")
    return None


def record(docs, event: ev.Event) -> bool:
    """Fold one event into the lineage documents, exactly once per event_id. False if seen before."""
    if not event.run_id:
        return False
    seen_key = hashlib.sha256(event.event_id.encode()).hexdigest()
    recipe = getattr(event, "recipe", None)

    def apply(txn) -> bool:
        if txn.get(SEEN, seen_key) is not None:
            return False
        if isinstance(event, ev.MessageDeadLettered) and txn.get(RUNS, event.run_id) is None:
            return False  # a poison message's run_id attribute: no run of ours to mark
        stored = txn.get(RUNS, event.run_id)
        before = stored or {"run_id": event.run_id, "status": "validating", "sub_state": "preparing_data",
                            "created_at": time.time(), "seq": 0}
        dataset_id = _dataset_id(before, event)
        dataset = txn.get(DATASETS, dataset_id) if dataset_id else None
        keep_recipe = recipe is not None and txn.get(RECIPES, event.run_id) is None
        now = time.time()
        seq = before.get("seq", 0) + 1
        run = deep_merge(before, fold(before, event, now))
        run.update(seq=seq, updated_at=now, last_event=event.type)
        count_tenant_change(txn, stored, run)
        txn.set(RUNS, event.run_id, run)
        txn.set(RUN_EVENTS, f"{event.run_id}:{seq:06d}", {"run_id": event.run_id, "seq": seq, "type": event.type,
                                                           "event_id": event.event_id, "at": now,
                                                           "summary": summarise(event)})
        txn.set(SEEN, seen_key, {"run_id": event.run_id, "seq": seq})
        if isinstance(event, ev.TrainingProgress):
            for row in event.metrics:
                txn.set(METRICS, f"{event.run_id}:{row.step:08d}",
                        {"run_id": event.run_id, **row.model_dump(exclude_none=True)})
        if dataset_id and (updated := fold_dataset(dataset, before, event, now)) is not None:
            txn.set(DATASETS, dataset_id, updated)
        if keep_recipe:
            txn.set(RECIPES, event.run_id, {"run_id": event.run_id, "recipe": recipe.model_dump(mode="json")})
        return True

    return docs.transaction(apply)


def summarise(event: ev.Event) -> str:
    match event:
        case ev.JobSubmitted():
            started = event.source.get("object") or event.source.get("submitted") or event.dataset_uri
            return f"{event.recipe.name} v{event.recipe.version} on {started} (tenant {event.tenant})"
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
        case ev.EvaluationErrored():
            return f"evaluation errored on {event.attempts} attempts (no verdict): {event.error}"
        case ev.ModelRegistered():
            return f"{event.model_name} {event.version} {event.status}"
        case ev.ModelApproved():
            return f"{event.model_name} {event.version} approved by {event.approver}" + (f": {event.note}" if event.note else "")
        case ev.ModelPromoted():
            return (f"{event.model_name} {event.version} is {event.alias} ({event.reason}"
                    + (f" by {event.actor}" if event.actor else "")
                    + (f", was {event.previous_version})" if event.previous_version else ")"))
        case ev.ModelQuarantined():
            return f"{event.model_name} {event.version} quarantined: " + "; ".join(event.reasons)
        case ev.ModelArchived():
            return f"{event.model_name} {event.version} archived: {event.reason}"
        case ev.MessageDeadLettered():
            return f"{event.message_type} dead-lettered by {event.subscription}: {event.reason}"
    return event.type
