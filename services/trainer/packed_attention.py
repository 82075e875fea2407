"""Attention for packed rows: each conversation attends causally to itself alone, computed per
conversation instead of through a block-diagonal mask.

Why our own: transformers reads packed rows off `position_ids` (positions restart at each
conversation) and builds a block-diagonal mask; PyTorch's SDPA with an explicit mask runs the
full row x row product per head, so a 1,024-token row of five conversations pays for 1,024² scores
where ~5 x 200² are needed. flash-attn's varlen kernel skips the masked blocks, but it is CUDA-only
and an extra build: where it is installed and the forward runs on a GPU in 16 bits, every
conversation of the batch goes through it in one call (services/trainer/kernels.py). Otherwise each
conversation is one `is_causal` SDPA call (the flash kernel on CPU and GPU alike), which is what
varlen does, one segment at a time.

Registered under `PACKED_ATTENTION` in transformers' AttentionInterface; unpacked batches (a
padding mask, generation with a cache) go through transformers' own SDPA unchanged, so the same
model serves packed training rows and padded evaluation batches.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from services.trainer import kernels

PACKED_ATTENTION = "ftpipe_packed_sdpa"


def _segments(positions: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each conversation in one row: a conversation starts where the position does
    not continue the previous one."""
    starts = torch.nonzero(positions[1:] != positions[:-1] + 1).flatten().add(1).tolist()
    bounds = [0, *starts, positions.numel()]
    return list(itertools.pairwise(bounds))


def packed_sdpa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          position_ids: torch.Tensor | None = None, **kwargs):
    """query (batch, heads, q_len, dim), key/value (batch, kv_heads, kv_len, dim) → (batch, q_len, heads, dim)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packed = (position_ids is not None and query.shape[2] == key.shape[2] > 1
              and bool((position_ids[:, 1:] != position_ids[:, :-1] + 1).any()))
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    positions = position_ids.expand(query.shape[0], -1)
    varlen, half = kernels.flash_varlen(), _half_dtype(query)
    if varlen is not None and query.is_cuda and half is not None:
        return _flash_varlen(varlen, query, key, value, positions, half, dropout, scaling), None
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: SDPA's enable_gqa falls back to the math kernel on CPU
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    rows = []
    for b in range(query.shape[0]):
        rows.append(torch.cat([
            F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                           dropout_p=dropout, is_causal=True, scale=scaling)
            for s, e in _segments(positions[b])], dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def _half_dtype(query: torch.Tensor) -> torch.dtype | None:
    """The 16-bit dtype flash-attn can run this query in: its own, or the forward's autocast's."""
    if query.dtype in (torch.float16, torch.bfloat16):
        return query.dtype
    device = query.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _flash_varlen(varlen, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor,
                  dtype: torch.dtype, dropout: float, scaling: float | None) -> torch.Tensor:
    """Every conversation of the batch in one flash-attn varlen call: the rows laid end to end, a
    sequence starting at each row and wherever the positions restart (grouped-query heads as they
    are: the kernel shares them)."""
    batch, heads, length, dim = query.shape
    flat = positions.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1] + 1
    starts[::length] = True
    bounds = torch.nonzero(starts).flatten()
    cumulative = torch.cat([bounds, bounds.new_tensor([flat.numel()])]).to(torch.int32)
    longest = int((cumulative[1:] - cumulative[:-1]).max())

    def tokens(t: torch.Tensor) -> torch.Tensor:  # (batch, heads, length, dim) -> (batch x length, heads, dim)
        return t.transpose(1, 2).reshape(batch * length, t.shape[1], dim).to(dtype)

    out = varlen(tokens(query), tokens(key), tokens(value), cumulative, cumulative, longest, longest,
                 dropout_p=dropout, softmax_scale=scaling, causal=True)
    return out.reshape(batch, length, heads, dim)


def use_packed_attention(model) -> None:
    """Switch a causal LM to per-conversation attention (idempotent). The mask builder stays
    transformers' SDPA one, so padded batches keep their padding mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)
    model.set_attn_implementation(PACKED_ATTENTION)
