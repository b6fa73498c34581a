"""KV-cache writes (validated wrappers of ``torch.ops.decodekit.append_*kv_cache``) and two
small cache managers built on them.

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

import numbers
import operator
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ._loader import ops

__all__ = ["append_kv_cache", "append_paged_kv_cache", "ContiguousKVCache", "PagedKVCache", "OutOfBlocksError"]

_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LAYOUTS = ("NHD", "HND")

IntOrInts = Union[int, Sequence[int], torch.Tensor]


# ----------------------------------------------------------------- checks ----
def _check_layout(kv_layout, op: str) -> str:
    if not isinstance(kv_layout, str) or kv_layout not in _LAYOUTS:
        raise ValueError(f'{op}: kv_layout must be "NHD" or "HND", got {kv_layout!r}')
    return kv_layout


def _check_caches(k_cache, v_cache, op: str, shape_doc: str) -> None:
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(c, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor {shape_doc}, got {type(c).__name__}")
        if c.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D {shape_doc}, got shape {tuple(c.shape)}")
        if c.dtype not in _CACHE_DTYPES:
            raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {c.dtype}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{op}: v_cache must have the shape of k_cache {tuple(k_cache.shape)}, "
                         f"got {tuple(v_cache.shape)}")
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"{op}: v_cache must have the dtype of k_cache ({k_cache.dtype}), got {v_cache.dtype}")
    if v_cache.device != k_cache.device:
        raise ValueError(f"{op}: v_cache is on {v_cache.device} but k_cache is on {k_cache.device}")
    if not (k_cache.is_cpu or k_cache.is_meta):
        raise ValueError(f"{op}: the caches are on {k_cache.device}, but this op has kernels for: CPU")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not c.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous (it is written in place)")


def _check_rows(key, value, k_cache: torch.Tensor, H: int, D: int, ndim: int, shape_doc: str,
                op: str) -> Tuple[torch.Tensor, torch.Tensor]:
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
            raise TypeError(f"{op}: {name} must have the cache's dtype {dtype}, got {x.dtype} "
                            "(convert it first; the cache stores the bits as given)")
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


def _index_tensor(x, name: str, op: str, device: torch.device, length: Optional[int]) -> torch.Tensor:
    """An int, a sequence of ints or an integer tensor -> contiguous 1-D int64 on ``device``."""
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(f"{op}: {name} must be an integer tensor (int32 or int64), got {x.dtype}")
        if x.dim() != 1:
            raise ValueError(f"{op}: {name} must be 1-D, got shape {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"{op}: {name} is on {x.device} but the caches are on {device}")
        t = x if x.dtype == torch.int64 and x.is_contiguous() else x.to(torch.int64).contiguous()
    elif isinstance(x, numbers.Integral) and not isinstance(x, bool):
        if length is None:
            raise TypeError(f"{op}: {name} must be a 1-D integer tensor or a list of ints, got an int")
        if not -(2**63) <= operator.index(x) < 2**63:
            raise ValueError(f"{op}: {name} must fit in int64, got {x}")
        t = torch.full((length,), operator.index(x), dtype=torch.int64, device=device)
    elif isinstance(x, (list, tuple)):
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in x):
            raise TypeError(f"{op}: {name} must hold ints, got {list(x)[:8]!r}")
        if not all(-(2**63) <= operator.index(v) < 2**63 for v in x):
            raise ValueError(f"{op}: {name} must hold values that fit in int64, got {list(x)[:8]!r}")
        t = torch.tensor([operator.index(v) for v in x], dtype=torch.int64, device=device)
    else:
        raise TypeError(f"{op}: {name} must be an integer tensor or a list of ints, got {type(x).__name__}")
    if length is not None and t.size(0) != length:
        raise ValueError(f"{op}: {name} must have length B={length}, got {t.size(0)}")
    return t


def _rows_text(rows: List[int], values: List[int]) -> str:
    shown = rows[:8]
    more = "" if len(rows) <= 8 else f" (and {len(rows) - 8} more)"
    return f"{shown}{more} (values {[values[r] for r in shown]})"


def _detached(t: torch.Tensor) -> torch.Tensor:
    return t.detach() if t.requires_grad else t


# ------------------------------------------------------------------- ops ----
def append_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    seq_lens: IntOrInts, *, kv_layout: str = "NHD", validate: bool = True) -> None:
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
        ValueError: wrong ranks or shapes, key/value head count or head dim different from the
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
    kv_layout = _check_layout(kv_layout, op)
    shape_doc = "[B, S_max, H, D]" if kv_layout == "NHD" else "[B, H, S_max, D]"
    _check_caches(k_cache, v_cache, op, shape_doc)
    B = k_cache.size(0)
    H, S = (k_cache.size(2), k_cache.size(1)) if kv_layout == "NHD" else (k_cache.size(1), k_cache.size(2))
    D = k_cache.size(3)
    key, value = _check_rows(key, value, k_cache, H, D, 4, "[B, T, H, D]", op)
    if key.size(0) != B:
        raise ValueError(f"{op}: key has {key.size(0)} rows but the cache has B={B} (key shape {tuple(key.shape)})")
    lens = _index_tensor(seq_lens, "seq_lens", op, k_cache.device, B)
    T = key.size(1)
    if validate and not k_cache.is_meta and B > 0:
        vals = lens.tolist()  # synchronises
        if min(vals) < 0:
            neg = [b for b, n in enumerate(vals) if n < 0]
            raise ValueError(f"{op}: seq_lens must be >= 0; rows {_rows_text(neg, vals)}")
        if max(vals) > S - T:
            over = [b for b, n in enumerate(vals) if n > S - T]
            raise ValueError(f"{op}: appending T={T} tokens would pass S_max={S} in rows {_rows_text(over, vals)} "
                             "(seq_lens + T must be <= S_max); nothing was written")
    ops.append_kv_cache(_detached(k_cache), _detached(v_cache), key, value, lens, kv_layout)


def append_paged_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          slot_mapping: Union[torch.Tensor, Sequence[int]], *, kv_layout: str = "NHD",
                          validate: bool = True) -> None:
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
        ValueError: wrong ranks or shapes, key/value head count or head dim different from the
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
    kv_layout = _check_layout(kv_layout, op)
    shape_doc = "[num_blocks, block_size, H, D]" if kv_layout == "NHD" else "[num_blocks, H, block_size, D]"
    _check_caches(k_cache, v_cache, op, shape_doc)
    num_blocks = k_cache.size(0)
    H, bs = (k_cache.size(2), k_cache.size(1)) if kv_layout == "NHD" else (k_cache.size(1), k_cache.size(2))
    D = k_cache.size(3)
    key, value = _check_rows(key, value, k_cache, H, D, 3, "[N, H, D]", op)
    slots = _index_tensor(slot_mapping, "slot_mapping", op, k_cache.device, None)
    if slots.size(0) > key.size(0):
        raise ValueError(f"{op}: slot_mapping has {slots.size(0)} entries but key has only {key.size(0)} rows "
                         "(it must have at most N)")
    if validate and not k_cache.is_meta and slots.numel() > 0:
        total = num_blocks * bs
        vals = slots.tolist()  # synchronises
        if max(vals) >= total:
            past = [i for i, x in enumerate(vals) if x >= total]
            raise ValueError(f"{op}: slot_mapping holds slots past the cache (num_blocks * block_size = {total}) "
                             f"at positions {_rows_text(past, vals)}; nothing was written")
        used = [x for x in vals if x >= 0]
        if len(set(used)) != len(used):
            seen, rep = set(), []
            for x in used:
                if x in seen and x not in rep:
                    rep.append(x)
                seen.add(x)
            raise ValueError(f"{op}: slot_mapping repeats slots {rep[:8]}; each slot may be written once per call")
    ops.append_paged_kv_cache(_detached(k_cache), _detached(v_cache), key, value, slots, kv_layout)


# --------------------------------------------------------------- managers ----
def _positive_int(value, name: str, cls: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{cls}: {name} must be a positive int, got {value!r}")
    return operator.index(value)


def _cache_args(cls: str, ints: Dict[str, object], dtype, kv_layout) -> Dict[str, int]:
    out = {name: _positive_int(v, name, cls) for name, v in ints.items()}
    if dtype not in _CACHE_DTYPES:
        raise TypeError(f"{cls}: dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
    _check_layout(kv_layout, cls)
    return out


class ContiguousKVCache:
    """A contiguous KV cache for a fixed batch: per layer, ``k[layer]`` and ``v[layer]`` of shape
    ``[B, max_seq_len, H, D]`` (``"NHD"``) or ``[B, H, max_seq_len, D]`` (``"HND"``), zeros at
    first, and per-row lengths ``seq_lens`` (int64 ``[B]``).

    A decoding step writes every layer at the current lengths, then moves them once::

        for layer in range(num_layers):
            cache.append(layer, key, value)     # key/value [B, T, H, D]
        cache.advance(T)

    Rows may have different lengths (``advance`` takes per-row counts, ``truncate`` one row).
    ``truncate`` rolls a row back (e.g. rejected speculative tokens) and zeroes the released
    positions in every layer, so the cache then holds exactly the bits it would hold had those
    tokens never been written.

    Args:
        num_layers, batch_size, max_seq_len, num_kv_heads, head_dim: positive ints.
        dtype: torch.float32 (default), torch.float16 or torch.bfloat16.
        kv_layout: ``"NHD"`` (default) or ``"HND"``.

    Memory: ``2 * num_layers * B * max_seq_len * H * D * dtype.itemsize`` bytes (CPU).

    Raises:
        ValueError / TypeError naming the argument for bad sizes, dtype or layout.
    """

    def __init__(self, num_layers: int, batch_size: int, max_seq_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, kv_layout: str = "NHD") -> None:
        a = _cache_args("ContiguousKVCache", dict(num_layers=num_layers, batch_size=batch_size,
                                                  max_seq_len=max_seq_len, num_kv_heads=num_kv_heads,
                                                  head_dim=head_dim), dtype, kv_layout)
        self.num_layers, self.batch_size, self.max_seq_len = a["num_layers"], a["batch_size"], a["max_seq_len"]
        self.num_kv_heads, self.head_dim = a["num_kv_heads"], a["head_dim"]
        self.dtype, self.kv_layout = dtype, kv_layout
        B, S, H, D = self.batch_size, self.max_seq_len, self.num_kv_heads, self.head_dim
        shape = (B, S, H, D) if kv_layout == "NHD" else (B, H, S, D)
        self.k: List[torch.Tensor] = [torch.zeros(shape, dtype=dtype) for _ in range(self.num_layers)]
        self.v: List[torch.Tensor] = [torch.zeros(shape, dtype=dtype) for _ in range(self.num_layers)]
        self.seq_lens = torch.zeros(B, dtype=torch.int64)

    def _layer(self, layer) -> int:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 0 <= layer < self.num_layers:
            raise ValueError(f"{type(self).__name__}: layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return operator.index(layer)

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Writes ``key``/``value`` ``[B, T, H, D]`` (the cache's dtype) of layer ``layer`` at
        positions ``seq_lens[b] .. seq_lens[b] + T - 1`` of every row; lengths do not move
        (call :meth:`advance` after the last layer).

        Raises:
            ValueError / TypeError as :func:`append_kv_cache`, in particular when a row would
            pass ``max_seq_len`` (nothing is written then).
        """
        i = self._layer(layer)
        append_kv_cache(self.k[i], self.v[i], key, value, self.seq_lens, kv_layout=self.kv_layout)

    def advance(self, num_tokens: IntOrInts) -> None:
        """Moves the lengths by ``num_tokens`` (an int for every row, or ``B`` ints), after every
        layer has been written.

        Raises:
            ValueError: a negative count, or a length that would pass ``max_seq_len``.
        """
        n = _index_tensor(num_tokens, "num_tokens", "ContiguousKVCache.advance", self.seq_lens.device,
                          self.batch_size)
        if bool((n < 0).any()):
            raise ValueError(f"ContiguousKVCache.advance: num_tokens must be >= 0, got {n.tolist()}")
        new = self.seq_lens + n
        if bool((new > self.max_seq_len).any()):
            raise ValueError(f"ContiguousKVCache.advance: lengths {new.tolist()} would pass "
                             f"max_seq_len={self.max_seq_len}")
        self.seq_lens.copy_(new)

    def truncate(self, seq: int, new_len: int) -> None:
        """Rolls row ``seq`` back to ``new_len`` tokens (``0 <= new_len <= seq_lens[seq]``) and
        zeroes the released positions in every layer.

        Raises:
            ValueError: ``seq`` outside ``[0, B)`` or ``new_len`` outside ``[0, seq_lens[seq]]``.
        """
        name = "ContiguousKVCache.truncate"
        if isinstance(seq, bool) or not isinstance(seq, numbers.Integral) or not 0 <= seq < self.batch_size:
            raise ValueError(f"{name}: seq must be a row in [0, {self.batch_size}), got {seq!r}")
        old = int(self.seq_lens[seq])
        if isinstance(new_len, bool) or not isinstance(new_len, numbers.Integral) or not 0 <= new_len <= old:
            raise ValueError(f"{name}: new_len must be an int in [0, {old}] (row {seq}'s length), got {new_len!r}")
        for layer in range(self.num_layers):
            for c in (self.k[layer], self.v[layer]):
                if self.kv_layout == "NHD":
                    c[seq, new_len:old] = 0
                else:
                    c[seq, :, new_len:old] = 0
        self.seq_lens[seq] = new_len


