"""KV-cache family: writes into contiguous and paged caches (validated wrappers of
``torch.ops.decodekit.append_*kv_cache``) and the compaction of a verified token tree's
accepted path (``torch.ops.decodekit.compact_*kv_cache``). The cache managers built on them
are in :mod:`decodekit.cache`.

Layouts (``kv_layout``), for one layer's key cache (the value cache has the same shape):

* contiguous cache: ``"NHD"`` = ``[B, S_max, H, D]``, ``"HND"`` = ``[B, H, S_max, D]``;
* paged cache: ``"NHD"`` = ``[num_blocks, block_size, H, D]``,
  ``"HND"`` = ``[num_blocks, H, block_size, D]``.

``H`` is the number of key/value heads and ``D`` the head dimension. Caches are float32,
float16 or bfloat16 and must be contiguous; new keys/values must have the cache's dtype
(elements are copied bit for bit, never converted). The ops run on the CPU (and on the meta
device, where they only check shapes).

The checks that look at tensor data (lengths past the cache, slots past the pool) synchronise
with the device; ``validate=False`` skips them (for CUDA graphs and ``torch.compile``). The
kernels never write out of bounds whatever the data: a position past the cache or a slot
outside the pool is skipped.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch

from .._checks import check_device, index_tensor

ops = torch.ops.decodekit

__all__ = ["append_kv_cache", "append_paged_kv_cache", "compact_kv_cache", "compact_paged_kv_cache"]

CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("NHD", "HND")

IntOrInts = Union[int, Sequence[int], torch.Tensor]


# ----------------------------------------------------------------- checks ----
def check_layout(kv_layout, op: str) -> str:
    if not isinstance(kv_layout, str) or kv_layout not in LAYOUTS:
        raise ValueError(f'{op}: kv_layout must be "NHD" or "HND", got {kv_layout!r}')
    return kv_layout


def _check_caches(k_cache, v_cache, op: str, shape_doc: str) -> None:
    """Both caches: 4-D, one shape, dtype and device, contiguous, on a device with a kernel."""
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(c, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor {shape_doc}, got {type(c).__name__}")
        if c.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D {shape_doc}, got shape {tuple(c.shape)}")
        if c.dtype not in CACHE_DTYPES:
            raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {c.dtype}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"{op}: v_cache must have the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}"
        )
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"{op}: v_cache must have the dtype of k_cache ({k_cache.dtype}), got {v_cache.dtype}")
    if v_cache.device != k_cache.device:
        raise ValueError(f"{op}: v_cache is on {v_cache.device} but k_cache is on {k_cache.device}")
    check_device(op, op, "k_cache", k_cache)
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not c.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous (it is written in place)")


def check_kv_rows(
    key, value, k_cache: torch.Tensor, H: int, D: int, ndim: int, shape_doc: str, op: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    dtype, device = k_cache.dtype, k_cache.device
    out = []
    for name, x in (("key", key), ("value", value)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor {shape_doc}, got {type(x).__name__}")
        shape = x.shape
        if len(shape) != ndim:
            raise ValueError(f"{op}: {name} must be {ndim}-D {shape_doc}, got shape {tuple(shape)}")
        if shape[-2] != H:
            raise ValueError(f"{op}: {name} has {shape[-2]} heads but the cache has H={H} (shape {tuple(shape)})")
        if shape[-1] != D:
            raise ValueError(f"{op}: {name} has head_dim {shape[-1]} but the cache has D={D} (shape {tuple(shape)})")
        if x.dtype != dtype:
            raise TypeError(
                f"{op}: {name} must have the cache's dtype {dtype}, got {x.dtype} "
                "(convert it first; the cache stores the bits as given)"
            )
        if x.device != device:
            raise ValueError(f"{op}: {name} is on {x.device} but the caches are on {device}")
        if x.requires_grad:
            x = x.detach()  # the ops are not differentiable
        if D > 1 and x.stride(-1) != 1:
            x = x.contiguous()
        out.append(x)
    if value.shape != key.shape:
        raise ValueError(f"{op}: value must have the shape of key {tuple(key.shape)}, got {tuple(value.shape)}")
    return out[0], out[1]


def _byte_range(t: torch.Tensor) -> Tuple[int, int]:
    """[first, last] byte addresses a tensor's elements can touch."""
    start = t.data_ptr()
    if t.numel() == 0:
        return start, start - 1
    extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    return start, start + (extent + 1) * t.element_size() - 1


