"""Each stage alone, in-process, without the bus: `ftpipe prepare | train | evaluate`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from shared.domain.recipe import load_recipe


class StageInputError(ValueError):
    pass


def _existing(path: str, what: str, *, folder: bool) -> Path:
    p = Path(path)
    if folder and not p.is_dir():
        raise StageInputError(f"{path}: {what} must be a folder")
    if not folder and not p.is_file():
        raise StageInputError(f"{path}: no such {what}")
    return p


def prepare_file(file: str, recipe: str, out: str, *, legal_basis: str | None = None) -> dict:
    from services.preprocess.job import prepare
    from services.preprocess.spark import build_session

    path = _existing(file, "file", folder=False)
    parsed = load_recipe(recipe)  # a wrong recipe fails at once, not after Spark has started
    source = {"file": str(path.resolve())}
    if legal_basis:
        source["legal_basis"] = legal_basis
    result = prepare(build_session(), str(path.resolve()), parsed, Path(out), source=source)
    return result.to_dict()


def train_folder(recipe: str, data: str, out: str, *, console: Console) -> dict:
    from services.trainer.training import train

    data_dir = _existing(data, "prepared dataset", folder=True)
    parsed = load_recipe(recipe)

    def show(rows: list[dict]) -> None:
        last = rows[-1]
        console.print(f"step {last['step']}: loss {last['loss']:.4f}, lr {last.get('lr', 0):.2e}, "
                      f"{last.get('tokens_per_s', 0):.0f} tok/s")

    from services.trainer.training import TrainingError

    try:
        result = train(parsed, data_dir, Path(out), on_metrics=show)
    except TrainingError as exc:
        raise StageInputError(str(exc)) from exc
    return {"adapter_dir": str(result.adapter_dir), "metrics": {k: v for k, v in result.metrics.items() if v is not None},
            "steps": result.steps, "tokens": result.tokens, "seconds": result.seconds}


def train_processes(recipe: str, data: str, out: str, nproc: int) -> dict:
    """train_folder in `nproc` processes on this machine, started by torchrun (gloo on CPU, nccl on
    GPUs) with the recipe's distribution.strategy; the result as train_folder's, from the run record
    rank 0 writes. The ranks' output (progress, logs, errors) goes to stderr as it comes."""
    from shared.platform.build_info import RUN_RECORD

    _existing(data, "prepared dataset", folder=True)
    strategy = load_recipe(recipe).distribution.strategy
    if strategy == "single":
        raise StageInputError(f"--nproc {nproc}: recipe {recipe} has distribution.strategy 'single'; set it to ddp, "
                              "fsdp, deepspeed_zero2 or deepspeed_zero3 (e.g. in a copy of the recipe), or drop --nproc")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "ftpipe.cli", "train", "--recipe", recipe, "--data", data, "--out", out]
    code = subprocess.call(command, stdout=2)  # the ranks print to our stderr: our stdout is the result
    if code != 0:
        raise StageInputError(f"training in {nproc} processes ({strategy}) failed (torchrun exited {code}); the "
                              "ranks' errors are above")
    adapter_dir = Path(out) / "adapter"
    result = json.loads((adapter_dir / RUN_RECORD).read_text())["result"]
    return {"adapter_dir": str(adapter_dir), "metrics": {k: v for k, v in result["metrics"].items() if v is not None},
            **{k: result[k] for k in ("steps", "tokens", "seconds", "distribution")}}


def evaluate_adapter(recipe: str, data: str, adapter: str, *, probes: str | None = None,
                     production: str | None = None) -> dict:
    from services.evaluator.evaluation import EvaluationError, evaluate

    try:
        result = evaluate(load_recipe(recipe), _existing(data, "prepared dataset", folder=True),
                          _existing(adapter, "adapter", folder=True),
                          production_dir=_existing(production, "production version", folder=True) if production else None,
                          probes_path=_existing(probes, "probes file", folder=False) if probes else None)
    except EvaluationError as exc:
        raise StageInputError(str(exc)) from exc
    return result.to_json()
