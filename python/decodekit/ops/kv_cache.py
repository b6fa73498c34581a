"""KV-cache family: writes into contiguous and paged caches (validated wrappers of
``torch.ops.decodekit.append_*kv_cache``). The cache managers built on them are in
:mod:`decodekit.cache`.

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

__all__ = ["append_kv_cache", "append_paged_kv_cache"]

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
