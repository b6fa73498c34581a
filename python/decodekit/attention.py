"""Paged decode attention over a paged KV cache.

``paged_attention(query, k_cache, v_cache, block_tables, seq_lens, *, scale, kv_layout="NHD")``
computes, for each sequence ``b`` and each of its ``Q`` new tokens ``i`` (at position
``seq_lens[b] - Q + i``), softmax(scale * q . k) v over the cached positions
``0 .. seq_lens[b] - Q + i`` (causal within the new tokens), reading keys and values
through the sequence's block table. Query head ``h`` reads KV head ``h // (H_q / H_kv)``
(grouped-query attention).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["paged_attention", "paged_attention_reference"]


def _gather(cache: torch.Tensor, table: torch.Tensor, n: int, kv_layout: str) -> torch.Tensor:
    """The first n cached positions of one sequence as [n, H, D]."""
    block_size = cache.size(1) if kv_layout == "NHD" else cache.size(2)
    blocks = table[: (n + block_size - 1) // block_size].long()
    if kv_layout == "NHD":
        return cache[blocks].reshape(-1, cache.size(2), cache.size(3))[:n]
    return cache[blocks].permute(0, 2, 1, 3).reshape(-1, cache.size(1), cache.size(3))[:n]


def paged_attention_reference(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, seq_lens: torch.Tensor, *, scale: Optional[float] = None,
                              kv_layout: str = "NHD") -> torch.Tensor:
    """Plain-torch paged attention (float32 math), the reference for the kernel.

    Shapes as in :func:`paged_attention`. Slow: one SDPA call per sequence.
    """
    B, Q, Hq, D = query.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.empty(B, Q, Hq, D, dtype=torch.float32)
    for b in range(B):
        n = int(seq_lens[b])
        k = _gather(k_cache, block_tables[b], n, kv_layout).float()
        v = _gather(v_cache, block_tables[b], n, kv_layout).float()
        Hkv = k.size(1)
        k = k.repeat_interleave(Hq // Hkv, dim=1).transpose(0, 1)  # [Hq, n, D]
        v = v.repeat_interleave(Hq // Hkv, dim=1).transpose(0, 1)
        q = query[b].float().transpose(0, 1)  # [Hq, Q, D]
        pos = torch.arange(n - Q, n)
        mask = torch.arange(n)[None, :] <= pos[:, None]  # [Q, n]
        out[b] = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale).transpose(0, 1)
    return out


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, *, scale: Optional[float] = None, kv_layout: str = "NHD") -> torch.Tensor:
    """Decode attention over a paged KV cache; see the module docstring.

    Args:
        query: ``[B, Q, H_q, D]`` float32 (or float16/bfloat16), the Q new tokens of each sequence.
        k_cache, v_cache: ``[num_blocks, block_size, H_kv, D]`` (NHD) or
            ``[num_blocks, H_kv, block_size, D]`` (HND), already holding the new tokens.
        block_tables: int32 or int64 ``[B, max_blocks]``, padded with -1.
        seq_lens: int32 or int64 ``[B]``: cached tokens per sequence including the Q new ones.
        scale: multiplier of q . k (default ``1 / sqrt(D)``).
        kv_layout: ``"NHD"`` or ``"HND"``.

    Returns:
        float32 ``[B, Q, H_q, D]``.
    """
    return paged_attention_reference(query, k_cache, v_cache, block_tables, seq_lens, scale=scale,
                                     kv_layout=kv_layout)