def check_no_overlap(
    op: str, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
) -> None:
    """Raise ValueError when key or value shares memory with a cache the op writes, as torch's
    own in-place copies do: the copy would read what it has already written."""
    pairs = [
        (n, s, d, dn)
        for n, s in (("key", key), ("value", value))
        for dn, d in (("k_cache", k_cache), ("v_cache", v_cache))
    ]
    if torch.compiler.is_compiling():  # fake tensors have no memory to compare
        return
    for name, src, dst, dst_name in pairs:
        if src.device.type == "meta" or src.numel() == 0 or dst.numel() == 0:
            continue
        if src.untyped_storage().data_ptr() != dst.untyped_storage().data_ptr():
            continue
        (a0, a1), (b0, b1) = _byte_range(src), _byte_range(dst)
        if a0 <= b1 and b0 <= a1:
            raise ValueError(
                f"{op}: {name} overlaps {dst_name} in memory (a view of the cache?); the copy would "
                f"read positions it writes. Pass {name}.clone()"
            )


def _rows_text(rows: List[int], values: List[int]) -> str:
    shown = rows[:8]
    more = "" if len(rows) <= 8 else f" (and {len(rows) - 8} more)"
    return f"{shown}{more} (values {[values[r] for r in shown]})"


def _detached(t: torch.Tensor) -> torch.Tensor:
    return t.detach() if t.requires_grad else t


# ------------------------------------------------------------------- ops ----
def append_kv_cache(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    seq_lens: IntOrInts,
    *,
    kv_layout: str = "NHD",
    validate: bool = True,
) -> None:
    """Writes the keys and values of ``T`` new tokens per row into a contiguous cache, in place.

    Row ``b``'s token ``t`` goes to position ``seq_lens[b] + t`` of cache row ``b``: each row
    keeps its own length, and the new tokens land right after the cached ones. ``seq_lens`` is
    not changed (the caller advances it once every layer is written). Positions outside the
    written ones are left untouched. This is the contiguous counterpart of the paged append
    (:func:`append_paged_kv_cache`), with the slot of each token implied by the row's length.

    Args:
        k_cache, v_cache: the layer's caches, ``[B, S_max, H, D]`` (``"NHD"``) or
            ``[B, H, S_max, D]`` (``"HND"``), float32 / float16 / bfloat16, contiguous, same
            shape, dtype and device. Modified in place.
        key, value: ``[B, T, H, D]`` with the caches' dtype and device (any strides; copied
            when the last dimension is not contiguous). ``T`` may be 0.
        seq_lens: positions already cached per row, in tokens: an integer ``[B]`` tensor
            (int32 or int64, on the caches' device), a list of B ints, or one int for every row.
        kv_layout: ``"NHD"`` (default) or ``"HND"``.
        validate: check that ``0 <= seq_lens[b]`` and ``seq_lens[b] + T <= S_max`` for every
            row before writing (synchronises). With ``validate=False`` such rows are written only
            at the positions that fit (a negative length skips the row); nothing is ever written
            out of bounds.

    Returns:
        None (the caches are written in place).

    Raises:
        TypeError: a non-tensor argument, a cache dtype other than float32/float16/bfloat16,
            key/value dtype different from the caches', non-integer ``seq_lens``.
        ValueError: key or value overlapping a cache in memory (a view of it: clone it first);
            wrong ranks or shapes, key/value head count or head dim different from the
            caches', key rows != B, tensors on different devices or on a device without kernels,
            non-contiguous caches, bad ``kv_layout``, ``seq_lens`` of the wrong length, and
            (``validate``) a negative length or an append that would pass ``S_max``, naming the
            rows; the caches are unchanged when it raises.

    Example:
        >>> k = torch.zeros(2, 8, 1, 4); v = torch.zeros_like(k)
        >>> append_kv_cache(k, v, torch.ones(2, 3, 1, 4), torch.ones(2, 3, 1, 4), torch.tensor([0, 5]))
        >>> k[1, 5:8].sum().item()
        12.0
    """
    op = "append_kv_cache"
    kv_layout = check_layout(kv_layout, op)
    shape_doc = "[B, S_max, H, D]" if kv_layout == "NHD" else "[B, H, S_max, D]"
    _check_caches(k_cache, v_cache, op, shape_doc)
    B = k_cache.size(0)
    H, S = (k_cache.size(2), k_cache.size(1)) if kv_layout == "NHD" else (k_cache.size(1), k_cache.size(2))
    D = k_cache.size(3)
    key, value = check_kv_rows(key, value, k_cache, H, D, 4, "[B, T, H, D]", op)
    check_no_overlap(op, key, value, k_cache, v_cache)
    if key.size(0) != B:
        raise ValueError(f"{op}: key has {key.size(0)} rows but the cache has B={B} (key shape {tuple(key.shape)})")
    lens = index_tensor(seq_lens, "seq_lens", op, k_cache.device, B)
    T = key.size(1)
    if validate and not k_cache.is_meta and B > 0:
        vals = lens.tolist()  # synchronises
        if min(vals) < 0:
            neg = [b for b, n in enumerate(vals) if n < 0]
            raise ValueError(f"{op}: seq_lens must be >= 0; rows {_rows_text(neg, vals)}")
        if max(vals) > S - T:
            over = [b for b, n in enumerate(vals) if n > S - T]
            raise ValueError(
                f"{op}: appending T={T} tokens would pass S_max={S} in rows {_rows_text(over, vals)} "
                "(seq_lens + T must be <= S_max); nothing was written"
            )
    ops.append_kv_cache(_detached(k_cache), _detached(v_cache), key, value, lens, kv_layout)


