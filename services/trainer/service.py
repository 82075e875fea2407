"""The trainer service: owns a run through a heartbeat lease, trains with checkpoints to the object
store, resumes from the latest one on redelivery, and does not ack until training has finished."""
from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from shared.domain import events as ev
from shared.domain.datasets import missing_prepared_files
from shared.domain.privacy import SignoffMissing, verify_signed_off
from shared.platform.runtime import Context, Reject, Retry, Service
from shared.platform.storage import download_dir, download_if_present, upload_dir

from services.trainer.lease import Heartbeat, Lease, LeaseHeld
from services.trainer.quota import OverQuota, UsageMeter, admit, estimated_cost

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


def _selection_probes(ctx: Context, recipe, dataset_uri: str, tmp: Path) -> Path | None:
    """eval.probes from the dataset's bucket, as the evaluator fetches it, when training.select_by is
    probes (its val probes pick the checkpoint); None otherwise or when it is not there (train says so)."""
    if recipe.training.select_by != "probes":
        return None
    bucket, _ = ctx.store.parse_url(dataset_uri)
    return download_if_present(ctx.store, bucket, recipe.eval.probes, tmp / "probes.jsonl")


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
            train(recipe, data_dir, Path(tmp) / "work", resume_from=resume_dir, should_stop=ctx.stopping.is_set,
                  probes_path=_selection_probes(ctx, recipe, dataset_uri, Path(tmp)))
        except TrainingStopped as stopped:
            outcome: Plan = world.broadcast(None)  # rank 0 knows whether the stop was a cancel or a preemption
            if outcome.action == "retry":
                raise Retry(f"stopped at step {stopped.step} with rank 0", delay_s=0) from stopped
        except TrainingError:
            pass  # every rank meets it (it comes from all-reduced numbers); rank 0 reports it
    return []


def _lead(ctx: Context, world, run_id: str, recipe, dataset_uri: str, tenant: str) -> list:
    """Rank 0: owns the lease, decides whether and from where to train, tells the other ranks (a
    `Plan`), publishes the events and uploads checkpoints and the adapter. Each stage is a function
    of one `_Run`; a stage that ends the run tells the other ranks so and returns the events (or
    raises Retry or Reject), one that lets it go on returns None."""
    from services.trainer.training import TrainingError, TrainingStopped, train

    run = _Run(ctx, world, run_id, recipe, dataset_uri, tenant)
    if (events := _already_trained(run)) is not None:
        return events
    lease = _take_lease(run)
    try:
        if (events := _admit(run)) is not None:
            return events
        with tempfile.TemporaryDirectory(prefix="ftpipe-train-") as tmp, Heartbeat(lease) as beat, \
                UsageMeter(ctx.docs, run_id, tenant, recipe.hardware.total_gpus, ctx.settings.trainer_lease_s / 3,
                           price_per_gpu_hour=recipe.hardware.gpu_price):
            _fetch_inputs(run, Path(tmp))
            if (events := _verify_inputs(run)) is not None:
                return events
            _start(run)
            callbacks = _Callbacks(run, beat)
            try:
                result = train(recipe, run.data_dir, run.tmp / "work", resume_from=run.resume_dir,
                               probes_path=_selection_probes(ctx, recipe, dataset_uri, run.tmp),
                               on_metrics=callbacks.on_metrics, on_checkpoint=callbacks.on_checkpoint,
                               should_stop=callbacks.should_stop, on_alert=callbacks.on_alert,
                               fetch_checkpoint=callbacks.fetch_checkpoint)
            except TrainingStopped as stopped:
                return _stopped(run, stopped)
            except TrainingError as exc:
                return [ev.TrainingFailed(run_id=run_id, reason=str(exc))]
            return _upload_result(run, result)
    finally:
        lease.release()


@dataclass
class _Run:
    """The state `_lead`'s stages share: the job, then what the stages add."""
    ctx: Context
    world: Any
    run_id: str
    recipe: Any
    dataset_uri: str
    tenant: str
    bucket: str = field(init=False)     # the dataset's, where the run's checkpoints and adapter go too
    # _fetch_inputs
    tmp: Path | None = None             # the run's temporary folder
    resumed_step: int = 0
    resume_prefix: str | None = None    # the latest complete checkpoint in the store (None: start)
    data_dir: Path | None = None
    resume_dir: Path | None = None

    def __post_init__(self) -> None:
        self.bucket, _ = self.ctx.store.parse_url(self.dataset_uri)

    @property
    def adapter_prefix(self) -> str:
        return f"{run_prefix(self.run_id)}/adapter"

    def tell(self, plan: Plan) -> None:
        """The plan, to the other ranks (waiting for it in `_follow`)."""
        self.world.broadcast(plan)


def _already_trained(run: _Run) -> list | None:
    """Trained before, but the completion was not recorded (crash after upload): publish it again."""
    store, complete = run.ctx.store, f"{run.adapter_prefix}/{COMPLETE}"
    if store.stat(run.bucket, complete) is None:
        return None
    run.tell(Plan("done"))
    return [completed_event(run.run_id, run.recipe, run.dataset_uri, run.tenant,
                            store.url(run.bucket, run.adapter_prefix + "/"), json.loads(store.read(run.bucket, complete)))]


def _take_lease(run: _Run) -> Lease:
    """The run's lease; held by another worker, the message comes back when it may have expired."""
    lease = Lease(run.ctx.docs, run.run_id, WORKER_ID, run.ctx.settings.trainer_lease_s)
    try:
        lease.acquire()
    except LeaseHeld as exc:
        run.tell(Plan("retry", reason=str(exc)))
        raise Retry(str(exc), delay_s=min(exc.expires_in + 1, 60)) from exc
    return lease


