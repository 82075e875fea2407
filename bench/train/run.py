"""The trainer benchmark: ftpipe's trainer against a plain TRL SFTTrainer script, recovery from
SIGKILL, and packing.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python bench/train/run.py [--only SECTION ...] [--repeats 3] [--out results.json]

Sections (`--only` picks some; the others' figures in --out are kept):

- throughput: the support demo (examples/support prepared as bench/demo_recipe.py prepares it, the
  recipe's SmolLM2-135M-Instruct, its LoRA and hyperparameters), one epoch, fp32, no gradient
  checkpointing (ftpipe's CPU defaults), ftpipe's `training.train` against TRL's SFTTrainer.
- half-billion: a ~0.5B random-weight Llama-shaped model (HALF_BILLION) at 1,024 tokens, bf16 and
  gradient checkpointing on both sides, batch 1: peak memory and tokens/s of ftpipe against TRL;
  and ftpipe in fp32 without checkpointing against ftpipe in bf16 with it: the peak memory ratio.
- sigkill: a training process (bench/train/worker.py, checkpoint every training.checkpoint_every
  steps) is killed with SIGKILL once it reports step --kill-at; a new process resumes from the
  latest checkpoint. Reported: steps lost (trained again), seconds from the new process's start to
  its first finished step, and whether the resumed losses equal an uninterrupted run's.
- packing: 64 of the prepared chats, each joined with 0-7 others into conversations of 1 to 8
  exchanges (about 40 to 800 tokens), max_seq_len 1024, one epoch each of ftpipe with packing
  against ftpipe without it, with random batches (padding to the longest in the batch, what a
  plain script does) and with ftpipe's default length-grouped batches. tokens/s counts
  non-padding tokens.

How ftpipe and TRL are compared (throughput, half-billion): every run is a fresh process
(bench/train/side.py), the sides interleaved (ftpipe, TRL, then TRL, ftpipe, ...) so that whatever
else loads the machine hits both alike, --repeats times each; figures are medians with the
min-max spread. Both sides train on the same batches: ftpipe's random sampler (not its default
length grouping, which TRL has no equal of), TRL reading the rows in that order. tokens/s =
non-padding tokens / seconds of the same window on both sides (from building a step's batch to the
scheduler's step), over every step but the first (warm-up). Peak memory = the process's resident
set high-water mark minus its resident set after the imports, before the model loads. The
throughput section also compares what both learned: the mean cross-entropy per assistant token of
the val split under each trained adapter, computed by one function (`heldout_loss`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# As `make` exports it: OpenMP threads that spin while waiting for a core other jobs hold make
# small ops 10x slower on a shared machine (measured here: 20 s against 2.3 s for a 135M LoRA step).
# The side processes inherit it: the same for ftpipe and TRL.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.demo_recipe import SAMPLE, prepare  # noqa: E402
from bench.plan.worker import random_model  # noqa: E402
from shared.domain.models import SMOLLM2, resolve_model  # noqa: E402
from shared.domain.recipe import Recipe, apply_overrides, load_recipe  # noqa: E402

from services.trainer.modeling import load_base  # noqa: E402
from services.trainer.objectives import IGNORE_INDEX, ChatSFT  # noqa: E402
from services.trainer.training import load_split, train  # noqa: E402

WORKER = Path(__file__).with_name("worker.py")
SIDE = Path(__file__).with_name("side.py")
SECTIONS = ("throughput", "half-billion", "sigkill", "packing")

# ~0.5B parameters, Llama-shaped (GQA, SwiGLU, tied embeddings), SmolLM2's tokenizer and vocabulary.
HALF_BILLION = {"hidden_size": 1280, "intermediate_size": 3456, "num_hidden_layers": 24, "num_attention_heads": 20,
                "num_key_value_heads": 10, "vocab_size": 49152, "tie_word_embeddings": True,
                "max_position_embeddings": 2048, "rms_norm_eps": 1e-5}


# ------------------------------------------------------------------------------ fresh-process sides

def run_side(side: str, recipe: Recipe, data: Path, work: Path) -> dict:
    """One side (ftpipe | trl) trained in a fresh process (bench/train/side.py); its RESULT."""
    spec = {"side": side, "recipe": recipe.model_dump(mode="json"), "data": str(data), "work": str(work)}
    proc = subprocess.run([sys.executable, str(SIDE), json.dumps(spec)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"{side} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def window(result: dict, warmup: int = 1) -> dict:
    """tokens/s over the steps after the first `warmup` ones."""
    steps = result["steps"][warmup:]
    tokens, seconds = sum(s["tokens"] for s in steps), sum(s["seconds"] for s in steps)
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 2)}


def spread(values: list[float], digits: int = 2) -> dict:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


def interleaved(repeats: int, sides: tuple[str, ...]):
    """(repeat, side) in the order ftpipe, TRL, then TRL, ftpipe, ...: neither side always goes first."""
    for r in range(repeats):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            yield r, side


def same_batches(runs: list[dict]) -> bool:
    """Whether every run's steps held the same non-padding and trained tokens: the same batches."""
    shapes = [[(s["tokens"], s["trained"]) for s in run["steps"]] for run in runs]
    return all(shape == shapes[0] for shape in shapes)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    flags = Path("/proc/cpuinfo").read_text()
    return {"cores": os.cpu_count(), "cpu": cpu, "amx_bf16": "amx_bf16" in flags,
            "avx512_bf16": "avx512_bf16" in flags,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


# ------------------------------------------------------------------------------ throughput

def heldout_loss(recipe: Recipe, adapter: Path | None, val: Path) -> dict:
    """Mean cross-entropy per trained token of the val split (the assistant's tokens, labelled as
    ftpipe labels them), through the model's own full forward: one function for both sides'
    adapters (adapter None: the base model)."""
    import torch
    import torch.nn.functional as F
    from peft import PeftModel

    tokenizer, model = load_base(recipe)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for e in ChatSFT(recipe, tokenizer).encode(load_split(val), "val", logging.getLogger(__name__)):
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
            targets = torch.tensor(e.labels[1:])
            total += F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((targets != IGNORE_INDEX).sum())
    return {"loss": round(total / count, 4), "tokens": count}


def throughput(recipe: Recipe, data: Path, work: Path, repeats: int) -> dict:
    recipe = apply_overrides(recipe, {"training.group_by_length": False, "training.precision": "fp32",
                                      "training.gradient_checkpointing": False})
    load = [round(os.getloadavg()[0], 2)]
    runs: dict[str, list[dict]] = {"ftpipe": [], "trl": []}
    for r, side in interleaved(repeats, ("ftpipe", "trl")):
        result = run_side(side, recipe, data, work / f"{side}-{r}")
        result["heldout"] = heldout_loss(recipe, Path(result["adapter"]), data / "val.jsonl")
        runs[side].append(result)
        print(f"throughput {side} #{r}:", json.dumps({**window(result), "heldout": result["heldout"]}), flush=True)
    load.append(round(os.getloadavg()[0], 2))
    out: dict = {"date": date.today().isoformat(), "machine": machine(), "load_average_before_after": load,
                 "setup": {"precision": "fp32", "gradient_checkpointing": False, "sampler": "random (ftpipe's, both)",
                           "batch_size": recipe.training.batch_size, "max_seq_len": recipe.training.max_seq_len,
                           "steps": len(runs["ftpipe"][0]["steps"]), "warmup_steps_excluded": 1,
                           "repeats": repeats},
                 "same_batches": same_batches(runs["ftpipe"] + runs["trl"]),
                 "base_heldout_loss": heldout_loss(recipe, None, data / "val.jsonl")["loss"]}
    for side, results in runs.items():
        out[side] = {"tokens_per_s": spread([window(x)["tokens_per_s"] for x in results]),
                     "heldout_loss": spread([x["heldout"]["loss"] for x in results], 4),
                     "call_seconds": spread([x["call_seconds"] for x in results], 1),
                     "runs": [{**window(x), "call_seconds": x["call_seconds"], "heldout_loss": x["heldout"]["loss"],
                               "first_loss": x["steps"][0]["loss"], "last_loss": x["steps"][-1]["loss"]}
                              for x in results]}
    out["ratio"] = round(out["ftpipe"]["tokens_per_s"]["median"] / out["trl"]["tokens_per_s"]["median"], 3)
    out["ratio_per_repeat"] = [round(window(f)["tokens_per_s"] / window(t)["tokens_per_s"], 3)
                               for f, t in zip(runs["ftpipe"], runs["trl"], strict=True)]
    return out


# ------------------------------------------------------------------------------ half-billion

def build_half_billion(folder: Path, seed: int = 0) -> int:
    """HALF_BILLION with random weights (seeded), saved in bf16 safetensors with SmolLM2's
    tokenizer and chat template; returns its parameter count."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(SMOLLM2))
    config = {"model_type": "llama", **HALF_BILLION, "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    return random_model(config, folder, tokenizer, dtype="bfloat16", seed=seed)


def long_chats(data: Path, out: Path, rows: int, seed: int = 0, joined: int = 40) -> None:
    """`rows` conversations of `joined` prepared chats each (about 1,650 tokens), so that both
    sides cut every one to 1,024 tokens: every step trains on the same 1,024 positions."""
    rng = random.Random(seed)
    chats = load_split(data / "train.jsonl")
    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": f"long{i}", "messages": [m for chat in rng.sample(chats, joined)
                                                         for m in chat["messages"] if m["role"] != "system"]})
             for i in range(rows)]
    (out / "train.jsonl").write_text("".join(line + "\n" for line in lines))


def half_billion(base: Recipe, data: Path, work: Path, repeats: int, steps: int, fp32_steps: int) -> dict:
    params = build_half_billion(work / "model")
    long_chats(data, work / "data", rows=steps)
    bf16 = apply_overrides(base, {
        "base_model": str(work / "model"), "training.max_seq_len": 1024, "training.batch_size": 1,
        "training.grad_accum": 1, "training.max_steps": steps, "training.epochs": 1, "training.warmup_steps": 1,
        "training.learning_rate": 2e-4, "training.precision": "bf16", "training.gradient_checkpointing": True,
        "training.group_by_length": False, "training.checkpoint_every": 10_000, "training.early_stop_evals": 0})
    fp32 = apply_overrides(bf16, {"training.precision": "fp32", "training.gradient_checkpointing": False,
                                  "training.max_steps": fp32_steps})
    load = [round(os.getloadavg()[0], 2)]
    runs: dict[str, list[dict]] = {"ftpipe": [], "trl": [], "ftpipe_fp32": []}
    for r, side in interleaved(repeats, ("ftpipe", "trl")):
        runs[side].append(run_side(side, bf16, work / "data", work / f"{side}-{r}"))
        print(f"half-billion {side} #{r}:", json.dumps({**window(runs[side][-1]),
                                                        "peak_mb": runs[side][-1]["peak_over_baseline_mb"]}), flush=True)
        if side == "trl" and r % 2 == 0 or side == "ftpipe" and r % 2 == 1:  # after each pair
            runs["ftpipe_fp32"].append(run_side("ftpipe", fp32, work / "data", work / f"fp32-{r}"))
            print(f"half-billion ftpipe fp32 #{r}:", json.dumps({**window(runs["ftpipe_fp32"][-1]),
                  "peak_mb": runs["ftpipe_fp32"][-1]["peak_over_baseline_mb"]}), flush=True)
    load.append(round(os.getloadavg()[0], 2))
    out: dict = {"date": date.today().isoformat(), "machine": machine(), "load_average_before_after": load,
                 "model": {**HALF_BILLION, "parameters": params, "weights": "random (seed 0), bf16 safetensors"},
                 "setup": {"max_seq_len": 1024, "batch_size": 1, "steps": steps, "warmup_steps_excluded": 1,
                           "lora": f"r {bf16.adapter.r}, {bf16.adapter.target_modules}", "repeats": repeats,
                           "fp32_steps": fp32_steps},
                 "same_batches": same_batches(runs["ftpipe"] + runs["trl"])}
    for side, results in runs.items():
        out[side] = {"peak_over_baseline_mb": spread([x["peak_over_baseline_mb"] for x in results], 1),
                     "tokens_per_s": spread([window(x)["tokens_per_s"] for x in results]),
                     "runs": [{**window(x), "peak_over_baseline_mb": x["peak_over_baseline_mb"],
                               "baseline_rss_mb": x["baseline_rss_mb"], "call_seconds": x["call_seconds"],
                               "step_seconds": [round(s["seconds"], 2) for s in x["steps"]],
                               "losses": [s["loss"] for s in x["steps"]]} for x in results]}
    med = {side: out[side]["peak_over_baseline_mb"]["median"] for side in runs}
    out["peak_ratio_vs_trl"] = round(med["ftpipe"] / med["trl"], 3)
    out["tokens_per_s_ratio_vs_trl"] = round(out["ftpipe"]["tokens_per_s"]["median"]
                                             / out["trl"]["tokens_per_s"]["median"], 3)
    out["fp32_no_checkpointing_peak_ratio"] = round(med["ftpipe_fp32"] / med["ftpipe"], 3)
    # Within a repeat the two sides ran back to back: their ratio holds up where the machine's load
    # changes between repeats, which moves the medians of each side.
    pairs = list(zip(runs["ftpipe"], runs["trl"], strict=True))
    out["tokens_per_s_ratio_per_repeat"] = [round(window(f)["tokens_per_s"] / window(t)["tokens_per_s"], 3)
                                            for f, t in pairs]
    out["peak_ratio_per_repeat"] = [round(f["peak_over_baseline_mb"] / t["peak_over_baseline_mb"], 3) for f, t in pairs]
    return out


# ------------------------------------------------------------------------------ packing, SIGKILL

def ftpipe_epoch(recipe: Recipe, data: Path, work: Path) -> dict:
    result = train(recipe, data, work)
    return {"tokens": result.tokens, "seconds": result.seconds, "steps": result.steps,
            "tokens_per_s": round(result.tokens / result.seconds, 1), "final_loss": result.loss_curve[-1]}


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


def targets(res: dict) -> dict:
    """The targets of whichever sections results hold."""
    out = {}
    if "throughput" in res and "ratio" in res["throughput"]:
        out["throughput_vs_trl"] = {"value": res["throughput"]["ratio"], "target": ">= 0.97",
                                    "pass": res["throughput"]["ratio"] >= 0.97}
    if "half_billion" in res:
        hb = res["half_billion"]
        out["half_billion_peak_memory_vs_trl"] = {"value": hb["peak_ratio_vs_trl"], "target": "<= 1.05",
                                                  "pass": hb["peak_ratio_vs_trl"] <= 1.05}
        out["half_billion_tokens_per_s_vs_trl"] = {"value": hb["tokens_per_s_ratio_vs_trl"], "target": ">= 0.95",
                                                   "pass": hb["tokens_per_s_ratio_vs_trl"] >= 0.95}
    if "sigkill" in res:
        out["steps_lost"] = {"value": res["sigkill"]["steps_lost"], "target": f"<= {res['sigkill']['checkpoint_every']}",
                             "pass": res["sigkill"]["steps_lost"] <= res["sigkill"]["checkpoint_every"]}
    if "packing" in res:
        out["packing_speedup"] = packing_target(res["packing"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=SECTIONS,
                    help="run this section (repeatable); default: all. The other sections' figures in --out are kept")
    ap.add_argument("--recipe", default="support-assistant")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each side (throughput, half-billion)")
    ap.add_argument("--half-billion-steps", type=int, default=7, help="steps of a bf16 run (the first is warm-up)")
    ap.add_argument("--fp32-steps", type=int, default=2, help="steps of the fp32 run (for its peak memory)")
    ap.add_argument("--kill-at", type=int, default=25)
    ap.add_argument("--kill-steps", type=int, default=40, help="length of the SIGKILL runs (steps)")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    args = ap.parse_args()
    sections = args.only or list(SECTIONS)

    base = load_recipe(args.recipe)
    epoch = apply_overrides(base, {"training.epochs": 1, "training.early_stop_evals": 0,
                                   "training.checkpoint_every": 10_000})
    res: dict = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for key in ("throughput", "half_billion", "sigkill", "packing"):  # a kept section keeps its own date
        if key in res and "date" not in res[key]:
            res[key]["date"] = res.get("date")
    res.update({"date": date.today().isoformat(), "recipe": args.recipe, "base_model": base.base_model})

    def save() -> None:  # after each section: a later failure keeps what was measured
        res["targets"] = targets(res)
        args.out.write_text(json.dumps(res, indent=1) + "\n")

    with tempfile.TemporaryDirectory(prefix="ftpipe-bench-train-") as tmp:
        tmp = Path(tmp)
        res["rows"] = dict(zip(("train", "val", "test"), prepare(base, SAMPLE, tmp / "data"), strict=True))
        if "throughput" in sections:
            res["throughput"] = throughput(epoch, tmp / "data", tmp / "throughput", args.repeats)
            save()
        if "half-billion" in sections:
            res["half_billion"] = half_billion(base, tmp / "data", tmp / "half-billion", args.repeats,
                                               args.half_billion_steps, args.fp32_steps)
            save()
        if "sigkill" in sections:
            killed = apply_overrides(base, {"training.max_steps": args.kill_steps, "training.checkpoint_every": 10,
                                            "training.metrics_every": 1, "training.early_stop_evals": 0})
            res["sigkill"] = {"date": date.today().isoformat(), "machine": machine(),
                              **sigkill(killed, tmp / "data", tmp / "kill", args.kill_at)}
            print("sigkill:", json.dumps(res["sigkill"]), flush=True)
            save()
        if "packing" in sections:
            res["packing"] = {"date": date.today().isoformat(), "machine": machine(),
                              **packing(epoch, tmp / "data", tmp / "packing")}
            save()
    print(json.dumps(res["targets"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
