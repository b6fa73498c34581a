"""Per-token layer kernels: rms_norm, silu_and_mul, rope_ (float64 references, batch invariance)."""

from __future__ import annotations

import math

import pytest
import torch

from decodekit import rms_norm, rope_, silu_and_mul
from decodekit.models.llama import rope_table


@pytest.mark.parametrize("H", [576, 37, 16, 1])
def test_rms_norm_matches_float64(H):
    g = torch.Generator().manual_seed(H)
    x = torch.randn(7, H, generator=g) * 3
    w = torch.randn(H, generator=g)
    ref = w.double() * x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    got = rms_norm(x, w, 1e-5)
    torch.testing.assert_close(got.double(), ref, rtol=2e-6, atol=1e-6)


def test_rms_norm_hand_case_and_rows_independent():
    # [3, 4]: mean square 12.5 -> [3, 4] / sqrt(12.5) = [0.8485, 1.1314]
    got = rms_norm(torch.tensor([[3.0, 4.0]]), torch.ones(2), 0.0)
    torch.testing.assert_close(got, torch.tensor([[3 / math.sqrt(12.5), 4 / math.sqrt(12.5)]]))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 576, generator=g)
    w = torch.randn(576, generator=g)
    full = rms_norm(x, w)
    for n in (1, 2, 5, 16):
        assert torch.equal(rms_norm(x[37 : 37 + n], w), full[37 : 37 + n])
    assert torch.equal(rms_norm(x.view(8, 8, 576), w).view(64, 576), full)


def test_silu_and_mul_matches_float64_and_extremes():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 2 * 1536, generator=g) * 4
    gate, up = x.double().chunk(2, -1)
    ref = gate * torch.sigmoid(gate) * up
    torch.testing.assert_close(silu_and_mul(x).double(), ref, rtol=1e-6, atol=1e-6)
    # Large |g|: no overflow, silu(g) -> g for g >> 0 and -> 0 for g << 0; odd widths use the tail path.
    big = torch.tensor([[100.0, -100.0, 0.0, 88.0, -1e30, 3.0, 1.0, 1.0, 1.0, 1.0, 2.0, 0.5]])
    out = silu_and_mul(big)
    assert torch.isfinite(out).all()
    assert out[0, 0] == 100.0 and out[0, 1] == 0.0 and out[0, 2] == 0.0
    with pytest.raises(ValueError, match="2 \\* I"):
        silu_and_mul(torch.zeros(2, 3))


def test_rope_is_bitwise_the_float32_expression():
    # x * cos + rotate_half(x) * sin in float32 (each product rounded, then the sum), from a table.
    D, H, N = 64, 12, 9
    cos_t, sin_t = rope_table(2048, D, 10000.0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, H * D + 5, generator=g)
    pos = torch.randint(0, 2048, (N,), generator=g)
    heads = x[:, : H * D].view(N, H, D)
    rotated = torch.cat((-heads[..., D // 2 :], heads[..., : D // 2]), -1)
    want = heads * cos_t[pos][:, None, :] + rotated * sin_t[pos][:, None, :]
    got = x.clone()
    rope_(got, H, cos_t, sin_t, pos)
    assert torch.equal(got[:, : H * D].view(N, H, D), want)
    assert torch.equal(got[:, H * D :], x[:, H * D :])  # columns past the heads untouched
    # Against a float64 rotation by the table's angles (float32 position x float32 frequency, as
    # rope_table documents): within float32 rounding of the products.
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    ang = (pos.float()[:, None] * inv[None, :]).double()
    c, s = ang.cos(), ang.sin()
    a, b = heads.double()[..., : D // 2], heads.double()[..., D // 2 :]
    ref = torch.cat((a * c[:, None] - b * s[:, None], b * c[:, None] + a * s[:, None]), -1)
    torch.testing.assert_close(got[:, : H * D].view(N, H, D).double(), ref, rtol=0, atol=2e-6)


def test_rope_errors():
    cos_t, sin_t = rope_table(16, 8, 10000.0)
    x = torch.zeros(2, 16)
    with pytest.raises(ValueError, match="positions"):
        rope_(x, 2, cos_t, sin_t, torch.tensor([0, 16]))
    with pytest.raises(ValueError, match="num_heads"):
        rope_(x, 3, cos_t, sin_t, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="float32"):
        rope_(x.double(), 2, cos_t, sin_t, torch.tensor([0, 1]))


def test_layer_ops_meta():
    x = torch.empty(3, 4, 576, device="meta")
    assert torch.ops.decodekit.rms_norm(x, torch.empty(576, device="meta"), 1e-5).shape == (3, 4, 576)
    assert torch.ops.decodekit.silu_and_mul(torch.empty(3, 8, device="meta")).shape == (3, 4)


def test_rope_refuses_overlapping_rows_and_grad():
    cos_t, sin_t = rope_table(8, 4, 10000.0)
    b = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="overlap"):
        rope_(b.expand(3, 4), 1, cos_t, sin_t, torch.tensor([1, 1, 1]))
    with pytest.raises(RuntimeError, match="grad"):
        rope_(torch.randn(1, 4, requires_grad=True), 1, cos_t, sin_t, torch.tensor([1]))
    m = torch.empty(2, 8, device="meta")
    assert rope_(m, 2, cos_t.to("meta"), sin_t.to("meta"), torch.tensor([0, 1], device="meta")) is m
