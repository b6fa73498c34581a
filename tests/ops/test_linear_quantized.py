"""decodekit.linear on a QuantizedWeight (GGML Q4_1 / Q8_0 blocks): the same bits as the
float32 linear on the dequantized weights, where the dequantization is the independent
reference of tests/reference/layers.py (written from the block format, float64 then one
rounding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import decodekit
from decodekit import QuantizedWeight
from reference.layers import GGML_BLOCK_BYTES, dequantize_blocks, random_blocks

TYPES = ["q4_1", "q8_0"]


def _weight(block_type, N, K, seed):
    blocks = random_blocks(block_type, N, K, torch.Generator().manual_seed(seed))
    return QuantizedWeight(blocks, block_type, (N, K)), dequantize_blocks(blocks, block_type, N, K)


@pytest.mark.parametrize("block_type", TYPES)
def test_dequantize_matches_reference(block_type):
    qw, w_ref = _weight(block_type, 13, 96, 1)
    assert torch.equal(qw.dequantize(), w_ref)
    ids = torch.tensor([[12, 0], [5, 5]])
    assert torch.equal(qw.dequantize_rows(ids), w_ref[ids])


@pytest.mark.parametrize("block_type", TYPES)
def test_dequantize_rows_one_call_and_fallbacks(block_type):
    """int64 ids on plain CPU tensors take one C++ call; other ids the torch path; both give the
    reference's values, and an id outside [0, N) raises (the C++ entry declines it)."""
    from decodekit._loader import _C

    qw, w_ref = _weight(block_type, 40, 64, 2)
    ids = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(3))
    fast = _C._dequantize_rows_fast(qw.blocks, block_type, 40, 64, ids)
    assert fast is not None and fast.shape == (3, 7, 64) and torch.equal(fast, w_ref[ids])
    assert torch.equal(qw.dequantize_rows(ids.int()), w_ref[ids])  # int32: the torch path
    assert torch.equal(qw.dequantize_rows(ids[:0]), w_ref[ids[:0]])
    assert _C._dequantize_rows_fast(qw.blocks, block_type, 40, 64, torch.tensor([40])) is None
    with pytest.raises(ValueError, match=r"ids must be in \[0, N=40\)"):
        qw.dequantize_rows(torch.tensor([40]))


