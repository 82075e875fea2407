"""The GPU check (issue 20; bench/gpu/run.sh runs it, bench/README.md "GPU check" says how to read
it): ftpipe's trainer against TRL's SFTTrainer on one GPU, LoRA then QLoRA, on a random-weight
model of Llama-3.2-1B's shape, and the memory planner's prediction against the measured peak.

    python bench/gpu/check.py [--steps 20] [--warmup 3] [--batch 8] [--seq 1024] [--deadline S] [--out F]
    python bench/gpu/check.py --cpu-smoke [--out F]   # the same path on a CPU with a tiny model (tests)

Each side trains in a fresh process, so that torch.cuda.max_memory_allocated is its own: ftpipe
through bench/plan's worker (`training.train` on the recipe), TRL through `trl` below (the
SFTTrainer script of bench/trl_sft.py). Both get the same rows (generated chats, every one longer
than max_seq_len and cut there: no padding), the recipe's LoRA (r 16, every linear layer), batch,
sequence length, learning rate and steps, bf16 (ftpipe: training.precision bf16; TRL: bf16=True),
non-reentrant activation checkpointing, the best attention each has (TRL: flash_attention_2 where
flash-attn is installed, else SDPA; ftpipe: SDPA, its kernel for unpacked rows) and Liger where it
is installed (ftpipe: its fused linear cross-entropy; TRL: use_liger_kernel, Liger's layer kernels,
next to TRL's own chunked LM-head loss).

Per side: tokens/s = non-padding tokens of the steps after the warm-up / the wall time from the end
of the last warm-up step to the end of the last one (the device synchronised at each step's end);
the peak = torch.cuda.max_memory_allocated (on a CPU: the peak resident set minus the one after
the imports); MFU = tokens/s x (6 N + 12 L d s) / the GPU's dense bf16 peak, N the parameters, L
the layers, d the attention width, s the sequence length (the usual model-FLOPs count: for LoRA
with checkpointing it is also what the GPU runs, as the recomputed forward stands in for the
weight gradients the frozen base does not get); and for ftpipe, the planner's `allocated_bytes`
(plan_recipe on this GPU) against the measured peak.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.plan.run import measure, recipe_of, write_chats  # noqa: E402
from bench.plan.worker import random_model  # noqa: E402
from bench.process_memory import peak_bytes, resident_bytes  # noqa: E402
from shared.domain.memory_plan import GIB, Device, ModelShape, cpu_device, gpu_device, plan_recipe  # noqa: E402
from shared.domain.recipe import Recipe  # noqa: E402

WHEELS = Path(__file__).with_name("wheels")

# Llama-3.2-1B's config.json (1.24B parameters, embeddings tied), random weights
LLAMA_1B = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
            "tie_word_embeddings": True, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 131072, "bos_token_id": 128000, "eos_token_id": 128001}
# the CPU smoke's: the same shape of layer, tiny (its vocabulary holds the byte tokenizer's 259 ids)
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512,
        "tie_word_embeddings": True}

# Dense bf16 tensor-core peaks (NVIDIA's data sheets, without sparsity), by a substring of the
# device name; the first match wins (H100 PCIe before H100, L40S before L4).
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0))


def peak_tflops(name: str) -> float | None:
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key.lower() in name.lower()), None)


def planner_device(name: str, total_bytes: int) -> Device:
    """The planner's GPU for this device: its GPU_TABLE entry where it has one, else the device's
    own capacity under its name (the plan needs nothing else of it)."""
    lowered = name.lower()
    if "h100" in lowered:
        return gpu_device("h100")
    if "a100" in lowered:
        return gpu_device("a100-80gb" if total_bytes > 50 * GIB else "a100")
    if "l4" in lowered and "l40" not in lowered:
        return gpu_device("l4")
    return Device(name, total_bytes)


def byte_tokenizer():
    """A tokenizer made here rather than carried: one token a byte (a byte-level BPE without merges)
    and SmolLM2's ChatML template, whose marked copy TRL's assistant-only loss uses (bench/trl_sft.py).
    The model's cost per token does not depend on which ids it sees."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from services.trainer.chat_templates import SMOLLM2

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        extra_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = SMOLLM2
    return tokenizer


