"""Attention family: paged decode attention over a paged KV cache.

``paged_attention(query, k_cache, v_cache, block_tables, seq_lens, *, scale, kv_layout="NHD")``
computes, for each sequence ``b`` and each of its ``Q`` new tokens ``i`` (at position
``seq_lens[b] - Q + i``), softmax(scale * q . k) v over the cached positions
``0 .. seq_lens[b] - Q + i`` (causal within the new tokens), reading keys and values
through the sequence's block table. Query head ``h`` reads KV head ``h // (H_q / H_kv)``
(grouped-query attention).

With ``tree_mask`` (bool ``[B, Q, Q]``) the ``Q`` new tokens are the flattened nodes of a
token tree (speculative tree verification, e.g. Medusa's candidate trees: Cai et al., 2024;
SpecInfer's tree attention: Miao et al., 2024): query ``i`` reads the cached prefix
``0 .. seq_lens[b] - Q - 1`` and the new tokens ``j`` with ``tree_mask[b, i, j]`` (its
ancestors and itself). :func:`tree_mask_from_parents` builds that mask from parent indices.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .._checks import check_device, has_data, host_bool

ops = torch.ops.decodekit

__all__ = ["paged_attention", "tree_mask_from_parents"]


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: Optional[float] = None,
    kv_layout: str = "NHD",
    tree_mask: Optional[torch.Tensor] = None,
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
        tree_mask: optional bool ``[B, Q, Q]`` on the query's device: ``tree_mask[b, i, j]``
            says new token ``i`` may read new token ``j``. Nodes are in a flat order where
            ancestors come before descendants, so only ``j <= i`` may be True, and the
            diagonal must be True (a node reads itself). Query ``i`` then reads the prefix
            ``0 .. seq_lens[b] - Q - 1`` plus the allowed new tokens. Masked-out positions are
            skipped (never scored nor added), so the mask ``j <= i`` (a chain) gives the very
            bits of ``tree_mask=None``, and a row's bits still do not depend on B. CPU only for
            now (a CUDA query raises NotImplementedError).
        validate: check that every sequence has ``Q <= seq_lens[b]``, that the blocks it
            needs are valid ids, and that ``tree_mask`` has a True diagonal and nothing above
            it (synchronises). Without validation, entries above the diagonal are ignored
            and a row with nothing to read gets zeros.

    Returns:
        float32 ``[B, Q, H_q, D]``.

    Raises:
        TypeError / ValueError naming the argument: ranks, dtypes, devices, head counts,
        head dims, layouts, seq_lens shorter than Q, block ids out of range, a tree_mask that
        is not bool ``[B, Q, Q]``, has a False diagonal or a True entry with ``j > i``.
        NotImplementedError: a tree_mask with CUDA tensors.

    Source: online softmax (Milakov & Gimelshein, 2018) as in FlashAttention (Dao et al.,
    2022), over vLLM-style block tables; tree attention masks as in SpecInfer (Miao et al.,
    2024) and Medusa (Cai et al., 2024).

    Example:
        >>> k = torch.randn(4, 16, 2, 64); v = torch.randn(4, 16, 2, 64)   # 4 blocks of 16, 2 KV heads
        >>> q = torch.randn(1, 1, 8, 64)                                     # one new token, 8 heads
        >>> out = decodekit.paged_attention(q, k, v, torch.tensor([[2, 0]]), torch.tensor([20]))
        >>> out.shape
        torch.Size([1, 1, 8, 64])
        >>> # a tree of 3 new tokens: node 0 the root, nodes 1 and 2 its two children
        >>> mask = tree_mask_from_parents(torch.tensor([[-1, 0, 0]]))
        >>> out = decodekit.paged_attention(torch.randn(1, 3, 8, 64), k, v, torch.tensor([[2, 0]]),
        ...                                 torch.tensor([20]), tree_mask=mask)
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
    mask = None
    if tree_mask is not None:
        mask = _check_tree_mask(op, tree_mask, query, validate)
    q = query.detach().to(torch.float32).contiguous()
    k, v = k_cache.detach().contiguous(), v_cache.detach().contiguous()
    if mask is None:
        return ops.paged_attention(q, k, v, tables, lens, scale, kv_layout)
    return ops.paged_attention(q, k, v, tables, lens, scale, kv_layout, mask)


def _check_tree_mask(op: str, tree_mask, query: torch.Tensor, validate: bool) -> torch.Tensor:
    """bool [B, Q, Q] on the query's device; with ``validate``, a True diagonal and nothing
    above it (synchronises)."""
    B, Q = query.size(0), query.size(1)
    if not isinstance(tree_mask, torch.Tensor):
        raise TypeError(
            f"{op}: tree_mask must be a bool torch.Tensor [B, Q, Q] or None, got {type(tree_mask).__name__}"
        )
    if tree_mask.dtype != torch.bool:
        raise TypeError(f"{op}: tree_mask must be bool [B, Q, Q], got dtype {tree_mask.dtype}")
    if tuple(tree_mask.shape) != (B, Q, Q):
        raise ValueError(f"{op}: tree_mask must be [B={B}, Q={Q}, Q={Q}], got shape {tuple(tree_mask.shape)}")
    if tree_mask.device != query.device:
        raise ValueError(f"{op}: tree_mask is on {tree_mask.device} but query is on {query.device}")
    if query.device.type == "cuda":
        raise NotImplementedError(
            f"{op}: tree_mask is not supported on CUDA yet (the CPU kernel has it); call it without "
            "tree_mask or on CPU tensors"
        )
    if validate and has_data(tree_mask):
        diag = tree_mask.diagonal(dim1=1, dim2=2)
        if host_bool((~diag).any(), op):
            bad = torch.nonzero(~diag)[:8].tolist()
            raise ValueError(f"{op}: tree_mask[b, i, i] must be True (a node reads itself); False at (b, i) = {bad}")
        above = torch.ones(Q, Q, dtype=torch.bool, device=tree_mask.device).triu(1)
        if host_bool((tree_mask & above).any(), op):
            bad = torch.nonzero(tree_mask & above)[:8].tolist()
            raise ValueError(
                f"{op}: tree_mask[b, i, j] must be False for j > i (ancestors come before descendants "
                f"in the flat order); True at (b, i, j) = {bad}"
            )
    return tree_mask.detach().contiguous()


def tree_mask_from_parents(parents: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
    """The tree attention mask of token trees given by parent indices: ``mask[b, i, j]`` is
    True when new token ``j`` is node ``i`` itself or one of its ancestors (the ancestor-or-self
    closure), the ``tree_mask`` of :func:`paged_attention`.

    Args:
        parents: int32 / int64 ``[B, Q]``: ``parents[b, i]`` is the flat index of node ``i``'s
            parent among the ``Q`` new tokens, or -1 for a node without one (the root, whose
            parent is the last cached token). Parents come before their children:
            ``-1 <= parents[b, i] < i``.
        validate: check that range (synchronises); with ``validate=False`` an out-of-range
            parent counts as -1.

    Returns:
        bool ``[B, Q, Q]`` on the parents' device, True on the diagonal and nowhere above it.

    Raises:
        TypeError: parents not an integer tensor. ValueError: parents not 2-D, or (validate)
        a parent outside ``[-1, i)``, naming the first (b, i).

    Source: the tree attention masks of SpecInfer (Miao et al., 2024) and Medusa (Cai et
    al., 2024), computed here as one boolean OR per node in flat order (the row of a node is
    its parent's row plus itself).

    Example:
        >>> tree_mask_from_parents(torch.tensor([[-1, 0, 0, 1]]))[0].int().tolist()
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]
    """
    op = "tree_mask_from_parents"
    if not isinstance(parents, torch.Tensor):
        raise TypeError(f"{op}: parents must be an int32/int64 torch.Tensor [B, Q], got {type(parents).__name__}")
    if parents.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: parents must be int32 or int64, got {parents.dtype}")
    if parents.dim() != 2:
        raise ValueError(f"{op}: parents must be 2-D [B, Q], got shape {tuple(parents.shape)}")
    B, Q = parents.shape
    p = parents.to(torch.int64)
    idx = torch.arange(Q, device=p.device)
    valid = (p >= 0) & (p < idx[None, :])
    if validate and has_data(p):
        bad = ~valid & (p != -1)
        if host_bool(bad.any(), op):
            b, i = torch.nonzero(bad)[0].tolist()
            raise ValueError(
                f"{op}: parents[{b}, {i}] = {int(p[b, i])} must be -1 (no parent) or a node before it, in [0, {i})"
            )
    mask = torch.zeros(B, Q, Q, dtype=torch.bool, device=p.device)
    rows = torch.arange(B, device=p.device)
    for i in range(Q):
        par = torch.where(valid[:, i], p[:, i], torch.zeros_like(p[:, i]))
        mask[:, i] = mask[rows, par] & valid[:, i, None]  # the parent's row (all False without one)
        mask[:, i, i] = True
    return mask