def append_paged_kv_cache(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: Union[torch.Tensor, Sequence[int]],
    *,
    kv_layout: str = "NHD",
    validate: bool = True,
) -> None:
    """Scatters token rows of keys and values into a paged (block) cache, in place.

    The cache is a pool of ``num_blocks`` blocks of ``block_size`` positions; a slot number
    ``slot = block * block_size + offset`` names one position. Row ``i`` of ``key``/``value``
    is written to slot ``slot_mapping[i]``, for ``i < M = len(slot_mapping)``; rows at or past
    ``M`` are ignored (so ``key`` may be a padded buffer), and negative slots are padding and
    skipped. Semantics of vLLM's ``reshape_and_cache`` (slot mapping, -1 padding) on the
    layouts of FlashInfer's paged KV cache (``"NHD"``/``"HND"``).

    Args:
        k_cache, v_cache: the layer's caches, ``[num_blocks, block_size, H, D]`` (``"NHD"``) or
            ``[num_blocks, H, block_size, D]`` (``"HND"``), float32 / float16 / bfloat16,
            contiguous, same shape, dtype and device. Modified in place.
        key, value: ``[N, H, D]`` with the caches' dtype and device (any strides; copied when
            the last dimension is not contiguous).
        slot_mapping: ``[M]`` slot per row, ``M <= N``: an integer tensor (int32 or int64, on the
            caches' device) or a list of ints. Negative = skip the row.
        kv_layout: ``"NHD"`` (default) or ``"HND"``.
        validate: check before writing that every slot is ``< num_blocks * block_size`` and that
            no slot appears twice (synchronises). With ``validate=False`` out-of-pool slots are
            skipped, and for a repeated slot which row ends up there is unspecified; nothing is
            ever written out of bounds.

    Returns:
        None (the caches are written in place).

    Raises:
        TypeError: a non-tensor argument, a cache dtype other than float32/float16/bfloat16,
            key/value dtype different from the caches', non-integer ``slot_mapping``.
        ValueError: key or value overlapping a cache in memory (a view of it: clone it first);
            wrong ranks or shapes, key/value head count or head dim different from the
            caches', tensors on different devices or on a device without kernels, non-contiguous
            caches, bad ``kv_layout``, ``slot_mapping`` longer than ``key``, and (``validate``)
            slots past the pool or repeated, naming their positions; nothing is written when it
            raises.

    Example:
        >>> k = torch.zeros(2, 4, 1, 2); v = torch.zeros_like(k)          # 2 blocks x 4 slots
        >>> rows = torch.tensor([[[1.0, 1.0]], [[2.0, 2.0]], [[3.0, 3.0]]])
        >>> append_paged_kv_cache(k, v, rows, rows, torch.tensor([0, 5, -1]))
        >>> k.view(8, 2)[[0, 5]].tolist()
        [[1.0, 1.0], [2.0, 2.0]]
    """
    op = "append_paged_kv_cache"
    kv_layout = check_layout(kv_layout, op)
    shape_doc = "[num_blocks, block_size, H, D]" if kv_layout == "NHD" else "[num_blocks, H, block_size, D]"
    _check_caches(k_cache, v_cache, op, shape_doc)
    num_blocks = k_cache.size(0)
    H, bs = (k_cache.size(2), k_cache.size(1)) if kv_layout == "NHD" else (k_cache.size(1), k_cache.size(2))
    D = k_cache.size(3)
    key, value = check_kv_rows(key, value, k_cache, H, D, 3, "[N, H, D]", op)
    check_no_overlap(op, key, value, k_cache, v_cache)
    slots = index_tensor(slot_mapping, "slot_mapping", op, k_cache.device, None)
    if slots.size(0) > key.size(0):
        raise ValueError(
            f"{op}: slot_mapping has {slots.size(0)} entries but key has only {key.size(0)} rows "
            "(it must have at most N)"
        )
    if validate and not k_cache.is_meta and slots.numel() > 0:
        total = num_blocks * bs
        vals = slots.tolist()  # synchronises
        if max(vals) >= total:
            past = [i for i, x in enumerate(vals) if x >= total]
            raise ValueError(
                f"{op}: slot_mapping holds slots past the cache (num_blocks * block_size = {total}) "
                f"at positions {_rows_text(past, vals)}; nothing was written"
            )
        used = [x for x in vals if x >= 0]
        if len(set(used)) != len(used):
            seen, rep = set(), []
            for x in used:
                if x in seen and x not in rep:
                    rep.append(x)
                seen.add(x)
            raise ValueError(f"{op}: slot_mapping repeats slots {rep[:8]}; each slot may be written once per call")
    ops.append_paged_kv_cache(_detached(k_cache), _detached(v_cache), key, value, slots, kv_layout)


