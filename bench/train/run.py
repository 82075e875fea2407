"""The trainer benchmark: throughput against a plain TRL SFTTrainer script, and recovery from SIGKILL.

    HF_HUB_OFFLINE=1 python bench/train/run.py [--recipe support-assistant] [--kill-at 25] [--out results.json]

Data: examples/support prepared as the demo prepares it (bench/demo_recipe.py), the recipe's base
model (SmolLM2-135M-Instruct by default), its LoRA and hyperparameters, fp32 on CPU.

1. Throughput, one epoch each, same model, rows, LoRA, batch, sequence cut, learning rate and
   schedule: ftpipe's `training.train` (loss on assistant turns, logits at trained positions only)
   against TRL's SFTTrainer on the same conversations, also with loss on assistant turns only
   (`assistant_only_loss`, through ftpipe's generation-marked copy of SmolLM2's template, which
   renders the same text). tokens/s =
   non-padding tokens of the epoch / seconds of the training loop (ftpipe: the steps' time;
   TRL: `train_runtime`). TRL runs twice: with SFTConfig's defaults (gradient checkpointing on) and
   without gradient checkpointing, as ftpipe trains; the ratio is against the faster of the two.
2. SIGKILL: a training process (bench/train/worker.py, checkpoint every
   training.checkpoint_every steps) is killed with SIGKILL once it reports step --kill-at; a new
   process resumes from the latest checkpoint. Reported: steps lost (trained again), seconds from
   the new process's start to its first finished step, and whether the resumed losses equal an
   uninterrupted run's.

3. Packing, on variable-length chats: 64 of the prepared chats, each joined with 0-7 others into
   conversations of 1 to 8 exchanges (about 40 to 800 tokens), max_seq_len 1024, one epoch each of ftpipe with packing
   against ftpipe without it, both with random batches (padding to the longest in the batch, what
   a plain script does) and with ftpipe's default length-grouped batches. tokens/s counts
   non-padding tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.demo_recipe import SAMPLE, prepare  # noqa: E402
from bench.trl_sft import sft_trainer, tokens_fed  # noqa: E402
from shared.domain.recipe import Recipe, apply_overrides, load_recipe  # noqa: E402

from services.trainer.modeling import load_base  # noqa: E402
from services.trainer.training import load_split, train  # noqa: E402

WORKER = Path(__file__).with_name("worker.py")


def ftpipe_epoch(recipe: Recipe, data: Path, work: Path) -> dict:
    result = train(recipe, data, work)
    return {"tokens": result.tokens, "seconds": result.seconds, "steps": result.steps,
            "tokens_per_s": round(result.tokens / result.seconds, 1), "final_loss": result.loss_curve[-1]}


def trl_epoch(recipe: Recipe, data: Path, work: Path, *, gradient_checkpointing: bool) -> dict:
    """The plain TRL script a user would write for the same job (SFTConfig turns gradient
    checkpointing on by default: measured both ways)."""
    tokenizer, model = load_base(recipe)
    trainer = sft_trainer(recipe, data, model, tokenizer, work, num_train_epochs=1, logging_steps=10,
                          use_cpu=True, gradient_checkpointing=gradient_checkpointing,
                          # float32 as ftpipe trains; SFTConfig's default bf16 autocast costs 25x on a CPU
                          # without AVX512-BF16 (seen here: 115 s a step)
                          bf16=False)
    tokens = sum(tokens_fed(trainer, recipe.training.max_seq_len))
    out = trainer.train()
    seconds = out.metrics["train_runtime"]
    return {"tokens": tokens, "seconds": round(seconds, 3), "steps": out.global_step,
            "tokens_per_s": round(tokens / seconds, 1), "final_loss": out.training_loss}


def variable_length_chats(data: Path, out: Path, seed: int = 0, rows_per_split: int = 64) -> None:
    """The first rows of the prepared splits, each conversation joined to 0-7 others: lengths spread
    40-800 tokens (64 rows: an epoch of each variant takes about a minute and a half on 2 cores)."""
    import random

    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        rows = load_split(data / f"{split}.jsonl")
        joined = []
        for i, row in enumerate(rows[:rows_per_split]):
            extra = [m for other in rng.sample(rows, rng.randint(0, 7)) for m in other["messages"] if m["role"] != "system"]
            joined.append({"id": f"v{i}", "messages": row["messages"] + extra})
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in joined))


def packing(recipe: Recipe, data: Path, work: Path) -> dict:
    variable_length_chats(data, work / "data")
    runs = {}
    for name, overrides in (("padded_random_batches", {"training.group_by_length": False}),
                            ("padded_length_grouped", {"training.group_by_length": True}),
                            ("packed", {"training.packing": True})):
        runs[name] = ftpipe_epoch(apply_overrides(recipe, {"training.max_seq_len": 1024, **overrides}),
                                  work / "data", work / name)
        print(f"packing {name}:", json.dumps(runs[name]), flush=True)
    for name in ("padded_random_batches", "padded_length_grouped"):
        runs[f"speedup_vs_{name}"] = round(runs["packed"]["tokens_per_s"] / runs[name]["tokens_per_s"], 3)
    return runs


def packing_target(runs: dict) -> dict:
    value = runs["speedup_vs_padded_random_batches"]
    return {"value": value, "target": ">= 1.5 (against padded random batches)", "pass": value >= 1.5,
            "vs_length_grouped": runs["speedup_vs_padded_length_grouped"]}


def worker(recipe: Recipe, data: Path, work: Path, *, resume: bool) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), recipe.model_dump_json(), str(data), str(work),
                             "resume" if resume else "fresh"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)


def steps_of(proc: subprocess.Popen, until: int | None = None) -> list[tuple[int, float, float]]:
    """(step, loss, seconds since the process started) lines until `until` or the end."""
    seen = []
    for line in proc.stdout:
        if line.startswith("STEP "):
            _, step, loss, at = line.split()
            seen.append((int(step), float(loss), float(at)))
            if until is not None and int(step) >= until:
                break
    return seen


def sigkill(recipe: Recipe, data: Path, work: Path, kill_at: int) -> dict:
    reference = {s: loss for s, loss, _ in steps_of(worker(recipe, data, work / "reference", resume=False))}
    victim = worker(recipe, data, work / "run", resume=False)
    before = steps_of(victim, until=kill_at)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = before[-1][0]
    resumed = worker(recipe, data, work / "run", resume=True)
    after = steps_of(resumed)
    resumed.wait()
    first_step, _, first_at = after[0]
    same = all(abs(loss - reference[step]) <= 1e-5 for step, loss, _ in after)
    return {"checkpoint_every": recipe.training.checkpoint_every, "killed_after_step": killed_at,
            "resumed_at_step": first_step - 1, "steps_lost": killed_at - (first_step - 1),
            "seconds_to_first_step_after_restart": round(first_at, 1),
            "losses_equal_uninterrupted_run": same, "steps_total": after[-1][0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="support-assistant")
    ap.add_argument("--kill-at", type=int, default=25)
    ap.add_argument("--kill-steps", type=int, default=40, help="length of the SIGKILL runs (steps)")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    ap.add_argument("--only-packing", action="store_true", help="measure packing alone (keeps the other figures)")
    args = ap.parse_args()

    base = load_recipe(args.recipe)
    epoch = apply_overrides(base, {"training.epochs": 1, "training.early_stop_evals": 0,
                                   "training.checkpoint_every": 10_000})
    res: dict = {"date": date.today().isoformat(), "cores": os.cpu_count(), "recipe": args.recipe,
                 "base_model": base.base_model}
    with tempfile.TemporaryDirectory(prefix="ftpipe-bench-train-") as tmp:
        tmp = Path(tmp)
        res["rows"] = dict(zip(("train", "val", "test"), prepare(base, SAMPLE, tmp / "data"), strict=True))
        if args.only_packing:
            res = {**json.loads(args.out.read_text()), "packing": packing(epoch, tmp / "data", tmp / "packing")}
            res["targets"]["packing_speedup"] = packing_target(res["packing"])
            args.out.write_text(json.dumps(res, indent=1) + "\n")
            print(json.dumps(res["targets"], indent=1))
            return 0
        res["throughput"] = {
            "ftpipe": ftpipe_epoch(epoch, tmp / "data", tmp / "ftpipe"),
            "trl_sft_trainer_defaults": trl_epoch(epoch, tmp / "data", tmp / "trl", gradient_checkpointing=True),
            "trl_sft_trainer_no_checkpointing": trl_epoch(epoch, tmp / "data", tmp / "trl2",
                                                          gradient_checkpointing=False)}
        fastest_trl = max(res["throughput"]["trl_sft_trainer_defaults"]["tokens_per_s"],
                          res["throughput"]["trl_sft_trainer_no_checkpointing"]["tokens_per_s"])
        res["throughput"]["ratio"] = round(res["throughput"]["ftpipe"]["tokens_per_s"] / fastest_trl, 3)
        print("throughput:", json.dumps(res["throughput"]), flush=True)
        killed = apply_overrides(base, {"training.max_steps": args.kill_steps, "training.checkpoint_every": 10,
                                        "training.metrics_every": 1, "training.early_stop_evals": 0})
        res["sigkill"] = sigkill(killed, tmp / "data", tmp / "kill", args.kill_at)
        print("sigkill:", json.dumps(res["sigkill"]), flush=True)
        res["packing"] = packing(epoch, tmp / "data", tmp / "packing")
    res["targets"] = {"throughput_vs_trl": {"value": res["throughput"]["ratio"], "target": ">= 0.97",
                                            "pass": res["throughput"]["ratio"] >= 0.97},
                      "steps_lost": {"value": res["sigkill"]["steps_lost"],
                                     "target": f"<= {res['sigkill']['checkpoint_every']}",
                                     "pass": res["sigkill"]["steps_lost"] <= res["sigkill"]["checkpoint_every"]},
                      "packing_speedup": packing_target(res["packing"])}
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res["targets"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
