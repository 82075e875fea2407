"""The README's planner table: Llama-3.1 8B and 70B (their published config.json, shipped in
shared/domain/model_configs/) planned on GKE's GPUs, from the config alone.

    python bench/plan/table.py        # prints the Markdown table README.md shows

Every row trains chat SFT rows of 2,048 tokens with an effective batch of 16 (batch_size 16; 64 over
the 32 GPUs of the 70B full fine-tune, two rows each), bf16 (auto on these GPUs) and activation
checkpointing (on by default on a GPU); LoRA / QLoRA r 16 on every linear layer. The planner picks
the micro-batch (batch_size) and the accumulation that keep the effective batch.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from shared.domain.memory_plan import GIB, plan_recipe  # noqa: E402
from shared.domain.recipe import GPU_TABLE, apply_overrides, load_recipe  # noqa: E402

ROWS: list[tuple[str, dict]] = [
    ("Llama-3.1-8B QLoRA, 1 x L4", {"base_model": "meta-llama/Llama-3.1-8B", "adapter.kind": "qlora"}),
    ("Llama-3.1-8B LoRA, 1 x L4", {"base_model": "meta-llama/Llama-3.1-8B"}),
    ("Llama-3.1-8B QLoRA, 1 x A100 80GB", {"base_model": "meta-llama/Llama-3.1-8B", "adapter.kind": "qlora",
                                           "hardware.gpu": "a100-80gb"}),
    ("Llama-3.1-8B LoRA, 1 x A100 80GB", {"base_model": "meta-llama/Llama-3.1-8B", "hardware.gpu": "a100-80gb"}),
    ("Llama-3.1-70B QLoRA, 1 x H100", {"base_model": "meta-llama/Llama-3.1-70B", "adapter.kind": "qlora",
                                       "hardware.gpu": "h100"}),
    ("Llama-3.1-70B full, 4 nodes x 8 H100 (FSDP)", {
        "base_model": "meta-llama/Llama-3.1-70B", "adapter.kind": "full", "hardware.gpu": "h100",
        "hardware.count": 8, "hardware.nodes": 4, "distribution.strategy": "fsdp", "training.batch_size": 64}),
]
COMMON = {"training.max_seq_len": 2048, "training.batch_size": 16, "training.grad_accum": 1, "adapter.r": 16}


def markdown() -> str:
    lines = ["| run | predicted peak per GPU | of | micro-batch per GPU (batch_size x grad_accum) | fits |",
             "|---|---|---|---|---|"]
    for label, overrides in ROWS:
        p = plan_recipe(apply_overrides(load_recipe("support-assistant"), {**COMMON, **overrides}))
        capacity = f"{GPU_TABLE[p.gpu]['memory_gib']:g} GiB"
        batch = f"{p.micro_batch} ({p.micro_batch} x {p.grad_accum})" if p.fits else "-"
        lines.append(f"| {label} | {p.peak_bytes / GIB:.1f} GiB | {capacity} | {batch} | "
                     f"{'yes' if p.fits else 'no: ' + p.advice[0]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
