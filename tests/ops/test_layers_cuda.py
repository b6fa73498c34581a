"""The layer family's CUDA kernels (rms_norm, silu_and_mul, rope_, linear) against the CPU
kernels and the float64 references.

Skipped without a GPU. The CUDA kernels perform the CPU kernels' float32 operations in the
CPU's order (csrc/cuda/layers.h: 16-lane FMA chains, the fixed tree, the same exponential,
IEEE division and square root, no contraction), so the results must be the CPU's bits, and a
row's result must not depend on how many rows the call has.
"""

from __future__ import annotations

import pytest
import torch
from common_cuda import capture, cuda, no_sync

import reference as ref

pytestmark = cuda
ops = torch.ops.decodekit


def _g(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("H", [576, 64, 37, 1])
def test_rms_norm_same_bits_as_cpu(H):
    x = torch.randn(9, H, generator=_g(0)) * 3
    w = torch.randn(H, generator=_g(1))
    cpu = ops.rms_norm(x, w, 1e-5)
    dx, dw = x.cuda(), w.cuda()
    with no_sync():  # host-to-device copies synchronise: done before
        gpu = ops.rms_norm(dx, dw, 1e-5)
    assert torch.equal(gpu.cpu(), cpu)
    torch.testing.assert_close(gpu.cpu().double(), ref.rms_norm(x, w, 1e-5).double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("I", [1536, 40, 7])
def test_silu_and_mul_same_bits_as_cpu(I):
    x = torch.randn(5, 2 * I, generator=_g(2)) * 6
    x[0, :4] = torch.tensor([0.0, -0.0, 100.0, -100.0])
    cpu = ops.silu_and_mul(x)
    dx = x.cuda()
    with no_sync():
        gpu = ops.silu_and_mul(dx)
    assert torch.equal(gpu.cpu(), cpu)
    torch.testing.assert_close(gpu.cpu().double(), ref.silu_and_mul(x).double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("D", [64, 6])
def test_rope_same_bits_as_cpu(D):
    N, H, P = 7, 3, 50
    x = torch.randn(N, (H + 2) * D, generator=_g(3))  # the last two heads are not rotated
    ang = torch.rand(P, D, generator=_g(4)) * 6
    cos, sin = torch.cos(ang), torch.sin(ang)
    pos = torch.randint(0, P, (N,), generator=_g(5))
    xc = x.clone()
    ops.rope_(xc, H, cos, sin, pos)
    xg, dcos, dsin, dpos = x.cuda(), cos.cuda(), sin.cuda(), pos.cuda()
    with no_sync():
        ops.rope_(xg, H, dcos, dsin, dpos)
    assert torch.equal(xg.cpu(), xc)
    torch.testing.assert_close(xg.cpu().double(), ref.rope(x, H, cos, sin, pos), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("M,K,N", [(1, 576, 1536), (8, 576, 192), (13, 100, 33), (3, 7, 5), (70, 64, 300)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_same_bits_as_cpu(M, K, N, bias):
    x = torch.randn(M, K, generator=_g(6))
    w = torch.randn(N, K, generator=_g(7)) * 0.05
    b = torch.randn(N, generator=_g(8)) if bias else None
    cpu = ops.linear(x, w, b)
    dx, dw, db = x.cuda(), w.cuda(), (b.cuda() if bias else None)
    with no_sync():
        gpu = ops.linear(dx, dw, db)
    assert torch.equal(gpu.cpu(), cpu)
    torch.testing.assert_close(gpu.cpu().double(), ref.linear(x, w, b), rtol=1e-4, atol=1e-4)


def test_linear_rows_do_not_depend_on_the_batch():
    K, N = 576, 192
    x = torch.randn(70, K, generator=_g(9)).cuda()
    w = (torch.randn(N, K, generator=_g(10)) * 0.05).cuda()
    whole = ops.linear(x, w, None)
    for M in (1, 3, 8, 9, 33):
        part = ops.linear(x[:M].contiguous(), w, None)
        assert torch.equal(part, whole[:M]), M
    for m in (0, 17, 69):
        assert torch.equal(ops.linear(x[m : m + 1], w, None), whole[m : m + 1]), m


def test_layers_in_a_cuda_graph():
    x = torch.randn(4, 576, generator=_g(11)).cuda()
    w = torch.randn(576, generator=_g(12)).cuda()
    wl = (torch.randn(96, 576, generator=_g(13)) * 0.05).cuda()

    def step():
        h = ops.rms_norm(x, w, 1e-5)
        return ops.silu_and_mul(ops.linear(h, wl, None))

    graph, out = capture(step)
    x.copy_(torch.randn(4, 576, generator=_g(14)))
    graph.replay()
    torch.cuda.synchronize()
    xc, wc, wlc = x.cpu(), w.cpu(), wl.cpu()
    expected = ops.silu_and_mul(ops.linear(ops.rms_norm(xc, wc, 1e-5), wlc, None))
    assert torch.equal(out.cpu(), expected)


def test_bad_arguments_are_named():
    x = torch.randn(2, 8, device="cuda")
    with pytest.raises(RuntimeError, match="weight is on"):
        ops.linear(x, torch.randn(3, 8), None)
    with pytest.raises(RuntimeError, match="positions"):
        ops.rope_(x, 1, torch.ones(4, 8, device="cuda"), torch.ones(4, 8, device="cuda"), torch.zeros(3).cuda())
