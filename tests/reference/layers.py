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
