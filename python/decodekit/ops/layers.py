"""Layers family: the per-token kernels of the built-in model: :func:`linear` (batch-invariant
GEMM), :func:`rms_norm`, :func:`silu_and_mul` (SwiGLU) and :func:`rope_` (rotary embedding in
place), and :func:`decoder_layer`, one whole Llama block of the paged forward in one call."""

from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch

from .._checks import FLT_MAX, check_float32
from .._loader import _C

ops = torch.ops.decodekit

__all__ = ["QuantizedWeight", "linear", "rms_norm", "silu_and_mul", "rope_", "decoder_layer"]

# Bytes per block of 32 weights of the GGML block formats that linear() runs on directly.
_BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}
_QK = 32  # weights per block


# The largest |weight| Q8_0 holds: the largest finite binary16 scale (65504) times 127.
_Q8_0_MAX = 65504.0 * 127


class QuantizedWeight:
    """A block-quantized ``[N, K]`` weight as stored in a GGUF file (no float32 copy).

    Each row of ``K`` weights is ``K / 32`` consecutive blocks of 32 weights (GGML's formats):

    - ``"q4_1"``, 20 bytes: binary16 scale ``d``, binary16 minimum ``m``, 16 bytes of nibbles;
      weight ``j < 16`` of the block is ``d * (qs[j] & 15) + m`` and weight ``j + 16`` is
      ``d * (qs[j] >> 4) + m``.
    - ``"q8_0"``, 34 bytes: binary16 scale ``d``, 32 int8 ``qs``; weight ``j`` is ``d * qs[j]``.

    The float32 value of a weight is the product rounded once with the minimum added (``d * q`` is
    exact in float32), so :func:`linear` on a QuantizedWeight gives the same bits as on
    :meth:`dequantize`'s float32 tensor.

    Args:
        blocks: uint8 tensor (CPU) of ``N * K / 32 * bytes_per_block`` bytes, any shape,
            contiguous (e.g. a view of a memory-mapped GGUF file; it is not copied).
        block_type: ``"q4_1"`` or ``"q8_0"``.
        shape: ``(N, K)`` with ``K`` a positive multiple of 32.

    Attributes:
        blocks: the bytes as a uint8 ``[N, K / 32 * bytes_per_block]`` tensor.
        block_type, shape.

    Raises:
        ValueError / TypeError naming the argument: an unknown block type, K not a multiple
        of 32, a byte count that does not match the shape, a non-uint8 or non-contiguous tensor.
    """

    __slots__ = ("blocks", "block_type", "shape")

    def __init__(self, blocks: torch.Tensor, block_type: str, shape) -> None:
        if block_type not in _BLOCK_BYTES:
            raise ValueError(f"QuantizedWeight: block_type must be one of {sorted(_BLOCK_BYTES)}, got {block_type!r}")
        if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.uint8:
            raise TypeError("QuantizedWeight: blocks must be a uint8 tensor")
        try:
            dims = tuple(shape)
        except TypeError:
            dims = ()
        if len(dims) != 2 or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) for d in dims):
            raise ValueError(f"QuantizedWeight: shape must be (N, K), two ints, got {shape!r}")
        N, K = (int(d) for d in dims)
        if N < 0 or K <= 0 or K % _QK:
            raise ValueError(f"QuantizedWeight: shape (N, K) needs N >= 0 and K a positive multiple of 32, got {shape}")
        row_bytes = K // _QK * _BLOCK_BYTES[block_type]
        if blocks.numel() != N * row_bytes:
            raise ValueError(
                f"QuantizedWeight: {block_type} [N={N}, K={K}] takes N * K / 32 * {_BLOCK_BYTES[block_type]} = "
                f"{N * row_bytes} bytes, blocks has {blocks.numel()}"
            )
        if not blocks.is_contiguous():
            raise ValueError("QuantizedWeight: blocks must be contiguous")
        self.blocks = blocks.reshape(N, row_bytes)
        self.block_type = block_type
        self.shape = torch.Size((N, K))

    @property
    def dtype(self) -> torch.dtype:
        """float32: the dtype of the values the weight stands for (and of :func:`linear`'s output)."""
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    def size(self, dim: Optional[int] = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks."""
        return self.blocks.numel()

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.block_type}, shape={tuple(self.shape)})"

    def rows(self, index) -> QuantizedWeight:
        """The weight rows ``index`` (an int64 tensor, a slice or a list) as a new QuantizedWeight
        (a copy of their blocks unless a slice gives a view)."""
        sel = self.blocks[index]
        return QuantizedWeight(sel.contiguous(), self.block_type, (sel.size(0), self.shape[1]))

    @staticmethod
    def cat(weights) -> QuantizedWeight:
        """Rows of several QuantizedWeights of one block type and ``K``, stacked (a copy)."""
        weights = list(weights)
        first = weights[0] if weights else None
        if first is None or any(
            not isinstance(w, QuantizedWeight) or w.block_type != first.block_type or w.shape[1] != first.shape[1]
            for w in weights
        ):
            raise ValueError("QuantizedWeight.cat: needs QuantizedWeights of one block type and one K")
        blocks = torch.cat([w.blocks for w in weights], 0)
        return QuantizedWeight(blocks, weights[0].block_type, (blocks.size(0), weights[0].shape[1]))

    @staticmethod
    def quantize(weight: torch.Tensor, block_type: str = "q8_0") -> QuantizedWeight:
        """Quantize a float ``[N, K]`` weight (``K`` a multiple of 32) to Q8_0 blocks.

        GGML's Q8_0 rule per block of 32 weights ``x``: scale ``d = max|x| / 127`` (stored as
        binary16), ``q = round(x / d)`` (halves away from zero, clamped to [-127, 127]; ``q = 0``
        for an all-zero block). Each dequantized weight ``fp16(d) * q`` is within
        ``fp16(d) / 2`` (plus the scale's own rounding) of ``x``.

        Args:
            weight: float16 / bfloat16 / float32 / float64 ``[N, K]`` tensor (CPU), finite, with
                ``|w| <= 65504 * 127`` (larger scales overflow binary16). A block whose scale
                underflows binary16 (``max|x| < 127 * 2^-25``) becomes zeros.
            block_type: ``"q8_0"`` (the only type this quantizer writes).

        Returns:
            A new :class:`QuantizedWeight` (``N * K / 32 * 34`` bytes).

        Raises:
            ValueError: another block type, a shape that is not ``[N, K]`` with ``K`` a positive
                multiple of 32, non-finite weights, or weights beyond ``65504 * 127``.
            TypeError: ``weight`` not a floating-point tensor.
        """
        if block_type != "q8_0":
            raise ValueError(f"QuantizedWeight.quantize: block_type must be 'q8_0', got {block_type!r}")
        if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
            raise TypeError("QuantizedWeight.quantize: weight must be a floating-point tensor")
        if weight.dim() != 2 or weight.shape[1] == 0 or weight.shape[1] % _QK:
            raise ValueError(
                f"QuantizedWeight.quantize: weight must be [N, K] with K a positive multiple of 32, "
                f"got {tuple(weight.shape)}"
            )
        w = weight.detach().to("cpu")
        if not bool(torch.isfinite(w).all()):
            raise ValueError("QuantizedWeight.quantize: weight must be finite")
        big = float(w.abs().max()) if w.numel() else 0.0
        if big > _Q8_0_MAX:
            raise ValueError(
                f"QuantizedWeight.quantize: |weight| must be at most 65504 * 127 = {_Q8_0_MAX:.0f} (the largest "
                f"binary16 scale times 127), got max |weight| = {big:.6g}"
            )
        x = w.to(torch.float32)
        N, K = x.shape
        xb = x.reshape(N, K // _QK, _QK)
        d = xb.abs().amax(-1, keepdim=True) / 127.0
        # a scale that underflows binary16 stores 0: the block's weights become 0 (q = 0)
        d16 = d.to(torch.float16).float()
        inv = torch.where(d16 > 0, 1.0 / d, torch.zeros_like(d))
        v = xb * inv
        q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp_(-127, 127).to(torch.int8)
        blocks = torch.cat((d.to(torch.float16).view(torch.uint8), q.view(torch.uint8)), dim=-1)
        return QuantizedWeight(blocks.reshape(-1).contiguous(), "q8_0", (N, K))

    def dequantize_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 ``[*ids.shape, K]``: rows ``ids`` dequantized (an embedding lookup).

        Raises:
            TypeError: ``ids`` not an integer tensor (bool included; uint8 ids are ids, not a mask).
            ValueError: an id outside ``[0, N)``.
        """
        if ids.__class__ is torch.Tensor and ids.dtype == torch.int64:  # plain CPU tensors: one C++ call
            out = _C._dequantize_rows_fast(self.blocks, self.block_type, self.shape[0], self.shape[1], ids)
            if out is not None:  # (None: the checks below, or another device)
                return out
        name = "QuantizedWeight.dequantize_rows"
        if (
            not isinstance(ids, torch.Tensor)
            or ids.dtype.is_floating_point
            or ids.dtype.is_complex
            or ids.dtype == torch.bool
        ):
            got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise TypeError(f"{name}: ids must be an integer tensor, got {got}")
        ids = ids.to(torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.shape[0]):
            raise ValueError(
                f"{name}: ids must be in [0, N={self.shape[0]}), got values from {int(ids.min())} to {int(ids.max())}"
            )
        blk = self.blocks[ids.reshape(-1)].reshape(-1, self.shape[1] // _QK, _BLOCK_BYTES[self.block_type])
        d = blk[..., 0:2].contiguous().view(torch.float16).float()  # [R, nb, 1], exact
        if self.block_type == "q4_1":
            m = blk[..., 2:4].contiguous().view(torch.float16).float()
            qs = blk[..., 4:].to(torch.int32)
            q = torch.cat((qs & 15, qs >> 4), dim=-1).float()
            w = d * q + m  # d * q exact: one rounding, as fma(d, q, m)
        else:
            w = d * blk[..., 2:].contiguous().view(torch.int8).float()  # exact
        return w.reshape(*ids.shape, self.shape[1])

    def dequantize(self) -> torch.Tensor:
        """float32 ``[N, K]``: every weight's value."""
        return self.dequantize_rows(torch.arange(self.shape[0]))


def linear(
    x: torch.Tensor, weight: Union[torch.Tensor, QuantizedWeight], bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Batch-invariant ``x @ weight.T + bias``: each output row is bit-identical whatever M is.

    The stock CPU GEMM picks its blocking of the inner dimension from the problem size,
    so a row's result changes with the number of rows in the call; batched decoding and
    speculative verification (M = K + 1 rows) then cannot reproduce one-row decoding.
    Here every output element is the same sequence of fused multiply-adds over K
    (16 lanes, lane j takes k = j mod 16 in ascending k, lanes combined in a fixed tree),
    with tiles over M and N only; the result is also the same on every thread count and
    instruction set.

    Args:
        x: ``[..., K]`` float32 on the CPU (leading dimensions are flattened into M).
        weight: ``[N, K]`` float32 (rows contiguous), or a :class:`QuantizedWeight` (Q4_1 /
            Q8_0 blocks, ``K`` a multiple of 32): each weight is dequantized in registers and used
            in the same order, so the result has the same bits as on
            ``weight.dequantize()`` while reading 4.5 (Q8_0: 8.5) bits per weight instead of 32.
        bias: ``[N]`` float32 or None.

    Returns:
        ``[..., N]`` float32 (no autograd graph: the op is not differentiable).

    Raises:
        TypeError: a non-float32 or non-tensor argument.
        ValueError: mismatched K, wrong ranks, or a device other than the CPU (meta
        tensors are accepted for shape inference).

    Source: a plain tiled dot-product kernel (4 x 4 output tiles of 16-lane
    accumulators), written for batch invariance rather than peak FLOPs; at the small M
    of decoding it is memory-bound on the weights like any GEMM.
    """
    op = "linear"
    if isinstance(weight, QuantizedWeight):
        return _linear_quantized(x, weight, bias)
    check_float32(op, op, x=x, weight=weight)
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"{op}: x must be [..., K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.size(-1) != weight.size(1):
        raise ValueError(f"{op}: x has K={x.size(-1)} but weight has K={weight.size(1)} (weight is [N, K])")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype != torch.float32:
            raise TypeError(f"{op}: bias must be a float32 tensor or None")
        if tuple(bias.shape) != (weight.size(0),):
            raise ValueError(f"{op}: bias must be [N={weight.size(0)}], got {tuple(bias.shape)}")
    lead = x.shape[:-1]
    if x.size(-1) == 0:  # empty inner dimension: the products are all zero
        out = torch.zeros(*lead, weight.size(0), dtype=torch.float32, device=x.device)
        return out + bias if bias is not None else out
    x2 = x.reshape(-1, x.size(-1))
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    y = ops.linear(x2.detach(), w.detach(), None if bias is None else bias.detach().contiguous())
    return y.reshape(*lead, weight.size(0))


def _linear_quantized(x: torch.Tensor, weight: QuantizedWeight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    op = "linear"
    check_float32(op, op, x=x)
    N, K = weight.shape
    if x.dim() < 1 or x.size(-1) != K:
        raise ValueError(f"{op}: x has K={x.size(-1) if x.dim() else None} but weight has K={K} (weight is [N, K])")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype != torch.float32:
            raise TypeError(f"{op}: bias must be a float32 tensor or None")
        if tuple(bias.shape) != (N,):
            raise ValueError(f"{op}: bias must be [N={N}], got {tuple(bias.shape)}")
        bias = bias.detach().contiguous()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = ops.linear_quantized(x2.detach(), weight.blocks, weight.block_type, N, K, bias)
    return y.reshape(*lead, N)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dimension: ``weight * (x * (1 / sqrt(mean(x^2) + eps)))``.

    The sum of squares of a row is accumulated in 16 float32 lanes with fused multiply-adds
    (lane j takes the columns j mod 16 in ascending order) and combined in a fixed tree, so a
    row's result never depends on the other rows, the thread count or the instruction set.

    Args:
        x: ``[..., H]`` float32 (CPU).
        weight: ``[H]`` float32.
        eps: added to the mean square (a finite float >= 0).

    Returns:
        ``[..., H]`` float32 (no autograd graph: the op is not differentiable).

    Raises:
        TypeError / ValueError naming the argument: dtypes, devices, shapes, eps.

    Source: Zhang & Sennrich, 2019, "Root Mean Square Layer Normalization".
    """
    op = "rms_norm"
    check_float32(op, op, x=x, weight=weight)
    if x.dim() < 1 or weight.dim() != 1 or x.size(-1) != weight.size(0):
        raise ValueError(f"{op}: x must be [..., H] and weight [H], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if not torch.compiler.is_compiling() and (
        isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 <= eps <= FLT_MAX)
    ):
        raise ValueError(f"{op}: eps must be a finite float32 number >= 0, got {eps!r:.60}")
    return ops.rms_norm(x.detach(), weight.detach().contiguous(), float(eps))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation of a fused gate/up projection: ``silu(x[..., :I]) * x[..., I:]``.

    ``silu(g) = g * sigmoid(g)``, the sigmoid computed from ``exp(-|g|)`` (no overflow for any
    finite g); element-wise, so rows are independent of each other.

    Args:
        x: ``[..., 2 * I]`` float32 (CPU), gate columns first.

    Returns:
        ``[..., I]`` float32 (no autograd graph: the op is not differentiable).

    Raises:
        TypeError / ValueError naming ``x``: dtype, device, odd last dimension.

    Source: Shazeer, 2020, "GLU Variants Improve Transformer" (SwiGLU); Elfwing et al., 2018 (SiLU).
    """
    op = "silu_and_mul"
    check_float32(op, op, x=x)
    if x.dim() < 1 or x.size(-1) % 2:
        raise ValueError(f"{op}: x must be [..., 2 * I] (gate then up), got {tuple(x.shape)}")
    return ops.silu_and_mul(x.detach())


def rope_(
    x: torch.Tensor,
    num_heads: int,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    positions: torch.Tensor,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Rotary position embedding in place ("rotate half" layout), for the first ``num_heads``
    heads of each token row.

    For token ``n`` at position ``p = positions[n]`` and each head ``x_h = x[n, h*D:(h+1)*D]``:
    ``x_h <- x_h * cos_table[p] + rotate_half(x_h) * sin_table[p]`` with
    ``rotate_half([a, b]) = [-b, a]``, each product rounded to float32 before the sum (exactly
    the bits of that float32 expression in PyTorch). Queries and keys that sit side by side in a
    fused QKV projection are rotated in one call.

    Args:
        x: ``[N, C]`` float32 (CPU), unit column stride, ``C >= num_heads * D``; modified in place.
        num_heads: heads to rotate (int >= 0).
        cos_table, sin_table: ``[P, D]`` float32 (``D`` even), e.g. from
            :func:`decodekit.models.llama.rope_table`.
        positions: int64 ``[N]`` in ``[0, P)``.
        validate: check that every position is in ``[0, P)`` (synchronises) and raise
            ValueError naming the range; with ``False`` the kernel's own check raises
            RuntimeError instead.

    Returns:
        ``x``.

    Raises:
        TypeError / ValueError naming the argument: dtypes, shapes, a position outside the table,
        rows of ``x`` that overlap in memory (an expanded tensor); RuntimeError when ``x``
        requires grad (the kernel is not differentiable).

    Source: Su et al., 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding".
    """
    op = "rope_"
    check_float32(op, "rope_", x=x, cos_table=cos_table, sin_table=sin_table)
    if x.dim() != 2 or (x.size(1) > 1 and x.stride(1) != 1):
        raise ValueError(f"{op}: x must be [N, C] with unit column stride, got shape {tuple(x.shape)}")
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: x requires grad; this in-place kernel is not differentiable (use it under "
            "torch.no_grad() or on a tensor without grad)"
        )
    if cos_table.dim() != 2 or cos_table.shape != sin_table.shape or cos_table.size(1) % 2:
        raise ValueError(
            f"{op}: cos_table and sin_table must be [P, D] of one shape with D even, got "
            f"{tuple(cos_table.shape)} and {tuple(sin_table.shape)}"
        )
    if (
        isinstance(num_heads, bool)
        or not isinstance(num_heads, int)
        or num_heads < 0
        or num_heads * cos_table.size(1) > x.size(1)
    ):
        raise ValueError(
            f"{op}: num_heads must be an int in [0, C / D = {x.size(1) // max(1, cos_table.size(1))}], "
            f"got {num_heads!r}"
        )
    if x.size(0) > 1 and num_heads and x.stride(0) < num_heads * cos_table.size(1):
        raise ValueError(
            f"{op}: the rows of x overlap in memory (row stride {x.stride(0)} < {num_heads} heads x "
            f"{cos_table.size(1)}); rotating in place needs distinct rows (e.g. x.contiguous())"
        )
    if (
        not isinstance(positions, torch.Tensor)
        or positions.dtype.is_floating_point
        or positions.dtype == torch.bool
        or positions.dim() != 1
        or positions.size(0) != x.size(0)
    ):
        raise ValueError(f"{op}: positions must be an integer tensor [N={x.size(0)}]")
    positions = positions.to(torch.int64).contiguous()
    if x.device.type == "meta":
        return x
    if validate and positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= cos_table.size(0)):
        raise ValueError(
            f"{op}: positions must be in [0, {cos_table.size(0)}), got [{int(positions.min())}, {int(positions.max())}]"
        )
    ops.rope_(x, num_heads, cos_table.contiguous(), sin_table.contiguous(), positions)
    return x


def layer_weight(w: Union[torch.Tensor, QuantizedWeight]) -> tuple[torch.Tensor, str]:
    """``(tensor, type)`` of one weight as :func:`decoder_layer`'s op takes it: a float32 tensor
    and ``"f32"``, or a QuantizedWeight's blocks and its block type."""
    if isinstance(w, QuantizedWeight):
        return w.blocks, w.block_type
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"decoder_layer: a weight must be a torch.Tensor or a QuantizedWeight, got {type(w).__name__}")
    return w, "f32"


