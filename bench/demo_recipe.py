"""Does the demo recipe really teach? Base vs fine-tuned fact rate on the held-out probes.

Prepares examples/support/support_chats.jsonl with the preprocess stage's own pure-Python steps
(validation and normalisation, exact dedup, PII masking, the content-hash split; no Spark, so
this takes a second but yields the very train/val/test rows the demo trains on), measures the
base model on examples/support/probes.jsonl, trains with services.trainer.training.train,
and measures the tuned model.

    HF_HUB_OFFLINE=1 python bench/demo_recipe.py [--recipe support-assistant] [--set training.epochs=2] [--show]

Timings depend on the machine and on what else runs on it: the load average is printed with them.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from shared.domain.recipe import Recipe, apply_overrides, load_recipe  # noqa: E402

from services.evaluator.probes import fact_rate, load_probes  # noqa: E402
from services.preprocess import formats, partitions, split  # noqa: E402
from services.trainer.modeling import load_base  # noqa: E402
from services.trainer.training import train  # noqa: E402

SAMPLE = ROOT / "examples" / "support" / "support_chats.jsonl"
PROBES = ROOT / "examples" / "support" / "probes.jsonl"


def prepare(recipe: Recipe, sample: Path, out: Path) -> list[int]:
    """Write train/val/test.jsonl as the preprocess stage would; returns the row count per split."""
    rules = formats.RowRules(format=recipe.data.format, system_prompt=recipe.data.system_prompt,
                             max_row_bytes=recipe.data.max_row_bytes)
    lines = sample.read_text(encoding="utf-8").splitlines()
    records = formats.validate_jsonl(((line, i) for i, line in enumerate(lines)), rules)
    unique: dict[str, tuple[int, tuple]] = {}
    for rec in records:
        if rec[0] == "ok":
            key, value = partitions.dedup_key(rec)
            unique[key] = partitions.keep_representative(unique[key], value) if key in unique else value
    out.mkdir(parents=True, exist_ok=True)
    splits: list[list[str]] = [[], [], []]
    for index, _, _, line, *_ in partitions.mask_and_place(unique.items(), recipe.data.pii_categories, recipe.data.split):
        splits[index].append(line)
    for name, rows in zip(split.SPLITS, splits, strict=True):
        (out / f"{name}.jsonl").write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    return [len(rows) for rows in splits]


def measure(label: str, model, tokenizer, probes, recipe: Recipe, show: bool) -> float:
    started = time.perf_counter()
    rate, details = fact_rate(model, tokenizer, probes, system_prompt=recipe.data.system_prompt,
                              max_new_tokens=recipe.eval.max_new_tokens)
    print(f"{label}: fact rate {rate:.0%} ({sum(d['passed'] for d in details)}/{len(details)}) "
          f"in {time.perf_counter() - started:.0f} s")
    if show:
        for d in details:
            print(f"  [{'x' if d['passed'] else ' '}] {d['question']}\n      -> {d['answer']!r}")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="support-assistant")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="recipe override, e.g. training.epochs=2 (value parsed as JSON when it can be)")
    parser.add_argument("--show", action="store_true", help="print every probe's answer")
    parser.add_argument("--skip-base", action="store_true", help="do not measure the base model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    overrides = {}
    for item in args.set:
        key, _, raw = item.partition("=")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    recipe = apply_overrides(load_recipe(args.recipe), overrides) if overrides else load_recipe(args.recipe)
    probes = load_probes(PROBES)
    print(f"recipe {recipe.name} v{recipe.version}; torch threads {torch.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.1f}")

    with tempfile.TemporaryDirectory(prefix="ftpipe-bench-") as tmp:
        data_dir = Path(tmp) / "data"
        counts = prepare(recipe, SAMPLE, data_dir)
        print(f"prepared {sum(counts)} rows: train {counts[0]}, val {counts[1]}, test {counts[2]}")

        base_rate = None
        if not args.skip_base:
            tokenizer, base = load_base(recipe)
            base_rate = measure("base ", base, tokenizer, probes, recipe, args.show)
            del base

        def progress(rows: list[dict]) -> None:
            last = rows[-1]
            print(f"  step {last['step']:4d}  epoch {last['epoch']:.2f}  loss {last['loss']:.3f}  "
                  f"{last['tokens_per_s']:.0f} tok/s")

        started = time.perf_counter()
        result = train(recipe, data_dir, Path(tmp) / "work", on_metrics=progress)
        wall = time.perf_counter() - started
        print(f"trained {result.steps} steps, {result.tokens} tokens in {wall:.0f} s wall "
              f"({result.seconds:.0f} s in steps, {result.tokens / result.seconds:.0f} tok/s); "
              f"train loss {result.metrics['train_loss']:.3f}, val loss {result.metrics['val_loss']:.3f}; "
              f"load average {os.getloadavg()[0]:.1f}")

        from peft import PeftModel
        tokenizer, base = load_base(recipe)
        tuned = PeftModel.from_pretrained(base, result.adapter_dir).merge_and_unload()
        tuned_rate = measure("tuned", tuned, tokenizer, probes, recipe, args.show)

    summary = {"train_wall_s": round(wall, 1), "tokens": result.tokens, "tokens_per_s": round(result.tokens / result.seconds),
               "steps": result.steps, **result.metrics, "base_fact_rate": base_rate, "tuned_fact_rate": tuned_rate}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
