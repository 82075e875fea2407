"""Optional fused kernels: each is used only where its package is installed and a GPU is there (both
are CUDA/Triton only); the plain PyTorch path runs otherwise and is what the tests check them against.
Neither package is a dependency of ftpipe; a GPU image installs them.

- flash-attn's `flash_attn_varlen_func`: attention over packed rows in one call, each conversation
  attending to itself (services/trainer/packed_attention.py);
- Liger's `liger_fused_linear_cross_entropy`: the LM head and the cross-entropy fused, in chunks of
  positions, never holding the logits (services/trainer/objectives.py).
"""
from __future__ import annotations

import functools
import logging
from typing import Callable

import torch

logger = logging.getLogger(__name__)


@functools.cache
def flash_varlen() -> Callable | None:
    from transformers.utils import is_flash_attn_2_available

    if not torch.cuda.is_available() or not is_flash_attn_2_available():
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as exc:  # installed but built against another torch or CUDA
        logger.warning("flash-attn is installed but does not load (%s); packed rows use the SDPA loop", exc)
        return None
    return flash_attn_varlen_func


@functools.cache
def liger_fused_linear_cross_entropy() -> Callable | None:
    from transformers.utils import is_liger_kernel_available

    if not torch.cuda.is_available() or not is_liger_kernel_available():
        return None
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as fused
    except ImportError as exc:
        logger.warning("liger-kernel is installed but does not load (%s); the loss uses the chunked head", exc)
        return None
    return fused
