"""Live progress of a run on the terminal (rich)."""
from __future__ import annotations

import time

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
    """Follow a run until it ends. The bar counts pipeline stages, and training steps within training.
    Without a terminal (CI, logs) it prints a line per stage and every 15 s of training instead."""
    if not console.is_terminal:
        return _watch_lines(client, run_id, timeout_s=timeout_s, console=console)
    with Progress(TextColumn("[bold]{task.fields[run]}[/bold]"), BarColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False) as progress:
        task = progress.add_task("", total=len(_STAGES) - 1, run=run_id)

        def update(run):
            done = _STAGES.index(run.get("sub_state", "preparing_data")) if run else 0
            fraction = run.get("training", {}).get("progress", 0.0) if run and run.get("sub_state") == "training" else 0.0
            progress.update(task, completed=done + (fraction or 0.0), description=describe(run))

        return client.wait(run_id, timeout_s=timeout_s, on_update=update)


def _watch_lines(client, run_id: str, *, timeout_s: float, console: Console) -> dict:
    last = {"stage": None, "at": 0.0}

    def update(run):
        stage = (run or {}).get("sub_state")
        if stage != last["stage"] or (stage == "training" and time.monotonic() - last["at"] >= 15):
            console.print(f"{time.strftime('%H:%M:%S')} {run_id}: {describe(run)}", soft_wrap=True)
            last.update(stage=stage, at=time.monotonic())

    return client.wait(run_id, timeout_s=timeout_s, on_update=update)