# ------------------------------------------------------------ compaction ----
def _check_accepted(accepted_nodes, B: int, device: torch.device, op: str) -> torch.Tensor:
    """int32/int64 [B, L] -> contiguous int64 on ``device``."""
    if not isinstance(accepted_nodes, torch.Tensor):
        raise TypeError(
            f"{op}: accepted_nodes must be an int32/int64 torch.Tensor [B, L], got {type(accepted_nodes).__name__}"
        )
    if accepted_nodes.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: accepted_nodes must be int32 or int64, got {accepted_nodes.dtype}")
    if accepted_nodes.dim() != 2 or accepted_nodes.size(0) != B:
        raise ValueError(f"{op}: accepted_nodes must be [B={B}, L], got shape {tuple(accepted_nodes.shape)}")
    if accepted_nodes.device != device:
        raise ValueError(f"{op}: accepted_nodes is on {accepted_nodes.device} but the caches are on {device}")
    return accepted_nodes.to(torch.int64).contiguous()


def accepted_paths(start: List[int], accepted: List[List[int]], op: str) -> List[List[int]]:
    """Each row's accepted nodes (the entries before the -1 padding), after checking that
    ``start >= 0``, the entries are ``>= -1``, the padding only trails, and the nodes strictly
    increase. Raises ValueError naming the row."""
    paths = []
    for b, (s0, row) in enumerate(zip(start, accepted)):
        if s0 < 0:
            raise ValueError(f"{op}: start must be >= 0; row {b} has {s0}")
        n = next((k for k, x in enumerate(row) if x == -1), len(row))
        path = row[:n]
        if any(x < -1 for x in row):
            raise ValueError(f"{op}: accepted_nodes holds values < -1 in row {b}: {row[:16]} (-1 is the padding)")
        if any(x != -1 for x in row[n:]):
            raise ValueError(f"{op}: accepted_nodes row {b} has entries after the -1 padding: {row[:16]}")
        if any(b2 <= a for a, b2 in zip(path, path[1:])):
            raise ValueError(
                f"{op}: accepted_nodes must increase strictly along a path (ancestors come before "
                f"descendants in the flat order); row {b} is {path[:16]}"
            )
        paths.append(path)
    return paths