@pytest.mark.parametrize("block_type", TYPES)
@pytest.mark.parametrize("N,K", [(37, 64), (576, 576), (130, 1536), (5, 32)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bit_identical_to_float_linear_on_dequantized_weights(block_type, N, K, with_bias):
    seed = N * 7 + K + (1 if with_bias else 0) + (100 if block_type == "q8_0" else 0)
    qw, w_ref = _weight(block_type, N, K, seed)
    g = torch.Generator().manual_seed(seed + 1)
    bias = torch.randn(N, generator=g) if with_bias else None
    for M in (1, 3, 17):
        x = torch.randn(M, K, generator=g)
        got = decodekit.linear(x, qw, bias)
        want = decodekit.linear(x, w_ref, bias)
        assert got.shape == (M, N)
        assert torch.equal(got, want), (M, (got - want).abs().max())
    # And close to the float64 product (a check of the reference path itself): float32
    # summation of K terms errs by far less than 1e-5 of sum |x_k w_k| (the bound is ~K * 2^-24).
    ref = x.double() @ w_ref.double().T + (bias.double() if with_bias else 0)
    scale = x.double().abs() @ w_ref.double().abs().T + (bias.double().abs() if with_bias else 0)
    assert ((got.double() - ref).abs() <= 1e-5 * scale + 1e-30).all()


@pytest.mark.parametrize("block_type", TYPES)
def test_rows_batch_invariant_and_thread_count(block_type):
    qw, _ = _weight(block_type, 67, 192, 5)
    x = torch.randn(9, 192, generator=torch.Generator().manual_seed(6))
    threads = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            outs.append(decodekit.linear(x, qw))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    for M in (1, 2, 4, 5):
        assert torch.equal(decodekit.linear(x[:M], qw), outs[0][:M])
    y = decodekit.linear(x.reshape(3, 3, 192), qw)
    assert y.shape == (3, 3, 67) and torch.equal(y.reshape(9, 67), outs[0])


def test_hand_case_q8_0_and_q4_1():
    # Q8_0, one row of one block: d = 0.5, q = 1..32, x = 1 -> 0.5 * (1 + ... + 32) = 264.
    b = np.zeros(34, np.uint8)
    b[0:2] = np.array([0.5], np.float16).view(np.uint8)
    b[2:34] = np.arange(1, 33, dtype=np.int8).view(np.uint8)
    qw = QuantizedWeight(torch.from_numpy(b), "q8_0", (1, 32))
    assert decodekit.linear(torch.ones(1, 32), qw).tolist() == [[264.0]]
    # Q4_1: d = 2, m = -1, every byte 0x31 -> weights 2*1-1 = 1 (first 16), 2*3-1 = 5 (last 16);
    # x = 1 -> 16 * 1 + 16 * 5 = 96; bias 4 -> 100.
    b = np.zeros(20, np.uint8)
    b[0:2] = np.array([2.0], np.float16).view(np.uint8)
    b[2:4] = np.array([-1.0], np.float16).view(np.uint8)
    b[4:20] = 0x31
    qw = QuantizedWeight(torch.from_numpy(b), "q4_1", (1, 32))
    assert qw.dequantize().tolist() == [[1.0] * 16 + [5.0] * 16]
    assert decodekit.linear(torch.ones(1, 32), qw, torch.tensor([4.0])).tolist() == [[100.0]]


def test_bad_input():
    blocks = torch.zeros(2 * 2 * GGML_BLOCK_BYTES["q4_1"], dtype=torch.uint8)
    with pytest.raises(ValueError, match="block_type"):
        QuantizedWeight(blocks, "q4_0", (2, 64))
    with pytest.raises(ValueError, match="multiple of 32"):
        QuantizedWeight(blocks, "q4_1", (2, 48))
    with pytest.raises(ValueError, match="80 bytes"):
        QuantizedWeight(blocks[:-1], "q4_1", (2, 64))
    with pytest.raises(TypeError, match="uint8"):
        QuantizedWeight(blocks.float(), "q4_1", (2, 64))
    qw = QuantizedWeight(blocks, "q4_1", (2, 64))
    with pytest.raises(ValueError, match="K="):
        decodekit.linear(torch.zeros(1, 32), qw)
    with pytest.raises(TypeError, match="float32"):
        decodekit.linear(torch.zeros(1, 64, dtype=torch.float64), qw)
    with pytest.raises(ValueError, match="bias"):
        decodekit.linear(torch.zeros(1, 64), qw, torch.zeros(3))
    # The op itself checks its arguments too (ValueError naming them).
    op = torch.ops.decodekit.linear_quantized
    with pytest.raises(ValueError, match="'q4_1' or 'q8_0'"):
        op(torch.zeros(1, 64), blocks, "q5_0", 2, 64, None)
    with pytest.raises(ValueError, match="multiple of 32"):
        op(torch.zeros(1, 48), blocks, "q4_1", 2, 48, None)
    with pytest.raises(ValueError, match="80 bytes"):
        op(torch.zeros(1, 64), blocks[:-1], "q4_1", 2, 64, None)
    with pytest.raises(ValueError, match="K=64"):
        op(torch.zeros(1, 32), blocks, "q4_1", 2, 64, None)


def test_opcheck():
    blocks = random_blocks("q8_0", 7, 64, torch.Generator().manual_seed(2))
    torch.library.opcheck(
        torch.ops.decodekit.linear_quantized.default, (torch.randn(3, 64), blocks, "q8_0", 7, 64, None)
    )


def test_quantize_q8_0_hand_case_and_bound():
    # One block by hand: max |x| = 2.54, so d = 0.02 and q = round(x / 0.02), halves away from
    # zero (0.01 / 0.02 = 0.5 -> 1, -0.03 / 0.02 = -1.5 -> -2); the rest of the row is zeros
    # (an all-zero block: d = 0, q = 0).
    x = torch.zeros(1, 64, dtype=torch.float64)
    x[0, :5] = torch.tensor([2.54, -2.54, 0.01, -0.03, 1.0])
    qw = QuantizedWeight.quantize(x)
    assert qw.block_type == "q8_0" and tuple(qw.shape) == (1, 64) and qw.blocks.numel() == 2 * 34
    blk = qw.blocks[0, :34]
    d = float(blk[:2].contiguous().view(torch.float16))
    assert d == float(torch.tensor(0.02, dtype=torch.float16))
    q = blk[2:].contiguous().view(torch.int8).tolist()
    assert q[:5] == [127, -127, 1, -2, 50] and q[5:] == [0] * 27
    assert qw.blocks[0, 34:].tolist() == [0] * 34
    # Random rows: every dequantized weight within half a step (plus the binary16 scale's own
    # rounding: 127 * 2^-11 of a step) of the float64 value.
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    dq = QuantizedWeight.quantize(w).dequantize().double()
    step = w.reshape(48, 8, 32).abs().amax(-1, keepdim=True) / 127
    err = (dq.reshape(48, 8, 32) - w.reshape(48, 8, 32)).abs()
    assert bool((err <= step * (0.5 + 127 * 2.0**-11) + 1e-12).all())
    # and linear() on it gives the bits of linear() on its dequantized tensor
    x2 = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    qw2 = QuantizedWeight.quantize(w)
    assert torch.equal(decodekit.linear(x2, qw2), decodekit.linear(x2, qw2.dequantize()))


def test_quantize_bad_input():
    with pytest.raises(ValueError, match="block_type must be 'q8_0'"):
        QuantizedWeight.quantize(torch.zeros(2, 32), "q4_1")
    with pytest.raises(TypeError, match="floating-point"):
        QuantizedWeight.quantize(torch.zeros(2, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple of 32"):
        QuantizedWeight.quantize(torch.zeros(2, 33))
    with pytest.raises(ValueError, match="finite"):
        QuantizedWeight.quantize(torch.full((1, 32), float("nan")))


def test_quantize_large_finite_weights_do_not_become_inf_or_nan():
    """A finite block whose max |x| / 127 exceeds binary16's largest value (65504), e.g. max |x| =
    1e7, would store an infinite scale (inf / NaN weights): refused, naming the range. At the
    limit itself the scale is 65504 exactly and the weights are finite; float64 beyond float32's
    range gets the range message too, and a block too small for a binary16 scale becomes zeros."""
    with pytest.raises(ValueError, match="at most 65504 \\* 127"):
        QuantizedWeight.quantize(torch.tensor([[1e7] + [1.0] * 31]))
    with pytest.raises(ValueError, match="at most 65504 \\* 127"):
        QuantizedWeight.quantize(torch.tensor([[1e300] + [1.0] * 31], dtype=torch.float64))
    deq = QuantizedWeight.quantize(torch.tensor([[65504.0 * 127] + [0.0] * 31])).dequantize()
    assert deq[0, 0].item() == 65504.0 * 127 and torch.isfinite(deq).all()
    tiny = QuantizedWeight.quantize(torch.full((1, 32), 1e-39))  # float32 subnormal
    assert torch.equal(tiny.dequantize(), torch.zeros(1, 32))
    assert tiny.blocks[0, 2:].tolist() == [0] * 32
