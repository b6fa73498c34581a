"""Attention family: paged decode attention over a paged KV cache.

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

from .._checks import check_device, has_data, host_bool

ops = torch.ops.decodekit

__all__ = ["paged_attention"]


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: Optional[float] = None,
    kv_layout: str = "NHD",
    validate: bool = True,
) -> torch.Tensor:
    """Decode attention over a paged KV cache; see the module docstring.

    Each query row's result is bit-identical whatever B and Q are (a fixed reduction order
    over its own positions: tiles of 16 positions aligned at position 0, float32 online
    softmax, our own exp), so batched decoding and speculative verification (Q = K + 1)
    reproduce one-token decoding exactly.

    Args:
        query: ``[B, Q, H_q, D]`` float32 / float16 / bfloat16, the Q new tokens of each
            sequence (computed in float32).
        k_cache, v_cache: ``[num_blocks, block_size, H_kv, D]`` (NHD) or
            ``[num_blocks, H_kv, block_size, D]`` (HND), float32 / float16 / bfloat16,
            already holding the new tokens; ``H_q`` must be a multiple of ``H_kv``.
        block_tables: int32 or int64 ``[B, max_blocks]``, padded with -1 past the blocks a
            sequence uses.
        seq_lens: int32 or int64 ``[B]``: cached tokens per sequence including the Q new
            ones, so query ``i`` sits at position ``seq_lens[b] - Q + i``.
        scale: multiplier of q . k (default ``1 / sqrt(D)``).
        kv_layout: ``"NHD"`` or ``"HND"``.
        validate: check that every sequence has ``Q <= seq_lens[b]`` and that the blocks it
            needs are valid ids (synchronises).

    Returns:
        float32 ``[B, Q, H_q, D]``.

    Raises:
        TypeError / ValueError naming the argument: ranks, dtypes, devices, head counts,
        head dims, layouts, seq_lens shorter than Q, block ids out of range.

    Source: online softmax (Milakov & Gimelshein, 2018) as in FlashAttention (Dao et al.,
    2022), over vLLM-style block tables.

    Example:
        >>> k = torch.randn(4, 16, 2, 64); v = torch.randn(4, 16, 2, 64)   # 4 blocks of 16, 2 KV heads
        >>> q = torch.randn(1, 1, 8, 64)                                     # one new token, 8 heads
        >>> out = decodekit.paged_attention(q, k, v, torch.tensor([[2, 0]]), torch.tensor([20]))
        >>> out.shape
        torch.Size([1, 1, 8, 64])
    """
    op = "paged_attention"
    for name, t in (
        ("query", query),
        ("k_cache", k_cache),
        ("v_cache", v_cache),
        ("block_tables", block_tables),
        ("seq_lens", seq_lens),
    ):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != query.device:
            raise ValueError(f"{op}: {name} is on {t.device} but query is on {query.device}")
    check_device(op, op, "query", query)
    if kv_layout not in ("NHD", "HND"):
        raise ValueError(f"{op}: kv_layout must be 'NHD' or 'HND', got {kv_layout!r}")
    if query.dim() != 4:
        raise ValueError(f"{op}: query must be [B, Q, H_q, D], got shape {tuple(query.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"{op}: k_cache and v_cache must be 4-D and of one shape, got {tuple(k_cache.shape)} "
            f"and {tuple(v_cache.shape)}"
        )
    floats = (torch.float32, torch.float16, torch.bfloat16)
    if query.dtype not in floats or k_cache.dtype not in floats or v_cache.dtype != k_cache.dtype:
        raise TypeError(
            f"{op}: query and caches must be float32/float16/bfloat16 (caches of one dtype), got "
            f"{query.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    B, Q, Hq, D = query.shape
    Hkv = k_cache.size(1) if kv_layout == "HND" else k_cache.size(2)
    block_size = k_cache.size(2) if kv_layout == "HND" else k_cache.size(1)
    if k_cache.size(3) != D:
        raise ValueError(f"{op}: the cache's head_dim is {k_cache.size(3)} but query's is {D}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"{op}: H_q={Hq} must be a multiple of the cache's H_kv={Hkv} ({kv_layout})")
    for name, t, shape in (("block_tables", block_tables, 2), ("seq_lens", seq_lens, 1)):
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: {name} must be int32 or int64, got {t.dtype}")
        if t.dim() != shape or t.size(0) != B:
            raise ValueError(f"{op}: {name} must have {shape} dims and B={B} rows, got {tuple(t.shape)}")
    tables = block_tables.to(torch.int64).contiguous()
    lens = seq_lens.to(torch.int64).contiguous()
    if validate and has_data(lens):
        if host_bool((lens < Q).any(), op):
            bad = torch.nonzero(lens < Q).flatten().tolist()
            raise ValueError(f"{op}: seq_lens must count the Q={Q} new tokens (>= Q); rows {bad} are shorter")
        need = (lens + block_size - 1) // block_size
        if host_bool((need > tables.size(1)).any(), op):
            raise ValueError(f"{op}: block_tables has {tables.size(1)} columns but a sequence needs {int(need.max())}")
        cols = torch.arange(tables.size(1), device=tables.device)[None, :] < need[:, None]
        used = tables[cols]
        if used.numel() and host_bool(((used < 0) | (used >= k_cache.size(0))).any(), op):
            raise ValueError(
                f"{op}: block_tables holds block ids outside [0, num_blocks={k_cache.size(0)}) "
                "among the blocks the sequences use"
            )
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif not torch.compiler.is_compiling() and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
    ):
        raise ValueError(f"{op}: scale must be a finite number (default 1/sqrt(D)), got {scale!r}")
    scale = float(scale)
    q = query.detach().to(torch.float32).contiguous()
    return ops.paged_attention(
        q, k_cache.detach().contiguous(), v_cache.detach().contiguous(), tables, lens, scale, kv_layout
    )