def compact_kv_cache(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    start: IntOrInts,
    accepted_nodes: torch.Tensor,
    *,
    kv_layout: str = "NHD",
    validate: bool = True,
) -> None:
    """Moves the accepted path of a verified token tree to consecutive positions of a
    contiguous cache, in place.

    Row ``b`` appended the ``Q`` nodes of a token tree (flattened, ancestors before
    descendants) at positions ``start[b] .. start[b] + Q - 1``; verification accepted the path
    ``accepted_nodes[b, 0], accepted_nodes[b, 1], ...`` (flat indices relative to ``start[b]``,
    increasing, then -1 padding). For every ``k`` the key and value at position
    ``start[b] + accepted_nodes[b, k]`` (all heads) are copied to position ``start[b] + k``, so
    that positions ``start[b] .. start[b] + n_b - 1`` (``n_b`` accepted nodes) hold exactly the
    bits a cache holds that had only the path appended. Other positions are untouched (the
    caller then sets the row's length to ``start[b] + n_b``, e.g. with
    :meth:`decodekit.ContiguousKVCache.compact`, which also zeroes the rest).

    The copies run in ascending ``k`` in place: the indices strictly increase from >= 0, so
    ``accepted_nodes[b, k] >= k``, and step ``k`` writes position ``start + k``, below every
    position a later step reads (``start + accepted_nodes[b, k'] >= start + k' > start + k``).

    Args:
        k_cache, v_cache: ``[B, S_max, H, D]`` (``"NHD"``) or ``[B, H, S_max, D]``
            (``"HND"``), float32 / float16 / bfloat16, contiguous. Modified in place.
        start: int64/int32 ``[B]`` tensor, list of ``B`` ints or one int: the position of each
            row's first tree node (its length before the tree).
        accepted_nodes: int32/int64 ``[B, L]``: the accepted nodes of each row in path order,
            -1 after the end (a row of -1 moves nothing).
        kv_layout: ``"NHD"`` (default) or ``"HND"``.
        validate: check (synchronises) that ``start >= 0``, entries are ``>= -1`` with the -1
            padding only at the end, the nodes strictly increase, and
            ``start[b] + accepted_nodes[b, k] < S_max``. Without it, a row's path ends at the
            first entry that is negative or not greater than the one before, or that lies past
            the cache; nothing is ever written out of bounds.

    Returns:
        None (the caches are written in place).

    Raises:
        TypeError: non-tensor caches or accepted_nodes, dtypes. ValueError: shapes, devices,
            layout, and (``validate``) the data checks above, naming the row; nothing is
            written when it raises.

    Source: the KV-cache update after tree verification of speculative decoding (SpecInfer,
    Miao et al., 2024; Medusa, Cai et al., 2024), here one in-place pass per row.

    Example:
        >>> k = torch.arange(6.0).view(1, 6, 1, 1); v = k.clone()   # positions hold 0..5
        >>> compact_kv_cache(k, v, [2], torch.tensor([[0, 2, 3, -1]]))   # tree at 2..5, path 0, 2, 3
        >>> k.flatten().tolist()[:5]
        [0.0, 1.0, 2.0, 4.0, 5.0]
    """
    op = "compact_kv_cache"
    kv_layout = check_layout(kv_layout, op)
    shape_doc = "[B, S_max, H, D]" if kv_layout == "NHD" else "[B, H, S_max, D]"
    _check_caches(k_cache, v_cache, op, shape_doc)
    B = k_cache.size(0)
    S = k_cache.size(1) if kv_layout == "NHD" else k_cache.size(2)
    starts = index_tensor(start, "start", op, k_cache.device, B)
    acc = _check_accepted(accepted_nodes, B, k_cache.device, op)
    if validate and not k_cache.is_meta and acc.numel() > 0:
        s_list = starts.tolist()  # synchronises
        paths = accepted_paths(s_list, acc.tolist(), op)
        for b, (s0, path) in enumerate(zip(s_list, paths)):
            if path and s0 + path[-1] >= S:
                raise ValueError(
                    f"{op}: row {b}'s accepted node {path[-1]} at start {s0} lies past the cache "
                    f"(S_max = {S}); nothing was written"
                )
    ops.compact_kv_cache(_detached(k_cache), _detached(v_cache), starts, acc, kv_layout)


