"""The trainer service: owns a run through a heartbeat lease, trains with checkpoints to the object
store, resumes from the latest one on redelivery, and does not ack until training has finished."""
from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shared.domain import events as ev
from shared.domain.datasets import missing_prepared_files
from shared.domain.privacy import SignoffMissing, verify_signed_off
from shared.platform.runtime import Context, Reject, Retry, Service
from shared.platform.storage import download_dir, upload_dir

from services.trainer.lease import Heartbeat, Lease, LeaseHeld
from services.trainer.quota import OverQuota, UsageMeter, admit

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
COMPLETE = "COMPLETE"          # written last into a checkpoint or adapter folder: it is whole
_STEP = re.compile(r"/checkpoints/step-(\d+)/" + COMPLETE + "$")
_ANY_STEP = re.compile(r"/checkpoints/step-(\d+)/")


def run_prefix(run_id: str) -> str:
    return f"runs/{run_id}"


def checkpoint_prefix(run_id: str, step: int) -> str:
    return f"{run_prefix(run_id)}/checkpoints/step-{step:06d}"


def latest_checkpoint(store, bucket: str, run_id: str) -> tuple[int, str] | None:
    steps = [int(m.group(1)) for info in store.list(bucket, f"{run_prefix(run_id)}/checkpoints/")
             if (m := _STEP.search(info.name))]
    if not steps:
        return None
    step = max(steps)
    return step, checkpoint_prefix(run_id, step)


def on_dataset(event: ev.DatasetPrepared, ctx: Context):
    if event.recipe.data.privacy_review and not event.privacy_signoff:
        raise Reject("the recipe requires a privacy sign-off (data.privacy_review) and this DatasetPrepared "
                     "carries none; approve it with `ftpipe privacy approve RUN --approver NAME`")
    return train_run(ctx, event.run_id, event.recipe, event.dataset_uri, event.tenant)


def on_job(event: ev.JobSubmitted, ctx: Context):
    if not event.prepared:
        return []  # raw data: preprocess's
    return train_run(ctx, event.run_id, event.recipe, event.dataset_uri, event.tenant)


def train_run(ctx: Context, run_id: str, recipe, dataset_uri: str, tenant: str):
    """Train the run. Under torchrun (a GKE Job's pods, services/trainer/run_job.py) every process
    calls this for the same run: rank 0 owns the lease, decides whether and where from to train,
    publishes the events and uploads checkpoints and the adapter; the other ranks follow its plan,
    train their share and return no events."""
    from services.trainer import distributed

    strategy = recipe.distribution.strategy
    if strategy != "single" and not distributed.launched():
        raise Reject(f"recipe {recipe.name} asks for distribution.strategy {strategy!r}, which trains in several "
                     "processes started by torchrun: on GKE the Job that `ftpipe train --render-k8s` prints, on one "
                     "machine `ftpipe train --nproc N`; this trainer worker is one process")
    try:
        world = distributed.join(strategy)
    except distributed.DistributedError as exc:
        raise Reject(str(exc)) from exc
    if not world.main:
        return _follow(ctx, world, run_id, recipe, dataset_uri)
    return _lead(ctx, world, run_id, recipe, dataset_uri, tenant)


def _download_inputs(ctx: Context, dataset_uri: str, resume_prefix: str | None, tmp: Path) -> tuple[Path, Path | None]:
    """The prepared dataset, and the checkpoint to resume from (None: from the start), into tmp."""
    bucket, dataset_prefix = ctx.store.parse_url(dataset_uri)
    data_dir = tmp / "data"
    download_dir(ctx.store, bucket, dataset_prefix, data_dir)
    if resume_prefix is None:
        return data_dir, None
    resume_dir = tmp / "resume"
    download_dir(ctx.store, bucket, resume_prefix, resume_dir)
    (resume_dir / COMPLETE).unlink(missing_ok=True)
    return data_dir, resume_dir


@dataclass(frozen=True)
class Plan:
    """Rank 0's word to the other ranks, broadcast by `_lead` and obeyed by `_follow` (pickled by
    World.broadcast, so it lives at module level). Before training: train (from the checkpoint at
    the `resume` prefix of the run's bucket, None: from the start), done (nothing to train: rank 0
    reports it), retry or reject (for `reason`). After a stopped training: done (cancelled) or
    retry (preempted, or the lease lost)."""
    action: Literal["train", "done", "retry", "reject"]
    reason: str = ""
    resume: str | None = None


