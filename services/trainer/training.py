"""The trainer's domain logic: fine-tuning of a recipe's base model on a prepared dataset, as plain
functions (no bus, no object store; `main.py` wires those in via the callbacks). What trains is in
`modeling.py` (LoRA, QLoRA, prefix tuning, full), what is learned from the rows in `objectives.py`
(chat SFT, DPO, ORPO, classification); this module is the loop they share.

The loop is a plain torch loop in the style of torchtune recipes rather than the Hugging Face
`Trainer`: we need exact resume (same step, same batch, same loss curve after a pod is replaced),
our own checkpoint layout that the caller uploads to the object store, and batched metrics
callbacks. All three are a few lines each here and would be overrides and workarounds there. It
is also faster: bench/train measures it against a plain TRL SFTTrainer script.

Data contract (produced by the preprocess service): a folder with train.jsonl / val.jsonl /
test.jsonl of the recipe's kind of rows (shared/domain/datasets.py, DESIGN.md "The stages").
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from transformers.integrations.neftune import activate_neftune, deactivate_neftune

from shared.domain.canaries import insert_canaries, recipe_canaries
from shared.domain.datasets import DatasetContractError, read_split
from shared.domain.memory_plan import Device, PlanError, plan_recipe
from shared.domain.probes import Probe, ProbeError, fact_rate, load_probes
from shared.domain.recipe import Recipe, TrainingSpec
from shared.platform.build_info import RUN_RECORD

from services.trainer import distributed, kernels, modeling, objectives, run_record
from services.trainer.compute import CPU_FP32, Compute, ComputeError, resolve as resolve_compute
from services.trainer.monitor import EARLY_STOPS, Alert, Monitor
from services.trainer.packed_attention import PACKED_ATTENTION

logger = logging.getLogger(__name__)

# Recipe fields that only change bookkeeping, memory or speed, not the numbers: a checkpoint written
# under other values of these can still be resumed exactly. Activation checkpointing is one: its
# recompute runs the same ops on the same inputs with the forward's RNG state (tests/unit/test_memory.py).
_BOOKKEEPING_FIELDS = ("checkpoint_every", "keep_checkpoints", "metrics_every", "eval_every", "early_stop_evals",
                       "grad_norm_alert", "gradient_checkpointing")


class TrainingError(RuntimeError):
    """Training cannot run; the message says what is wrong, where, and how to fix it."""


class TrainingStopped(Exception):
    """should_stop() asked the loop to stop; it checkpointed first, so the run can be resumed."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"training stopped at step {step}; resume from {checkpoint}")
        self.step = step
        self.checkpoint = checkpoint


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path          # PEFT adapter (save_pretrained): PeftModel.from_pretrained(base, adapter_dir)
    metrics: dict              # train_loss (mean over the final epoch's steps), val_loss (None without val split)
    steps: int
    tokens: int                # non-padding tokens fed to the model, over the whole run (resumes included)
    seconds: float             # time spent in training steps, over the whole run (resumes included)
    loss_curve: list[float]    # the loss of every step, resumes included
    micro_batch: tuple[int, int]  # (batch_size, grad_accum) the run ended with (the OOM back-off may lower it)
    device: str
    distribution: dict = field(default_factory=dict)  # World.describe: strategy, processes, what each holds
    compute: dict = field(default_factory=dict)       # what ran: precision, checkpointing, attention, loss kernel


@dataclass
class _State:
    """Everything besides weights, optimizer and RNG that a checkpoint must carry to resume exactly."""
    global_step: int = 0
    epoch: int = 0
    next_step: int = 0         # index of the next step batch in this epoch's shuffled order
    tokens_seen: int = 0
    seconds: float = 0.0
    metrics: list[dict] = field(default_factory=list)
    monitor: dict = field(default_factory=dict)   # the Monitor's state: best evaluation, rising streak


def _ignore(*_args) -> None:
    return None


def _no_checkpoint(_step: int) -> Path | None:
    return None


def _never() -> bool:
    return False


# ------------------------------------------------------------------------------------ data

def load_split(path: Path, kind: str = "chat") -> list[dict]:
    """Rows of one prepared split; a malformed line is an error (the preprocess should not emit it)."""
    try:
        return read_split(path, kind)
    except DatasetContractError as exc:
        raise TrainingError(f"{exc}; re-run the preprocess stage with this recipe (its kind of rows)") from exc


def _step_batches(lengths: list[int], step_size: int, seed: int, epoch: int,
                  group_by_length: bool) -> list[list[int]]:
    """Example indices of each optimizer step of one epoch (`step_size` = batch_size x grad_accum),
    a function of (seed, epoch) only: a resumed run recomputes the very same batches instead of
    storing them. What a step holds does not depend on how it is cut into micro-batches, so the
    OOM back-off (smaller micro-batches, more of them) trains on the same steps. (A string seed is
    hashed with SHA-512 by `random`, so this does not depend on PYTHONHASHSEED.)"""
    rng = random.Random(f"ftpipe/{seed}/{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return [order[start:start + step_size] for start in range(0, len(order), step_size)]
    # Sort by length inside windows of 16 steps, cut, then shuffle the steps: each step (and each
    # micro-batch cut from it) holds similar lengths, so far less compute goes to padding (a
    # quarter of it on short chats), while which examples meet, and in what order, stays random at
    # the scale of the epoch.
    window = step_size * 16
    grouped = [i for start in range(0, len(order), window)
               for i in sorted(order[start:start + window], key=lambda i: lengths[i])]
    batches = [grouped[start:start + step_size] for start in range(0, len(grouped), step_size)]
    rng.shuffle(batches)
    return batches


# ------------------------------------------------------------------------------------ model

def _peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: the CUDA allocator's on a GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def _lr_scheduler(optimizer, recipe: Recipe, total_steps: int):
    from transformers import get_scheduler

    name = "constant_with_warmup" if recipe.training.lr_scheduler == "constant" else recipe.training.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=recipe.training.warmup_steps,
                         num_training_steps=total_steps)