def _int64(t, name: str, rows: Optional[tuple] = None) -> torch.Tensor:
    """An integer tensor as contiguous int64; with ``rows = (B, T)`` a flat ``[B * T]`` one becomes ``[B, T]``."""
    if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"decoder_layer: {name} must be an integer tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if rows is not None and t.dim() == 1 and t.numel() == rows[0] * rows[1]:  # PagedKVCache.slot_mapping's order
        t = t.view(rows)
    return t.to(torch.int64).contiguous()


def decoder_layer(
    x: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    positions: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    attn_norm: torch.Tensor,
    wqkv: Union[torch.Tensor, QuantizedWeight],
    wo: Union[torch.Tensor, QuantizedWeight],
    ffn_norm: torch.Tensor,
    w_gate_up: Union[torch.Tensor, QuantizedWeight],
    w_down: Union[torch.Tensor, QuantizedWeight],
    *,
    num_heads: int,
    num_kv_heads: int,
    eps: float,
    scale: Optional[float] = None,
    kv_layout: str = "NHD",
    tree_mask: Optional[torch.Tensor] = None,
    validate: bool = True,
) -> torch.Tensor:
    """One Llama block of the paged forward in one C++ call, in place on the residual stream.

    With ``M = B * T`` token rows (row ``b * T + t`` is token ``t`` of sequence ``b``)::

        h = rms_norm(x, attn_norm, eps)
        q, k, v = split(linear(h, wqkv))              # Hq, Hkv, Hkv heads of D
        rope_(q and k, cos_table, sin_table, positions)
        k, v -> k_cache, v_cache at slot_mapping      # as append_paged_kv_cache
        x += linear(paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                    tree_mask=tree_mask), wo)
        h = rms_norm(x, ffn_norm, eps)
        x += linear(silu_and_mul(linear(h, w_gate_up)), w_down)

    Each step is the kernel of the op of that name, called as those ops call it, so ``x`` and
    the caches get exactly the bits of the sequence of ops (the per-op path of
    :meth:`decodekit.models.llama.LlamaModel.forward_paged`, ``model.layer_op = False``); the
    intermediates live in scratch kept between calls and no PyTorch op runs inside. Rows stay
    independent (batch-invariant, like each op).

    Args:
        x: ``[B, T, H]`` float32, contiguous (CPU): the residual stream, updated in place.
        k_cache, v_cache: the layer's paged cache, float32 ``[num_blocks, block_size, Hkv, D]``
            (``"NHD"``) or ``[num_blocks, Hkv, block_size, D]`` (``"HND"``); the new keys and
            values are written in place. ``D`` is even.
        slot_mapping: integer ``[B, T]`` (or ``[B * T]``): slot ``block * block_size + offset``
            of each new token (:meth:`~decodekit.cache.PagedKVCache.slot_mapping`); a negative
            slot is padding and is not written.
        block_tables: integer ``[B, max_blocks]``: each sequence's blocks, padded with -1.
        seq_lens: integer ``[B]``: each sequence's length, the ``T`` new tokens included.
        positions: integer ``[B, T]`` (or ``[B * T]``): each new token's position, in ``[0, P)``.
        cos_table, sin_table: float32 ``[P, D]`` RoPE tables
            (:func:`decodekit.models.llama.rope_table`, "rotate half" layout).
        attn_norm, ffn_norm: float32 ``[H]`` RMSNorm weights.
        wqkv: ``[(Hq + 2 Hkv) D, H]``: the q, k and v projections' rows stacked.
        wo: ``[H, Hq D]``.
        w_gate_up: ``[2 I, H]``: the gate rows, then the up rows.
        w_down: ``[H, I]``.
            Each weight is a contiguous float32 tensor or a :class:`QuantizedWeight` (Q4_1 / Q8_0
            blocks, ``K`` a multiple of 32), as :func:`linear` takes them.
        num_heads, num_kv_heads: ``Hq`` and ``Hkv`` (``Hkv`` divides ``Hq``).
        eps: RMSNorm epsilon (finite, >= 0).
        scale: attention score scale; ``None`` for ``1 / sqrt(D)``.
        kv_layout: ``"NHD"`` or ``"HND"``.
        tree_mask: ``None`` (the new tokens of a row are a sequence: causal among them), or
            bool ``[B, T, T]``: the ``T`` new tokens of each row are the flattened nodes of a
            token tree and ``tree_mask[b, i, j]`` is True when node ``j`` is node ``i`` itself or
            one of its ancestors (:func:`decodekit.tree_mask_from_parents`), as
            :func:`decodekit.paged_attention` takes it (any strides: it is made contiguous
            here). The diagonal must be True and nothing above it (parents come first);
            ``positions`` then carry each node's depth.
        validate: also check (synchronises) that no slot appears twice and that every block the
            sequences read (those holding positions ``[0, seq_lens[b])``) is an id in
            ``[0, num_blocks)``, as :func:`decodekit.paged_attention` does (without it, such
            blocks are skipped); the op itself checks the positions against the tables, the
            slots against the pool and ``seq_lens`` in ``[T, max_blocks * block_size]``, in
            ``O(B * T)``, before writing anything.

    Returns:
        ``x`` (updated in place).

    Raises:
        TypeError / ValueError naming the argument: dtypes, shapes (against ``x``, the cache's
        ``Hkv`` and ``D``, ``num_heads``), devices, non-contiguous tensors, a weight type or
        block size that does not match its tensor, positions outside the tables, slots past
        the pool or repeated, block ids outside the pool among the blocks read, lengths
        outside ``[T, max_blocks * block_size]``, ``kv_layout``, a ``tree_mask`` of the wrong
        dtype or shape or with a False diagonal or a True entry above it; nothing is written
        then. RuntimeError when ``x`` requires grad (not differentiable).

    Source: the Llama block (Touvron et al., 2023) with RMSNorm (Zhang & Sennrich, 2019), RoPE
    (Su et al., 2021), grouped-query attention (Ainslie et al., 2023) over a paged cache (Kwon
    et al., 2023, PagedAttention) and SwiGLU (Shazeer, 2020).
    """
    op = "decoder_layer"
    check_float32(op, op, x=x)
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{op}: x requires grad; this in-place kernel is not differentiable")
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be [B, T, H], got shape {tuple(x.shape)}")
    B, T = x.shape[0], x.shape[1]
    slot_mapping = _int64(slot_mapping, "slot_mapping", (B, T))
    positions = _int64(positions, "positions", (B, T))
    block_tables = _int64(block_tables, "block_tables")
    seq_lens = _int64(seq_lens, "seq_lens")
    if (
        isinstance(num_heads, bool)
        or isinstance(num_kv_heads, bool)
        or not isinstance(num_heads, int)
        or not isinstance(num_kv_heads, int)
    ):
        raise TypeError(f"{op}: num_heads and num_kv_heads must be ints, got {num_heads!r} and {num_kv_heads!r}")
    if scale is None:
        if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4:
            raise ValueError(f"{op}: k_cache must be a 4-D tensor")
        scale = 1.0 / math.sqrt(k_cache.size(3))
    wqkv_t, wqkv_type = layer_weight(wqkv)
    wo_t, wo_type = layer_weight(wo)
    gu_t, gu_type = layer_weight(w_gate_up)
    down_t, down_type = layer_weight(w_down)
    if len(w_down.shape) != 2:
        raise ValueError(f"{op}: w_down must be [H, I], got shape {tuple(w_down.shape)}")
    intermediate_size = int(w_down.shape[1])
    if tree_mask is not None:
        if not isinstance(tree_mask, torch.Tensor):
            raise TypeError(
                f"{op}: tree_mask must be None or a bool torch.Tensor [B, T, T], got {type(tree_mask).__name__}"
            )
        tree_mask = tree_mask.detach().contiguous()  # (the op itself wants it contiguous)
    if validate and x.device.type != "meta" and slot_mapping.numel() > 1:
        used = slot_mapping[slot_mapping >= 0]
        if used.unique().numel() != used.numel():
            raise ValueError(f"{op}: slot_mapping repeats a slot: {slot_mapping.tolist()}")
    if (
        validate
        and x.device.type != "meta"
        and isinstance(k_cache, torch.Tensor)
        and k_cache.dim() == 4
        and block_tables.dim() == 2
        and seq_lens.shape == (B,)
        and block_tables.size(0) == B
    ):  # (other shapes: the op raises naming them)
        num_blocks, block_size = k_cache.size(0), k_cache.size(2 if kv_layout == "HND" else 1)
        if block_size > 0:
            need = (seq_lens.clamp(min=0) + block_size - 1) // block_size
            cols = torch.arange(block_tables.size(1), device=block_tables.device)[None, :] < need[:, None]
            read = block_tables[cols]
            if read.numel() and bool(((read < 0) | (read >= num_blocks)).any()):
                raise ValueError(
                    f"{op}: block_tables holds block ids outside [0, num_blocks={num_blocks}) among the blocks "
                    "the sequences read (positions [0, seq_lens))"
                )
    ops.decoder_layer(
        x,
        k_cache,
        v_cache,
        slot_mapping,
        block_tables,
        seq_lens,
        positions,
        cos_table,
        sin_table,
        attn_norm,
        wqkv_t,
        wqkv_type,
        wo_t,
        wo_type,
        ffn_norm,
        gu_t,
        gu_type,
        down_t,
        down_type,
        num_heads,
        num_kv_heads,
        intermediate_size,
        float(eps),
        float(scale),
        kv_layout,
        tree_mask,
    )
    return x