def _follow(ctx: Context, world, run_id: str, recipe, dataset_uri: str) -> list:
    """A rank other than 0: rank 0's plan (train, and from which checkpoint; or done, retry, reject)."""
    from services.trainer.training import TrainingError, TrainingStopped, train

    plan: Plan = world.broadcast(None)
    if plan.action == "retry":
        raise Retry(plan.reason, delay_s=0)
    if plan.action == "reject":
        raise Reject(plan.reason)
    if plan.action != "train":
        return []
    with tempfile.TemporaryDirectory(prefix="ftpipe-train-") as tmp:
        data_dir, resume_dir = _download_inputs(ctx, dataset_uri, plan.resume, Path(tmp))
        try:
            train(recipe, data_dir, Path(tmp) / "work", resume_from=resume_dir, should_stop=ctx.stopping.is_set)
        except TrainingStopped as stopped:
            outcome: Plan = world.broadcast(None)  # rank 0 knows whether the stop was a cancel or a preemption
            if outcome.action == "retry":
                raise Retry(f"stopped at step {stopped.step} with rank 0", delay_s=0) from stopped
        except TrainingError:
            pass  # every rank meets it (it comes from all-reduced numbers); rank 0 reports it
    return []


def _lead(ctx: Context, world, run_id: str, recipe, dataset_uri: str, tenant: str) -> list:
    from services.trainer.training import TrainingError, TrainingStopped, train

    bucket, _ = ctx.store.parse_url(dataset_uri)
    adapter_prefix = f"{run_prefix(run_id)}/adapter"
    done = ctx.store.stat(bucket, f"{adapter_prefix}/{COMPLETE}")
    if done is not None:
        # Trained before, but the completion was not recorded (crash after upload): publish it again.
        world.broadcast(Plan("done"))
        return [completed_event(run_id, recipe, dataset_uri, tenant, ctx.store.url(bucket, adapter_prefix + "/"),
                                json.loads(ctx.store.read(bucket, f"{adapter_prefix}/{COMPLETE}")))]
    lease = Lease(ctx.docs, run_id, WORKER_ID, ctx.settings.trainer_lease_s)
    try:
        lease.acquire()
    except LeaseHeld as exc:
        world.broadcast(Plan("retry", reason=str(exc)))
        raise Retry(str(exc), delay_s=min(exc.expires_in + 1, 60)) from exc
    try:
        try:
            admit(ctx.docs, tenant, run_id, recipe.hardware.total_gpus)
        except OverQuota as exc:
            ctx.log.warning("refused: %s", exc)
            world.broadcast(Plan("done"))
            return [ev.TrainingFailed(run_id=run_id, reason=f"over quota: {exc}")]
        with tempfile.TemporaryDirectory(prefix="ftpipe-train-") as tmp, Heartbeat(lease) as beat, \
                UsageMeter(ctx.docs, run_id, tenant, recipe.hardware.total_gpus, ctx.settings.trainer_lease_s / 3):
            found = latest_checkpoint(ctx.store, bucket, run_id)
            resumed_step, resume_prefix = found or (0, None)
            data_dir, resume_dir = _download_inputs(ctx, dataset_uri, resume_prefix, Path(tmp))
            if recipe.data.privacy_review:
                try:
                    verify_signed_off(ctx.docs, data_dir)
                except SignoffMissing as exc:
                    world.broadcast(Plan("reject", reason=str(exc)))
                    raise Reject(str(exc)) from exc
            if problem := missing_prepared_files(data_dir):
                world.broadcast(Plan("done"))
                return [ev.TrainingFailed(run_id=run_id, reason=f"{dataset_uri}: {problem}")]
            world.broadcast(Plan("train", resume=resume_prefix))
            ctx.publish(ev.TrainingStarted(run_id=run_id, dataset_uri=dataset_uri, resumed_from_step=resumed_step))
            ctx.log.info("training", extra={"resumed_from_step": resumed_step, "worker": WORKER_ID})

            def on_metrics(rows: list[dict]) -> None:
                ctx.publish(ev.TrainingProgress(run_id=run_id, metrics=rows, total_steps=rows[-1].get("total_steps")))

            def on_checkpoint(step: int, path: Path, metrics: dict) -> None:
                prefix = checkpoint_prefix(run_id, step)
                upload_dir(ctx.store, path, bucket, prefix, overwrite=True)
                ctx.store.write(bucket, f"{prefix}/{COMPLETE}", json.dumps(metrics).encode())
                prune_checkpoints(ctx.store, bucket, run_id, keep=recipe.training.keep_checkpoints,
                                  best=metrics.get("best_step"))
                ctx.publish(ev.CheckpointSaved(run_id=run_id, step=step, uri=ctx.store.url(bucket, prefix + "/"),
                                               metrics={k: float(v) for k, v in metrics.items() if _is_number(v)}))

            def should_stop() -> bool:
                return ctx.stopping.is_set() or beat.lost.is_set() or ctx.cancelled(run_id)

            def on_alert(alert) -> None:
                ctx.publish(ev.TrainingAlert(run_id=run_id, step=alert.step, kind=alert.kind, message=alert.message,
                                             value=alert.value, threshold=alert.threshold, stop=alert.stop))

            def fetch_checkpoint(step: int) -> Path | None:
                prefix = checkpoint_prefix(run_id, step)
                if ctx.store.stat(bucket, f"{prefix}/{COMPLETE}") is None:
                    return None
                target = Path(tmp) / f"best-{step}"
                download_dir(ctx.store, bucket, prefix, target)
                return target

            try:
                result = train(recipe, data_dir, Path(tmp) / "work", resume_from=resume_dir,
                               on_metrics=on_metrics, on_checkpoint=on_checkpoint, should_stop=should_stop,
                               on_alert=on_alert, fetch_checkpoint=fetch_checkpoint)
            except TrainingStopped as stopped:
                if ctx.cancelled(run_id):
                    world.broadcast(Plan("done"))
                    return [ev.TrainingFailed(run_id=run_id, reason="cancelled by request", step=stopped.step,
                                              cancelled=True)]
                # Preempted (SIGTERM) or lease lost: checkpointed; whoever gets the redelivery resumes.
                world.broadcast(Plan("retry"))
                raise Retry(f"stopped at step {stopped.step}; will resume from its checkpoint", delay_s=0) from stopped
            except TrainingError as exc:
                return [ev.TrainingFailed(run_id=run_id, reason=str(exc))]
            summary = {**{k: float(v) for k, v in result.metrics.items() if _is_number(v)}, "steps": result.steps}
            upload_dir(ctx.store, result.adapter_dir, bucket, adapter_prefix, overwrite=True)
            ctx.store.write(bucket, f"{adapter_prefix}/{COMPLETE}", json.dumps(summary).encode())
            return [completed_event(run_id, recipe, dataset_uri, tenant, ctx.store.url(bucket, adapter_prefix + "/"), summary)]
    finally:
        lease.release()


