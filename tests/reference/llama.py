"""The contiguous-cache forward of the built-in Llama model in plain PyTorch (SDPA), kept in the
tests as the transformers-parity reference: the package's one forward is the paged one
(:meth:`decodekit.models.llama.LlamaModel.forward_paged`). Functions take the model as ``self``:
``forward(model, ids, new_cache(model, 1, n))``."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from decodekit.models.llama import rms_norm, rope_cos_sin


class KVCache:
    """Contiguous key/value cache: per layer, ``k`` and ``v`` of shape ``[B, max_seq_len, Hkv, D]``.

    All ``B`` rows hold the same number of positions, ``length``; positions ``[0, length)`` are
    valid and later ones are uninitialised memory that is never read. The model writes the keys
    and values of new tokens at ``[length, length + T)`` and then advances ``length``.

    Args:
        num_layers, batch_size, max_seq_len, num_kv_heads, head_dim: the sizes above (positive ints).
        dtype: storage dtype (default float32).
        device: storage device (default CPU).

    Memory: ``2 * num_layers * B * max_seq_len * Hkv * D * dtype.itemsize`` bytes.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_seq_len: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        for name, value in (
            ("num_layers", num_layers),
            ("batch_size", batch_size),
            ("max_seq_len", max_seq_len),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVCache: {name} must be a positive int, got {value!r}")
        shape = (batch_size, max_seq_len, num_kv_heads, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0

    @property
    def batch_size(self) -> int:
        """Rows ``B``."""
        return self.k[0].shape[0]

    @property
    def max_seq_len(self) -> int:
        """Positions each row can hold."""
        return self.k[0].shape[1]

    def reset(self) -> None:
        """Forget every cached position (the memory is kept for reuse)."""
        self.length = 0


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each head of ``x`` by the RoPE angles (rotate-half layout).

    Args:
        x: ``[B, T, heads, D]`` float32.
        cos, sin: ``[T, D]`` from :func:`rope_cos_sin`.

    Returns:
        ``[B, T, heads, D]``: ``x * cos + rotate_half(x) * sin`` with
        ``rotate_half([a, b]) = [-b, a]`` (``a``, ``b`` the two halves of the head).
    """
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    return x * cos + rotated * sin


def new_cache(self, batch_size: int = 1, max_seq_len: Optional[int] = None) -> KVCache:
    """An empty :class:`KVCache` for model ``self`` (``max_seq_len`` defaults to the context)."""
    c = self.config
    max_seq_len = c.max_seq_len if max_seq_len is None else max_seq_len
    if isinstance(max_seq_len, int) and max_seq_len > c.max_seq_len:
        raise ValueError(f"new_cache: max_seq_len={max_seq_len} exceeds the model's context length {c.max_seq_len}")
    return KVCache(
        c.num_layers, batch_size, max_seq_len, c.num_kv_heads, c.head_dim, dtype=self.dtype, device=self.device
    )


@torch.inference_mode()
def forward(self, input_ids: torch.Tensor, cache: KVCache, *, all_logits: bool = False) -> torch.Tensor:
    """Run ``T`` new tokens per row after the ``cache.length`` cached ones.

    Keys and values of the new tokens are written to the cache at positions
    ``[cache.length, cache.length + T)`` and ``cache.length`` advances by ``T``.

    Args:
        input_ids: ``[B, T]`` integer token ids (``B = cache.batch_size``, ``T >= 1``).
        cache: the :class:`KVCache` of this sequence batch.
        all_logits: return the logits of every new position instead of the last one.

    Returns:
        float32 logits ``[B, V]`` for the last new position, or ``[B, T, V]`` with
        ``all_logits=True``.

    Raises:
        ValueError: on a wrong shape, or when the cache has no room for ``T`` more positions.
    """
    c = self.config
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"forward: input_ids must be [B, T] with T >= 1, got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"forward: input_ids must be an integer tensor, got {input_ids.dtype}")
    B, T = input_ids.shape
    if B != cache.batch_size:
        raise ValueError(f"forward: input_ids has {B} rows but the cache has {cache.batch_size}")
    start = cache.length
    end = start + T
    if end > cache.max_seq_len:
        raise ValueError(f"forward: {T} new tokens after {start} cached ones exceed the cache size {cache.max_seq_len}")

    input_ids = input_ids.to(device=self.device, dtype=torch.long)
    x = self._embed(input_ids)  # [B, T, H] (F.embedding, or the rows of QuantizedWeight blocks)
    positions = torch.arange(start, end, device=self.device)
    cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta)  # [T, D]
    if T == 1:  # one query sees the whole cache
        mask, causal = None, False
    elif start == 0:  # prefill from scratch: plain causal mask
        mask, causal = None, True
    else:  # new query i sees cached keys and new keys <= i
        mask = torch.ones(T, end, dtype=torch.bool, device=self.device).tril(diagonal=start)
        causal = False

    q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    for i, block in enumerate(self.blocks):
        h = rms_norm(x, block.attn_norm, c.rms_norm_eps)
        q, k, v = self._linear(h, block.wqkv).split((q_size, kv_size, kv_size), dim=-1)
        q = apply_rope(q.view(B, T, c.num_heads, c.head_dim), cos, sin)
        k = apply_rope(k.view(B, T, c.num_kv_heads, c.head_dim), cos, sin)
        cache.k[i][:, start:end] = k
        cache.v[i][:, start:end] = v.view(B, T, c.num_kv_heads, c.head_dim)
        keys = cache.k[i][:, :end].transpose(1, 2)  # [B, Hkv, L, D]
        values = cache.v[i][:, :end].transpose(1, 2)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask, is_causal=causal, enable_gqa=True
        )  # [B, Hq, T, D]
        x = x + self._linear(attn.transpose(1, 2).reshape(B, T, q_size), block.wo)

        h = rms_norm(x, block.ffn_norm, c.rms_norm_eps)
        gate, up = self._linear(h, block.w_gate_up).chunk(2, dim=-1)
        x = x + self._linear(F.silu(gate) * up, block.w_down)
    cache.length = end

    if not all_logits:
        x = x[:, -1]
    return self._head(x)


def prefill(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run a prompt into ``cache`` (which is reset first) and return its last logits.

    Args:
        input_ids: ``[B, T]`` (or ``[T]``, taken as one row) integer prompt ids, ``T >= 1``.
        cache: a :class:`KVCache` from :meth:`new_cache` with ``B`` rows and room for
            ``T`` positions plus the tokens to be generated.

    Returns:
        float32 logits ``[B, V]`` for the last prompt position.

    Raises:
        ValueError: as :meth:`forward`.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    cache.reset()
    return forward(self, input_ids, cache)


def decode_step(self, token_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run one new token per row and return the next-token logits.

    Args:
        token_ids: ``[B]`` (or ``[B, 1]``) integer ids of the tokens just chosen.
        cache: the :class:`KVCache` filled by :meth:`prefill` and earlier steps.

    Returns:
        float32 logits ``[B, V]``.
    """
    if token_ids.dim() == 1:
        token_ids = token_ids[:, None]
    return forward(self, token_ids, cache)
