"""A compact Llama-family decoder in PyTorch and decodekit's kernels, float32, on a paged KV cache.

The architecture is the one of Llama 2/3, Mistral-style dense models and SmolLM2:

    x = embed[ids]
    for each layer:
        x = x + Wo · Attention(RoPE(Wq · norm(x)), RoPE(Wk · norm(x)), Wv · norm(x))
        x = x + Wdown · (silu(Wgate · norm(x)) * (Wup · norm(x)))
    logits = Whead · norm(x)

- RMSNorm (Zhang & Sennrich, 2019): ``w * x / sqrt(mean(x^2) + eps)``, computed in float32.
- RoPE (Su et al., 2021, "RoFormer") in the "rotate half" layout: dimension ``i`` of a head is
  paired with dimension ``i + head_dim / 2`` and rotated by ``position * theta^(-2i / head_dim)``.
- Grouped-query attention (Ainslie et al., 2023): ``num_heads / num_kv_heads`` query heads share
  one key/value head.
- SwiGLU feed-forward (Shazeer, 2020, "GLU Variants Improve Transformer").

Every matrix multiplication with a weight goes through :meth:`LlamaModel._linear`, so the whole
model can switch to another GEMM implementation by replacing that one method.

Weights: float32 tensors, or for the matrices :class:`decodekit.QuantizedWeight` (GGUF Q4_1 /
Q8_0 blocks, CPU): the linear layers and the embedding lookup dequantize them on the fly, with
the same bits as the float32 model on the dequantized weights.

One forward: :meth:`LlamaModel.forward_paged` on a :class:`~decodekit.cache.PagedKVCache`, where
each row is a sequence of its own length (batched decoding of requests that started at different
times), with attention by :func:`decodekit.paged_attention`; on the CPU in float32 each block is
one :func:`decodekit.decoder_layer` call (``model.layer_op``, default True; False runs the block
op by op in Python, the readable reference, with the same bits). In deterministic mode a row's logits
are bit-identical whatever the other rows of the call. (The plain-PyTorch contiguous forward with
SDPA, the transformers-parity reference, lives in the tests: ``tests/reference/llama.py``.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F

from .._checks import parse_device
from .._loader import _C
from ..cache import PagedKVCache
from ..ops import linear as _dk_linear
from ..ops.layers import QuantizedWeight, layer_weight

_dk_ops = torch.ops.decodekit
_decoder_layers_fast = _C._decoder_layers_fast
_decode_step_fast = _C._decode_step_fast
# Bumped whenever an attribute of a LlamaModel or of one of its blocks is set: the arguments
# LlamaModel._decode_step keeps between steps are then rebuilt.
_EDITS = [0]


class _StepArgs(NamedTuple):
    """What LlamaModel._decode_step keeps on a cache between steps (see _step_args)."""

    embed: object  # the embedding: a float32 tensor or a QuantizedWeight
    cos: torch.Tensor  # RoPE tables
    sin: torch.Tensor
    shapes: tuple  # (num_heads, num_kv_heads, intermediate_size, rms_norm_eps, attention scale)
    plan: object  # the cache's _C._DecoderLayersPlan
    lm_head: object
    embed_shape: tuple  # (N, K) of the embedding
    stream: bool  # the quantized products stream their weights
    reduced_head: tuple  # () or (head_token_ids, vocab_size) for a head over part of the vocabulary


__all__ = ["LlamaConfig", "LlamaLayerWeights", "LlamaWeights", "LlamaModel", "rms_norm", "rope_cos_sin", "rope_table"]


@dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-family decoder.

    Attributes:
        vocab_size: number of rows of the embedding and of the LM head (``V``).
        hidden_size: model width (``H``).
        intermediate_size: width of the SwiGLU feed-forward layer (``I``).
        num_layers: number of transformer blocks.
        num_heads: query heads (``Hq``).
        num_kv_heads: key/value heads (``Hkv``); must divide ``num_heads``.
        head_dim: per-head width (``D``), even.
        rope_theta: RoPE base frequency.
        rms_norm_eps: epsilon added to the mean square in RMSNorm.
        max_seq_len: longest sequence (context length) the model supports.
        tie_word_embeddings: whether the LM head is the token embedding matrix.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_seq_len",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"LlamaConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"LlamaConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if not (self.rope_theta > 0 and self.rms_norm_eps >= 0):
            raise ValueError(
                f"LlamaConfig needs rope_theta > 0 and rms_norm_eps >= 0, got "
                f"{self.rope_theta!r} and {self.rms_norm_eps!r}"
            )


@dataclass
class LlamaLayerWeights:
    """Weights of one transformer block, float32 (the matrices may be
    :class:`~decodekit.QuantizedWeight`), linear weights in ``[out, in]`` layout.

    Shapes (``Hq = num_heads``, ``Hkv = num_kv_heads``, ``D = head_dim``):
    ``attn_norm [H]``, ``wq [Hq*D, H]``, ``wk [Hkv*D, H]``, ``wv [Hkv*D, H]``, ``wo [H, Hq*D]``,
    ``ffn_norm [H]``, ``w_gate [I, H]``, ``w_up [I, H]``, ``w_down [H, I]``.
    The rows of ``wq`` and ``wk`` are in the "rotate half" RoPE order (the Hugging Face layout).
    """

    attn_norm: torch.Tensor
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    ffn_norm: torch.Tensor
    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor


@dataclass
class LlamaWeights:
    """All weights of a :class:`LlamaModel`.

    Attributes:
        embed: ``[V, H]`` token embedding (a tensor or a :class:`~decodekit.QuantizedWeight`).
        layers: one :class:`LlamaLayerWeights` per block.
        norm: ``[H]`` final RMSNorm weight.
        lm_head: ``[V, H]`` output projection, or ``None`` to tie it to ``embed``; with
            ``lm_head_token_ids``, ``[N, H]`` (row ``i`` scores token ``lm_head_token_ids[i]``).
        lm_head_token_ids: ``None`` (the head covers the whole vocabulary) or int64 ``[N]``
            distinct token ids in ``[0, V)``: a reduced-vocabulary head (a draft model's), whose
            logits are ``-inf`` at every other token, so those tokens have probability 0.
    """

    embed: torch.Tensor
    layers: List[LlamaLayerWeights]
    norm: torch.Tensor
    lm_head: Optional[torch.Tensor] = None
    lm_head_token_ids: Optional[torch.Tensor] = None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension: ``weight * x / sqrt(mean(x^2, -1) + eps)``.

    Args:
        x: ``[..., H]`` float32.
        weight: ``[H]`` float32.
        eps: added to the mean square.

    Returns:
        ``[..., H]`` float32.
    """
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines of the RoPE angles for the "rotate half" layout.

    The angle of position ``p`` and pair ``i`` (``0 <= i < D/2``) is ``p * theta^(-2i/D)``;
    it is used by dimensions ``i`` and ``i + D/2``.

    Args:
        positions: ``[T]`` int64 absolute positions.
        head_dim: ``D`` (even).
        theta: base frequency.

    Returns:
        ``(cos, sin)``, each ``[T, D]`` float32.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rope_table(num_positions: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines of the RoPE angles of positions ``0 .. num_positions - 1``, as a table
    that every row of a batch reads from (so that a position's values never depend on the batch).

    The angles are those of :func:`rope_cos_sin`, in float32 (``float32(p) * inv_freq``, as HF
    transformers computes them); their cosine and sine are computed in float64 and rounded to
    float32, so an entry is the correctly rounded value of its float32 angle whichever code path
    (vectorised or scalar tail) computed it.

    Args:
        num_positions: table length (positive int).
        head_dim: ``D`` (even).
        theta: base frequency.

    Returns:
        ``(cos, sin)``, each ``[num_positions, D]`` float32 (CPU).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = torch.arange(num_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1).double()
    return angles.cos().float(), angles.sin().float()


def _apply_rope_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE with per-token angles (``x * cos + rotate_half(x) * sin``): ``x [B, T, heads, D]``, ``cos``/``sin``
    ``[B, T, D]`` (row ``b``, token ``t`` at its own position). Elementwise only."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


_BLOCK_WEIGHTS = ("attn_norm", "wqkv", "wo", "ffn_norm", "w_gate_up", "w_down")


class _Block:
    """Weights of one block as the forward pass uses them (Q/K/V and gate/up fused)."""

    __slots__ = _BLOCK_WEIGHTS + ("_op_args",)

    def __init__(self, w: LlamaLayerWeights) -> None:
        self.attn_norm = w.attn_norm.contiguous()
        self.wqkv = _fuse_rows((w.wq, w.wk, w.wv))
        self.wo = _contiguous(w.wo)
        self.ffn_norm = w.ffn_norm.contiguous()
        self.w_gate_up = _fuse_rows((w.w_gate, w.w_up))
        self.w_down = _contiguous(w.w_down)

    def __setattr__(self, name: str, value) -> None:
        object.__setattr__(self, name, value)
        if name != "_op_args":  # a weight changed: rebuild the op's arguments at the next call
            object.__setattr__(self, "_op_args", None)
            _EDITS[0] += 1

    def op_args(self) -> tuple:
        """The weight arguments of ``torch.ops.decodekit.decoder_layer`` (attn_norm, wqkv, its type,
        wo, its type, ffn_norm, w_gate_up, its type, w_down, its type), built once."""
        if self._op_args is None:
            self._op_args = (
                self.attn_norm,
                *layer_weight(self.wqkv),
                *layer_weight(self.wo),
                self.ffn_norm,
                *layer_weight(self.w_gate_up),
                *layer_weight(self.w_down),
            )
        return self._op_args


def _contiguous(w):
    return w if isinstance(w, QuantizedWeight) else w.contiguous()


def _fuse_rows(ws):
    """The rows of several weights stacked: QuantizedWeights of one block type stay quantized
    (their blocks are concatenated); any other mix is dequantized to float32."""
    if all(isinstance(w, QuantizedWeight) for w in ws) and len({w.block_type for w in ws}) == 1:
        return QuantizedWeight.cat(ws)
    return torch.cat([w.dequantize() if isinstance(w, QuantizedWeight) else w for w in ws], dim=0).contiguous()


class LlamaModel:
    """Llama-family decoder (float32) that runs new tokens against a paged KV cache.

    Args:
        config: the :class:`LlamaConfig`.
        weights: the :class:`LlamaWeights`; shapes are checked against ``config``.

    Raises:
        ValueError: when a weight has the wrong shape.

    Example:
        >>> cache = model.new_paged_cache(num_blocks=4)
        >>> seq = cache.add_sequence()
        >>> logits = model.forward_paged(torch.tensor([[1, 2, 3]]), cache, [seq])   # [1, V]
        >>> next_id = logits.argmax(-1)                                              # [1]
        >>> logits = model.forward_paged(next_id[:, None], cache, [seq])            # [1, V]
    """

    def __setattr__(self, name: str, value) -> None:
        object.__setattr__(self, name, value)
        _EDITS[0] += 1  # (see _decode_step)

    def __init__(self, config: LlamaConfig, weights: LlamaWeights) -> None:
        self.config = config
        c = config
        _check_shape("embed", weights.embed, (c.vocab_size, c.hidden_size))
        _check_shape("norm", weights.norm, (c.hidden_size,))
        if len(weights.layers) != c.num_layers:
            raise ValueError(f"LlamaModel: config has {c.num_layers} layers but weights have {len(weights.layers)}")
        q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        for i, layer in enumerate(weights.layers):
            for name, shape in (
                ("attn_norm", (c.hidden_size,)),
                ("wq", (q_out, c.hidden_size)),
                ("wk", (kv_out, c.hidden_size)),
                ("wv", (kv_out, c.hidden_size)),
                ("wo", (c.hidden_size, q_out)),
                ("ffn_norm", (c.hidden_size,)),
                ("w_gate", (c.intermediate_size, c.hidden_size)),
                ("w_up", (c.intermediate_size, c.hidden_size)),
                ("w_down", (c.hidden_size, c.intermediate_size)),
            ):
                _check_shape(f"layers[{i}].{name}", getattr(layer, name), shape)
        self.head_token_ids: Optional[torch.Tensor] = None
        if weights.lm_head_token_ids is not None:
            ids = weights.lm_head_token_ids
            if (
                not isinstance(ids, torch.Tensor)
                or ids.dim() != 1
                or ids.dtype.is_floating_point
                or ids.dtype == torch.bool
                or ids.numel() == 0
            ):
                raise ValueError("LlamaModel: lm_head_token_ids must be a non-empty 1-D integer tensor")
            ids = ids.to(torch.int64)
            if int(ids.min()) < 0 or int(ids.max()) >= c.vocab_size or ids.unique().numel() != ids.numel():
                raise ValueError(f"LlamaModel: lm_head_token_ids must be distinct ids in [0, {c.vocab_size})")
            if weights.lm_head is None:
                raise ValueError("LlamaModel: lm_head_token_ids needs an explicit lm_head [N, H]")
            _check_shape("lm_head", weights.lm_head, (ids.numel(), c.hidden_size))
            self.head_token_ids = ids.contiguous()
        elif weights.lm_head is not None:
            _check_shape("lm_head", weights.lm_head, (c.vocab_size, c.hidden_size))

        self.embed = _contiguous(weights.embed)
        self.lm_head = self.embed if weights.lm_head is None else _contiguous(weights.lm_head)
        self.norm = weights.norm.contiguous()
        self.blocks = [_Block(layer) for layer in weights.layers]
        self.deterministic = True
        self.fused_layer_ops = True  # decodekit's rms_norm / rope_ / silu_and_mul on the paged path
        # ... and on that path one decodekit.decoder_layer call per block (False: the per-op Python path,
        # the readable reference, with the same bits)
        self.layer_op = True
        self._rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # rope_table, built lazily
        self._stream_weights: Optional[bool] = None  # _streams_weights(), computed at the first forward
        # On a GPU in deterministic mode, the decode step (T = 1, no tree) is captured once per batch
        # size and cache in a CUDA graph and replayed (False: every step launches its kernels).
        self.cuda_graphs = True
        self._weights_version = 0  # bumped by to(): captured graphs hold the weights' addresses

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the activations, the logits and the KV cache: float32 (also when the weight
        matrices are bfloat16 or float16, see :meth:`to`)."""
        d = self.embed.dtype
        return torch.float32 if d in (torch.bfloat16, torch.float16) else d

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype of the weight matrices (embedding, projections, LM head): float32, or
        bfloat16 / float16 after :meth:`to` with ``dtype``."""
        return self.embed.dtype

    def _linear(self, x: torch.Tensor, weight) -> torch.Tensor:
        """``x @ weight.T`` for ``x [..., in]`` and ``weight [out, in]``; returns ``[..., out]``.

        In deterministic mode (``self.deterministic``, the default) float32 products (CPU and
        CUDA) go through :func:`decodekit.linear`, whose rows are bit-identical whatever the
        number of rows in the call; otherwise ``torch.nn.functional.linear``. bfloat16 / float16
        matrices: in deterministic mode their exact float32 values go through
        :func:`decodekit.linear` (converted at each call: batch-invariant, the same bits on
        every device, at the cost of the conversion); in fast mode ``x`` rounded to their dtype
        meets them in ``torch.nn.functional.linear``, float32 out. A
        :class:`~decodekit.QuantizedWeight` goes through ``linear_quantized`` in deterministic
        mode (the same bits as :func:`decodekit.linear` on its float32 values); otherwise it is
        dequantized at each call for ``torch.nn.functional.linear`` (slow: a reference path).
        """
        if isinstance(weight, QuantizedWeight):
            if not (self.deterministic and x.dtype == torch.float32 and x.device.type == "cpu"):
                return F.linear(x, weight.dequantize())
            N, K = weight.shape
            x2 = x.reshape(-1, K)
            if x2.stride(-1) != 1:
                x2 = x2.contiguous()
            return _dk_ops.linear_quantized(x2, weight.blocks, weight.block_type, N, K, None).view(*x.shape[:-1], N)
        if weight.dtype != x.dtype:  # bfloat16 / float16 matrices
            if not self.deterministic:  # the product in their dtype, float32 out
                return F.linear(x.to(weight.dtype), weight).to(x.dtype)
            weight = weight.to(x.dtype)  # exact: decodekit.linear's fixed order on the same values
        if self.deterministic and x.dtype == weight.dtype == torch.float32 and x.device.type in ("cpu", "cuda"):
            # The op itself (decodekit.linear's checks hold by construction: weights contiguous).
            x2 = x.reshape(-1, x.size(-1))
            if x2.stride(-1) != 1 or x.size(-1) == 0 or not weight.is_contiguous():
                return _dk_linear(x, weight)
            return _dk_ops.linear(x2, weight, None).view(*x.shape[:-1], weight.size(0))
        return F.linear(x, weight)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embedding rows of int64 ``input_ids`` (only those rows are dequantized).
        ValueError naming ``input_ids`` for an id outside ``[0, vocab_size)``."""
        try:
            if isinstance(self.embed, QuantizedWeight):
                return self.embed.dequantize_rows(input_ids)
            return F.embedding(input_ids, self.embed).to(self.dtype)
        except (IndexError, ValueError, RuntimeError):
            V = self.config.vocab_size
            bad = input_ids[(input_ids < 0) | (input_ids >= V)]
            if bad.numel():
                raise ValueError(
                    f"LlamaModel: input_ids must be token ids in [0, vocab_size={V}), got {bad[:5].tolist()}"
                ) from None
            raise

    def _head(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """Final RMSNorm and LM head: ``x [..., H]`` -> float32 logits ``[..., V]`` (``-inf``
        outside a reduced-vocabulary head's tokens)."""
        return self._project(self._final_norm(x, fused))

    def _final_norm(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """The final RMSNorm: the hidden state the LM head (and Medusa heads) read."""
        norm = _dk_ops.rms_norm if fused else rms_norm
        return norm(x, self.norm, self.config.rms_norm_eps)

    def _project(self, h: torch.Tensor) -> torch.Tensor:
        """LM head on final-normed ``h [..., H]`` -> float32 logits ``[..., V]``."""
        logits = self._linear(h, self.lm_head)
        if self.head_token_ids is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), -math.inf)
        full[..., self.head_token_ids] = logits
        return full

    # ------------------------------------------------------------------ paged path ----
    def new_paged_cache(self, num_blocks: int, block_size: int = 16, kv_layout: str = "NHD") -> PagedKVCache:
        """Allocate an empty :class:`~decodekit.cache.PagedKVCache` for this model.

        Args:
            num_blocks: blocks in the pool (positive int); a sequence of ``n`` tokens holds
                ``ceil(n / block_size)`` of them.
            block_size: positions per block (positive int, default 16).
            kv_layout: ``"NHD"`` (default) or ``"HND"``.

        Memory: ``2 * num_layers * num_blocks * block_size * Hkv * D * 4`` bytes (float32), on the
        model's device, zero-filled.

        Raises:
            ValueError / TypeError: as :class:`~decodekit.cache.PagedKVCache`.
        """
        c = self.config
        return PagedKVCache(
            c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim, dtype=self.dtype, kv_layout=kv_layout,
            device=self.device,
        )  # fmt: skip

    def _rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE ``(cos, sin)`` tables ``[max_seq_len, D]`` of every position of the context
        (:func:`rope_table`, built at the first call)."""
        if self._rope is None:
            c = self.config
            cos, sin = rope_table(c.max_seq_len, c.head_dim, c.rope_theta)
            self._rope = (cos.to(self.device), sin.to(self.device))
        return self._rope

    def _rope_rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE ``(cos, sin)`` ``[B, T, D]`` for int64 ``positions [B, T]``, read from the tables."""
        cos, sin = self._rope_tables()
        return cos[positions], sin[positions]

    @torch.inference_mode()
    def forward_paged(
        self,
        input_ids: torch.Tensor,
        cache: PagedKVCache,
        seq_ids: List[int],
        *,
        all_logits: bool = False,
        return_hidden: bool = False,
        tree_parents: Optional[torch.Tensor] = None,
    ):
        """Run ``T`` new tokens for each of ``B`` sequences of a paged KV cache.

        Row ``b`` is sequence ``seq_ids[b]``, which holds ``n_b = cache.seq_lens(seq_ids)[b]``
        cached tokens (any ``n_b >= 0``, different per row): its new tokens take positions
        ``n_b .. n_b + T - 1`` (RoPE angles per row), their keys and values are appended to the
        cache with :meth:`PagedKVCache.append` in every layer (allocating blocks as needed), and
        each new token attends to the row's cached tokens and to the new ones up to itself through
        :func:`decodekit.paged_attention`. The lengths then advance by ``T``.

        Two paths with the same bits: with ``self.layer_op`` (the default; deterministic float32
        CPU model) each block is one :func:`decodekit.decoder_layer` call (all blocks, then the
        final norm and the LM head for the last positions' logits, in one C++ call when the
        arguments are plain tensors), whose kernels are those of the per-op path;
        with ``layer_op = False`` the block runs op by op in Python (the readable reference).

        Batch invariance (deterministic mode, the default): a row's logits are bit-identical
        whatever the other rows (their number, lengths and contents) and its position in the
        batch. Every step is per row: the embedding is a gather; RMSNorm reduces over the hidden
        dimension of each token only; RoPE reads a per-position table (:func:`rope_table`) and is
        elementwise; the weight products go through :func:`decodekit.linear` (a fixed order of
        operations per output element, whatever the number of rows); attention reads each
        sequence's own blocks; residual adds and SwiGLU are elementwise.

        Args:
            input_ids: ``[B, T]`` integer token ids (``B = len(seq_ids)``, ``T >= 1``).
            cache: a :class:`~decodekit.cache.PagedKVCache` from :meth:`new_paged_cache`
                (the model's layer count, KV heads, head dim and dtype).
            seq_ids: ``B`` distinct sequence ids of ``cache`` (from ``cache.add_sequence()``).
            all_logits: return the logits of every new position instead of the last one.
            return_hidden: also return the final-normed hidden states (the LM head's input,
                what Medusa heads read), with the logits' leading shape.
            tree_parents: ``None`` (the new tokens are a sequence), or int64 ``[T]`` / ``[B, T]``:
                the new tokens are a tree (Medusa verification): ``tree_parents[.., 0] == -1``
                (the root) and ``0 <= tree_parents[.., i] < i``. Token ``i`` then takes position
                ``n_b + depth(i)`` and attends to the cached tokens and to its ancestors and
                itself among the new ones (:func:`decodekit.paged_attention` with a tree mask);
                all ``T`` keys and values are appended at the next ``T`` slots (keep the
                accepted path with :meth:`PagedKVCache.compact`).

        Returns:
            float32 logits ``[B, V]`` for the last new position of each row, or ``[B, T, V]`` with
            ``all_logits=True``; with ``return_hidden``, the pair ``(logits, hidden)`` where
            ``hidden`` is float32 ``[B, H]`` or ``[B, T, H]``.

        Raises:
            TypeError: non-integer ``input_ids``; ``cache`` not a PagedKVCache.
            ValueError: a wrong shape, ``len(seq_ids) != B``, unknown or repeated sequence ids, a
                cache built for another model, or a row that would pass the model's context
                length (nothing is written then).
            decodekit.OutOfBlocksError: the pool has too few free blocks for the new tokens
                (nothing is written).

        Example:
            >>> cache = model.new_paged_cache(num_blocks=64)
            >>> a, b = cache.add_sequence(), cache.add_sequence()
            >>> la = model.forward_paged(torch.tensor([[1, 2, 3]]), cache, [a])        # [1, V]
            >>> lb = model.forward_paged(torch.tensor([[4, 5]]), cache, [b])           # [1, V]
            >>> nxt = torch.cat([la, lb]).argmax(-1)                                     # [2]
            >>> logits = model.forward_paged(nxt[:, None], cache, [a, b])               # [2, V]
        """
        c = self.config
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"forward_paged: input_ids must be a [B, T] integer tensor, got {type(input_ids).__name__}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"forward_paged: input_ids must be [B, T] with T >= 1, got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"forward_paged: input_ids must be an integer tensor, got {input_ids.dtype}")
        if not isinstance(cache, PagedKVCache):
            raise TypeError(
                f"forward_paged: cache must be a PagedKVCache (see new_paged_cache), got {type(cache).__name__}"
            )
        got = (cache.num_layers, cache.num_kv_heads, cache.head_dim, cache.dtype, str(cache.device))
        want = (c.num_layers, c.num_kv_heads, c.head_dim, self.dtype, str(self.device))
        if got != want:
            raise ValueError(
                f"forward_paged: the cache has (layers, kv heads, head dim, dtype, device) = {got}, the model "
                f"needs {want}"
            )
        B, T = input_ids.shape
        if isinstance(seq_ids, torch.Tensor):
            seq_ids = seq_ids.tolist()
        seq_ids = list(seq_ids)
        if len(seq_ids) != B:
            raise ValueError(f"forward_paged: input_ids has {B} rows but {len(seq_ids)} seq_ids were given")
        seq_ids, start = cache._lens_list(seq_ids)  # cached tokens per row; checks the ids
        if B and max(start) + T > c.max_seq_len:
            rows = [b for b in range(B) if start[b] + T > c.max_seq_len]
            raise ValueError(
                f"forward_paged: {T} new tokens after {[start[b] for b in rows]} cached ones "
                f"(rows {rows}) exceed the model's context length {c.max_seq_len}"
            )

        tree_mask = None
        if tree_parents is not None:
            depths, tree_mask = _tree_depths_and_mask(tree_parents, B, T)
            if bool((depths == torch.arange(T)).all()):  # a chain: the causal rule is its mask
                tree_mask = None
        input_ids = input_ids.to(device=self.device, dtype=torch.long)
        if tree_mask is None:  # built from Python ints (no small tensor ops per step)
            positions = torch.tensor([[s + t for t in range(T)] for s in start], dtype=torch.int64).view(B, T)
        else:  # a token's position is the row's length plus its depth in the tree
            positions = torch.tensor(start, dtype=torch.int64)[:, None] + depths  # [B, T]
        seq_lens = torch.tensor([s + T for s in start], dtype=torch.int64)  # including the new tokens
        scale = 1.0 / math.sqrt(c.head_dim)
        block_tables = None
        dev = self.device
        if self._graph_step_applies(T, tree_mask, all_logits, return_hidden):
            return self._graph_step(input_ids, cache, seq_ids, positions, seq_lens)
        if dev.type != "cpu":
            positions, seq_lens = positions.to(dev), seq_lens.to(dev)
            if tree_mask is not None:
                tree_mask = tree_mask.to(dev)
        x = self._embed(input_ids)  # [B, T, H]

        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        # Deterministic float32 CPU path: RMSNorm, RoPE and SwiGLU as decodekit kernels (one call
        # each instead of several PyTorch element-wise ops; rows stay independent). RoPE reads the
        # same per-position table either way, with the same float32 roundings.
        fused = (
            self.fused_layer_ops and self.deterministic and dev.type in ("cpu", "cuda") and self.dtype == torch.float32
        )
        if fused and self.layer_op and dev.type == "cpu" and self.weight_dtype == torch.float32:
            # Weights larger than the last-level cache stream through it at every step; the
            # quantized products then prefetch them non-temporally so that the cache keeps the KV
            # cache and the interpreter's objects (a hint: the same bits either way).
            stream = self._streams_weights()
            prev = _C._weight_stream(True) if stream else None
            try:
                return self._forward_layer_op(x, cache, seq_ids, B, T, positions, seq_lens, scale, tree_mask,
                                              all_logits, return_hidden, fused)  # fmt: skip
            finally:
                if stream:
                    _C._weight_stream(prev)
        if fused:
            cos_table, sin_table = self._rope_tables()
            flat_positions = positions.reshape(-1).contiguous()
        else:
            cos, sin = self._rope_rows(positions)  # [B, T, D]
        for i, block in enumerate(self.blocks):
            if fused:
                h = _dk_ops.rms_norm(x, block.attn_norm, c.rms_norm_eps)
                qkv = self._linear(h, block.wqkv)  # [B, T, q + 2 kv]
                _dk_ops.rope_(
                    qkv.view(B * T, -1), c.num_heads + c.num_kv_heads, cos_table, sin_table, flat_positions
                )  # q and k heads are adjacent
                q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
                q = q.view(B, T, c.num_heads, c.head_dim)
                k = k.view(B, T, c.num_kv_heads, c.head_dim)
            else:
                h = rms_norm(x, block.attn_norm, c.rms_norm_eps)
                q, k, v = self._linear(h, block.wqkv).split((q_size, kv_size, kv_size), dim=-1)
                q = _apply_rope_rows(q.view(B, T, c.num_heads, c.head_dim), cos, sin)
                k = _apply_rope_rows(k.view(B, T, c.num_kv_heads, c.head_dim), cos, sin)
            cache.append(i, seq_ids, k, v.reshape(B, T, c.num_kv_heads, c.head_dim))
            if block_tables is None:  # the first append allocated the blocks of the new tokens
                block_tables = cache.block_table(seq_ids, torch.int64).to(dev)
                seq_lens_i64 = seq_lens.to(torch.int64).contiguous()
            # The tables and lengths come from the cache itself and the shapes from the model:
            # the kernel is called directly, without the wrapper's per-call checks.
            attn = _dk_ops.paged_attention(
                q.contiguous(), cache.k[i], cache.v[i], block_tables, seq_lens_i64, scale, cache.kv_layout, tree_mask
            )  # [B, T, Hq, D]
            x = x + self._linear(attn.reshape(B, T, q_size), block.wo)

            if fused:
                h = _dk_ops.rms_norm(x, block.ffn_norm, c.rms_norm_eps)
                x = x + self._linear(_dk_ops.silu_and_mul(self._linear(h, block.w_gate_up)), block.w_down)
            else:
                h = rms_norm(x, block.ffn_norm, c.rms_norm_eps)
                gate, up = self._linear(h, block.w_gate_up).chunk(2, dim=-1)
                x = x + self._linear(F.silu(gate) * up, block.w_down)
        return self._advance_and_head(x, cache, seq_ids, T, all_logits, return_hidden, fused)

    def _decode_step(self, tokens: List[int], cache: PagedKVCache, seq_ids: List[int], keepdim: bool = False):
        """``forward_paged(torch.tensor(tokens).view(-1, 1), cache, seq_ids)``: one new token per
        row (``tokens``: a list of ``B`` ints, ``seq_ids``: a list of ``B`` ints), the float32
        logits ``[B, V]`` of the new positions (``[B, 1, V]`` with ``keepdim``), with the same
        bits, the same cache contents and the same errors.

        The decode loop's plain step (and a draft model's). Where forward_paged would run its
        one C++ layer call (a deterministic float32 CPU model with the layer op), the same call
        also runs the final norm and the LM head (a head over part of the vocabulary scatters its
        logits, -inf elsewhere, as ``_project`` does), and the step's ids, positions, lengths,
        slots and block table go to it as Python ints
        (``_C._decode_step_fast``, which also looks up the embedding rows) instead of as small
        tensors built here, and the call's other arguments are kept on the cache between steps
        (rebuilt after any attribute of the model or of a block is set). Right after a step
        has streamed the weights through the caches, each small torch op or check in Python
        costs microseconds to tens of microseconds of cache misses. Anything else, and anything
        the C++ entry declines (an id outside the vocabulary, say), takes forward_paged."""
        fast = None
        if isinstance(cache, PagedKVCache):  # (else forward_paged's TypeError)
            args = cache.__dict__.get("_step_args")
            if args is None or args[0] is not self or args[1] != _EDITS[0]:
                fast = self._step_args(cache)  # (may build the RoPE tables: an attribute set)
                args = cache.__dict__["_step_args"] = (self, _EDITS[0], fast)
            fast = args[2]
        if fast is not None and type(tokens) is list and type(seq_ids) is list and len(tokens) == len(seq_ids):
            lens, tables, V = cache._lens, cache._tables, self.config.vocab_size
            if (
                all(type(s) is int and s in lens for s in seq_ids)
                and len(set(seq_ids)) == len(seq_ids)
                and all(type(t) is int and 0 <= t < V for t in tokens)
            ):  # (else forward_paged raises its error before anything is reserved)
                start = [lens[s] for s in seq_ids]
                if start and max(start) < self.config.max_seq_len:
                    bs = cache.block_size
                    rows = [tables[s] for s in seq_ids]
                    held = None
                    if any(len(t) * bs <= n for t, n in zip(rows, start)):
                        held = [len(t) for t in rows]
                        cache._reserve(seq_ids, [1] * len(seq_ids))  # OutOfBlocksError: nothing written
                    # (the embedding's and the head's blocks are read now: a QuantizedWeight's may be replaced)
                    embed = (*layer_weight(fast.embed), *fast.embed_shape)
                    head = (self.norm, *layer_weight(fast.lm_head), fast.lm_head.shape[0], *fast.reduced_head)
                    logits = False
                    try:
                        logits = _decode_step_fast(
                            tokens, start, rows, bs, embed, cache.k, cache.v, fast.cos, fast.sin,
                            [block.op_args() for block in self.blocks], *fast.shapes, cache.kv_layout, fast.plan, head,
                            fast.stream, keepdim,
                        )  # fmt: skip
                    finally:
                        if logits is False and held is not None:  # nothing written: the blocks go back
                            cache._unreserve(seq_ids, held)
                    if logits is not False:
                        cache._advance_reserved(seq_ids, 1)
                        return logits
        logits = self.forward_paged(torch.tensor(tokens, dtype=torch.long).view(-1, 1), cache, seq_ids)
        return logits[:, None] if keepdim else logits

    def _step_args(self, cache: PagedKVCache) -> Optional[_StepArgs]:
        """What ``_C._decode_step_fast`` takes from step to step: (embedding, RoPE tables, shapes,
        the cache's plan, the LM head, the embedding's (N, K), the weight stream, and for a head
        over part of the vocabulary its token ids and V), or None where forward_paged would not
        take its one C++ layer call. The embedding's and the head's tensors (a QuantizedWeight's
        blocks) are read at each step."""
        c = self.config
        if not (
            self.layer_op
            and self.fused_layer_ops
            and self.deterministic
            and isinstance(cache, PagedKVCache)
            and self.device.type == "cpu"
            and self.dtype == torch.float32
            and self.weight_dtype == torch.float32
            and cache.device.type == "cpu"
            and cache.dtype == torch.float32
            and (cache.num_layers, cache.num_kv_heads, cache.head_dim) == (c.num_layers, c.num_kv_heads, c.head_dim)
        ):
            return None
        plan = cache.__dict__.get("_layers_plan")
        if plan is None:
            plan = cache.__dict__["_layers_plan"] = _C._DecoderLayersPlan()
        cos_table, sin_table = self._rope_tables()
        shapes = (c.num_heads, c.num_kv_heads, c.intermediate_size, c.rms_norm_eps, 1.0 / math.sqrt(c.head_dim))
        stream = self._streams_weights()
        reduced = () if self.head_token_ids is None else (self.head_token_ids, c.vocab_size)
        embed_shape = (c.vocab_size, c.hidden_size)
        return _StepArgs(self.embed, cos_table, sin_table, shapes, plan, self.lm_head, embed_shape, stream, reduced)

    # ------------------------------------------------------------- CUDA graphs ----
    def _graph_step_applies(self, T, tree_mask, all_logits, return_hidden) -> bool:
        """Whether forward_paged replays a captured decode step: a deterministic float32 model on
        a GPU with ``cuda_graphs``, one new token per row, no tree, the last logits only."""
        return (
            self.cuda_graphs
            and self.device.type == "cuda"
            and self.deterministic
            and self.fused_layer_ops
            and self.dtype == torch.float32
            and T == 1
            and tree_mask is None
            and not all_logits
            and not return_hidden
            and _graphs_capturable()
        )

    def _graph_step(self, input_ids, cache, seq_ids, positions, seq_lens) -> torch.Tensor:
        """forward_paged's decode step through one of the cache's captured graphs: the step's
        slots are reserved, the host-side values (ids, positions, lengths, block table, slots)
        copied into the static inputs of the graph for the smallest bucket of rows holding B
        (1, 2, 4, 8, then multiples of 8; the padding rows write nothing and read nothing), then
        the graph replays the per-op path's kernels (the same ops, so the same bits). A graph is
        captured at its bucket's first use and kept with the cache (it holds the cache's and
        the weights' addresses; :meth:`to` retires it)."""
        B = input_ids.size(0)
        slots = cache.slot_mapping(seq_ids, 1)  # reserves the step's blocks (OutOfBlocksError: nothing written)
        tables = cache.block_table(seq_ids, torch.int64)
        bucket = _graph_bucket(B)
        graphs = cache.__dict__.setdefault("_decode_graphs", {})
        key = (bucket, id(self), self._weights_version)
        g = graphs.get(key)
        if g is None or g.model is not self:
            g = graphs[key] = _DecodeGraph(self, cache, bucket, capture=self.device.type == "cuda")
        try:
            logits = g.run(cache, input_ids, positions, seq_lens, tables, slots)
        except BaseException:
            graphs.pop(key, None)  # a failed capture is not retried from a half-built graph
            raise
        cache.advance(seq_ids, 1)
        return logits

    def _decode_body(self, cache, ids, positions, seq_lens, tables, slots) -> torch.Tensor:
        """The decode step (T = 1) on static tensors, what a captured graph replays: the per-op
        path of forward_paged (decodekit's rms_norm, linear, rope_, paged KV append, paged
        attention, silu_and_mul) and the head; float32 logits ``[B, V]``."""
        c = self.config
        B = ids.size(0)
        scale = 1.0 / math.sqrt(c.head_dim)
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        cos_table, sin_table = self._rope_tables()
        flat_positions = positions.view(-1)
        x = self._embed(ids)  # [B, 1, H]
        for i, block in enumerate(self.blocks):
            h = _dk_ops.rms_norm(x, block.attn_norm, c.rms_norm_eps)
            qkv = self._linear(h, block.wqkv)  # [B, 1, q + 2 kv]
            _dk_ops.rope_(qkv.view(B, -1), c.num_heads + c.num_kv_heads, cos_table, sin_table, flat_positions)
            q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
            _dk_ops.append_paged_kv_cache(
                cache.k[i], cache.v[i], k.reshape(B, c.num_kv_heads, c.head_dim),
                v.reshape(B, c.num_kv_heads, c.head_dim), slots, cache.kv_layout,
            )  # fmt: skip
            attn = _dk_ops.paged_attention(
                q.reshape(B, 1, c.num_heads, c.head_dim).contiguous(), cache.k[i], cache.v[i], tables, seq_lens,
                scale, cache.kv_layout, None,
            )  # fmt: skip
            x = x + self._linear(attn.reshape(B, 1, q_size), block.wo)
            h = _dk_ops.rms_norm(x, block.ffn_norm, c.rms_norm_eps)
            x = x + self._linear(_dk_ops.silu_and_mul(self._linear(h, block.w_gate_up)), block.w_down)
        return self._head(x[:, -1], True)

    def _advance_and_head(self, x, cache, seq_ids, T, all_logits, return_hidden, fused):
        """forward_paged's end: the cache lengths move by ``T``, then the final norm and the head on
        the last position (every position with ``all_logits``), with the hidden states if asked."""
        cache.advance(seq_ids, T)
        if not all_logits:
            x = x[:, -1]
        if return_hidden:
            h = self._final_norm(x, fused)
            return self._project(h), h
        return self._head(x, fused)

    def _forward_layer_op(self, x, cache, seq_ids, B, T, positions, seq_lens, scale, tree_mask, all_logits,
                          return_hidden, fused):  # fmt: skip
        """forward_paged's layer-op path (``self.layer_op``, deterministic float32 CPU): every block
        in one C++ call (or one decoder_layer op per block), then the final norm and the head."""
        c = self.config
        # The same kernels again, one decoder_layer call per block (no PyTorch op inside): the
        # step's slots are reserved before the first layer (OutOfBlocksError: nothing written),
        # the tables and lengths come from the cache and the shapes from the model; a tree's
        # mask goes to the attention of every block.
        cos_table, sin_table = self._rope_tables()
        slots = cache.slot_mapping(seq_ids, T).view(B, T)
        block_tables = cache.block_table(seq_ids, torch.int64)
        layers = [block.op_args() for block in self.blocks]
        common = (c.num_heads, c.num_kv_heads, c.intermediate_size, c.rms_norm_eps, scale, cache.kv_layout)
        # The whole loop in one C++ call (the same kernel and checks); False: nothing was
        # written and the op itself runs (e.g. under a torch function mode), or raises. The
        # cache keeps what the call checked about the blocks for the next steps (its "plan":
        # it holds the blocks' arguments, and so this model's weights, while the cache lives).
        plan = cache.__dict__.get("_layers_plan")
        if plan is None:
            plan = cache.__dict__["_layers_plan"] = _C._DecoderLayersPlan()
        # The last positions' logits: the same call also runs the final norm and the LM head (the
        # kernels of _head's op path on the same rows, so the same bits); returns the logits.
        head = None
        if not all_logits and not return_hidden and self.head_token_ids is None and fused:
            head = (self.norm, *layer_weight(self.lm_head), self.lm_head.shape[0])
        done = _decoder_layers_fast(
            x, cache.k, cache.v, slots, block_tables, seq_lens, positions, cos_table, sin_table, layers, *common,
            tree_mask, plan, head,
        )  # fmt: skip
        if done is False:
            for i, args in enumerate(layers):
                _dk_ops.decoder_layer(
                    x, cache.k[i], cache.v[i], slots, block_tables, seq_lens, positions, cos_table, sin_table,
                    *args, *common, tree_mask,
                )  # fmt: skip
        elif head is not None:
            cache._advance_reserved(seq_ids, T)  # slot_mapping reserved the blocks
            return done
        return self._advance_and_head(x, cache, seq_ids, T, all_logits, return_hidden, fused)

    def _streams_weights(self) -> bool:
        """Whether a forward reads more weight bytes than the CPU's last-level cache holds (then
        the quantized products prefetch them non-temporally; computed once per set of weights)."""
        if self._stream_weights is None:
            ws = [self.lm_head] + [getattr(b, n) for b in self.blocks for n in _BLOCK_WEIGHTS]
            total = sum(w.nbytes if isinstance(w, QuantizedWeight) else w.numel() * w.element_size() for w in ws)
            self._stream_weights = total > _C._last_level_cache_bytes()
        return self._stream_weights

    def to(self, device: torch.device | str, dtype: Optional[torch.dtype] = None) -> LlamaModel:
        """Move every weight to ``device`` in place; returns ``self``.

        Args:
            device: the target device (``"cpu"``, ``"cuda"``, ...).
            dtype: ``None`` (keep), or torch.float32 / torch.bfloat16 / torch.float16 for the
                weight matrices (embedding, projections, LM head); the norms, activations,
                logits and KV cache stay float32 (:attr:`dtype`). Products with bfloat16 /
                float16 matrices are converted to float32 at each product in deterministic mode
                (rows bit-exact whatever the batch, as with float32 weights) and used as they
                are in fast mode (``torch.nn.functional.linear``; float16 then rounds the
                activations too and overflows where they pass 65504: prefer bfloat16).

        Raises:
            ValueError: QuantizedWeight matrices (CPU kernels only) and a device other than
            the CPU, or a ``dtype`` for them; load with ``dequantize=True`` for another device.
            TypeError: another ``dtype``.
        """
        device, dtype = model_device_and_dtype(device, dtype, "LlamaModel.to")
        quantized = [self.embed, self.lm_head] + [getattr(b, n) for b in self.blocks for n in _BLOCK_WEIGHTS]
        if torch.device(device).type != "cpu" and any(isinstance(w, QuantizedWeight) for w in quantized):
            raise ValueError(
                f"LlamaModel.to: quantized weights run on the CPU only; load the model with dequantize=True "
                f"to move it to {device}"
            )
        if any(isinstance(w, QuantizedWeight) for w in quantized):
            if dtype is not None:
                raise ValueError(
                    "LlamaModel.to: quantized weights keep their blocks; load with dequantize=True for a dtype"
                )
            return self
        tied = self.lm_head is self.embed
        self.embed = self.embed.to(device, dtype)
        self.lm_head = self.embed if tied else self.lm_head.to(device, dtype)
        if self.head_token_ids is not None:
            self.head_token_ids = self.head_token_ids.to(device)
        self.norm = self.norm.to(device)
        for block in self.blocks:
            for name in _BLOCK_WEIGHTS:
                w = getattr(block, name)
                setattr(block, name, w.to(device, dtype if w.dim() == 2 else None))  # norms stay float32
        self._rope = None
        self._stream_weights = None
        self._weights_version += 1
        return self

    def num_parameters(self) -> int:
        """Number of distinct weight elements (a tied LM head is counted once)."""
        n = self.embed.numel() + self.norm.numel()
        if self.lm_head is not self.embed:
            n += self.lm_head.numel()
        return n + sum(getattr(b, name).numel() for b in self.blocks for name in _BLOCK_WEIGHTS)


_WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_device_and_dtype(device, dtype, name: str):
    """``(torch.device, dtype or None)`` from a ``device`` (None, a string or a torch.device: the
    CPU or CUDA) and a weight ``dtype`` (None, a torch dtype or its name: float32, bfloat16,
    float16); ValueError / TypeError naming the argument otherwise."""
    if device is None:
        dev = torch.device("cpu")
    else:
        dev = parse_device(device, name)
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"{name}: decodekit has kernels for 'cpu' and 'cuda' devices, got {device!r}")
        if dev.type == "cpu":
            dev = torch.device("cpu")  # one CPU, whatever the index
    if isinstance(dtype, str) and dtype in _WEIGHT_DTYPES:
        dtype = _WEIGHT_DTYPES[dtype]
    if dtype is not None and dtype not in _WEIGHT_DTYPES.values():
        raise TypeError(
            f"{name}: dtype must be None, torch.float32, torch.bfloat16 or torch.float16 (or their names), "
            f"got {dtype!r}"
        )
    return dev, dtype


def _graphs_capturable() -> bool:
    """CUDA graphs need a capturing torch (and no capture already in progress on this stream)."""
    return torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing()


def _graph_bucket(B: int) -> int:
    """The rows of the captured graph that serves a batch of B: 1, 2, 4, 8, then multiples of 8."""
    return 1 << (B - 1).bit_length() if B <= 8 else -(-B // 8) * 8


class _DecodeGraph:
    """A CUDA graph of one model's decode step (T = 1) for ``R`` rows of one paged cache.

    Static inputs on the device: ids ``[R, 1]``, positions ``[R, 1]``, lengths ``[R]``, a block
    table ``[R, W]`` as wide as the model's context (``W = ceil(max_seq_len / block_size)``, -1
    padded, so that no step needs a wider one) and the slots ``[R]``. A batch of ``B <= R``
    rows fills the first ``B``; the others are padding (slot -1: no key or value written;
    length 0: no position read; their logits are dropped). :meth:`run` copies the step's values
    in and replays; the first call warms up on a side stream (a real step: it writes the same
    keys and values as the replay that follows) and captures on the model's device, into a
    memory pool shared by the cache's graphs (their outputs are copied out after each replay).
    With ``capture=False`` the body runs eagerly on the static inputs (how the CPU tests check
    it). The cache is passed to each call, not kept (the cache keeps its graphs).
    """

    def __init__(self, model: LlamaModel, cache: PagedKVCache, rows: int, capture: bool = True) -> None:
        dev = model.device
        self.model, self.capture, self.rows = model, capture, rows
        width = -(-model.config.max_seq_len // cache.block_size)
        self.ids = torch.zeros((rows, 1), dtype=torch.int64, device=dev)
        self.positions = torch.zeros((rows, 1), dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros((rows,), dtype=torch.int64, device=dev)
        self.tables = torch.full((rows, width), -1, dtype=torch.int64, device=dev)
        self.slots = torch.full((rows,), -1, dtype=torch.int64, device=dev)
        self.graph = None
        self.logits: Optional[torch.Tensor] = None

    def _body(self, cache) -> torch.Tensor:
        return self.model._decode_body(cache, self.ids, self.positions, self.seq_lens, self.tables, self.slots)

    def run(self, cache, ids, positions, seq_lens, tables, slots) -> torch.Tensor:
        """The step's logits ``[B, V]`` for the ``B`` rows given (a new tensor)."""
        B, w = ids.size(0), tables.size(1)
        self.ids[:B].copy_(ids, non_blocking=True)
        self.positions[:B].copy_(positions, non_blocking=True)
        self.seq_lens[:B].copy_(seq_lens, non_blocking=True)
        self.tables[:B, w:].fill_(-1)
        self.tables[:B, :w].copy_(tables, non_blocking=True)
        self.slots[:B].copy_(slots, non_blocking=True)
        if B < self.rows:  # padding rows: id 0 at position 0, nothing written, nothing read
            self.ids[B:].zero_()
            self.positions[B:].zero_()
            self.seq_lens[B:].zero_()
            self.tables[B:].fill_(-1)
            self.slots[B:].fill_(-1)
        if not self.capture:  # the same static inputs run eagerly (CPU tests of this path)
            return self._body(cache)[:B].clone()
        dev = self.ids.device
        with torch.cuda.device(dev):
            if self.graph is None:
                self.model._rope_tables()  # built before the capture (a graph allocates nothing it keeps)
                side = torch.cuda.Stream(device=dev)
                side.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(side):
                    self._body(cache)  # warm-up: the step itself (the replay writes the same values again)
                torch.cuda.current_stream(dev).wait_stream(side)
                pool = cache.__dict__.get("_decode_graph_pool")
                if pool is None:
                    pool = cache.__dict__["_decode_graph_pool"] = torch.cuda.graph_pool_handle()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=torch.cuda.Stream(device=dev)):
                    self.logits = self._body(cache)
                self.graph = graph
            self.graph.replay()
            return self.logits[:B].clone()


def _tree_depths_and_mask(parents, B: int, T: int):
    """``(depths [B, T] int64, ancestor-or-self mask [B, T, T] bool)`` of ``parents`` (``[T]`` or
    ``[B, T]``), checked: the root first with parent -1, every other parent before its child."""
    if not isinstance(parents, torch.Tensor) or parents.dtype.is_floating_point or parents.dtype == torch.bool:
        raise TypeError("forward_paged: tree_parents must be an int64 [T] or [B, T] tensor")
    p = parents.to(torch.int64)
    if p.dim() == 1:
        p = p[None]
    if p.dim() != 2 or p.shape[1] != T or p.shape[0] not in (1, B):
        raise ValueError(f"forward_paged: tree_parents must be [T={T}] or [B={B}, T={T}], got {tuple(parents.shape)}")
    depths, masks = [], []
    for row in p.tolist():  # T is small (a tree's nodes): plain lists are the fastest here
        if row[0] != -1 or any(not 0 <= row[i] < i for i in range(1, T)):
            raise ValueError(
                "forward_paged: tree_parents needs -1 at the root (node 0) and 0 <= parent < node elsewhere"
            )
        depth, anc = [0] * T, [[0] * T for _ in range(T)]
        anc[0][0] = 1
        for i in range(1, T):
            depth[i] = depth[row[i]] + 1
            anc[i] = list(anc[row[i]])
            anc[i][i] = 1
        depths.append(depth)
        masks.append(anc)
    depth_t = torch.tensor(depths, dtype=torch.int64).expand(B, T)
    mask_t = torch.tensor(masks, dtype=torch.bool).expand(B, T, T).contiguous()
    return depth_t, mask_t


def _check_shape(name: str, tensor: torch.Tensor, shape: tuple) -> None:
    if not isinstance(tensor, (torch.Tensor, QuantizedWeight)):
        raise TypeError(f"LlamaModel: weight {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"LlamaModel: weight {name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