# ------------------------------------------------------------------------------ the TRL side (a process)

def trl_train(recipe_json: str, data: Path, work: Path) -> None:
    """`check.py trl RECIPE_JSON DATA WORK`: the recipe trained with TRL's SFTTrainer; prints
    MEASURED as bench/plan/worker.py does for ftpipe."""
    import peft  # noqa: F401
    import torch
    import trl  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from transformers.utils import is_flash_attn_2_available

    from bench.trl_sft import sft_trainer, tokens_fed

    if importlib.util.find_spec("bitsandbytes"):
        import bitsandbytes  # noqa: F401
    baseline = resident_bytes()
    recipe = Recipe.model_validate_json(recipe_json)
    t, gpu = recipe.training, torch.cuda.is_available()
    dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
    kwargs: dict = {"dtype": dtype, "attn_implementation": "flash_attention_2" if gpu and is_flash_attn_2_available()
                    else "sdpa"}
    if recipe.adapter.kind == "qlora":
        kwargs.update(device_map={"": 0 if gpu else "cpu"}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=recipe.adapter.quant_type,
            bnb_4bit_use_double_quant=recipe.adapter.double_quant, bnb_4bit_compute_dtype=dtype))
    model = AutoModelForCausalLM.from_pretrained(recipe.base_model, **kwargs)
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if gpu:
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    liger = gpu and importlib.util.find_spec("liger_kernel") is not None
    trainer = sft_trainer(recipe, data, model, AutoTokenizer.from_pretrained(recipe.base_model), work,
                          callbacks=[Clock()], max_steps=t.max_steps, logging_steps=t.max_steps, use_cpu=not gpu,
                          bf16=t.precision == "bf16", gradient_checkpointing=bool(t.gradient_checkpointing),
                          gradient_checkpointing_kwargs={"use_reentrant": False}, use_liger_kernel=liger)
    fed = tokens_fed(trainer, t.max_seq_len)
    trainer.train()
    peak = torch.cuda.max_memory_allocated() if gpu else peak_bytes() - baseline
    print("MEASURED " + json.dumps({
        "peak_bytes": peak, "baseline_bytes": 0 if gpu else baseline, "step_ends": ends, "steps": len(ends),
        # every example is cut at max_seq_len: each step feeds the same number of tokens
        "tokens": round(sum(fed) / len(fed) * t.batch_size * t.grad_accum * len(ends)),
        "compute": {"precision": "bf16" if trainer.args.bf16 else "fp32",
                    "gradient_checkpointing": trainer.args.gradient_checkpointing,
                    "attention": model.config._attn_implementation,
                    "loss": "trl_chunked_lm_head" + (" + liger layer kernels" if liger else "")}}), flush=True)


# ------------------------------------------------------------------------------ the check

def throughput(measured: dict, warmup: int) -> tuple[int, float]:
    """(tokens, seconds) of the steps after the warm-up."""
    ends, steps = measured["step_ends"], measured["steps"]
    timed = steps - warmup
    return round(measured["tokens"] / steps * timed), ends[-1] - ends[warmup - 1]


def versions() -> dict[str, str | None]:
    found = {}
    for name in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "liger-kernel", "bitsandbytes",
                 "flash-attn", "pydantic"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def qlora_skipped() -> str | None:
    """Why QLoRA cannot run here, or None."""
    if importlib.util.find_spec("bitsandbytes"):
        return None
    manifest = WHEELS / "MANIFEST.txt"
    said = [line for line in manifest.read_text().splitlines() if "bitsandbytes" in line] if manifest.is_file() else []
    return "bitsandbytes is not installed" + (f" ({said[0].strip()})" if said else "")


