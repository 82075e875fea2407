"""`make demo`: the main job end to end on the embedded defaults — start the local stack, drop the
support-chat sample, follow the run, and show the registered version against the base model."""
from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shared.domain.metrics import HIGHER_IS_BETTER
from shared.domain.models import resolve_model
from shared.domain.recipe import load_recipe
from shared.platform.config import Settings

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "support" / "support_chats.jsonl"
PROBES = ROOT / "examples" / "support" / "probes.jsonl"
RECIPE = "support-assistant"


def run_demo(settings: Settings, *, keep_up: bool, console: Console) -> int:
    from ftpipe.client import Client
    from ftpipe.progress import watch
    from ftpipe.stack import dashboard_url, down, up

    started = time.monotonic()
    recipe = load_recipe(RECIPE)
    console.rule("[bold]ftpipe demo")
    with console.status(f"base model {recipe.base_model} (converted once into the model cache)…"):
        console.print(f"base model: {resolve_model(recipe.base_model)}")
    with console.status("starting the local stack: notifier, preprocess, trainer, evaluator, registry, tracker…"):
        up(settings)
    console.print(f"stack up; state in {settings.state_dir}, logs in {settings.state_dir / 'logs'}")
    # The link carries the stack's token; --keep-up leaves the dashboard there after the demo.
    console.print(f"watch it in the dashboard: {escape(dashboard_url(settings))}")
    client = Client(settings)
    try:
        client.adapters.store.upload_file(settings.bucket, recipe.eval.probes, str(PROBES))
        run_id = client.drop(SAMPLE, RECIPE)
        console.print(f"dropped {SAMPLE.name} into incoming/{RECIPE}/ → run [bold]{run_id}[/bold]")
        run = watch(client, run_id, timeout_s=3600, console=console)
        show_result(client, run, console)
    finally:
        client.close()
        if not keep_up:
            with console.status("stopping the stack…"):
                down(settings)
    console.print(f"demo finished in {time.monotonic() - started:.0f}s")
    return 0 if run.get("status") == "succeeded" else 1


def show_result(client, run: dict, console: Console) -> None:
    if run.get("status") != "succeeded":
        console.print(f"[red]run {run['run_id']} {run.get('status')}[/red]: {run.get('error', '')}")
        return
    counts = run.get("dataset", {}).get("counts", {})
    console.print("data: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    evaluation = run["evaluation"]
    base, cand = evaluation["scores"].get("base", {}), evaluation["scores"].get("candidate", {})
    table = Table("metric", "base model", "fine-tuned", title="held-out evaluation and probes")
    for metric in HIGHER_IS_BETTER:   # the headline metrics; per-category ones are in the report
        if metric in cand:
            table.add_row(metric, f"{base.get(metric, float('nan')):.3f}", f"{cand[metric]:.3f}")
    console.print(table)
    if "fact_rate" in cand:
        console.print(f"[bold]company facts stated correctly on held-out rephrasings: base {base['fact_rate']:.0%}, "
                      f"fine-tuned {cand['fact_rate']:.0%}[/bold]")
    model = run["model"]
    colour = "green" if model["status"] == "promoted" else "yellow"
    console.print(f"gate {'passed' if evaluation['passed'] else 'failed'} ({len(evaluation['reasons'])} rules):")
    for reason in evaluation["reasons"]:
        console.print(f"  - {escape(reason)}")
    console.print(f"report: {evaluation.get('report_uri', '')}report.md")
    console.print(f"registered [bold]{model['name']} {model['version']}[/bold] ([{colour}]{model['status']}[/{colour}])")
    console.print(f"files (adapter, bundle.json, MODEL_CARD.md): {model['uri']}")