def completed_event(run_id, recipe, dataset_uri, tenant, adapter_uri, summary: dict) -> ev.TrainingCompleted:
    return ev.TrainingCompleted(run_id=run_id, recipe=recipe, dataset_uri=dataset_uri, adapter_uri=adapter_uri,
                                metrics={k: v for k, v in summary.items() if k != "steps"},
                                steps=int(summary.get("steps", 0)), tenant=tenant)


def prune_checkpoints(store, bucket: str, run_id: str, keep: int, best: int | None = None) -> None:
    """Keep the latest `keep` complete checkpoints of the run and its best one (lowest val loss).
    Partial folders older than the latest complete one (an upload or a prune cut short) go too."""
    names = [info.name for info in store.list(bucket, f"{run_prefix(run_id)}/checkpoints/")]
    complete = sorted({int(m.group(1)) for name in names if (m := _STEP.search(name))})
    if not complete:
        return
    every = {int(m.group(1)) for name in names if (m := _ANY_STEP.search(name))}
    kept = set(complete[-keep:]) | {best}
    for step in sorted(s for s in every if s not in kept and s < complete[-1]):
        prefix = checkpoint_prefix(run_id, step)
        marker = f"{prefix}/{COMPLETE}"
        # The marker first: a folder cut short mid-prune must read as partial, never as whole.
        if marker in names:
            store.delete(bucket, marker)
        for info in list(store.list(bucket, prefix + "/")):
            store.delete(bucket, info.name)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


SERVICE = Service(
    name="trainer",
    handlers={ev.DatasetPrepared: on_dataset, ev.JobSubmitted: on_job},
    max_messages=1,
    max_lease_s=24 * 3600,
)