class OutOfBlocksError(RuntimeError):
    """Raised by :class:`PagedKVCache` when an append needs more free blocks than the pool has.
    Nothing is allocated or written when it is raised."""


class PagedKVCache:
    """A paged KV cache: per layer, ``k[layer]`` and ``v[layer]`` of shape
    ``[num_blocks, block_size, H, D]`` (``"NHD"``) or ``[num_blocks, H, block_size, D]``
    (``"HND"``), zeros at first, shared by any number of sequences through per-sequence block
    tables (the scheme of vLLM's PagedAttention).

    Blocks come from a free list, lowest id first; released blocks go back on top of it, so
    the same history of calls always gives the same block tables. A decoding step::

        for layer in range(num_layers):
            cache.append(layer, seq_ids, key, value)   # key/value [len(seq_ids), T, H, D]
        cache.advance(seq_ids, T)

    ``append`` allocates the blocks the new tokens need (once, for the first layer) and writes
    at each sequence's current length; ``advance`` then moves the lengths. Released positions
    (``truncate``, ``free``) are zeroed, so the pool holds exactly the bits it would hold had
    the released tokens never been written.

    Args:
        num_layers, num_blocks, block_size, num_kv_heads, head_dim: positive ints.
        dtype: torch.float32 (default), torch.float16 or torch.bfloat16.
        kv_layout: ``"NHD"`` (default) or ``"HND"``.

    Memory: ``2 * num_layers * num_blocks * block_size * H * D * dtype.itemsize`` bytes (CPU).

    Raises:
        ValueError / TypeError naming the argument for bad sizes, dtype or layout.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, kv_layout: str = "NHD") -> None:
        a = _cache_args("PagedKVCache", dict(num_layers=num_layers, num_blocks=num_blocks, block_size=block_size,
                                             num_kv_heads=num_kv_heads, head_dim=head_dim), dtype, kv_layout)
        self.num_layers, self.num_blocks, self.block_size = a["num_layers"], a["num_blocks"], a["block_size"]
        self.num_kv_heads, self.head_dim = a["num_kv_heads"], a["head_dim"]
        self.dtype, self.kv_layout = dtype, kv_layout
        NB, bs, H, D = self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim
        shape = (NB, bs, H, D) if kv_layout == "NHD" else (NB, H, bs, D)
        self.k: List[torch.Tensor] = [torch.zeros(shape, dtype=dtype) for _ in range(self.num_layers)]
        self.v: List[torch.Tensor] = [torch.zeros(shape, dtype=dtype) for _ in range(self.num_layers)]
        self._free: List[int] = list(range(NB - 1, -1, -1))  # pop() gives the lowest id
        self._tables: Dict[int, List[int]] = {}
        self._lens: Dict[int, int] = {}
        self._next_id = 0
        self._step: Optional[Tuple[tuple, torch.Tensor]] = None  # slot mapping shared by a step's layers

    # ------------------------------------------------------------ sequences ----
    @property
    def num_free_blocks(self) -> int:
        """Blocks not held by any sequence."""
        return len(self._free)

    def add_sequence(self) -> int:
        """Registers an empty sequence and returns its id (ids are never reused)."""
        sid = self._next_id
        self._next_id += 1
        self._tables[sid] = []
        self._lens[sid] = 0
        return sid

    def _seq(self, seq, name: str) -> int:
        if isinstance(seq, bool) or not isinstance(seq, numbers.Integral) or operator.index(seq) not in self._tables:
            raise ValueError(f"PagedKVCache.{name}: unknown sequence id {seq!r} (live ids: "
                             f"{sorted(self._tables)[:16]})")
        return operator.index(seq)

    def _seq_list(self, seq_ids, name: str) -> List[int]:
        if isinstance(seq_ids, numbers.Integral) and not isinstance(seq_ids, bool):
            seq_ids = [seq_ids]
        elif isinstance(seq_ids, torch.Tensor):
            seq_ids = seq_ids.tolist()
        if not isinstance(seq_ids, (list, tuple)):
            raise TypeError(f"PagedKVCache.{name}: seq_ids must be an int or a list of ints, "
                            f"got {type(seq_ids).__name__}")
        ids = [self._seq(s, name) for s in seq_ids]
        if len(set(ids)) != len(ids):
            raise ValueError(f"PagedKVCache.{name}: seq_ids must not repeat, got {ids}")
        return ids

    def _counts(self, num_tokens, n: int, name: str) -> List[int]:
        if isinstance(num_tokens, numbers.Integral) and not isinstance(num_tokens, bool):
            counts = [operator.index(num_tokens)] * n
        else:
            counts = _index_tensor(num_tokens, "num_tokens", f"PagedKVCache.{name}", torch.device("cpu"), n).tolist()
        if any(c < 0 for c in counts):
            raise ValueError(f"PagedKVCache.{name}: num_tokens must be >= 0, got {counts}")
        return counts

    def _release(self, blocks: List[int]) -> None:
        """Zeroes whole blocks in every layer and puts them back on the free list (so that the
        next allocations return them in their original order)."""
        if not blocks:
            return
        idx = torch.tensor(blocks, dtype=torch.int64)
        for layer in range(self.num_layers):
            self.k[layer].index_fill_(0, idx, 0)
            self.v[layer].index_fill_(0, idx, 0)
        self._free.extend(reversed(blocks))

    def _reserve(self, ids: List[int], counts: List[int]) -> None:
        """Allocates the blocks the sequences need to hold ``counts`` more tokens; all or none."""
        bs = self.block_size
        need = [max(0, -(-(self._lens[s] + n) // bs) - len(self._tables[s])) for s, n in zip(ids, counts)]
        if sum(need) > len(self._free):
            raise OutOfBlocksError(f"PagedKVCache: appending needs {sum(need)} new blocks of {bs} positions but only "
                                   f"{len(self._free)} of {self.num_blocks} are free; free or truncate sequences")
        for s, k in zip(ids, need):
            for _ in range(k):
                self._tables[s].append(self._free.pop())

    def _slot_mapping(self, ids: List[int], counts: List[int]) -> torch.Tensor:
        key = (tuple(ids), tuple(counts))
        if self._step is not None and self._step[0] == key:
            return self._step[1]
        self._reserve(ids, counts)
        bs = self.block_size
        parts = []
        for s, n in zip(ids, counts):
            pos = torch.arange(self._lens[s], self._lens[s] + n, dtype=torch.int64)
            table = torch.tensor(self._tables[s], dtype=torch.int64)
            parts.append(table[pos // bs] * bs + pos % bs)
        slots = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
        self._step = (key, slots)
        return slots

    # --------------------------------------------------------------- writes ----
    def append(self, layer: int, seq_ids: IntOrInts, key: torch.Tensor, value: torch.Tensor,
               num_tokens: Optional[Sequence[int]] = None) -> None:
        """Writes the new tokens' keys/values of layer ``layer`` after each sequence's current
        length, allocating blocks as needed; lengths do not move (call :meth:`advance` after
        the last layer).

        Args:
            layer: in ``[0, num_layers)``.
            seq_ids: the sequences (ids from :meth:`add_sequence`, no repeats), length ``B``.
            key, value: ``[B, T, H, D]`` (``T`` tokens for every sequence), or ``[N, H, D]``
                with the tokens of the sequences one after another and ``num_tokens`` giving
                each sequence's count (sum ``N``; may be omitted for a single sequence). The
                cache's dtype.
            num_tokens: per-sequence token counts for 3-D ``key``.

        Raises:
            OutOfBlocksError: not enough free blocks (nothing is allocated or written).
            ValueError / TypeError: unknown or repeated ids, bad layer, shapes or dtypes as
                :func:`append_paged_kv_cache`.
        """
        name = "PagedKVCache.append"
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 0 <= layer < self.num_layers:
            raise ValueError(f"{name}: layer must be an int in [0, {self.num_layers}), got {layer!r}")
        ids = self._seq_list(seq_ids, "append")
        for nm, x in (("key", key), ("value", value)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name}: {nm} must be a torch.Tensor, got {type(x).__name__}")
        if key.dim() == 4:
            if num_tokens is not None:
                raise ValueError(f"{name}: num_tokens is for a 3-D key [N, H, D]; key is 4-D {tuple(key.shape)}")
            if key.size(0) != len(ids):
                raise ValueError(f"{name}: key has {key.size(0)} rows but {len(ids)} seq_ids were given")
            if value.shape != key.shape:
                raise ValueError(f"{name}: value must have the shape of key {tuple(key.shape)}, "
                                 f"got {tuple(value.shape)}")
            counts = [key.size(1)] * len(ids)
            key, value = key.flatten(0, 1), value.flatten(0, 1)
        elif key.dim() == 3:
            if num_tokens is None:
                if len(ids) != 1:
                    raise ValueError(f"{name}: a 3-D key [N, H, D] for {len(ids)} sequences needs num_tokens")
                counts = [key.size(0)]
            else:
                counts = self._counts(num_tokens, len(ids), "append")
                if sum(counts) != key.size(0):
                    raise ValueError(f"{name}: num_tokens sum to {sum(counts)} but key has N={key.size(0)} rows")
        else:
            raise ValueError(f"{name}: key must be [B, T, H, D] or [N, H, D], got shape {tuple(key.shape)}")
        if value.shape != key.shape:
            raise ValueError(f"{name}: value must have the shape of key {tuple(key.shape)}, got {tuple(value.shape)}")
        # Shapes and dtypes first, so that a bad call allocates nothing.
        _check_rows(key, value, self.k[layer], self.num_kv_heads, self.head_dim, 3, "[N, H, D]", name)
        slots = self._slot_mapping(ids, counts)
        append_paged_kv_cache(self.k[layer], self.v[layer], key, value, slots, kv_layout=self.kv_layout,
                              validate=False)  # slots are in the pool and distinct by construction

    def advance(self, seq_ids: IntOrInts, num_tokens: IntOrInts) -> None:
        """Moves the lengths of ``seq_ids`` by ``num_tokens`` (an int for all, or one per id),
        after every layer has been written (allocating blocks if :meth:`append` did not).

        Raises:
            OutOfBlocksError: not enough free blocks. ValueError: unknown ids, negative counts.
        """
        ids = self._seq_list(seq_ids, "advance")
        counts = self._counts(num_tokens, len(ids), "advance")
        self._reserve(ids, counts)
        for s, n in zip(ids, counts):
            self._lens[s] += n
        self._step = None

    def truncate(self, seq: int, new_len: int) -> None:
        """Rolls sequence ``seq`` back to ``new_len`` tokens (``0 <= new_len <= length``): the
        released positions are zeroed in every layer and whole blocks past the new length go
        back to the free list.

        Raises:
            ValueError: unknown ``seq``, ``new_len`` outside ``[0, length]``.
        """
        s = self._seq(seq, "truncate")
        old = self._lens[s]
        if isinstance(new_len, bool) or not isinstance(new_len, numbers.Integral) or not 0 <= new_len <= old:
            raise ValueError(f"PagedKVCache.truncate: new_len must be an int in [0, {old}] "
                             f"(sequence {s}'s length), got {new_len!r}")
        bs = self.block_size
        keep = -(-new_len // bs)
        table = self._tables[s]
        if new_len % bs and keep <= len(table):  # zero the tail of the last kept block
            blk, off = table[keep - 1], new_len % bs
            for layer in range(self.num_layers):
                for c in (self.k[layer], self.v[layer]):
                    if self.kv_layout == "NHD":
                        c[blk, off:] = 0
                    else:
                        c[blk, :, off:] = 0
        self._release(table[keep:])
        del table[keep:]
        self._lens[s] = new_len
        self._step = None

    def free(self, seq: int) -> None:
        """Releases every block of sequence ``seq`` (zeroed) and forgets the id.

        Raises:
            ValueError: unknown ``seq``.
        """
        s = self._seq(seq, "free")
        self._release(self._tables.pop(s))
        del self._lens[s]
        self._step = None

    # -------------------------------------------------------------- queries ----
    def block_table(self, seq_ids: IntOrInts) -> torch.Tensor:
        """int32 ``[B, max_blocks]``: row ``b`` lists the blocks of ``seq_ids[b]`` in order
        (including those allocated for tokens appended but not yet advanced), padded with -1;
        ``max_blocks`` is the longest table among them."""
        ids = self._seq_list(seq_ids, "block_table")
        width = max((len(self._tables[s]) for s in ids), default=0)
        out = torch.full((len(ids), width), -1, dtype=torch.int32)
        for b, s in enumerate(ids):
            if self._tables[s]:
                out[b, : len(self._tables[s])] = torch.tensor(self._tables[s], dtype=torch.int32)
        return out

    def seq_lens(self, seq_ids: IntOrInts) -> torch.Tensor:
        """int64 ``[B]``: the number of cached (advanced) tokens of each of ``seq_ids``."""
        ids = self._seq_list(seq_ids, "seq_lens")
        return torch.tensor([self._lens[s] for s in ids], dtype=torch.int64)
