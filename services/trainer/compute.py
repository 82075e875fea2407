"""How a run computes, resolved once from the recipe and the device before the model is built:
the precision (`training.precision`) and whether activations are checkpointed
(`training.gradient_checkpointing`).

- The frozen weights are held in the precision (QLoRA: 4-bit, computing in it); the forward runs
  under torch's autocast to it. Trainable weights and the optimizer state stay float32 whatever the
  precision: an update is small next to its weight, and in bf16 most updates would round away.
- fp16 has 5 exponent bits, so small gradients underflow: its loss is scaled (torch.amp.GradScaler,
  whose state a checkpoint carries); bf16 has float32's range and needs no scaler.
- auto: bf16 on a GPU that has it (Ampere and later), fp16 on one that has not, fp32 on a CPU
  (bit-reproducible on one machine). An explicit bf16 on a CPU runs (CPU autocast supports it);
  fp16 on a CPU is refused.
- Checkpointing (PyTorch's non-reentrant `torch.utils.checkpoint`, through transformers) keeps a
  layer's input instead of its activations and recomputes them in the backward pass: far less
  memory for a third more compute. Default: on on a GPU, off on a CPU. With prefix tuning the
  virtual tokens' KV cache is kept read-only through the checkpointed layers (modeling.py).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from shared.domain.recipe import Recipe

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ComputeError(ValueError):
    """The recipe asks for a precision this device cannot run; the message says what to use."""


@dataclass(frozen=True)
class Compute:
    precision: str = "fp32"             # bf16 | fp16 | fp32, resolved
    device_type: str = "cpu"            # where the forward runs: cuda | cpu
    gradient_checkpointing: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.precision]

    @property
    def mixed(self) -> bool:
        return self.precision != "fp32"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context of every forward: autocast to the precision; nothing in fp32."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16's dynamic loss scaler; None for bf16 and fp32."""
        return torch.amp.GradScaler(self.device_type) if self.precision == "fp16" else None

    def describe(self) -> dict:
        return {"precision": self.precision, "gradient_checkpointing": self.gradient_checkpointing}


CPU_FP32 = Compute()  # what a CPU run resolves to by default


def resolve(recipe: Recipe, device: torch.device) -> Compute:
    """The recipe's precision and checkpointing on this device (see the module's docstring)."""
    spec, gpu = recipe.training, device.type == "cuda"
    # including_emulation=False: pre-Ampere GPUs emulate bf16 matmuls, far slower than fp16
    bf16_gpu = gpu and torch.cuda.is_bf16_supported(including_emulation=False)
    precision = spec.precision
    if precision == "auto":
        precision = ("bf16" if bf16_gpu else "fp16") if gpu else "fp32"
    elif precision == "fp16" and not gpu:
        raise ComputeError("training.precision 'fp16' needs a GPU (a CPU has no fast fp16 kernels and fp16 needs a "
                           "loss scaler); on a CPU use bf16 (CPU autocast supports it), fp32, or auto")
    elif precision == "bf16" and gpu and not bf16_gpu:
        raise ComputeError(f"training.precision 'bf16': this GPU ({torch.cuda.get_device_name(device)}) has no "
                           "native bfloat16 (it needs compute capability 8.0, Ampere, or later); use fp16 or auto")
    checkpointing = spec.gradient_checkpointing
    if checkpointing is None:
        checkpointing = gpu
    return Compute(precision, device.type, checkpointing)
