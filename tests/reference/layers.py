"""float64 references of the layers family: RMSNorm, SwiGLU, RoPE and linear."""

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