@torch.no_grad()
def _evaluate_loss(model, objective, examples: list, *, batch_size: int, device: torch.device) -> float | None:
    """Weighted mean loss over examples (per trained token, pair or example; None when there are none)."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, weight = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        total += objective.loss_sum(model, batch, device).item()
        weight += sum(objective.weight(e) for e in batch)
    model.train(was_training)
    return total / weight


# ------------------------------------------------------------------------------------ checkpoints

def _fingerprint(recipe: Recipe, train_file: Path, precision: str) -> str:
    """What must be equal for a checkpoint to resume exactly: the numbers-relevant recipe fields and
    the data. The precision is the resolved one: auto means bf16 on a GPU and fp32 on a CPU."""
    training = {k: v for k, v in recipe.training.model_dump(mode="json").items() if k not in _BOOKKEEPING_FIELDS}
    training["precision"] = precision
    # the effective batch, not how it is cut: the OOM back-off resumes with smaller micro-batches
    training["effective_batch"] = training.pop("batch_size") * training.pop("grad_accum")
    material = {"base_model": recipe.base_model, "task": recipe.task, "method": recipe.method,
                "system_prompt": recipe.data.system_prompt,
                "adapter": recipe.adapter.model_dump(mode="json"), "training": training,
                "train_sha256": hashlib.sha256(train_file.read_bytes()).hexdigest()}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def _rng_states() -> dict:
    np_state = np.random.get_state()
    states = {"python": random.getstate(),
              # numpy's key array travels as a tensor so the file loads with weights_only=True.
              "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng(states: dict) -> None:
    random.setstate(states["python"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _save_checkpoint(checkpoints: Path, state: _State, model, optimizer, scheduler, *, fingerprint: str,
                     seed: int, total_steps: int, labels: list[str] | None, world: distributed.World) -> Path:
    """Write step-N/ next to a temporary name and rename it into place, so a crash mid-write never
    leaves a half checkpoint that looks complete. Every rank calls it (gathering the shards is a
    collective); rank 0 writes, each rank's RNG state included."""
    final = checkpoints / f"step-{state.global_step}"
    tmp = checkpoints / f".step-{state.global_step}.tmp"
    optimizer_state, rng_states = world.optimizer_state(optimizer), world.gather(_rng_states())
    weights = world.full_state(model)
    if not world.main:
        return final
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    modeling.save_trained(model, tmp / "adapter", labels=labels, state_dict=weights)
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if world.scaler is not None:  # fp16: the loss scale and its growth tracker, for the same skipped steps
        torch.save(world.scaler.state_dict(), tmp / "scaler.pt")
    torch.save(rng_states[0], tmp / "rng.pt")
    for rank, states in enumerate(rng_states[1:], start=1):
        torch.save(states, tmp / f"rng-rank{rank}.pt")
    trainer_state = {
        "global_step": state.global_step, "total_steps": total_steps, "tokens_seen": state.tokens_seen,
        "seconds": round(state.seconds, 3), "fingerprint": fingerprint,
        "data_position": {"epoch": state.epoch, "next_step": state.next_step, "shuffle_seed": seed},
        "metrics": state.metrics, "monitor": state.monitor,
    }
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def local_checkpoints(checkpoints: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the whole checkpoints in a work folder's checkpoints/, oldest first."""
    return sorted((int(p.name.split("-", 1)[1]), p) for p in checkpoints.glob("step-*")
                  if (p / "trainer_state.json").is_file())


def _prune_checkpoints(checkpoints: Path, keep: int, best_step: int | None) -> None:
    """Keep the latest `keep` checkpoints and the best one."""
    steps = local_checkpoints(checkpoints)
    for step, path in steps[:-keep]:
        if step != best_step:
            shutil.rmtree(path)


def _load_checkpoint(path: Path, model, *, fingerprint: str,
                     weights: modeling.WeightFiles | None = None) -> tuple[_State, modeling.WeightFiles | None]:
    """The trainer's state, and the trained weights into the (not yet sharded) model, or, for a
    whole model built unloaded (`weights`), the checkpoint's files for World.wrap to load in place of
    the base's (see modeling.restore_trained); `_load_optimizer` loads the rest once the optimizer is built."""
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise TrainingError(f"resume_from={path} is not a checkpoint (no trainer_state.json); pass a "
                            "checkpoints/step-N folder written by this trainer")
    saved = json.loads(state_file.read_text())
    if saved["fingerprint"] != fingerprint:
        raise TrainingError(f"checkpoint {path} was written for another recipe or dataset (fingerprint "
                            f"{saved['fingerprint']} != {fingerprint}); resume with the run's own recipe and data, "
                            "or start a new run")
    try:
        weights = modeling.restore_trained(model, path / "adapter", weights)
    except modeling.ModelError as exc:
        raise TrainingError(str(exc)) from exc
    position = saved["data_position"]
    return _State(global_step=saved["global_step"], epoch=position["epoch"], next_step=position["next_step"],
                  tokens_seen=saved["tokens_seen"], seconds=saved["seconds"], metrics=saved["metrics"],
                  monitor=saved.get("monitor") or {}), weights


def _load_optimizer(path: Path, optimizer, scheduler, world: distributed.World) -> None:
    world.load_optimizer_state(optimizer, torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if world.scaler is not None and (path / "scaler.pt").is_file():  # absent: written in another precision
        world.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    own = path / f"rng-rank{world.rank}.pt"  # absent when the checkpoint was written by fewer processes
    _restore_rng(torch.load(own if own.is_file() else path / "rng.pt", weights_only=True))


# ------------------------------------------------------------------------------------ training

def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _steps(state: _State, examples: list, lengths: list[int], spec: TrainingSpec) -> Iterator[list]:
    """The examples of each optimizer step from the state's data position on, forever; the state's
    position is advanced by the caller once the step is done."""
    epoch, start = state.epoch, state.next_step
    while True:
        for batch in _step_batches(lengths, spec.batch_size * spec.grad_accum, spec.seed, epoch,
                                   spec.group_by_length)[start:]:
            yield [examples[i] for i in batch]
        epoch, start = epoch + 1, 0


class _OutOfMemory(Exception):
    def __init__(self, where: str, step: int, batch_size: int, detail: str):
        super().__init__(f"out of memory {where} with micro-batches of {batch_size}: {detail}")
        self.where, self.step, self.batch_size = where, step, batch_size


def _is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a RuntimeError saying so)."""
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text


@contextlib.contextmanager
def _backs_off(run: _Attempt, step: int, where: str):
    """Out of memory inside raises _OutOfMemory (`where`: what ran out, for the message), on which
    `train` backs off. What the work held stays referenced by the exception's frames until `train`
    has left its handler."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise
        raise _OutOfMemory(where, step, run.spec.batch_size, str(exc).splitlines()[0][:200]) from exc


def _release_memory() -> None:
    """Return what a failed attempt held: its objects (cycles of frames and tensors included), then
    the CUDA allocator's cached blocks, so the next attempt starts from an empty device. On a CPU,
    glibc keeps freed blocks in its heap: trimming gives them back to the system, or the next attempt
    could fail to map even its model's file."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if _libc is not None:
        _libc.malloc_trim(0)


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_libc = _glibc()


def backed_off(spec: TrainingSpec) -> tuple[int, int] | None:
    """(batch_size, grad_accum) after an out-of-memory step: the largest divisor of the batch size
    up to half of it, with the accumulation raised to keep the effective batch; None at 1."""
    if spec.batch_size == 1:
        return None
    smaller = max(d for d in range(1, spec.batch_size // 2 + 1) if spec.batch_size % d == 0)
    return smaller, spec.grad_accum * (spec.batch_size // smaller)


def _micro_rows(spec, device: torch.device) -> int:
    """Rows per forward pass. A packed row already holds max_seq_len tokens; on a CPU, stacking
    several costs more per token than it saves (memory-bound: bench/train measured 78 tokens/s with
    8 packed rows of 1,024 tokens per forward, 148 with one), so packed rows go one at a time there.
    The step, and so the loss curve, is the same either way."""
    return 1 if spec.packing and device.type == "cpu" else spec.batch_size


def _planned_micro_batch(recipe: Recipe, world: distributed.World, log: logging.Logger) -> Recipe:
    """On a GPU, the micro-batch the memory plan picks for this GPU's memory, with the accumulation
    that keeps the effective batch (so the same steps; the recipe's batch_size is the most a forward
    may hold). A GKE Job already carries it (k8s.py); a local GPU run gets it here. Where the plan
    cannot be made (no config.json) or nothing fits, the recipe runs as written and the
    out-of-memory back-off is the guard."""
    if world.device.type != "cuda" or world.size != recipe.hardware.total_gpus:
        return recipe  # a CPU, or processes other than the recipe's hardware: plan for what runs, not guess
    props = torch.cuda.get_device_properties(world.device)
    gpu = Device(props.name, props.total_memory, bf16=torch.cuda.is_bf16_supported())
    try:
        plan = plan_recipe(recipe, device=gpu)
    except PlanError as exc:
        log.info("no memory plan (%s): training with the recipe's batch_size", exc)
        return recipe
    spec = recipe.training
    if not plan.fits or plan.micro_batch >= spec.batch_size:
        return recipe
    log.info("memory plan on %s: micro-batches of %d x %d accumulation (peak %.1f GiB of %.1f)", props.name,
             plan.micro_batch, plan.grad_accum, plan.peak_bytes / 2**30, props.total_memory / 2**30)
    return recipe.model_copy(update={"training": spec.model_copy(
        update={"batch_size": plan.micro_batch, "grad_accum": plan.grad_accum})})


def train(recipe: Recipe, data_dir: Path, work_dir: Path, *, resume_from: Path | None = None,
          probes_path: Path | None = None, on_alert: Callable[[Alert], None] = _ignore, log: logging.Logger = logger,
          **hooks) -> TrainResult:
    """Train (see `_train_attempt` for the hooks and what a run does), backing off on out of memory:
    the micro-batch is halved and the accumulation doubled (the same effective batch, so the same
    steps: see `_step_batches`), and training resumes from the latest checkpoint; at a micro-batch
    of 1 the run fails with what to change."""
    try:
        world = distributed.join(recipe.distribution.strategy)
    except distributed.DistributedError as exc:
        raise TrainingError(str(exc)) from exc
    if not world.main:  # metrics, checkpoint uploads and alerts are rank 0's
        on_alert, hooks = _ignore, {**hooks, "on_metrics": _ignore, "on_checkpoint": _ignore}
    checkpoints = Path(work_dir) / "checkpoints"
    attempt = _planned_micro_batch(recipe, world, log)
    while True:
        try:
            result = _train_attempt(attempt, data_dir, work_dir, resume_from=resume_from, probes_path=probes_path,
                                    on_alert=on_alert, log=log, world=world, **hooks)
            break
        except _OutOfMemory as oom:
            if world.size > 1:  # the other ranks wait in a collective: no agreed back-off
                raise TrainingError(f"{oom} (rank {world.rank}); a run of several processes does not back off: lower "
                                    "training.batch_size (the effective batch is batch_size x grad_accum)") from oom
            smaller = backed_off(attempt.training)
            if smaller is None:
                raise TrainingError(f"{oom}; nothing smaller to try: lower training.max_seq_len (now "
                                    f"{attempt.training.max_seq_len}) or train on a GPU with more memory") from oom
            message = (f"out of memory {oom.where} with micro-batches of {oom.batch_size}; resuming with "
                       f"{smaller[0]} x {smaller[1]} accumulation (the same effective batch)")
            log.warning(message)
            on_alert(Alert("out_of_memory", oom.step, message, float(oom.batch_size), None, stop=False))
            attempt = attempt.model_copy(update={"training": attempt.training.model_copy(
                update={"batch_size": smaller[0], "grad_accum": smaller[1]})})
            done = local_checkpoints(checkpoints)
            resume_from = done[-1][1] if done else resume_from
        # out of the handler: the exception, and with its frames the failed attempt's model,
        # optimizer and activations, are unreferenced now
        _release_memory()
    if world.main:
        run_record.write(result.adapter_dir / RUN_RECORD, run_record.build(
            recipe, data_dir, device=result.device,
            result={"steps": result.steps, "tokens": result.tokens, "seconds": result.seconds, "metrics": result.metrics,
                    "micro_batch": {"batch_size": result.micro_batch[0], "grad_accum": result.micro_batch[1]},
                    "loss_curve": result.loss_curve, "distribution": result.distribution, "compute": result.compute}))
    return result


def _train_attempt(recipe: Recipe, data_dir: Path, work_dir: Path, *,
                   resume_from: Path | None = None, probes_path: Path | None = None,
                   on_metrics: Callable[[list[dict]], None] = _ignore,
                   on_checkpoint: Callable[[int, Path, dict], None] = _ignore,
                   should_stop: Callable[[], bool] = _never,
                   on_alert: Callable[[Alert], None] = _ignore,
                   fetch_checkpoint: Callable[[int], Path | None] = _no_checkpoint,
                   log: logging.Logger = logger, world: distributed.World | None = None) -> TrainResult:
    """Fine-tune recipe.base_model on data_dir/train.jsonl with the recipe's objective and adapter;
    the result (a PEFT adapter, or the whole model for adapter.kind 'full') lands in work_dir/adapter.

    Checkpoints go to work_dir/checkpoints/step-N every training.checkpoint_every steps and at the
    end; on_checkpoint(step, path, metrics) runs after each (the caller uploads it). Per-step metrics
    reach on_metrics in lists of training.metrics_every; a checkpoint first flushes the pending ones
    (so the final partial list arrives with the final checkpoint, and every step up to a checkpoint
    is delivered before it is announced; steps after it are replayed by a resume). should_stop() is
    polled after every step: when it is true the loop checkpoints and raises TrainingStopped.
    resume_from continues a run exactly from one of its checkpoints. probes_path: the recipe's
    eval.probes file, whose val probes pick the result under training.select_by: probes.

    Validation loss is measured every training.eval_every steps (default: at each checkpoint) and
    rides on that step's metrics. The monitor's alerts (services/trainer/monitor.py) reach
    on_alert; a stop alert ends the run: early stop (validation loss rising) returns the best
    checkpoint's adapter (fetch_checkpoint(step) supplies it when it is no longer on local disk,
    e.g. after a resume), a non-finite loss or the budget raise TrainingError.

    Under torchrun every rank runs this with its own share of each step (services/trainer/distributed.py).
    Each stage below is a function of one `_Attempt`: what it reads and adds is in its docstring.
    """
    run = _Attempt(recipe, Path(data_dir), Path(work_dir), world or distributed.World(), log=log,
                   hooks=_Hooks(on_metrics, on_checkpoint, should_stop, on_alert, fetch_checkpoint),
                   probes_path=probes_path)
    _load_data(run)
    _build_model(run)
    _plan_steps(run)
    _restore_or_start(run, resume_from)

    batches = _steps(run.state, run.examples, [run.objective.length(e) for e in run.examples], run.spec)
    while run.state.global_step < run.total_steps and not run.stopped_early:
        metrics, grad_norm = _optimizer_step(run, next(batches))
        stop = _watch(run, metrics, grad_norm)  # alerts, validation loss; a non-finite loss raises
        _record(run, metrics)
        if stop is not None or _checkpoint_due(run):
            _checkpoint(run)
        if stop is not None and stop.kind == "budget":
            raise TrainingError(stop.message)
        run.stopped_early = stop is not None  # early stop: the result is the best checkpoint's
        if run.world.any(run.hooks.should_stop()):
            raise TrainingStopped(run.state.global_step, _checkpoint_of_this_step(run))
    return _finish(run)


# ------------------------------------------------------------------------------------ the stages

@dataclass(frozen=True)
class _Hooks:
    """The caller's callbacks (see `_train_attempt`)."""
    on_metrics: Callable[[list[dict]], None] = _ignore
    on_checkpoint: Callable[[int, Path, dict], None] = _ignore
    should_stop: Callable[[], bool] = _never
    on_alert: Callable[[Alert], None] = _ignore
    fetch_checkpoint: Callable[[int], Path | None] = _no_checkpoint


