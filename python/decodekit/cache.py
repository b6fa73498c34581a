"""KV-cache managers: :class:`ContiguousKVCache` (a fixed batch, per-row lengths) and
:class:`PagedKVCache` (a block pool shared by sequences through block tables), built on the
validated writes of :mod:`decodekit.ops.kv_cache`.

Layouts (``kv_layout``), for one layer's key cache (the value cache has the same shape):

* contiguous cache: ``"NHD"`` = ``[B, S_max, H, D]``, ``"HND"`` = ``[B, H, S_max, D]``;
* paged cache: ``"NHD"`` = ``[num_blocks, block_size, H, D]``,
  ``"HND"`` = ``[num_blocks, H, block_size, D]``.
"""

from __future__ import annotations

import numbers
import operator
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ._checks import index_tensor, parse_device
from .ops.kv_cache import (
    CACHE_DTYPES,
    IntOrInts,
    accepted_paths,
    append_kv_cache,
    append_paged_kv_cache,
    check_kv_rows,
    check_layout,
    compact_kv_cache,
    compact_paged_kv_cache,
)

__all__ = ["ContiguousKVCache", "PagedKVCache", "OutOfBlocksError"]

_dk_ops = torch.ops.decodekit  # the raw ops, for the per-layer calls after one checked call


def _positive_int(value, name: str, cls: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{cls}: {name} must be a positive int, got {value!r}")
    return operator.index(value)


def _cache_args(cls: str, ints: Dict[str, object], dtype, kv_layout) -> Dict[str, int]:
    out = {name: _positive_int(v, name, cls) for name, v in ints.items()}
    if dtype not in CACHE_DTYPES:
        raise TypeError(f"{cls}: dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
    check_layout(kv_layout, cls)
    return out


def _accepted_tensor(accepted_nodes, B: int, name: str) -> torch.Tensor:
    """int64 [B, L] on the CPU from an integer tensor or B lists of ints (ragged: padded with -1)."""
    if isinstance(accepted_nodes, torch.Tensor):
        if accepted_nodes.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name}: accepted_nodes must be an int32/int64 tensor, got {accepted_nodes.dtype}")
        if accepted_nodes.dim() != 2 or accepted_nodes.size(0) != B:
            raise ValueError(f"{name}: accepted_nodes must be [B={B}, L], got shape {tuple(accepted_nodes.shape)}")
        return accepted_nodes.to("cpu", torch.int64).contiguous()
    if not isinstance(accepted_nodes, (list, tuple)) or len(accepted_nodes) != B:
        raise TypeError(f"{name}: accepted_nodes must be an int tensor [B={B}, L] or {B} lists of ints")
    rows = []
    for r in accepted_nodes:
        if not isinstance(r, (list, tuple)) or not all(
            isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in r
        ):
            raise TypeError(f"{name}: accepted_nodes must be an int tensor [B={B}, L] or {B} lists of ints")
        rows.append([operator.index(x) for x in r])
    L = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [-1] * (L - len(r)) for r in rows], dtype=torch.int64).view(B, L)