def compact_paged_kv_cache(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    start: IntOrInts,
    accepted_nodes: torch.Tensor,
    *,
    kv_layout: str = "NHD",
    validate: bool = True,
) -> None:
    """Moves the accepted path of a verified token tree to consecutive positions of a paged
    cache (one layer), in place: :func:`compact_kv_cache` with each sequence's positions read
    through its block table (position ``p`` is slot ``block_tables[b, p // block_size] *
    block_size + p % block_size``).

    The sequences' written blocks must be their own: a block shared with another sequence (a
    fork's prefix) must be copied first, as :meth:`decodekit.PagedKVCache.compact` does.

    Args:
        k_cache, v_cache: ``[num_blocks, block_size, H, D]`` (``"NHD"``) or
            ``[num_blocks, H, block_size, D]`` (``"HND"``), float32 / float16 / bfloat16,
            contiguous. Modified in place.
        block_tables: int32/int64 ``[B, max_blocks]``, -1 padded.
        start: int64/int32 ``[B]`` tensor, list of ``B`` ints or one int: the position of each
            sequence's first tree node (its length before the tree).
        accepted_nodes: int32/int64 ``[B, L]``: accepted nodes in path order, -1 after the end.
        kv_layout: ``"NHD"`` (default) or ``"HND"``.
        validate: the checks of :func:`compact_kv_cache` with the cache's end at
            ``max_blocks * block_size``, plus: the blocks of the positions each row moves are
            valid ids in ``[0, num_blocks)``, and no block is touched by two rows (synchronises).
            Without it, a position whose block id is out of range is neither read nor written.

    Returns:
        None (the caches are written in place).

    Raises:
        TypeError / ValueError as :func:`compact_kv_cache`, and for block_tables' dtype, shape,
        block ids out of range or shared between rows; nothing is written when it raises.

    Source: as :func:`compact_kv_cache`, on vLLM-style block tables.

    Example:
        >>> k = torch.arange(8.0).view(2, 4, 1, 1); v = k.clone()   # 2 blocks of 4 slots
        >>> compact_paged_kv_cache(k, v, torch.tensor([[1, 0]]), [1], torch.tensor([[0, 3]]))
        >>> k.flatten().tolist()   # sequence positions 1.. are slots 5, 6, 7, 0: node 3 (slot 0) -> slot 6
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 7.0]
    """
    op = "compact_paged_kv_cache"
    kv_layout = check_layout(kv_layout, op)
    shape_doc = "[num_blocks, block_size, H, D]" if kv_layout == "NHD" else "[num_blocks, H, block_size, D]"
    _check_caches(k_cache, v_cache, op, shape_doc)
    num_blocks = k_cache.size(0)
    bs = k_cache.size(1) if kv_layout == "NHD" else k_cache.size(2)
    if not isinstance(block_tables, torch.Tensor):
        raise TypeError(
            f"{op}: block_tables must be an int32/int64 torch.Tensor [B, max_blocks], got {type(block_tables).__name__}"
        )
    if block_tables.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: block_tables must be int32 or int64, got {block_tables.dtype}")
    if block_tables.dim() != 2:
        raise ValueError(f"{op}: block_tables must be 2-D [B, max_blocks], got shape {tuple(block_tables.shape)}")
    if block_tables.device != k_cache.device:
        raise ValueError(f"{op}: block_tables is on {block_tables.device} but the caches are on {k_cache.device}")
    B = block_tables.size(0)
    tables = block_tables.to(torch.int64).contiguous()
    starts = index_tensor(start, "start", op, k_cache.device, B)
    acc = _check_accepted(accepted_nodes, B, k_cache.device, op)
    if validate and not k_cache.is_meta and acc.numel() > 0:
        s_list, t_list = starts.tolist(), tables.tolist()  # synchronises
        paths = accepted_paths(s_list, acc.tolist(), op)
        cap = tables.size(1) * bs
        owner = {}
        for b, (s0, path) in enumerate(zip(s_list, paths)):
            moved = [k for k, node in enumerate(path) if node != k]
            if not moved:
                continue
            if s0 + path[-1] >= cap:
                raise ValueError(
                    f"{op}: row {b}'s accepted node {path[-1]} at start {s0} lies past its block table "
                    f"(max_blocks * block_size = {cap}); nothing was written"
                )
            # The blocks this row reads and writes: positions start + moved[0] .. start + last node.
            for col in range((s0 + moved[0]) // bs, (s0 + path[-1]) // bs + 1):
                blk = t_list[b][col]
                if not 0 <= blk < num_blocks:
                    raise ValueError(
                        f"{op}: row {b} needs block_tables[{b}, {col}] = {blk}, outside [0, num_blocks={num_blocks})"
                        "; nothing was written"
                    )
                if owner.setdefault(blk, b) != b:
                    raise ValueError(
                        f"{op}: block {blk} is moved in by rows {owner[blk]} and {b}; each row's written blocks "
                        "must be its own (copy a shared block first); nothing was written"
                    )
    ops.compact_paged_kv_cache(_detached(k_cache), _detached(v_cache), tables, starts, acc, kv_layout)