@dataclass
class _Attempt:
    """One attempt's state, explicit: what the caller gives, then what the stages add, in their
    order. A stage is a function of it whose docstring says what it reads and what it adds; each
    records its calls, seconds and counts in `stats` (stage name -> {name: number})."""
    recipe: Recipe
    data_dir: Path
    work_dir: Path
    world: distributed.World
    log: logging.Logger = logger
    hooks: _Hooks = field(default_factory=_Hooks)
    probes_path: Path | None = None
    # _load_data
    train_rows: list[dict] = field(default_factory=list)
    val_rows: list[dict] = field(default_factory=list)
    val_probes: list[Probe] = field(default_factory=list)   # select_by probes: what each validation asks
    # _build_model
    compute: Compute = CPU_FP32         # precision and checkpointing, resolved for the device
    tokenizer: Any = None
    labels: list[str] | None = None     # a classifier's classes
    model: Any = None                   # wrapped for the world's strategy by _restore_or_start
    neftune: Any = None                 # the NEFTune forward hook's handle (training.neftune_alpha)
    weights: modeling.WeightFiles | None = None   # a model built unloaded: where _restore_or_start loads it from
    objective: objectives.Objective | None = None
    examples: list = field(default_factory=list)
    val_examples: list = field(default_factory=list)
    # _plan_steps
    steps_per_epoch: int = 0
    total_steps: int = 0
    # _restore_or_start
    fingerprint: str = ""
    state: _State = field(default_factory=_State)   # what a checkpoint carries besides the weights
    optimizer: Any = None
    scheduler: Any = None
    monitor: Monitor | None = None
    stopped_early: bool = False                     # also set by the loop after each step
    # the loop
    pending: list[dict] = field(default_factory=list)   # metrics rows not yet delivered to on_metrics
    last_checkpoint: tuple[int, Path] | None = None     # (step, folder) of the latest one written
    stats: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def spec(self) -> TrainingSpec:
        return self.recipe.training

    @property
    def device(self) -> torch.device:
        return self.world.device

    @property
    def train_file(self) -> Path:
        return self.data_dir / "train.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.work_dir / "checkpoints"

    def count(self, stage: str, **counts: float) -> None:
        stats = self.stats.setdefault(stage, {})
        for name, value in counts.items():
            stats[name] = stats.get(name, 0) + value