def _admit(run: _Run) -> list | None:
    """The tenant's quota admits the run, or it fails as over quota."""
    try:
        estimate, source = estimated_cost(run.ctx.store, run.dataset_uri, run.recipe)
        admit(run.ctx.docs, run.tenant, run.run_id, run.recipe.hardware.total_gpus, estimate_usd=estimate,
              estimate_from=source)
    except OverQuota as exc:
        run.ctx.log.warning("refused: %s", exc)
        run.tell(Plan("done"))
        return [ev.TrainingFailed(run_id=run.run_id, reason=f"over quota: {exc}")]
    return None


def _fetch_inputs(run: _Run, tmp: Path) -> None:
    """Adds tmp, the latest checkpoint in the store (resumed_step, resume_prefix), and data_dir and
    resume_dir downloaded into tmp."""
    run.tmp = tmp
    run.resumed_step, run.resume_prefix = latest_checkpoint(run.ctx.store, run.bucket, run.run_id) or (0, None)
    run.data_dir, run.resume_dir = _download_inputs(run.ctx, run.dataset_uri, run.resume_prefix, tmp)


def _verify_inputs(run: _Run) -> list | None:
    """The privacy sign-off (a review recipe without one is rejected) and the prepared files (the
    run fails without them)."""
    if run.recipe.data.privacy_review:
        try:
            verify_signed_off(run.ctx.docs, run.data_dir)
        except SignoffMissing as exc:
            run.tell(Plan("reject", reason=str(exc)))
            raise Reject(str(exc)) from exc
    if problem := missing_prepared_files(run.data_dir):
        run.tell(Plan("done"))
        return [ev.TrainingFailed(run_id=run.run_id, reason=f"{run.dataset_uri}: {problem}")]
    return None


def _start(run: _Run) -> None:
    """Every rank trains, from the checkpoint found (or the start); TrainingStarted says so."""
    run.tell(Plan("train", resume=run.resume_prefix))
    run.ctx.publish(ev.TrainingStarted(run_id=run.run_id, dataset_uri=run.dataset_uri,
                                       resumed_from_step=run.resumed_step))
    run.ctx.log.info("training", extra={"resumed_from_step": run.resumed_step, "worker": WORKER_ID})


@dataclass(frozen=True)
class _Callbacks:
    """train()'s callbacks on rank 0: metrics and alerts become events, each checkpoint is uploaded
    (then the old ones pruned) and announced, the loop stops on SIGTERM, a lost lease or a cancel,
    and the best checkpoint comes back from the store when an early stop needs it."""
    run: _Run
    beat: Heartbeat

    def on_metrics(self, rows: list[dict]) -> None:
        self.run.ctx.publish(ev.TrainingProgress(run_id=self.run.run_id, metrics=rows,
                                                 total_steps=rows[-1].get("total_steps")))

    def on_checkpoint(self, step: int, path: Path, metrics: dict) -> None:
        run, store = self.run, self.run.ctx.store
        prefix = checkpoint_prefix(run.run_id, step)
        upload_dir(store, path, run.bucket, prefix, overwrite=True)
        store.write(run.bucket, f"{prefix}/{COMPLETE}", json.dumps(metrics).encode())
        prune_checkpoints(store, run.bucket, run.run_id, keep=run.recipe.training.keep_checkpoints,
                          best=metrics.get("best_step"))
        run.ctx.publish(ev.CheckpointSaved(run_id=run.run_id, step=step, uri=store.url(run.bucket, prefix + "/"),
                                           metrics={k: float(v) for k, v in metrics.items() if _is_number(v)}))

    def should_stop(self) -> bool:
        ctx = self.run.ctx
        return ctx.stopping.is_set() or self.beat.lost.is_set() or ctx.cancelled(self.run.run_id)

    def on_alert(self, alert) -> None:
        self.run.ctx.publish(ev.TrainingAlert(run_id=self.run.run_id, step=alert.step, kind=alert.kind,
                                              message=alert.message, value=alert.value,
                                              threshold=alert.threshold, stop=alert.stop))

    def fetch_checkpoint(self, step: int) -> Path | None:
        run = self.run
        prefix = checkpoint_prefix(run.run_id, step)
        if run.ctx.store.stat(run.bucket, f"{prefix}/{COMPLETE}") is None:
            return None
        target = run.tmp / f"best-{step}"
        download_dir(run.ctx.store, run.bucket, prefix, target)
        return target


def _stopped(run: _Run, stopped) -> list:
    """Training stopped after a checkpoint: cancelled by request, the run fails as cancelled;
    preempted (SIGTERM) or the lease lost, the message goes back and whoever gets it resumes."""
    if run.ctx.cancelled(run.run_id):
        run.tell(Plan("done"))
        return [ev.TrainingFailed(run_id=run.run_id, reason="cancelled by request", step=stopped.step,
                                  cancelled=True)]
    run.tell(Plan("retry"))
    raise Retry(f"stopped at step {stopped.step}; will resume from its checkpoint", delay_s=0) from stopped


def _upload_result(run: _Run, result) -> list:
    """The adapter to the store, COMPLETE (its summary) last, and the completion event."""
    store = run.ctx.store
    summary = {**{k: float(v) for k, v in result.metrics.items() if _is_number(v)}, "steps": result.steps}
    upload_dir(store, result.adapter_dir, run.bucket, run.adapter_prefix, overwrite=True)
    store.write(run.bucket, f"{run.adapter_prefix}/{COMPLETE}", json.dumps(summary).encode())
    return [completed_event(run.run_id, run.recipe, run.dataset_uri, run.tenant,
                            store.url(run.bucket, run.adapter_prefix + "/"), summary)]


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
