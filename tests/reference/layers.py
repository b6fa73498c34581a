"""float64 references of the layers family: RMSNorm, SwiGLU, RoPE, linear, and one decoder block
composed of them."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dimension, in float64."""
    x = x.double()
    return weight.double() * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :I]) * x[..., I:]`` in float64."""
    g, u = x.double().chunk(2, dim=-1)
    return g * torch.sigmoid(g) * u


def rope(
    x: torch.Tensor, num_heads: int, cos_table: torch.Tensor, sin_table: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Rotate-half RoPE of the first ``num_heads`` heads of ``x [N, C]`` (a new float64 tensor)."""
    out = x.double().clone()
    D = cos_table.size(1)
    for n in range(x.size(0)):
        c, s = cos_table[positions[n]].double(), sin_table[positions[n]].double()
        for h in range(num_heads):
            v = out[n, h * D : (h + 1) * D].clone()
            rot = torch.cat((-v[D // 2 :], v[: D // 2]))
            out[n, h * D : (h + 1) * D] = v * c + rot * s
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """``x @ weight.T + bias`` in float64."""
    y = x.double() @ weight.double().T
    return y + bias.double() if bias is not None else y


def decoder_layer(
    x,
    k_cache,
    v_cache,
    slot_mapping,
    block_tables,
    seq_lens,
    positions,
    cos_table,
    sin_table,
    weights,
    *,
    num_heads: int,
    num_kv_heads: int,
    eps: float,
    scale: float,
    kv_layout: str = "NHD",
    tree_mask=None,
):
    """One Llama block of the paged forward in float64 (new tensors; nothing is modified).

    ``weights``: ``(attn_norm, wqkv, wo, ffn_norm, w_gate_up, w_down)`` as float tensors (a
    quantized weight dequantized first). ``x [B, T, H]``; ``slot_mapping``, ``positions`` ``[B, T]``.
    Returns ``(x, k_cache, v_cache)`` in float64: the residual stream after the block and the
    caches with the new keys and values. ``tree_mask``: bool ``[B, T, T]`` for new tokens that
    form a tree (the attention reference's mask), or None for the causal rule."""
    from .attention import paged_attention
    from .kv_cache import append_paged_kv_cache

    attn_norm, wqkv, wo, ffn_norm, w_gate_up, w_down = weights
    B, T, H = x.shape
    D = cos_table.size(1)
    q_size, kv_size = num_heads * D, num_kv_heads * D
    x = x.double().reshape(B * T, H)
    qkv = linear(rms_norm(x, attn_norm, eps), wqkv)
    qkv = rope(qkv, num_heads + num_kv_heads, cos_table, sin_table, positions.reshape(-1))
    q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
    kc, vc = append_paged_kv_cache(
        k_cache.double(),
        v_cache.double(),
        k.reshape(-1, num_kv_heads, D),
        v.reshape(-1, num_kv_heads, D),
        slot_mapping.reshape(-1),
        kv_layout,
    )
    attn = paged_attention(
        q.reshape(B, T, num_heads, D),
        kc,
        vc,
        block_tables,
        seq_lens,
        scale=scale,
        kv_layout=kv_layout,
        tree_mask=tree_mask,
        out_dtype=torch.float64,
    )
    x = x + linear(attn.reshape(B * T, q_size), wo)
    x = x + linear(silu_and_mul(linear(rms_norm(x, ffn_norm, eps), w_gate_up)), w_down)
    return x.reshape(B, T, H), kc, vc


# GGML block formats (ggml-common.h): block_q4_1 = {half d, half m, uint8 qs[16]},
# block_q8_0 = {half d, int8 qs[32]}; 32 weights per block.
GGML_BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}


def dequantize_blocks(blocks, block_type: str, N: int, K: int) -> torch.Tensor:
    """float32 ``[N, K]`` values of GGML blocks, computed in float64 and rounded once.

    Q4_1: weight ``j`` of a block is ``d * (qs[j] & 15) + m`` and weight ``j + 16`` is
    ``d * (qs[j] >> 4) + m``; Q8_0: ``d * qs[j]``. ``d * q + m`` is exact in float64 for
    binary16 ``d``, ``m`` of the usual range, so the single rounding to float32 is the correctly
    rounded value (what a fused multiply-add gives in float32).
    """
    import numpy as np

    raw = np.asarray(blocks, dtype=np.uint8).reshape(N, K // 32, GGML_BLOCK_BYTES[block_type])
    d = raw[..., 0:2].copy().view("<f2").astype(np.float64)  # [N, nb, 1]
    if block_type == "q4_1":
        m = raw[..., 2:4].copy().view("<f2").astype(np.float64)
        qs = raw[..., 4:20].astype(np.int64)
        q = np.concatenate((qs & 0xF, qs >> 4), axis=-1).astype(np.float64)
        w = d * q + m
    elif block_type == "q8_0":
        q = raw[..., 2:34].copy().view(np.int8).astype(np.float64)
        w = d * q
    else:
        raise ValueError(block_type)
    return torch.from_numpy(w.reshape(N, K).astype(np.float32))


def random_blocks(block_type: str, N: int, K: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 blocks of a random ``[N, K]`` weight with scales of a trained model's size
    (d in [2^-10, 2^-5), m in (-2^-3, 2^-3)); every nibble / byte value occurs."""
    import numpy as np

    nb = N * K // 32
    raw = torch.randint(0, 256, (nb, GGML_BLOCK_BYTES[block_type]), generator=generator, dtype=torch.uint8)
    scale = (torch.rand(nb, generator=generator, dtype=torch.float64) * 31 + 1) / 1024
    halves = scale.numpy().astype(np.float16)
    raw[:, 0:2] = torch.from_numpy(halves.view(np.uint8).reshape(nb, 2))
    if block_type == "q4_1":
        mins = ((torch.rand(nb, generator=generator, dtype=torch.float64) - 0.5) / 4).numpy().astype(np.float16)
        raw[:, 2:4] = torch.from_numpy(mins.view(np.uint8).reshape(nb, 2))
    return raw.reshape(-1)