def _stage(fn):
    """A stage of `_Attempt`: its calls and seconds (exceptions included) go to run.stats under its name."""
    name = fn.__name__.lstrip("_")

    @functools.wraps(fn)
    def timed(run: _Attempt, *args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(run, *args, **kwargs)
        finally:
            run.count(name, calls=1, seconds=time.perf_counter() - started)
    return timed


@_stage
def _load_data(run: _Attempt) -> None:
    """Reads the recipe, data_dir and probes_path; adds train_rows (the recipe's canaries inserted),
    val_rows and val_probes (select_by probes)."""
    train_file, spec = run.train_file, run.spec
    if not train_file.is_file():
        raise TrainingError(f"no train split at {train_file}; data_dir must be a prepared dataset folder "
                            "(train.jsonl, val.jsonl, test.jsonl) written by the preprocess stage")
    rows = load_split(train_file, run.recipe.data_kind)
    if not rows:
        raise TrainingError(f"the train split {train_file} is empty; the preprocess stage kept no rows "
                            "(see its quality_report.json and rejected.jsonl)")
    read = len(rows)
    if canaries := recipe_canaries(run.recipe, run.data_dir):
        # Secret Sharer canaries: the evaluator measures how exposed these secrets become
        rows = insert_canaries(rows, canaries, repeats=run.recipe.eval.canaries.repeats, seed=spec.seed)
        run.log.info("inserted %d canary conversations (eval.canaries%s) into the train split",
                     len(canaries) * run.recipe.eval.canaries.repeats,
                     ", auto: the data had PII masked" if run.recipe.eval.canaries.count is None else "")
    val_file = run.data_dir / "val.jsonl"
    run.train_rows = rows
    run.val_rows = load_split(val_file, run.recipe.data_kind) if val_file.is_file() else []
    if spec.select_by == "probes":
        run.val_probes = _val_probes(run)
    run.count("load_data", rows=read, canary_rows=len(rows) - read, val_rows=len(run.val_rows))


def _val_probes(run: _Attempt) -> list[Probe]:
    if not run.val_rows:  # its val loss breaks ties, and validation runs only with val rows
        raise TrainingError(f"training.select_by: probes needs a val split; {run.data_dir}/val.jsonl is missing or "
                            "empty (give data.split a val share)")
    if run.probes_path is None:
        raise TrainingError(f"training.select_by is probes, but the probes file eval.probes "
                            f"({run.recipe.eval.probes!r}) did not reach the trainer: put it in the dataset's bucket")
    try:
        return load_probes(run.probes_path, split="val")
    except ProbeError as exc:
        raise TrainingError(f"{exc} (training.select_by: probes picks checkpoints on them)") from exc


@_stage
def _build_model(run: _Attempt) -> None:
    """Reads the rows; seeds every RNG, then adds tokenizer, labels, the model (on the device; for a
    sharded run, built without the base's weights, which `weights` locates), the objective, and the
    examples and val_examples it encodes from the rows."""
    recipe, device, world = run.recipe, run.device, run.world
    _seed_everything(run.spec.seed)
    try:
        run.compute = resolve_compute(recipe, device)
        run.tokenizer = modeling.load_tokenizer(recipe)
        run.labels = objectives.split_labels(recipe, run.train_rows) if recipe.task == "classification" else None
        if world.loads_sharded(recipe.adapter.kind):  # no rank holds the whole model: wrap loads each rank's shards
            run.model, run.weights = modeling.build_unloaded_model(
                recipe, labels=run.labels, log=run.log, compute=run.compute,
                empty=world.empty_init(run.compute, run.spec.max_grad_norm), device=device)
        else:
            model = modeling.build_model(recipe, labels=run.labels, log=run.log, compute=run.compute)
            run.model = model if recipe.adapter.kind == "qlora" else model.to(device)  # a 4-bit model is placed as it loads
        world.note_loading(run.model)
        if run.spec.neftune_alpha is not None:  # the hook adds noise only while the module is in training mode
            run.neftune = activate_neftune(run.model, run.spec.neftune_alpha)
        run.objective = objective = objectives.for_recipe(recipe, run.tokenizer, labels=run.labels)
        run.examples, run.val_examples = objective.encode(run.train_rows, "train", run.log), objective.encode(
            run.val_rows, "val", run.log)
    except (ComputeError, modeling.ModelError, objectives.DataError) as exc:
        raise TrainingError(str(exc)) from exc
    if not run.examples:
        raise TrainingError(f"the train split {run.train_file} has no row this recipe can train on (see the warnings "
                            "above); check the dataset against the recipe's task and method")
    run.count("build_model", examples=len(run.examples), val_examples=len(run.val_examples))


@_stage
def _plan_steps(run: _Attempt) -> None:
    """Reads the examples and the recipe; adds steps_per_epoch and total_steps."""
    spec, objective, examples = run.spec, run.objective, run.examples
    run.steps_per_epoch = math.ceil(len(examples) / (spec.batch_size * spec.grad_accum))
    run.total_steps = spec.max_steps or math.ceil(spec.epochs * run.steps_per_epoch)
    tokens, weight = sum(objective.tokens(e) for e in examples), sum(objective.weight(e) for e in examples)
    run.log.info("train split: %d examples, %d tokens (weight %d); %d steps of %d x %d examples",
                 len(examples), tokens, weight, run.total_steps, spec.grad_accum, spec.batch_size)
    run.count("plan_steps", steps=run.total_steps, tokens=tokens, weight=weight)


@_stage
def _restore_or_start(run: _Attempt, resume_from: Path | None) -> None:
    """Reads the model, its weights' files and the plan; adds the fingerprint, the state
    (resume_from's, or a new one), the model wrapped for the world's strategy with its optimizer
    (loaded), the examples' DPO reference (which needs the loaded model), the scheduler, the monitor
    and whether the run had already stopped early; the model is left in training mode."""
    spec, world = run.spec, run.world
    run.fingerprint = _fingerprint(run.recipe, run.train_file, run.compute.precision)
    if resume_from is not None:
        run.state, run.weights = _load_checkpoint(Path(resume_from), run.model, fingerprint=run.fingerprint,
                                                  weights=run.weights)
    # AdamW's moments take their parameters' dtype: float32, as every trained weight is
    run.model, run.optimizer = world.wrap(run.model, lambda params: torch.optim.AdamW(
        params, lr=spec.learning_rate, weight_decay=0.0), max_grad_norm=spec.max_grad_norm, compute=run.compute,
        weights=run.weights)
    # DPO's reference pass: forwards over the whole split, in micro-batches of the recipe's batch size
    with run.compute.autocast(), _backs_off(run, 0, "in the DPO reference pass (before training)"):
        try:
            run.examples = run.objective.prepare(run.model, run.examples, run.device)
            run.val_examples = run.objective.prepare(run.model, run.val_examples, run.device)
        except objectives.DataError as exc:
            raise TrainingError(str(exc)) from exc
    run.scheduler = _lr_scheduler(run.optimizer, run.recipe, run.total_steps)
    if resume_from is not None:
        _load_optimizer(Path(resume_from), run.optimizer, run.scheduler, world)
        run.log.info("resumed from %s at step %d", resume_from, run.state.global_step)
    run.monitor = Monitor(run.recipe, run.total_steps, Monitor.load_state(run.state.monitor))
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    run.model.train()
    run.stopped_early = run.monitor.stopped_early()  # a resume of a run that had already stopped early
    run.count("restore_or_start", resumed_at=run.state.global_step)


@_stage
def _optimizer_step(run: _Attempt, step: list) -> tuple[dict, float]:
    """One optimizer step over `step`'s examples: this rank's micro-batches of them forward and
    backward, then the optimizer and the scheduler. Reads the model, objective, optimizer, scheduler
    and monitor; advances the state (step, tokens, seconds, data position); returns the step's
    metrics row and its gradient norm. Out of memory raises _OutOfMemory (`train` backs off)."""
    spec, world, device, state, objective = run.spec, run.world, run.device, run.state, run.objective
    started = time.perf_counter()
    # this rank's share; the loss is divided by the weight of the whole step, over all ranks
    micro = world.micro_batches(step, _micro_rows(spec, device))
    targets = sum(objective.weight(e) for e in step)
    tokens = sum(objective.tokens(e) for e in step)
    lr = run.scheduler.get_last_lr()[0]
    step_loss = 0.0
    number = state.global_step + 1
    with _backs_off(run, number, f"at step {number}"):
        for batch, weight in micro:
            with run.compute.autocast():  # the forward only: backward ops run in their forward's dtypes
                loss_sum = objective.loss_sum(run.model, batch, device)
            world.backward(loss_sum * weight / targets)
            step_loss += loss_sum.item() * weight
    with _backs_off(run, number, f"at step {number} (optimizer step)"):  # where AdamW allocates its moments
        grad_norm = world.step(run.optimizer, spec.max_grad_norm)
    if not world.skipped:  # an fp16 step skipped for overflowing: the schedule waits for it (as accelerate does)
        run.scheduler.step()
    step_loss = world.sum(step_loss)
    seconds = time.perf_counter() - started

    state.global_step += 1
    state.tokens_seen += tokens
    state.seconds += seconds
    state.next_step += 1
    metrics = {"step": state.global_step, "total_steps": run.total_steps, "loss": round(step_loss / targets, 6),
               "grad_norm": round(float(grad_norm), 6), "lr": lr,
               "tokens_per_s": round(tokens / seconds, 1),
               "epoch": round(state.epoch + state.next_step / run.steps_per_epoch, 4),
               "peak_memory_mb": _peak_memory_mb(device), "cost": run.monitor.cost(state.seconds)}
    if state.next_step >= run.steps_per_epoch:
        state.epoch, state.next_step = state.epoch + 1, 0
    run.count("optimizer_step", steps=1, micro_batches=len(micro), tokens=tokens)
    return metrics, float(grad_norm)


@_stage
def _watch(run: _Attempt, metrics: dict, grad_norm: float) -> Alert | None:
    """The monitor's look at the step just taken: its alerts (logged, and to on_alert), the
    validation loss when it is due (added to `metrics`). Returns the alert that stops the run, if
    any; a non-finite loss raises TrainingError (nothing after a NaN is worth a checkpoint)."""
    state, spec = run.state, run.spec
    alerts = run.monitor.on_step(state.global_step, metrics["loss"], grad_norm, state.seconds)
    eval_every = spec.eval_every or spec.checkpoint_every
    if run.val_examples and not any(a.stop for a in alerts) and (
            state.global_step % eval_every == 0 or state.global_step == run.total_steps):
        alerts += _validate(run, metrics)
    for alert in alerts:
        level = run.log.info if alert.kind in EARLY_STOPS else run.log.error if alert.stop else run.log.warning
        level("%s: %s", alert.kind, alert.message)
        run.hooks.on_alert(alert)
    run.count("watch", alerts=len(alerts))
    stop = next((a for a in alerts if a.stop), None)
    if stop is not None and stop.kind == "non_finite_loss":
        raise TrainingError(stop.message)
    return stop


@_stage
def _validate(run: _Attempt, metrics: dict) -> list[Alert]:
    """Reads the model, val_examples and val_probes; adds val_loss (and val_fact_rate) to the step's
    metrics; the monitor's alerts on them."""
    metrics["val_loss"] = round(_val_loss(run), 6)
    score = None
    if run.val_probes:  # greedy answers, asked as the evaluator asks its test probes
        with run.compute.autocast():
            score, _ = fact_rate(run.model, run.tokenizer, run.val_probes, system_prompt=run.recipe.data.system_prompt,
                                 max_new_tokens=run.recipe.eval.max_new_tokens)
        metrics["val_fact_rate"] = round(score, 6)
    return run.monitor.on_eval(run.state.global_step, metrics["val_loss"], score)


def _val_loss(run: _Attempt) -> float | None:
    """The validation loss of the model as it is now, in micro-batches of the recipe's batch size."""
    step = run.state.global_step
    with run.compute.autocast(), _backs_off(run, step, f"at step {step} (validation)"):
        return _evaluate_loss(run.model, run.objective, run.val_examples, batch_size=run.spec.batch_size,
                              device=run.device)


@_stage
def _record(run: _Attempt, metrics: dict) -> None:
    """The step's metrics row into the state (checkpoints carry it) and to on_metrics, in lists of metrics_every."""
    run.state.metrics.append(metrics)
    run.pending.append(metrics)
    if len(run.pending) >= run.spec.metrics_every:
        _flush_metrics(run)


def _flush_metrics(run: _Attempt) -> None:
    if run.pending:
        run.hooks.on_metrics(list(run.pending))
        run.pending.clear()


def _checkpoint_due(run: _Attempt) -> bool:
    step = run.state.global_step
    # select_by probes: the result is the best checkpoint, so a new best is always written
    new_best = run.spec.select_by == "probes" and run.monitor.state.best_step == step
    return step % run.spec.checkpoint_every == 0 or step == run.total_steps or new_best


@_stage
def _checkpoint(run: _Attempt) -> Path:
    """Delivers the pending metrics (every step up to a checkpoint reaches the caller before it is
    announced), writes work_dir/checkpoints/step-N, announces it to on_checkpoint and keeps the
    latest keep_checkpoints and the best one; sets last_checkpoint."""
    state, monitor, spec = run.state, run.monitor, run.spec
    _flush_metrics(run)
    state.monitor = monitor.state_dict()
    path = _save_checkpoint(run.checkpoints, state, run.model, run.optimizer, run.scheduler,
                            fingerprint=run.fingerprint, seed=spec.seed, total_steps=run.total_steps,
                            labels=run.labels, world=run.world)
    summary = {**(state.metrics[-1] if state.metrics else {}), "tokens_seen": state.tokens_seen}
    if monitor.state.best_step is not None:
        summary["best_step"] = monitor.state.best_step
    run.log.info("checkpoint step %d -> %s", state.global_step, path)
    run.hooks.on_checkpoint(state.global_step, path, summary)
    if run.world.main:
        _prune_checkpoints(run.checkpoints, spec.keep_checkpoints, monitor.state.best_step)
    run.last_checkpoint = (state.global_step, path)
    return path


def _checkpoint_of_this_step(run: _Attempt) -> Path:
    """The checkpoint of the current step: the one just written, or a new one."""
    last = run.last_checkpoint
    return last[1] if last is not None and last[0] == run.state.global_step else _checkpoint(run)


@_stage
def _finish(run: _Attempt) -> TrainResult:
    """The result: work_dir/adapter (the best checkpoint's adapter after an early stop, or whenever
    select_by is probes; else the final weights) and the final metrics. Reads the whole state; adds nothing."""
    state, world, spec, best = run.state, run.world, run.spec, run.monitor.state
    adapter_dir = run.work_dir / "adapter"
    from_best = run.stopped_early or (spec.select_by == "probes" and best.best_step not in (None, state.global_step))
    if world.main:
        shutil.rmtree(adapter_dir, ignore_errors=True)
    if from_best and world.main:  # the run's result is its best checkpoint, not its last step
        found = run.checkpoints / f"step-{best.best_step}"
        found = found if found.is_dir() else run.hooks.fetch_checkpoint(best.best_step)
        if found is None or not (found / "adapter").is_dir():
            raise TrainingError(f"stopped early at step {state.global_step}, but the best checkpoint (step "
                                f"{best.best_step}) is neither in {run.checkpoints} nor in the run's store")
        shutil.copytree(found / "adapter", adapter_dir)
    if from_best:
        val_loss = best.best_val_loss
    else:
        if run.neftune is not None:  # the saved model is the plain one
            deactivate_neftune(run.model, run.neftune)
            run.neftune = None
        weights = world.full_state(run.model)
        if world.main:
            modeling.save_trained(run.model, adapter_dir, labels=run.labels, state_dict=weights)
        last_eval = state.metrics[-1].get("val_loss") if state.metrics else None
        val_loss = last_eval if last_eval is not None else _val_loss(run)
    final_epoch = state.metrics[-min(run.steps_per_epoch, len(state.metrics)):]
    train_loss = sum(m["loss"] for m in final_epoch) / len(final_epoch) if final_epoch else None
    if val_loss is None:
        run.log.warning("no val split in %s: val_loss is not measured", run.data_dir)
    run.log.info("training done: %d steps, %d tokens, %.1f s, train_loss %s, val_loss %s", state.global_step,
                 state.tokens_seen, state.seconds, train_loss, val_loss)
    run.log.info("time by stage: %s", ", ".join(  # where an attempt's time went, from the stages' own stats
        f"{name} {s['seconds']:.1f} s" + (f" ({s['calls']:.0f} calls)" if s["calls"] > 1 else "")
        for name, s in run.stats.items()))
    metrics = {"train_loss": train_loss, "val_loss": val_loss, "cost": run.monitor.cost(state.seconds)}
    if from_best:
        metrics["best_step"] = best.best_step
    if run.stopped_early and state.global_step < run.total_steps:  # a stop at the last step ended nothing early
        metrics["early_stopped_at"] = state.global_step
    if best.best_score is not None:
        metrics["val_fact_rate"] = best.best_score
    return TrainResult(adapter_dir=adapter_dir, metrics=metrics, steps=state.global_step, tokens=state.tokens_seen,
                       seconds=round(state.seconds, 3), loss_curve=[m["loss"] for m in state.metrics],
                       micro_batch=(spec.batch_size, spec.grad_accum), device=str(run.device),
                       distribution=world.describe(run.model, run.optimizer), compute=_what_ran(run))


def _what_ran(run: _Attempt) -> dict:
    """For the run record: the resolved precision and checkpointing, the attention implementation
    (and packed rows' kernel) and the loss's computation."""
    attention = run.model.config._attn_implementation
    packed = None
    if attention == PACKED_ATTENTION:  # padded batches (validation) still use transformers' SDPA
        attention = "sdpa"
        flash = kernels.flash_varlen() is not None and run.device.type == "cuda" and run.compute.mixed
        packed = "flash_attn_varlen" if flash else "sdpa_per_conversation"
    return {**run.compute.describe(), "attention": attention, "packed_attention": packed,
            "loss": run.objective.loss_kernel(run.model, run.device)}
