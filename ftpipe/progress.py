"""Live progress of a run on the terminal (rich)."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_STAGES = ["preparing_data", "waiting_for_capacity", "training", "evaluating", "registering", "done"]


def describe(run: dict | None) -> str:
    if run is None:
        return "waiting for the run to appear"
    text = f"{run.get('status')}: {run.get('sub_state', '').replace('_', ' ')}"
    training = run.get("training", {})
    latest = training.get("latest", {})
    if run.get("sub_state") == "training" and "step" in training:
        text += f" — step {training['step']}/{training.get('total_steps', '?')}"
        if "loss" in latest:
            text += f", loss {latest['loss']:.3f}"
        if latest.get("tokens_per_s"):
            text += f", {latest['tokens_per_s']:.0f} tok/s"
    return text


def watch(client, run_id: str, *, timeout_s: float, console: Console) -> dict:
    """Follow a run until it ends. The bar counts pipeline stages, and training steps within training."""
    with Progress(TextColumn("[bold]{task.fields[run]}[/bold]"), BarColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False) as progress:
        task = progress.add_task("", total=len(_STAGES) - 1, run=run_id)

        def update(run):
            done = _STAGES.index(run.get("sub_state", "preparing_data")) if run else 0
            fraction = run.get("training", {}).get("progress", 0.0) if run and run.get("sub_state") == "training" else 0.0
            progress.update(task, completed=done + (fraction or 0.0), description=describe(run))

        return client.wait(run_id, timeout_s=timeout_s, on_update=update)