def side_row(side: str, kind: str, measured: dict, *, warmup: int, flops_per_token: float,
             peak: float | None) -> dict:
    tokens, seconds = throughput(measured, warmup)
    rate = tokens / seconds
    return {"side": side, "kind": kind, "tokens_per_s": round(rate, 1), "timed_tokens": tokens,
            "timed_seconds": round(seconds, 3), "peak_bytes": measured["peak_bytes"],
            "mfu": round(rate * flops_per_token / peak, 4) if peak else None, "compute": measured.get("compute")}


def table(result: dict) -> str:
    gpu = result["device"]["type"] == "cuda"
    memory = "max_memory_allocated" if gpu else "peak RSS (delta)"
    lines = [f"{'side':<7} {'adapter':<6} {'tokens/s':>10} {memory:>21} {'MFU':>6} {'planner':>10} {'error':>7}  "
             "attention / loss"]
    for r in result["sides"]:
        if "skipped" in r:
            lines.append(f"{r['side']:<7} {r['kind']:<6} skipped: {r['skipped']}")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        plan = r.get("planner")
        planned = f"{plan['predicted_bytes'] / GIB:.2f} G" if plan else "-"
        error = f"{plan['error']:+.1%}" if plan else ""
        compute = r["compute"] or {}
        lines.append(f"{r['side']:<7} {r['kind']:<6} {r['tokens_per_s']:>10,.0f} {r['peak_bytes'] / GIB:>19.2f} G "
                     f"{mfu:>6} {planned:>10} {error:>7}  {compute.get('attention')} / {compute.get('loss')}")
    for kind, ratio in result["ftpipe_vs_trl"].items():
        lines.append(f"ftpipe / TRL tokens/s, {kind}: {ratio:.3f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="a tiny model on the CPU, a few steps: the path works")
    ap.add_argument("--steps", type=int, help="optimizer steps per side (default 20; smoke 3)")
    ap.add_argument("--warmup", type=int, help="first steps left out of tokens/s (default 3; smoke 1)")
    ap.add_argument("--batch", type=int, help="examples per step (default 8; smoke 2)")
    ap.add_argument("--seq", type=int, help="max_seq_len: every example is cut to it (default 1024; smoke 128)")
    ap.add_argument("--kinds", default="lora,qlora", help="adapters to run, in order (default lora,qlora)")
    ap.add_argument("--deadline", type=float, help="seconds this check may take: sides that would "
                    "start too late are skipped, and each side is stopped at it")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ftpipe-gpu-check"))
    ap.add_argument("--out", type=Path, help="results JSON (default: $OUT/gpu_check.json where $OUT is set, else "
                    "bench/gpu/results.json; the smoke: WORK/results.json)")
    args = ap.parse_args()
    started = time.monotonic()
    smoke = args.cpu_smoke
    steps, warmup = args.steps or (3 if smoke else 20), args.warmup or (1 if smoke else 3)
    batch, seq = args.batch or (2 if smoke else 8), args.seq or (128 if smoke else 1024)
    if not 1 <= warmup < steps:
        ap.error("--warmup must be at least 1 (the timing starts at the end of a step) and below --steps")
    out = args.out or (args.work / "results.json" if smoke else
                       Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else
                       Path(__file__).with_name("results.json"))

    if smoke:   # the smoke is the CPU's, on a GPU machine too (its processes inherit this)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not smoke:
        print("no CUDA device: this is the GPU check (--cpu-smoke runs its path on a CPU)", file=sys.stderr)
        return 2
    if gpu:
        name, total = torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory
        device = {"type": "cuda", "name": name, "memory_bytes": total, "peak_bf16_tflops": peak_tflops(name)}
        planner = planner_device(name, total)
    else:
        device = {"type": "cpu", "name": platform.processor() or platform.machine(), "peak_bf16_tflops": None}
        planner = cpu_device()
    config = TINY if smoke else LLAMA_1B
    folder, data = args.work / "model", args.work / "data"
    print(f"building the random-weight model ({'tiny' if smoke else 'Llama-3.2-1B shape'}) in {folder}", flush=True)
    params = random_model(config, folder, byte_tokenizer(), dtype="bfloat16", device="cuda" if gpu else "cpu")
    if gpu:
        torch.cuda.empty_cache()
    write_chats(data, rows=steps * batch, seed=0)
    shape = ModelShape.from_config(config)
    flops_per_token = 6 * shape.params + 12 * shape.layers * shape.heads * shape.head_dim * seq
    peak = device["peak_bf16_tflops"] * 1e12 if device["peak_bf16_tflops"] else None

    result = {"date": date.today().isoformat(), "python": platform.python_version(), "versions": versions(),
              "device": device, "model": {"shape_of": "tiny" if smoke else "Llama-3.2-1B", "params": params,
                                          "config": config},
              "setup": {"batch": batch, "seq": seq, "steps": steps, "warmup": warmup, "precision": "bf16",
                        "gradient_checkpointing": True, "lora_r": 16, "lora_alpha": 32,
                        "target_modules": "all-linear"},
              "flops_per_token": flops_per_token,
              "mfu_formula": "tokens/s x (6 N + 12 L d s) / peak dense bf16 FLOPs",
              "sides": [], "ftpipe_vs_trl": {}}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")

    for kind in args.kinds.split(","):
        reason = qlora_skipped() if kind == "qlora" else None
        row = {"kind": kind, "precision": "bf16", "checkpointing": True, "seq": seq, "batch": batch,
               "accum": 1}
        recipe = recipe_of(row, folder, steps)
        rates = {}
        for side in ("ftpipe", "trl"):
            left = None if args.deadline is None else args.deadline - (time.monotonic() - started)
            if reason is None and left is not None and left < 30:
                reason = f"out of time ({left:.0f} s of the --deadline left)"
            if reason is not None:
                result["sides"].append({"side": side, "kind": kind, "skipped": reason})
                print(f"{side} {kind}: skipped: {reason}", flush=True)
                continue
            print(f"{side} {kind}: training {steps} steps of {batch} x {seq} tokens", flush=True)
            how = {} if side == "ftpipe" else {"script": Path(__file__), "command": "trl"}
            measured = measure(recipe, data, args.work / f"run-{side}-{kind}", timeout=left and left - 5, **how)
            if "error" in measured:
                result["sides"].append({"side": side, "kind": kind, "skipped": f"failed: {measured['error']}"})
                print(f"{side} {kind} failed: {measured.get('stderr') or measured['error']}", flush=True)
                continue
            entry = side_row(side, kind, measured, warmup=warmup, flops_per_token=flops_per_token, peak=peak)
            rates[side] = entry["tokens_per_s"]
            if side == "ftpipe":   # the planner models ftpipe's trainer
                plan = plan_recipe(recipe, planner)
                predicted = plan.allocated_bytes if gpu else plan.peak_bytes
                entry["planner"] = {"device": planner.kind, "predicted_bytes": predicted, "phase": plan.phase,
                                    "micro_batch": plan.micro_batch, "peak_bytes": plan.peak_bytes,
                                    "error": round(predicted / measured["peak_bytes"] - 1, 4)}
            result["sides"].append(entry)
            print(json.dumps(entry), flush=True)
            save()
        if len(rates) == 2:
            result["ftpipe_vs_trl"][kind] = round(rates["ftpipe"] / rates["trl"], 3)
    result["seconds"] = round(time.monotonic() - started, 1)
    save()
    print(table(result))
    print(f"results: {out}")
    return 1 if any(r.get("skipped", "").startswith("failed") for r in result["sides"]) else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "trl":
        trl_train(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        sys.exit(main())
