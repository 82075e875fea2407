"""Facts that stick: does a recipe teach a company's facts, on a dataset it was never tuned on?

Prepares a support dataset's chats as the preprocess stage would (bench/demo_recipe.py's `prepare`),
trains the recipe on them with services.trainer.training.train, and evaluates the tuned adapter
with services.evaluator.evaluation.evaluate: the gate's decision and every score, among them the
knowledge fact rate of base and candidate on the probe file's `test` probes (the evaluator gates on
those only; `val` probes are the trainer's, for `select_by: probes`, and the tuned model's rate on
them is reported too: it, not the test rate, is what may choose between recipes).

    HF_HUB_OFFLINE=1 PYTHONPATH=. nice python bench/eval/facts.py --variant baseline \
        [--dataset support_b] [--set training.neftune_alpha=5] [--adapter DIR] [--no-gate]

The company's system prompt comes with the dataset (DATASETS), everything else from the recipe and
--set. One run = one variant, one seed (`--set training.seed=N`); each appends its figures to
--out (bench/eval/facts_results.json). --adapter evaluates an adapter trained before (skips
training); --no-gate measures only the knowledge probes (base and tuned), not the whole gate.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from demo_recipe import prepare  # noqa: E402
from peft import PeftModel  # noqa: E402

from shared.domain.recipe import apply_overrides, load_recipe  # noqa: E402

from services.evaluator.evaluation import evaluate  # noqa: E402
from services.evaluator.probes import fact_rate, load_probes  # noqa: E402
from services.trainer.modeling import load_base  # noqa: E402
from services.trainer.training import train  # noqa: E402

DATASETS = {
    "support": ("You are the support assistant of Cairnridge Outfitters.", ROOT / "examples" / "support"),
    "support_b": ("You are the support assistant of Larkfield Home.", ROOT / "examples" / "support_b"),
}


def _overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", required=True, help="a name for this configuration in the results")
    parser.add_argument("--dataset", default="support_b", choices=sorted(DATASETS))
    parser.add_argument("--recipe", default="support-assistant")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--adapter", type=Path, help="evaluate this adapter instead of training one")
    parser.add_argument("--keep", type=Path, help="copy the trained adapter here")
    parser.add_argument("--no-gate", action="store_true", help="knowledge probes only, not the whole gate")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "eval" / "facts_results.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    system_prompt, folder = DATASETS[args.dataset]
    overrides = {"data.system_prompt": system_prompt, **_overrides(args.set)}
    recipe = apply_overrides(load_recipe(args.recipe), overrides)
    probes_path = folder / "probes.jsonl"
    row: dict = {"variant": args.variant, "dataset": args.dataset, "recipe": args.recipe, "set": _overrides(args.set),
                 "load_average_start": round(os.getloadavg()[0], 1)}
    print(f"{args.variant} on {args.dataset}: {row['set']}", flush=True)

    with tempfile.TemporaryDirectory(prefix="ftpipe-facts-") as tmp:
        data_dir = Path(tmp) / "data"
        counts = prepare(recipe, folder / "support_chats.jsonl", data_dir)
        row["rows"] = dict(zip(("train", "val", "test"), counts, strict=True))
        adapter = args.adapter
        if adapter is None:
            started = time.perf_counter()
            result = train(recipe, data_dir, Path(tmp) / "work", probes_path=probes_path)
            row["train_s"] = round(time.perf_counter() - started, 1)
            row.update(steps=result.steps, tokens=result.tokens, train_loss=result.metrics["train_loss"],
                       val_loss=result.metrics["val_loss"], best_step=result.metrics.get("best_step"),
                       val_fact_rate=result.metrics.get("val_fact_rate"))
            adapter = result.adapter_dir
            if args.keep:
                shutil.rmtree(args.keep, ignore_errors=True)
                shutil.copytree(adapter, args.keep)
            print(f"trained {result.steps} steps in {row['train_s']:.0f} s; {result.metrics}", flush=True)

        started = time.perf_counter()
        row["fact_rate"] = {}
        tokenizer, base = load_base(recipe)
        # the test probes of both sides are the evaluator's to score, unless --no-gate
        asks = [("candidate", "val")] + ([("base", "test"), ("candidate", "test")] if args.no_gate else [])
        for side in ("base", "candidate"):
            model = base if side == "base" else PeftModel.from_pretrained(base, adapter).merge_and_unload()
            for split in (split for s, split in asks if s == side):
                rate, _ = fact_rate(model, tokenizer, load_probes(probes_path, split=split),
                                    system_prompt=system_prompt, max_new_tokens=recipe.eval.max_new_tokens)
                row["fact_rate"][f"{side}_{split}"] = round(rate, 4)
        del base, model
        if not args.no_gate:
            result = evaluate(recipe, data_dir, adapter, probes_path=probes_path)
            row["fact_rate"].update({f"{side}_test_gate": s.get("fact_rate") for side, s in result.scores.items()})
            row["gate"] = {"outcome": result.gate.get("outcome"), "passed": result.passed}
            row["gate_reasons"] = result.reasons
            row["scores"] = result.scores
            row["eval_timings"] = result.timings
        row["eval_s"] = round(time.perf_counter() - started, 1)
    row["load_average_end"] = round(os.getloadavg()[0], 1)
    print(json.dumps(row, indent=1), flush=True)
    results = json.loads(args.out.read_text()) if args.out.exists() else []
    args.out.write_text(json.dumps([*results, row], indent=1) + "\n")


if __name__ == "__main__":
    main()
