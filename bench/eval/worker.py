"""One evaluation in a fresh process, for bench/eval/run.py. The evaluator under test is whichever
ftpipe tree PYTHONPATH puts first (this one, or an older commit's worktree), so the same script
measures the code before and after a change.

    PYTHONPATH=<tree> python bench/eval/worker.py --recipe R.yaml --data D --adapter A --out O.json \
        [--probes P] [--cache DIR] [--set eval.x=json ...]

Writes {wall, result (EvalResult.to_json() less the markdown and samples), rules (the effective gate
rules: metric -> GateRule as JSON)}. Never prints training text.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--probes")
    parser.add_argument("--cache", help="a folder for the evaluation cache (where the tree has one)")
    parser.add_argument("--set", action="append", default=[], help="KEY=JSON recipe override")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from shared.domain.gate_rules import effective_rules
    from shared.domain.recipe import apply_overrides, parse_recipe

    from services.evaluator.evaluation import evaluate

    recipe = parse_recipe(Path(args.recipe).read_text(), source=args.recipe)
    if args.set:
        recipe = apply_overrides(recipe, {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)})
    kwargs = {}
    if args.cache and "cache" in inspect.signature(evaluate).parameters:
        from shared.platform.adapters.local_store import LocalObjectStore

        from services.evaluator.cache import StoreEntries

        kwargs["cache"] = StoreEntries(LocalObjectStore(args.cache), "bench")
    started = time.perf_counter()
    result = evaluate(recipe, Path(args.data), Path(args.adapter), probes_path=Path(args.probes) if args.probes else None,
                      log=lambda _: None, **kwargs)
    wall = time.perf_counter() - started
    out = {k: v for k, v in result.to_json().items() if k not in ("report_markdown", "samples")}
    rules = {metric: rule.model_dump(mode="json") for metric, (rule, _) in effective_rules(recipe).items()}
    Path(args.out).write_text(json.dumps({"wall": wall, "result": out, "rules": rules}))


if __name__ == "__main__":
    main()