def _check_tree_rows(name: str, starts: List[int], lens: List[int], paths: List[List[int]], what: str) -> None:
    """Each row's tree starts within its length and its accepted nodes were cached."""
    for b, (s0, n, path) in enumerate(zip(starts, lens, paths)):
        if s0 > n:
            raise ValueError(f"{name}: start = {s0} of {what} {b} is past its length {n}")
        if path and s0 + path[-1] >= n:
            raise ValueError(
                f"{name}: accepted node {path[-1]} of {what} {b} (position {s0 + path[-1]}) was never cached "
                f"(length {n}); append and advance the tree first"
            )


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
    tokens never been written. A row advanced by fewer tokens than the step appended keeps the
    extra ones past its length (never read; the next append overwrites them) until ``truncate``
    or ``compact`` zeroes them.

    Args:
        num_layers, batch_size, max_seq_len, num_kv_heads, head_dim: positive ints.
        dtype: torch.float32 (default), torch.float16 or torch.bfloat16.
        kv_layout: ``"NHD"`` (default) or ``"HND"``.

    Memory: ``2 * num_layers * B * max_seq_len * H * D * dtype.itemsize`` bytes (CPU).

    Raises:
        ValueError / TypeError naming the argument for bad sizes, dtype or layout.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_seq_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        kv_layout: str = "NHD",
    ) -> None:
        a = _cache_args(
            "ContiguousKVCache",
            dict(
                num_layers=num_layers,
                batch_size=batch_size,
                max_seq_len=max_seq_len,
                num_kv_heads=num_kv_heads,
                head_dim=head_dim,
            ),
            dtype,
            kv_layout,
        )
        self.num_layers, self.batch_size, self.max_seq_len = a["num_layers"], a["batch_size"], a["max_seq_len"]
        self.num_kv_heads, self.head_dim = a["num_kv_heads"], a["head_dim"]
        self.dtype, self.kv_layout = dtype, kv_layout
        B, S, H, D = self.batch_size, self.max_seq_len, self.num_kv_heads, self.head_dim
        shape = (B, S, H, D) if kv_layout == "NHD" else (B, H, S, D)
        self.k: List[torch.Tensor] = [torch.zeros(shape, dtype=dtype) for _ in range(self.num_layers)]
        self.v: List[torch.Tensor] = [torch.zeros(shape, dtype=dtype) for _ in range(self.num_layers)]
        self.seq_lens = torch.zeros(B, dtype=torch.int64)
        # Every position at or past _written_end is zero in every row and layer, once the appends
        # since the lengths last moved (at most _pending tokens past each length) are counted in:
        # truncate zeroes a row up to it, including what an append wrote past the length that
        # advance then did not count (a row advanced by fewer tokens than were appended).
        self._written_end = 0
        self._pending = 0

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
        self._pending = max(self._pending, key.size(1))  # (append_kv_cache checked [B, T, H, D])

    def _fold_pending(self) -> int:
        """_written_end with the appends at the current lengths counted in."""
        if self._pending:
            self._written_end = max(self._written_end, int(self.seq_lens.max()) + self._pending)
            self._pending = 0
        return self._written_end

    def advance(self, num_tokens: IntOrInts) -> None:
        """Moves the lengths by ``num_tokens`` (an int for every row, or ``B`` ints), after every
        layer has been written.

        Raises:
            ValueError: a negative count, or a length that would pass ``max_seq_len``.
        """
        n = index_tensor(num_tokens, "num_tokens", "ContiguousKVCache.advance", self.seq_lens.device, self.batch_size)
        if bool((n < 0).any()):
            raise ValueError(f"ContiguousKVCache.advance: num_tokens must be >= 0, got {n.tolist()}")
        new = self.seq_lens + n
        if bool((new > self.max_seq_len).any()):
            raise ValueError(
                f"ContiguousKVCache.advance: lengths {new.tolist()} would pass max_seq_len={self.max_seq_len}"
            )
        self._fold_pending()
        self.seq_lens.copy_(new)

    def truncate(self, seq: int, new_len: int) -> None:
        """Rolls row ``seq`` back to ``new_len`` tokens (``0 <= new_len <= seq_lens[seq]``) and
        zeroes the released positions in every layer (and any position past the row's length
        that an append wrote but :meth:`advance` did not count).

        Raises:
            ValueError: ``seq`` outside ``[0, B)`` or ``new_len`` outside ``[0, seq_lens[seq]]``.
        """
        name = "ContiguousKVCache.truncate"
        if isinstance(seq, bool) or not isinstance(seq, numbers.Integral) or not 0 <= seq < self.batch_size:
            raise ValueError(f"{name}: seq must be a row in [0, {self.batch_size}), got {seq!r}")
        old = int(self.seq_lens[seq])
        if isinstance(new_len, bool) or not isinstance(new_len, numbers.Integral) or not 0 <= new_len <= old:
            raise ValueError(f"{name}: new_len must be an int in [0, {old}] (row {seq}'s length), got {new_len!r}")
        end = max(old, min(self._fold_pending(), self.max_seq_len))
        for layer in range(self.num_layers):
            for c in (self.k[layer], self.v[layer]):
                if self.kv_layout == "NHD":
                    c[seq, new_len:end] = 0
                else:
                    c[seq, :, new_len:end] = 0
        self.seq_lens[seq] = new_len

    def compact(self, start: IntOrInts, accepted_nodes) -> None:
        """Keeps only the accepted path of a verified token tree in every row and layer.

        Row ``b`` cached the ``Q`` nodes of a token tree (flattened, ancestors before
        descendants) at positions ``start[b] ..`` (and advanced past them); verification
        accepted the nodes ``accepted_nodes[b]`` (flat indices relative to ``start[b]``,
        increasing, -1 padded). Their keys and values move to positions
        ``start[b] .. start[b] + n_b - 1`` (:func:`decodekit.compact_kv_cache` in every layer),
        the row's length becomes ``start[b] + n_b``, and the positions after it are zeroed:
        the cache then holds exactly the bits it would hold had only the path been appended.
        A row with ``start[b]`` equal to its length and no accepted node is unchanged.

        Args:
            start: an int for every row, ``B`` ints or an int ``[B]`` tensor.
            accepted_nodes: int ``[B, L]`` tensor (-1 padded) or ``B`` lists of ints.

        Raises:
            ValueError / TypeError: ``start`` outside ``[0, seq_lens[b]]``, nodes that are not
                strictly increasing, negative (other than trailing -1) or never cached
                (``start + node >= seq_lens``), shapes and types; nothing changes then.
        """
        name = "ContiguousKVCache.compact"
        B = self.batch_size
        starts = index_tensor(start, "start", name, self.seq_lens.device, B).tolist()
        acc = _accepted_tensor(accepted_nodes, B, name)
        paths = accepted_paths(starts, acc.tolist(), name)
        _check_tree_rows(name, starts, self.seq_lens.tolist(), paths, "row")
        st = torch.tensor(starts, dtype=torch.int64)
        for layer in range(self.num_layers):
            compact_kv_cache(self.k[layer], self.v[layer], st, acc, kv_layout=self.kv_layout, validate=False)
        for b, (s0, path) in enumerate(zip(starts, paths)):
            self.truncate(b, s0 + len(path))


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
    at each sequence's current length; ``advance`` then moves the lengths. A caller whose
    kernels write the cache themselves (:func:`decodekit.decoder_layer`) takes the step's slots
    from :meth:`slot_mapping` before its first layer instead of calling ``append``. Released positions
    (``truncate``, ``free``) are zeroed, so the pool holds exactly the bits it would hold had
    the released tokens never been written.

    :meth:`fork` makes a sequence that shares another's full blocks (reference counts, see
    :meth:`refcount`) and owns a copy of its last partial block, so that ``n`` samples of one
    prompt share its prefill; a shared block is zeroed and freed only when its last holder
    lets it go, and a shared block is never written (truncating into one copies it first).

    Args:
        num_layers, num_blocks, block_size, num_kv_heads, head_dim: positive ints.
        dtype: torch.float32 (default), torch.float16 or torch.bfloat16.
        kv_layout: ``"NHD"`` (default) or ``"HND"``.
        device: where the pool lives (default the CPU; ``"cuda"`` for the CUDA kernels). The
            bookkeeping (block tables, lengths, free list) stays in Python; :meth:`slot_mapping`
            returns its slots on this device, :meth:`block_table` and :meth:`seq_lens` on the CPU.

    Memory: ``2 * num_layers * num_blocks * block_size * H * D * dtype.itemsize`` bytes on ``device``.

    Raises:
        ValueError / TypeError naming the argument for bad sizes, dtype or layout.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        kv_layout: str = "NHD",
        device: Union[str, torch.device, None] = None,
    ) -> None:
        a = _cache_args(
            "PagedKVCache",
            dict(
                num_layers=num_layers,
                num_blocks=num_blocks,
                block_size=block_size,
                num_kv_heads=num_kv_heads,
                head_dim=head_dim,
            ),
            dtype,
            kv_layout,
        )
        self.num_layers, self.num_blocks, self.block_size = a["num_layers"], a["num_blocks"], a["block_size"]
        self.num_kv_heads, self.head_dim = a["num_kv_heads"], a["head_dim"]
        self.dtype, self.kv_layout = dtype, kv_layout
        NB, bs, H, D = self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim
        shape = (NB, bs, H, D) if kv_layout == "NHD" else (NB, H, bs, D)
        # One zeroed allocation for every layer's keys and values ([2, layers, *shape]): zeroing or
        # copying a block in every layer is one op on it (the per-layer tensors are views).
        if device is not None:
            dev = parse_device(device, "PagedKVCache")
            if dev.type not in ("cpu", "cuda", "meta"):
                raise ValueError(f"PagedKVCache: device must be 'cpu' or 'cuda' (or 'meta' for shapes), got {device!r}")
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ValueError("PagedKVCache: device 'cuda' was asked for but torch sees no GPU")
        self._pool = torch.zeros((2, self.num_layers) + shape, dtype=dtype, device=device)
        self.device = self._pool.device
        self.k: List[torch.Tensor] = list(self._pool[0].unbind(0))
        self.v: List[torch.Tensor] = list(self._pool[1].unbind(0))
        self._free: List[int] = list(range(NB - 1, -1, -1))  # pop() gives the lowest id
        self._refs: List[int] = [0] * NB  # sequences holding each block
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
            raise ValueError(
                f"PagedKVCache.{name}: unknown sequence id {seq!r} (live ids: {sorted(self._tables)[:16]})"
            )
        return operator.index(seq)

    def _seq_list(self, seq_ids, name: str) -> List[int]:
        if isinstance(seq_ids, numbers.Integral) and not isinstance(seq_ids, bool):
            seq_ids = [seq_ids]
        elif isinstance(seq_ids, torch.Tensor):
            seq_ids = seq_ids.tolist()
        if not isinstance(seq_ids, (list, tuple)):
            raise TypeError(
                f"PagedKVCache.{name}: seq_ids must be an int or a list of ints, got {type(seq_ids).__name__}"
            )
        ids = [self._seq(s, name) for s in seq_ids]
        if len(set(ids)) != len(ids):
            raise ValueError(f"PagedKVCache.{name}: seq_ids must not repeat, got {ids}")
        return ids

    def _counts(self, num_tokens, n: int, name: str) -> List[int]:
        if isinstance(num_tokens, numbers.Integral) and not isinstance(num_tokens, bool):
            counts = [operator.index(num_tokens)] * n
        else:
            counts = index_tensor(num_tokens, "num_tokens", f"PagedKVCache.{name}", torch.device("cpu"), n).tolist()
        if any(c < 0 for c in counts):
            raise ValueError(f"PagedKVCache.{name}: num_tokens must be >= 0, got {counts}")
        return counts

    def _release(self, blocks: List[int]) -> None:
        """Drops one reference to each block; the blocks nobody holds any more are zeroed in
        every layer and put back on the free list (so that the next allocations return them in
        their original order)."""
        last = []
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                last.append(b)
        blocks = last
        if not blocks:
            return
        index = torch.tensor(blocks, dtype=torch.int64).to(self.device)
        self._pool.index_fill_(2, index, 0)  # every layer, keys and values
        self._free.extend(reversed(blocks))

    def _reserve(self, ids: List[int], counts: List[int]) -> None:
        """Allocates the blocks the sequences need to hold ``counts`` more tokens; all or none."""
        bs = self.block_size
        need = [max(0, -(-(self._lens[s] + n) // bs) - len(self._tables[s])) for s, n in zip(ids, counts)]
        if sum(need) > len(self._free):
            raise OutOfBlocksError(
                f"PagedKVCache: appending needs {sum(need)} new blocks of {bs} positions but only "
                f"{len(self._free)} of {self.num_blocks} are free; free or truncate sequences"
            )
        for s, k in zip(ids, need):
            for _ in range(k):
                b = self._free.pop()
                self._refs[b] = 1
                self._tables[s].append(b)

    def _unreserve(self, ids: List[int], held: List[int]) -> None:
        """Undoes a :meth:`_reserve` whose blocks nothing has written: sequence ``ids[b]`` keeps
        its first ``held[b]`` blocks; the others go back to the free list (zeroed, in the order
        that gives the same ids to the next reservation)."""
        blocks = []  # in the order _reserve took them from the free list
        for s, n in zip(ids, held):
            blocks.extend(self._tables[s][n:])
            del self._tables[s][n:]
        self._release(blocks)
        self._step = None

    def _slot_mapping(self, ids: List[int], counts: List[int]) -> torch.Tensor:
        key = (tuple(ids), tuple(counts))
        if self._step is not None and self._step[0] == key:
            return self._step[1]
        self._reserve(ids, counts)
        bs = self.block_size
        slots = []
        for s, n in zip(ids, counts):
            table, start = self._tables[s], self._lens[s]
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
        out = torch.tensor(slots, dtype=torch.int64)
        if self.device.type != "cpu":
            out = out.to(self.device)
        self._step = (key, out)
        return out

    def slot_mapping(self, seq_ids: IntOrInts, num_tokens: IntOrInts) -> torch.Tensor:
        """The slots of the next ``num_tokens`` tokens of each sequence, allocating the blocks
        they need: what :meth:`append` writes to, for callers that write the cache themselves
        (one fused kernel per layer, :func:`decodekit.decoder_layer`). Lengths do not move (call
        :meth:`advance` after the last layer); until then every call with the same arguments,
        and every :meth:`append` of the same tokens, uses the same slots.

        Args:
            seq_ids: the sequences (ids from :meth:`add_sequence`, no repeats), length ``B``.
            num_tokens: an int for all, or one count per sequence.

        Returns:
            int64 ``[N]`` (``N = sum(num_tokens)``) on the cache's device: slot ``block *
            block_size + offset`` of each new token, the tokens of the sequences one after
            another in ``seq_ids`` order.
            Shared by the step's callers: do not modify it.

        Raises:
            OutOfBlocksError: not enough free blocks (nothing is allocated).
            ValueError / TypeError: unknown or repeated ids, negative counts.
        """
        ids = self._seq_list(seq_ids, "slot_mapping")
        counts = self._counts(num_tokens, len(ids), "slot_mapping")
        return self._slot_mapping(ids, counts)

    # --------------------------------------------------------------- writes ----
    def append(
        self,
        layer: int,
        seq_ids: IntOrInts,
        key: torch.Tensor,
        value: torch.Tensor,
        num_tokens: Optional[Sequence[int]] = None,
    ) -> None:
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
                raise ValueError(
                    f"{name}: value must have the shape of key {tuple(key.shape)}, got {tuple(value.shape)}"
                )
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
        check_kv_rows(key, value, self.k[layer], self.num_kv_heads, self.head_dim, 3, "[N, H, D]", name)
        slots = self._slot_mapping(ids, counts)
        append_paged_kv_cache(
            self.k[layer], self.v[layer], key, value, slots, kv_layout=self.kv_layout, validate=False
        )  # slots are in the pool and distinct by construction

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
        back to the free list. A block the new length cuts into that a fork shares is copied
        first (copy on write), which takes a free block.

        Raises:
            ValueError: unknown ``seq``, ``new_len`` outside ``[0, length]``.
            OutOfBlocksError: that copy finds no free block (nothing changes then).
        """
        s = self._seq(seq, "truncate")
        old = self._lens[s]
        if isinstance(new_len, bool) or not isinstance(new_len, numbers.Integral) or not 0 <= new_len <= old:
            raise ValueError(
                f"PagedKVCache.truncate: new_len must be an int in [0, {old}] (sequence {s}'s length), got {new_len!r}"
            )
        if new_len == old:  # nothing to release (e.g. a speculative pass whose drafts were all kept)
            return
        bs = self.block_size
        keep = -(-new_len // bs)
        table = self._tables[s]
        if new_len % bs and keep <= len(table):  # zero the tail of the last kept block
            if self._refs[table[keep - 1]] > 1:  # shared with a fork: copy it first
                table[keep - 1] = self._copy_block(table[keep - 1], "truncate")
            blk, off = table[keep - 1], new_len % bs
            if self.kv_layout == "NHD":  # every layer, keys and values
                self._pool[:, :, blk, off:] = 0
            else:
                self._pool[:, :, blk, :, off:] = 0
        self._release(table[keep:])
        del table[keep:]
        self._lens[s] = new_len
        self._step = None

    def compact(self, seq_ids: IntOrInts, start: IntOrInts, accepted_nodes) -> None:
        """Keeps only the accepted path of a verified token tree in the given sequences.

        Sequence ``seq_ids[b]`` cached the ``Q`` nodes of a token tree (flattened, ancestors
        before descendants) at positions ``start[b] ..`` and advanced past them; verification
        accepted the nodes ``accepted_nodes[b]`` (flat indices relative to ``start[b]``,
        increasing, -1 padded). In every layer their keys and values move to positions
        ``start[b] .. start[b] + n_b - 1`` (:func:`decodekit.compact_paged_kv_cache`), then the
        sequence is truncated to ``start[b] + n_b`` (:meth:`truncate`: the rest zeroed, whole
        blocks past it released). The pool then holds, for these sequences, exactly the bits
        it would hold had only the path been appended.

        A block shared with a fork (:meth:`fork`) is never written: each shared block that a
        move or the truncation would write is first copied into a free block owned by the
        sequence (the fork keeps the original). All copies are counted first, so the call
        either completes or changes nothing.

        Args:
            seq_ids: the sequences (no repeats), length ``B``.
            start: an int for all, ``B`` ints or an int ``[B]`` tensor: each tree's first
                position (the length before it).
            accepted_nodes: int ``[B, L]`` tensor (-1 padded) or ``B`` lists of ints.

        Raises:
            OutOfBlocksError: shared blocks to copy but not enough free blocks.
            ValueError / TypeError: unknown or repeated ids, ``start`` past a length, nodes not
                strictly increasing, negative (other than trailing -1) or never cached; nothing
                changes then.
        """
        name = "PagedKVCache.compact"
        ids = self._seq_list(seq_ids, "compact")
        B, bs = len(ids), self.block_size
        starts = index_tensor(start, "start", name, torch.device("cpu"), B).tolist()
        acc = _accepted_tensor(accepted_nodes, B, name)
        paths = accepted_paths(starts, acc.tolist(), name)
        _check_tree_rows(name, starts, [self._lens[s] for s in ids], paths, "sequence")
        # The table columns each sequence writes: the moved positions, and the tail of the last
        # kept block that the truncation zeroes.
        writes = []
        for s, s0, path in zip(ids, starts, paths):
            cols = set()
            moved = [k for k, node in enumerate(path) if node != k]
            if moved:
                cols.update(range((s0 + moved[0]) // bs, (s0 + len(path) - 1) // bs + 1))
            new_len = s0 + len(path)
            if new_len % bs and new_len // bs < len(self._tables[s]):
                cols.add(new_len // bs)
            writes.append(sorted(c for c in cols if self._refs[self._tables[s][c]] > 1))
        copies = sum(len(c) for c in writes)
        if copies > len(self._free):
            raise OutOfBlocksError(
                f"{name}: copying {copies} blocks shared with forks needs {copies} free blocks but only "
                f"{len(self._free)} of {self.num_blocks} are free; free or truncate sequences"
            )
        for s, cols in zip(ids, writes):
            for c in cols:
                self._tables[s][c] = self._copy_block(self._tables[s][c], "compact")
        width = max((len(self._tables[s]) for s in ids), default=0)
        tables = torch.full((B, width), -1, dtype=torch.int64)
        for b, s in enumerate(ids):
            if self._tables[s]:
                tables[b, : len(self._tables[s])] = torch.tensor(self._tables[s], dtype=torch.int64)
        st = torch.tensor(starts, dtype=torch.int64)
        if self.device.type != "cpu":
            tables, st, acc = tables.to(self.device), st.to(self.device), acc.to(self.device)
        if any(node != k for path in paths for k, node in enumerate(path)):  # else nothing moves
            # the first layer through the wrapper's checks, the others (same shapes) directly
            compact_paged_kv_cache(self.k[0], self.v[0], tables, st, acc, kv_layout=self.kv_layout, validate=False)
            acc64 = acc.to(torch.int64).contiguous()
            for layer in range(1, self.num_layers):
                _dk_ops.compact_paged_kv_cache(self.k[layer], self.v[layer], tables, st, acc64, self.kv_layout)
            # (written blocks are private to their sequence after the copies above)
        for s, s0, path in zip(ids, starts, paths):
            self.truncate(s, s0 + len(path))

    def _copy_block(self, src: int, name: str) -> int:
        """A fresh block holding a copy of block ``src`` in every layer; drops one reference
        to ``src``."""
        if not self._free:
            raise OutOfBlocksError(
                f"PagedKVCache.{name}: copying a shared block needs 1 free block but none of "
                f"{self.num_blocks} is free; free or truncate sequences"
            )
        dst = self._free.pop()
        self._refs[dst] = 1
        self._pool[:, :, dst].copy_(self._pool[:, :, src])  # every layer, keys and values
        self._refs[src] -= 1
        return dst

    def fork(self, seq: int) -> int:
        """A new sequence with the contents of ``seq`` (e.g. the ``n`` samples of one prompt
        after its prefill): the full blocks of ``seq`` are shared (their reference counts go
        up; nobody writes into a full block), and its last partial block, if any, is copied
        into a fresh block owned by the new sequence. Returns the new id.

        Raises:
            ValueError: unknown ``seq``. OutOfBlocksError: no free block for the partial copy
                (nothing changes then).
        """
        s = self._seq(seq, "fork")
        table, n = self._tables[s], self._lens[s]
        full = n // self.block_size
        # A partial block holds n % block_size tokens; blocks past the length (reserved by
        # slot_mapping for a step not yet advanced) are not the sequence's contents.
        partial = n % self.block_size != 0
        if partial and not self._free:
            raise OutOfBlocksError(
                f"PagedKVCache.fork: copying the last partial block needs 1 free block but none of "
                f"{self.num_blocks} is free; free or truncate sequences"
            )
        new = self.add_sequence()
        for b in table[:full]:
            self._refs[b] += 1
        self._tables[new] = list(table[:full])
        if partial:  # the partial block is copied (blocks reserved past it are not)
            self._refs[table[full]] += 1  # _copy_block drops it again
            self._tables[new].append(self._copy_block(table[full], "fork"))
        self._lens[new] = n
        self._step = None
        return new

    def refcount(self, block: int) -> int:
        """How many sequences hold block ``block`` (0 for a free block)."""
        if isinstance(block, bool) or not isinstance(block, numbers.Integral) or not 0 <= block < self.num_blocks:
            raise ValueError(f"PagedKVCache.refcount: block must be an int in [0, {self.num_blocks}), got {block!r}")
        return self._refs[operator.index(block)]

    def free(self, seq: int) -> None:
        """Releases every block of sequence ``seq`` and forgets the id; a block shared with a
        fork stays with the others, the rest are zeroed and go back to the free list.

        Raises:
            ValueError: unknown ``seq``.
        """
        s = self._seq(seq, "free")
        self._release(self._tables.pop(s))
        del self._lens[s]
        self._step = None

    # -------------------------------------------------------------- queries ----
    def block_table(self, seq_ids: IntOrInts, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        """``[B, max_blocks]`` of ``dtype`` (torch.int32, the default, or torch.int64): row ``b``
        lists the blocks of ``seq_ids[b]`` in order (including those allocated for tokens appended
        but not yet advanced), padded with -1; ``max_blocks`` is the longest table among them."""
        ids = self._seq_list(seq_ids, "block_table")
        if dtype not in (torch.int32, torch.int64):
            raise TypeError(f"PagedKVCache.block_table: dtype must be torch.int32 or torch.int64, got {dtype}")
        tables = [self._tables[s] for s in ids]
        width = max(map(len, tables), default=0)
        return torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=dtype).view(len(ids), width)

    def _lens_list(self, seq_ids: IntOrInts) -> Tuple[List[int], List[int]]:
        """(ids, lengths) as Python lists, with :meth:`seq_lens`'s checks (forward_paged's step)."""
        ids = self._seq_list(seq_ids, "seq_lens")
        return ids, [self._lens[s] for s in ids]

    def _advance_reserved(self, ids: List[int], num_tokens: int) -> None:
        """:meth:`advance` by ``num_tokens`` for checked ``ids`` whose blocks :meth:`slot_mapping`
        reserved in the same step (forward_paged's one-call loop)."""
        for s in ids:
            self._lens[s] += num_tokens
        self._step = None

    def seq_lens(self, seq_ids: IntOrInts) -> torch.Tensor:
        """int64 ``[B]``: the number of cached (advanced) tokens of each of ``seq_ids``."""
        ids = self._seq_list(seq_ids, "seq_lens")
        return torch.tensor([self._lens[s] for s in ids], dtype=torch.int64)
