"""Plain-torch reference of decodekit.paged_attention (float64 math), one SDPA call per sequence."""

from __future__ import annotations

import math
from typing import Optional

import torch


def _gather(cache: torch.Tensor, table: torch.Tensor, n: int, kv_layout: str) -> torch.Tensor:
    """The first n cached positions of one sequence as [n, H, D]."""
    block_size = cache.size(1) if kv_layout == "NHD" else cache.size(2)
    blocks = table[: (n + block_size - 1) // block_size].long()
    if kv_layout == "NHD":
        return cache[blocks].reshape(-1, cache.size(2), cache.size(3))[:n]
    return cache[blocks].permute(0, 2, 1, 3).reshape(-1, cache.size(1), cache.size(3))[:n]


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: Optional[float] = None,
    kv_layout: str = "NHD",
    dtype: torch.dtype = torch.float64,
    tree_mask: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """softmax(scale * q . k) v over each sequence's cached positions, causal within its Q new
    tokens (or, with ``tree_mask`` bool ``[B, Q, Q]``, the prefix plus the new tokens j with
    ``tree_mask[b, i, j]``), computed in ``dtype`` (float64 by default). Returns ``[B, Q, H_q, D]``
    of ``out_dtype`` (float32 by default)."""
    B, Q, Hq, D = query.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.empty(B, Q, Hq, D, dtype=out_dtype)
    for b in range(B):
        n = int(seq_lens[b])
        k = _gather(k_cache, block_tables[b], n, kv_layout).to(dtype)
        v = _gather(v_cache, block_tables[b], n, kv_layout).to(dtype)
        Hkv = k.size(1)
        k = k.repeat_interleave(Hq // Hkv, dim=1).transpose(0, 1)  # [Hq, n, D]
        v = v.repeat_interleave(Hq // Hkv, dim=1).transpose(0, 1)
        q = query[b].to(dtype).transpose(0, 1)  # [Hq, Q, D]
        pos = torch.arange(n - Q, n)
        mask = torch.arange(n)[None, :] <= pos[:, None]  # [Q, n]
        if tree_mask is not None:
            mask[:, n - Q :] = tree_mask[b].cpu()
        out[b] = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(0, 1)
    return out
