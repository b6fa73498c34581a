"""The scalar reference of the fixed splits (csrc/include/decodekit/reduce.h): the CPU
kernels' inverse-CDF draw must give the same token as the reference for the same uniform."""

from __future__ import annotations

import pytest
import torch

import decodekit  # noqa: F401  (loads the ops)
from decodekit import _C


@pytest.mark.parametrize("V", [1, 15, 16, 17, 52, 1023, 1024, 1025, 1024 + 60, 3 * 1024 + 7, 40000])
def test_sample_from_probs_draw_equals_reduce_reference(V):
    g = torch.Generator().manual_seed(V)
    probs = torch.rand(6, V, generator=g) ** 4
    probs[1, : V // 2] = 0.0
    seeds = torch.arange(6) * 7919 + V
    ids, valid, *_ = torch.ops.decodekit.sample_from_probs(
        probs, None, 0, None, 1.0, None, 0.0, seeds, 0, None, 3, V, True, False, 0, False
    )
    for b in range(6):
        u = _C.philox_uniform_double(int(seeds[b]), 3, 0, 0)
        ref, total = _C._draw_reference(probs[b].tolist(), u)
        assert bool(valid[b]) and int(ids[b]) == ref, (b, u)
        assert total == pytest.approx(float(probs[b].double().sum()), rel=1e-12)


def test_reference_never_returns_a_zero_weight_and_handles_an_empty_row():
    assert _C._draw_reference([0.0, 0.0, 0.0], 0.5) == (-1, 0.0)
    w = [0.0, 1.0, 0.0, 0.0]
    assert all(_C._draw_reference(w, u)[0] == 1 for u in (0.0, 0.5, 0.999999))
