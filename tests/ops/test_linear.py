"""decodekit.linear: rows bit-identical whatever M, close to a float64 matmul."""

from __future__ import annotations

import pytest
import torch

import decodekit

# SmolLM2-135M's projection shapes (N, K): q/o, fused k+v, fused gate+up, down, LM head slice.
SHAPES = [(576, 576), (384, 576), (3072, 576), (576, 1536), (4099, 576)]


@pytest.mark.parametrize("N,K", SHAPES)
def test_rows_bit_identical_for_any_m(N, K):
    g = torch.Generator().manual_seed(N + K)
    w = torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g)
    x = torch.randn(64, K, generator=g)
    full = decodekit.linear(x, w, b)
    for M in (1, 2, 5, 16, 64):
        for start in (0, 64 - M):
            part = decodekit.linear(x[start : start + M], w, b)
            assert torch.equal(part, full[start : start + M]), (M, start)
    ref = x.double() @ w.double().T + b.double()
    torch.testing.assert_close(full.double(), ref, rtol=1e-5, atol=1e-5)


def test_thread_count_and_odd_sizes():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(37, 53, generator=g)
    x = torch.randn(7, 53, generator=g)
    threads = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            outs.append(decodekit.linear(x, w))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0].double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-5)
    y = decodekit.linear(torch.randn(2, 3, 53, generator=g), w)
    assert y.shape == (2, 3, 37)


def test_hand_case():
    x = torch.tensor([[1.0, 2.0, 3.0]])
    w = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    assert decodekit.linear(x, w, torch.tensor([10.0, 0.0])).tolist() == [[8.0, 3.0]]


def test_bad_input():
    with pytest.raises(ValueError, match="K="):
        decodekit.linear(torch.zeros(2, 3), torch.zeros(4, 5))
    with pytest.raises(TypeError, match="float32"):
        decodekit.linear(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="bias"):
        decodekit.linear(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(3))


def test_opcheck():
    torch.library.opcheck(torch.ops.decodekit.linear.default, (torch.randn(3, 20), torch.randn(5, 20), None))


def test_empty_inner_dimension_gives_the_bias():
    out = decodekit.linear(torch.randn(4, 0), torch.randn(3, 0), torch.ones(3))
    assert out.shape == (4, 3) and torch.equal(out, torch.ones(4, 3))
