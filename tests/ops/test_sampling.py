"""Tests of softmax, argmax and sample_from_logits against tests/reference.py."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import decodekit
import reference as ref
from decodekit import _C

scipy_stats = pytest.importorskip("scipy.stats")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ------------------------------------------------------------------ Philox ----
# Published Random123 known answers: (counter, key) -> output.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    assert _C.philox4x32_10(*counter, *key) == expected
    assert ref.philox4x32_10(counter, key) == expected


def test_philox_uniform_keying_matches_design():
    # key = (seed lo, seed hi); counter = (offset lo, offset hi, stream, i // 4).
    for seed, offset, stream, i in [(0, 0, 0, 0), (2**40 + 7, 3, 0, 0), (123, 2**33 + 1, 5, 3), (2**64 - 1, 9, 2, 7)]:
        assert _C.philox_uniform_double(seed, offset, stream, i) == ref.uniform_double(seed, offset, stream, i)
    u = [_C.philox_uniform_double(1, 0, 0, i) for i in range(1000)]
    assert all(0.0 <= x < 1.0 for x in u)


# ----------------------------------------------------------------- softmax ----
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_matches_float64_reference(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 1000, generator=g) * 4).to(dtype)
    temps = torch.tensor([1.0, 0.7, 2.0, 0.0, 1e-3, 30.0])
    probs = decodekit.softmax(logits, temps)
    assert probs.dtype == torch.float32 and probs.shape == (6, 1000)
    for b in range(6):
        expected = ref.softmax(logits[b].float(), float(temps[b]))
        torch.testing.assert_close(probs[b].double(), expected, rtol=2e-6, atol=1e-12)
    # A scalar temperature equals the same value per row.
    torch.testing.assert_close(decodekit.softmax(logits, 0.7)[1], probs[1], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_rows_whose_running_maximum_keeps_rising(dtype):
    # The kernel reads each 256-token chunk once, relative to the running maximum, and
    # rescales earlier chunks at the end: a rising ramp (a new maximum in every chunk),
    # the maximum in the last chunk, a prefix of -inf chunks and a maximum in the first
    # chunk must all match the float64 softmax.
    V = 256 * 9 + 37
    g = torch.Generator().manual_seed(7)
    ramp = torch.linspace(-20.0, 20.0, V)
    late = torch.randn(V, generator=g)
    late[-3] = 12.0
    masked = torch.randn(V, generator=g) * 3
    masked[: 3 * 256 + 5] = float("-inf")
    early = torch.randn(V, generator=g) * 5
    early[0] = 40.0
    logits = torch.stack([ramp, late, masked, early, -ramp]).to(dtype)
    for T in (1.0, 0.3, 7.0):
        probs = decodekit.softmax(logits, T)
        for b in range(logits.size(0)):
            expected = ref.softmax(logits[b].float(), T)
            # (x - max) is rounded to float32: up to 40 * 2^-24 ~ 2.4e-6 relative at the far end
            torch.testing.assert_close(probs[b].double(), expected, rtol=1e-5, atol=1e-30)
        assert (probs[2, : 3 * 256 + 5] == 0).all()
    bad = logits.float().clone()
    bad[0, -1] = float("nan")  # NaN in the last chunk
    bad[1, 1000] = float("inf")  # +inf in a middle chunk
    out = decodekit.softmax(bad, 1.0, validate=False)
    assert torch.isnan(out[:2]).all() and not torch.isnan(out[2:]).any()
    with pytest.raises(ValueError, match=r"rows \[0, 1\]"):
        decodekit.softmax(bad, 1.0)


def test_softmax_hand_values_and_padding():
    probs = decodekit.softmax(torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 3.0, 3.0, 9.0]]), 0.0, vocab_size=3)
    assert probs.tolist() == [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]  # T=0: one-hot, lowest index
    p = decodekit.softmax(torch.tensor([[0.0, 2.0**0.5 * 0, 0.0]]), 1.0)
    assert torch.allclose(p, torch.full((1, 3), 1 / 3))
    p = decodekit.softmax(torch.tensor([[1.0, 2.0, 100.0]]), 1.0, vocab_size=2)
    torch.testing.assert_close(
        p[0].double(),
        torch.tensor(
            [1 / (1 + 2.718281828459045), 2.718281828459045 / (1 + 2.718281828459045), 0.0], dtype=torch.float64
        ),
    )


def test_softmax_tiny_temperature_is_finite_one_hot():
    for logits, t in [
        (torch.tensor([[30.0, 20.0, 10.0]], dtype=torch.float16), 1e-4),
        (torch.tensor([[1.0, 2.0, 3.0]]), 1e-12),
        (torch.tensor([[1.0, 2.0, 3.0]]), 1e-45),
    ]:
        p = decodekit.softmax(logits, t)
        assert torch.isfinite(p).all()
        assert p.argmax().item() == int(logits.float().argmax()) and p.max().item() == 1.0


# ------------------------------------------------------------------ argmax ----
@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_lowest_index_wins(dtype):
    x = torch.tensor([[1, 2, 5, 4, 5], [3, 3, 3, 3, 3], [-1, -9, -1, -9, -1]], dtype=dtype)
    assert decodekit.argmax(x).tolist() == [2, 0, 0]
    assert decodekit.argmax(x, vocab_size=2).tolist() == [1, 0, 0]
    g = torch.Generator().manual_seed(1)
    y = torch.randint(-3, 3, (64, 333), generator=g).to(dtype)  # many ties
    expected = [ref.argmax(y[b].double()) for b in range(64)]
    assert decodekit.argmax(y).tolist() == expected


def test_argmax_invalid_rows():
    x = torch.tensor([[0.0, float("nan"), 1.0], [-float("inf")] * 3, [0.0, float("inf"), float("inf")]])
    ids, valid = decodekit.argmax(x, return_valid=True)
    assert ids.tolist() == [-1, -1, 1] and valid.tolist() == [False, False, True]
    with pytest.raises(ValueError, match=r"rows \[0, 1\]"):
        decodekit.argmax(x)


# ------------------------------------------------ sampling: hand cases ----
def test_greedy_rows_are_argmax_on_raw_logits():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-4, 4, (32, 500), generator=g).float()
    expected = decodekit.argmax(x)
    assert torch.equal(decodekit.sample_from_logits(x, 0.0), expected)  # no seed needed: all greedy
    assert torch.equal(decodekit.sample_from_logits(x, 1.0, top_k=1, seed=3), expected)
    assert torch.equal(decodekit.sample_from_logits(x, 1.0, top_p=0.0, seed=3), expected)
    assert expected.tolist() == [ref.argmax(x[b]) for b in range(32)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_top_k_1_on_ties_is_lowest_index(dtype):
    x = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]], dtype=dtype)
    seeds = torch.arange(2)
    for s in range(50):
        ids = decodekit.sample_from_logits(x, torch.tensor([1.0, 0.0]), top_k=1, seed=seeds + 2 * s)
        assert ids.tolist() == [0, 0]


def test_top_p_edges():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    for s in range(100):  # top_p == 0 keeps only the top token
        assert decodekit.sample_from_logits(x, 0.6, top_p=0.0, seed=s).item() == 3
    # top_p == 1 is an exact no-op: the same draws as without top-p.
    y = torch.randn(16, 3000, generator=torch.Generator().manual_seed(4))
    seeds = torch.arange(16) * 7
    assert torch.equal(
        decodekit.sample_from_logits(y, 0.9, top_p=1.0, seed=seeds), decodekit.sample_from_logits(y, 0.9, seed=seeds)
    )
    expected = [ref.sample(y[b], int(seeds[b]), temperature=0.9) for b in range(16)]
    assert decodekit.sample_from_logits(y, 0.9, top_p=1.0, seed=seeds).tolist() == expected


def test_top_k_at_or_past_vocab_is_disabled():
    y = torch.randn(8, 100, generator=torch.Generator().manual_seed(5))
    seeds = torch.arange(8)
    base = decodekit.sample_from_logits(y, 1.0, seed=seeds)
    for k in (0, -1, 100, 101, 2**40):
        assert torch.equal(decodekit.sample_from_logits(y, 1.0, top_k=k, seed=seeds), base)
    assert torch.equal(
        decodekit.sample_from_logits(y, 1.0, top_k=100, seed=seeds, vocab_size=60),
        decodekit.sample_from_logits(y, 1.0, seed=seeds, vocab_size=60),
    )


def test_min_p_edges():
    # probs [0.1, 0.2, 0.3, 0.4]: min_p 0.76 and 1.0 keep only token 3; 0.51 keeps {2, 3}.
    x = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    for s in range(200):
        assert decodekit.sample_from_logits(x, 1.0, min_p=0.76, seed=s).item() == 3
        assert decodekit.sample_from_logits(x, 1.0, min_p=1.0, seed=s).item() == 3
        assert decodekit.sample_from_logits(x, 1.0, min_p=0.51, seed=s).item() in (2, 3)
    # Ties at the threshold are kept: min_p 1 with two equal maxima keeps both.
    tie = torch.tensor([[0.0, 2.0, 2.0, 1.0]]).repeat(400, 1)
    ids = decodekit.sample_from_logits(tie, 1.0, min_p=1.0, seed=torch.arange(400))
    assert set(ids.tolist()) == {1, 2}


def test_vocab_size_masks_padding():
    x = torch.tensor([[0.0] * 6 + [5.0, 5.0]]).repeat(6000, 1)
    ids = decodekit.sample_from_logits(x, 1.0, seed=torch.arange(6000), vocab_size=6)
    counts = torch.bincount(ids, minlength=8)
    assert counts[6:].sum() == 0
    assert scipy_stats.chisquare(counts[:6].numpy()).pvalue > 1e-4
    assert decodekit.argmax(x[:1], vocab_size=6).item() == 0


def test_tiny_temperatures_are_finite_and_agree():
    x16 = torch.tensor([[30.0, 20.0, 10.0]], dtype=torch.float16)
    x32 = torch.tensor([[1.0, 2.0, 3.0]])
    for s in range(20):
        assert decodekit.sample_from_logits(x16, 1e-4, seed=s).item() == 0
        assert decodekit.sample_from_logits(x32, 1e-12, seed=s).item() == 2
        assert (
            decodekit.sample_from_logits(x32, 2e-5, seed=s).item()
            == decodekit.sample_from_logits(x32, 5e-6, seed=s).item()
            == 2
        )
    # With top-p alone the nucleus pre-pass bounds the logits through log(bound) * T:
    # a temperature so small that 1 / T is capped must still keep the (tied) maxima only.
    wide = torch.randn(4, 5000, generator=torch.Generator().manual_seed(3))
    wide[:, 17] = wide[:, 4000] = 9.0
    for T in (1e-38, 1e-30, 1e-12):
        ids = decodekit.sample_from_logits(wide, T, top_p=0.5, seed=torch.arange(4))
        assert set(ids.tolist()) <= {17, 4000}, (T, ids)
    ids = decodekit.sample_from_logits(wide.repeat(500, 1), 1e-30, top_p=0.9, seed=torch.arange(2000))
    assert set(ids.tolist()) == {17, 4000}


def test_positive_temperatures_below_float32_range_are_not_greedy():
    # T > 0, however small, is the T -> 0+ limit: uniform over the tied maxima (T = 0 would
    # pick the lowest index). Below float32's smallest normal number T acts as that number.
    x = torch.tensor([[0.0, 1.0, 1.0, -1.0]])
    for T in (1e-30, 1e-40, 1e-46, 1e-300, torch.tensor([1e-46], dtype=torch.float64)):
        assert decodekit.softmax(x, T).tolist() == [[0.0, 0.5, 0.5, 0.0]], T
    ids = decodekit.sample_from_logits(x.repeat(400, 1), 1e-50, seed=torch.arange(400))
    assert set(ids.tolist()) == {1, 2}
    assert decodekit.softmax(x, 0.0).tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_zero_probability_token_never_drawn():
    x = torch.log(torch.tensor([[0.33, 0.34, 0.0, 0.33]])).repeat(20000, 1)
    ids = decodekit.sample_from_logits(x, 1.0, seed=torch.arange(20000))
    assert (ids != 2).all() and ids.min() >= 0 and ids.max() <= 3


def test_invalid_rows_marked_or_raised():
    nan_row = torch.tensor([0.0, float("nan"), 1.0, 2.0, 0.0, 0.0])
    one_hot = torch.full((6,), -float("inf"))
    one_hot[5] = 0.0
    ninf = torch.full((6,), -float("inf"))
    good = torch.tensor([0.0, 1.0, 2.0, 3.0, -float("inf"), -float("inf")])
    x = torch.stack([nan_row, one_hot, ninf, good])
    out = decodekit.sample_from_logits(x, 1.0, seed=torch.arange(4), return_valid=True)
    assert isinstance(out, decodekit.SamplingOutput)
    assert out.valid.tolist() == [False, True, False, True]
    assert out.token_ids[0] == -1 and out.token_ids[2] == -1 and out.token_ids[1] == 5
    assert 0 <= out.token_ids[3] <= 3
    with pytest.raises(ValueError, match=r"rows \[0, 2\]"):
        decodekit.sample_from_logits(x, 1.0, seed=1)
    with pytest.raises(ValueError, match=r"rows \[0, 2\]"):
        decodekit.softmax(x)


# ------------------------------------- sampling: exact match with reference ----
CONFIGS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=50),
    dict(temperature=0.7, top_p=0.9),
    dict(temperature=1.3, min_p=0.05),
    dict(temperature=0.7, top_k=50, top_p=0.9),
    dict(temperature=1.0, top_k=200, top_p=0.5, min_p=0.1),
    dict(temperature=0.5, top_p=0.999),
    dict(temperature=2.0, top_k=3000, top_p=0.95),
]


@pytest.mark.parametrize("params", CONFIGS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_draws_match_reference_with_same_uniform(params):
    # The kernel and the float64 reference use the same Philox uniform, so they must
    # agree on every row (up to float rounding at a CDF edge, vanishingly rare).
    g = torch.Generator().manual_seed(6)
    B, V = 24, 5000
    logits = torch.randn(B, V, generator=g) * 3
    seeds = torch.randint(0, 2**62, (B,), generator=g)
    ids = decodekit.sample_from_logits(logits, seed=seeds, offset=11, **params).tolist()
    expected = [ref.sample(logits[b], int(seeds[b]), 11, **params) for b in range(B)]
    mismatches = sum(a != b for a, b in zip(ids, expected))
    assert mismatches == 0, (ids, expected)


def test_top_p_alone_and_plain_draws_on_rows_whose_running_maximum_rises():
    # Top-p without top-k reads each chunk once relative to the running maximum and
    # rescales the earlier segments' totals and nucleus masses at the end: rows whose
    # maximum comes late, rises in steps, follows a -inf prefix or is tied across chunks
    # must draw exactly what the float64 reference draws with the same uniform.
    V = 256 * 12 + 40
    g = torch.Generator().manual_seed(11)
    ramp = torch.linspace(-6.0, 6.0, V)
    steps = torch.randn(V, generator=g) + torch.arange(V).div(256, rounding_mode="floor").float() * 0.8
    late = torch.randn(V, generator=g) * 2
    late[-5] = 9.0
    masked = torch.randn(V, generator=g) * 2
    masked[: 4 * 256 + 3] = float("-inf")
    tied = torch.randn(V, generator=g)
    tied[[100, 1500, 3000]] = 7.0
    rows = [ramp, steps, late, masked, tied]
    seeds = torch.arange(120)
    # (top_p = 1 is the plain temperature draw, read once in 1024-token blocks the same way)
    for T, p in ((1.0, 0.9), (0.5, 0.7), (3.0, 0.95), (0.05, 0.5), (1.0, 1.0), (0.3, 1.0), (4.0, 1.0)):
        for r, row in enumerate(rows):
            ids = decodekit.sample_from_logits(row.repeat(len(seeds), 1), T, top_p=p, seed=seeds)
            want = [ref.sample(row, int(sd), 0, temperature=T, top_p=p) for sd in seeds]
            assert ids.tolist() == want, (T, p, r)


def test_top_p_alone_capture_limits_and_fallbacks_match_reference():
    # Top-p alone captures, in the one read, the tokens within 2^-16 of the running
    # maximum and cuts the nucleus among them with exact float64 bucket sums. Rows that
    # overflow the capture (a flat start, then the maximum late), rows whose nucleus
    # reaches below 2^-16 of the top weight, and rows whose weights sum past 4096 take
    # the fallbacks; every one must draw what the float64 reference draws.
    g = torch.Generator().manual_seed(13)
    V = 50000
    flat_then_spike = torch.randn(V, generator=g) * 0.01
    flat_then_spike[45000] = 30.0  # 45000 near-ties captured first: overflow
    flat_then_peak = torch.randn(V, generator=g) * 0.3
    flat_then_peak[40000:40010] = 2.5  # overflow, and a nucleus spread over the flat part
    deep = torch.randn(V, generator=g) * 0.5
    deep[7] = 13.0  # top weight ~1, the rest ~e^-13 < 2^-16 each
    heavy = torch.zeros(V)
    heavy[::7] = 0.25
    heavy[:25000] = float("-inf")  # 25000 near-ties captured, W past 4096
    std3 = torch.randn(V, generator=g) * 3  # the usual path, for contrast
    rows = [flat_then_spike, flat_then_peak, deep, heavy, std3]
    seeds = torch.arange(60) * 7 + 1
    uniforms = [ref.uniform_double(int(sd), 0, 0, 0) for sd in seeds]
    for T, p in ((1.0, 0.9), (0.7, 0.5), (1.0, 0.99), (2.0, 0.95)):
        for r, row in enumerate(rows):
            ids = decodekit.sample_from_logits(row.repeat(len(seeds), 1), T, top_p=p, seed=seeds)
            probs = ref.filtered_probs(row, temperature=T, top_p=p)
            assert ids.tolist() == [ref.draw(probs, u) for u in uniforms], (T, p, r)


def test_top_p_alone_boundary_in_the_last_captured_octave_and_exact_ties():
    # The capture must hold every token whose final weight is above 2^-16 of the top
    # one, also those read after the maximum: here the nucleus ends among ~30000 tokens
    # at about 2^-15.9, half of them before the maximum and half after it.
    g = torch.Generator().manual_seed(17)
    V, T = 30001, 1.0
    row = -15.9 * math.log(2.0) * T + 0.01 * torch.randn(V, generator=g)
    row[V // 2] = 0.0
    seeds = torch.arange(80) * 3 + 5
    uniforms = [ref.uniform_double(int(sd), 0, 0, 0) for sd in seeds]
    for p in (0.8, 0.9):
        ids = decodekit.sample_from_logits(row.repeat(len(seeds), 1), T, top_p=p, seed=seeds)
        probs = ref.filtered_probs(row, temperature=T, top_p=p)
        assert ids.tolist() == [ref.draw(probs, u) for u in uniforms], p
    # Tied weights of exactly 1 make the nucleus mass hit p * W: the prefix whose
    # running sum reaches the float64 product p * W is kept, and not one token more
    # (9 of 10 ties reach 0.9 * 10, as 0.3 + 0.5 reaches 0.8 in the hand case).
    for n, p, kept in ((4, 0.5, 2), (8, 0.25, 2), (8, 0.375, 3), (4, 0.75, 3), (10, 0.9, 9), (12, 0.5, 6)):
        row = torch.full((64,), float("-inf"))
        row[10 : 10 + n] = 0.0
        ids = decodekit.sample_from_logits(row.repeat(400, 1), 1.0, top_p=p, seed=torch.arange(400))
        assert set(ids.tolist()) == set(range(10, 10 + kept)), (n, p)
        assert set(torch.nonzero(ref.filtered_probs(row, top_p=p)).flatten().tolist()) == set(range(10, 10 + kept))
        out = decodekit.sample_from_logits(row[None], 1.0, top_p=p, seed=0, return_logprobs=True)
        assert abs(float(out.logprobs[0]) + math.log(kept)) < 1e-6


@pytest.mark.parametrize(
    "V,scale,T,p,min_p",
    [
        (128256, 3.5, 0.7, 0.9, 0.0),  # nucleus ~1.7e3
        (128256, 2.5, 0.7, 0.9, 0.0),  # ~1.4e4
        (128256, 1 / 0.7, 0.7, 0.9, 0.0),  # ~5.6e4: randn logits at T = 0.7
        (128256, 0.5, 1.5, 0.9, 0.0),  # ~1.0e5
        (50000, 1.0, 1.0, 0.99, 0.0),
        (32000, 1 / 0.7, 0.7, 0.5, 0.0),
        (128256, 1 / 0.7, 0.7, 0.9, 0.002),  # min-p after the flat nucleus
    ],
)
def test_top_p_alone_on_flat_rows_keeps_the_reference_nucleus(V, scale, T, p, min_p):
    # Flat rows (what models give at T >= 1) hold nuclei of 10^3 to 10^5 tokens: the kept set
    # must be the float64 reference's, token for token, and the draws its inverse CDF with the
    # same uniforms, also when the logprobs are asked for (the kept tokens are then listed).
    g = torch.Generator().manual_seed(int(V * scale * 10) % 100003)
    row = torch.randn(V, generator=g) * (scale * T)
    want = ref.filtered_probs(row, temperature=T, top_p=p, min_p=min_p)
    kept = int((want > 0).sum())
    if min_p == 0.0:
        assert 500 <= kept <= 120000, kept
    got = decodekit.processed_probs(row[None], T, top_p=p, min_p=min_p)[0]
    assert torch.equal(got > 0, want > 0), (int((got > 0).sum()), kept)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-12)
    seeds = torch.arange(48) * 5 + 3
    want_ids = [ref.draw(want, ref.uniform_double(int(sd), 0, 0, 0)) for sd in seeds]
    ids = decodekit.sample_from_logits(row.repeat(len(seeds), 1), T, top_p=p, min_p=min_p, seed=seeds)
    assert ids.tolist() == want_ids
    out = decodekit.sample_from_logits(row.repeat(8, 1), T, top_p=p, min_p=min_p, seed=seeds[:8], return_logprobs=True)
    assert out.token_ids.tolist() == want_ids[:8]
    lp_want = torch.log(want[out.token_ids]).float()
    assert torch.allclose(out.logprobs, lp_want, atol=1e-4)
    fast = decodekit.sample_from_logits(
        row.repeat(len(seeds), 1), T, top_p=p, min_p=min_p, seed=seeds, deterministic=False
    )
    assert bool((want[fast] > 0).all())


def _assert_reference_nucleus_and_draws(row: torch.Tensor, T: float, p: float, seeds: torch.Tensor) -> None:
    """processed_probs keeps the float64 reference's nucleus of one row, and the seeded draws of
    sample_from_logits are its inverse CDF with the same uniforms."""
    want = ref.filtered_probs(row, temperature=T, top_p=p)
    got = decodekit.processed_probs(row[None], T, top_p=p)[0]
    assert torch.equal(got > 0, want > 0), (p, int((got > 0).sum()), int((want > 0).sum()))
    ids = decodekit.sample_from_logits(row.repeat(len(seeds), 1), T, top_p=p, seed=seeds)
    assert ids.tolist() == [ref.draw(want, ref.uniform_double(int(sd), 0, 0, 0)) for sd in seeds], p


@pytest.mark.parametrize(
    "V,scale,T,p,order",
    [
        (49152, 3.0, 1.0, 0.5, "ascending"),  # the heavy tokens in the row's last vectors
        (49152, 3.0, 1.0, 0.9, "descending"),  # ... and in its first ones
        (128256, 3.5, 1.0, 0.999, "random"),  # the boundary in the far tail: the guess misses
        (32000, 2.0, 0.7, 0.95, "ascending"),
    ],
)
def test_top_p_on_flat_rows_whose_sample_misleads_keeps_the_reference_nucleus(V, scale, T, p, order):
    # The flat cut first guesses the band holding the boundary from a sample of the row (one
    # vector in eight) and verifies it exactly; where the guess misses (here the p = 0.999 row,
    # whose boundary lies in the far tail) it counts every token. Sorted rows put the heavy
    # tokens in a few vectors that the sample may skip. Either way the kept set and the draws
    # must be the float64 reference's.
    g = torch.Generator().manual_seed(int(V * scale * 10 + p * 1000) % 100003)
    row = torch.randn(V, generator=g) * (scale * T)
    if order != "random":
        row = torch.sort(row, descending=order == "descending").values
    _assert_reference_nucleus_and_draws(row, T, p, torch.arange(40) * 11 + 2)
    got = decodekit.processed_probs(row[None], T, top_p=p)[0]
    assert torch.allclose(got.double(), ref.filtered_probs(row, temperature=T, top_p=p), rtol=1e-5, atol=1e-12)


def _sampled_vectors(V: int) -> torch.Tensor:
    """The 16-token vectors the flat cut's sample counts (nucleus_online.cpp, count_buckets):
    in each group of 8 vectors, the one at a position hashed from the group's index."""
    groups = torch.arange(0, V, 128)
    pick = (((groups // 128) * 2654435761) % 2**32 >> 16) % 8
    first = groups + 16 * pick
    return first[first < V] // 16


@pytest.mark.parametrize("heavy_in_sample", [True, False])
def test_top_p_on_a_flat_row_built_against_its_sample_keeps_the_reference_nucleus(heavy_in_sample):
    # Heavy tokens exactly in the vectors the sample counts (it overestimates the heavy part,
    # the guessed band lies too high) or exactly outside them (it sees only light tokens):
    # the read rejects the guess and the cut counts every token; the kept set and the draws
    # stay the float64 reference's.
    g = torch.Generator().manual_seed(11)
    V, T, p = 128256, 1.0, 0.9
    in_sample = torch.zeros(V // 16 + 1, dtype=torch.bool)
    in_sample[_sampled_vectors(V)] = True
    heavy = in_sample.repeat_interleave(16)[:V]
    if not heavy_in_sample:
        heavy = ~heavy
    row = torch.where(heavy, 0.0, -2.0) + 0.05 * torch.randn(V, generator=g)
    _assert_reference_nucleus_and_draws(row, T, p, torch.arange(24) * 17 + 5)


def test_top_p_on_a_flat_row_whose_boundary_lies_below_the_exact_domain():
    # 32768 tokens of weight exactly 1 and the rest tied near 2^-15: the nucleus ends among the
    # light tokens, below the weights whose float64 sums the flat cut takes as exact, so the row
    # goes to the general gather, whose bound comes from the masses above 16^-(j + 1) measured
    # in a read of the whole row. p puts the boundary half a token past a tie's running sum, far
    # from the float32 roundings of the weights; ties are kept lowest index first.
    g = torch.Generator().manual_seed(3)
    V, T, heavy = 128256, 1.0, 32768
    row = torch.full((V,), -15.0 * math.log(2.0) * T)
    row[torch.randperm(V, generator=g)[:heavy]] = 0.0
    w = math.exp(float(row.min()) / T)
    W = heavy + (V - heavy) * w
    for light in (47000, 90000):
        p = (heavy + (light + 0.5) * w) / W
        assert int((ref.filtered_probs(row, temperature=T, top_p=p) > 0).sum()) == heavy + light + 1
        _assert_reference_nucleus_and_draws(row, T, p, torch.arange(24) * 13 + 1)


def test_top_p_gather_starts_empty_after_other_rows():
    # The nucleus gather of non-float32 rows reuses per-thread candidate lists: what a
    # previous call left there must not join the next row's candidates.
    g = torch.Generator().manual_seed(41)
    rows = [(torch.randn(1000, generator=g) * s).bfloat16() for s in (0.3, 2.0, 0.3)]
    for row, p in zip(rows, (0.1, 0.9, 0.5)):
        want = ref.filtered_probs(row.float(), temperature=0.7, top_p=p) > 0
        decodekit.sample_from_logits(rows[1][None], 0.7, top_p=0.9, seed=1)
        decodekit.sample_from_logits(rows[0][None], 0.7, top_p=0.99, seed=2, deterministic=False)
        got = decodekit.processed_probs(row[None], 0.7, top_p=p)[0] > 0
        assert torch.equal(got, want), (p, int(got.sum()), int(want.sum()))


@pytest.mark.parametrize("max_at", [0, 70000, 128255])
def test_top_p_alone_on_flat_rows_with_the_maximum_anywhere(max_at):
    # The flat cut reuses the weights of the one-read pass only where they were taken
    # relative to the row maximum: the maximum first, past the capture (~32768 tokens),
    # and in the last chunk, with a slow drift so that the running maximum moves often.
    g = torch.Generator().manual_seed(31 + max_at)
    V, T, p = 128256, 0.8, 0.9
    row = torch.randn(V, generator=g) + torch.linspace(-0.5, 0.5, V)
    row[max_at] = float(row.max()) + 1.0
    _assert_reference_nucleus_and_draws(row, T, p, torch.arange(24) * 7 + 1)


def test_top_p_alone_on_flat_tied_rows_ranks_ties_by_index():
    # Flat rows of heavily tied logits: the nucleus boundary falls inside a run of thousands
    # of equal logits, where the lowest indices must be kept first, as in the reference.
    g = torch.Generator().manual_seed(23)
    for V, T, p in ((128256, 0.7, 0.9), (128256, 1.0, 0.5), (32000, 1.5, 0.99)):
        row = torch.round(torch.randn(V, generator=g) * 3) / 3
        want = ref.filtered_probs(row, temperature=T, top_p=p)
        got = decodekit.processed_probs(row[None], T, top_p=p)[0]
        assert torch.equal(got > 0, want > 0), (V, T, p)
        seeds = torch.arange(32) + 7
        ids = decodekit.sample_from_logits(row.repeat(len(seeds), 1), T, top_p=p, seed=seeds)
        assert ids.tolist() == [ref.draw(want, ref.uniform_double(int(sd), 0, 0, 0)) for sd in seeds]


def test_top_p_with_many_tied_candidates_matches_reference():
    # Large nuclei over heavily tied logits (including -0.0 next to +0.0) go through the
    # radix-sorted top-p selection: ties must rank by lowest index, as in the reference.
    g = torch.Generator().manual_seed(5)
    for trial in range(12):
        row = torch.randint(-4, 5, (3000,), generator=g).float() * 0.5
        row[torch.rand(3000, generator=g) < 0.1] = -0.0
        row[torch.rand(3000, generator=g) < 0.1] = 0.0
        for T, p in ((1.0, 0.9), (2.0, 0.5), (0.7, 0.99)):
            seeds = torch.arange(40) + trial * 100
            ids = decodekit.sample_from_logits(row.repeat(40, 1), T, top_p=p, seed=seeds)
            assert ids.tolist() == [ref.sample(row, int(sd), 0, temperature=T, top_p=p) for sd in seeds]
        probs = torch.softmax(row.double(), -1).float()
        kept = decodekit.top_p_renorm_probs(probs[None], 0.8)[0] > 0
        ref_kept = ref.filter_probs(probs, top_p=0.8) > 0
        assert torch.equal(kept, ref_kept)


def test_per_row_parameters_match_reference():
    g = torch.Generator().manual_seed(7)
    B, V = 12, 800
    logits = torch.randn(B, V, generator=g) * 2
    temps = torch.tensor([0.0, 0.7, 1.5] * 4)
    top_k = torch.tensor([0, 5, -1, 40, 800, 1, 2, 0, 10, 0, 3, 100])
    top_p = torch.tensor([1.0, 0.9, 0.5, 1.0, 0.3, 0.8, 1.0, 0.0, 0.95, 0.7, 1.0, 0.99], dtype=torch.float64)
    min_p = torch.tensor([0.0, 0.0, 0.2, 0.05, 0.0, 0.5, 0.1, 0.0, 0.0, 0.3, 1.0, 0.01])
    seeds = torch.arange(B) + 100
    ids = decodekit.sample_from_logits(logits, temps, top_k, top_p, min_p, seed=seeds)
    for b in range(B):
        exp = ref.sample(
            logits[b],
            int(seeds[b]),
            temperature=float(temps[b]),
            top_k=int(top_k[b]),
            top_p=float(top_p[b]),
            min_p=float(min_p[b]),
        )
        assert ids[b].item() == exp, b


def test_top_p_keeps_exact_prefix_of_uniform_row():
    # 32000 equal logits with top_p 0.9999: exactly the 31997 lowest indices can be drawn.
    V = 32000
    probs = ref.filtered_probs(torch.zeros(V), 1.0, top_p=0.9999)
    assert int((probs > 0).sum()) == 31997 and bool((probs[:31997] > 0).all())
    x = torch.zeros(4000, V)
    ids = decodekit.sample_from_logits(x, 1.0, top_p=0.9999, seed=torch.arange(4000))
    assert ids.max().item() < 31997 and ids.min().item() >= 0
    for p in (0.9999999, 1 - 1e-9):
        ids = decodekit.sample_from_logits(torch.zeros(2000, 100), 1.0, top_p=p, seed=torch.arange(2000))
        assert ids.min() >= 0 and ids.max() <= 99 and len(set(ids.tolist())) == 100


# --------------------------------------------------- statistical tests ----
@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=1.0),
        dict(temperature=0.8, top_k=6),
        dict(temperature=1.2, top_p=0.8),
        dict(temperature=1.0, min_p=0.1),
        dict(temperature=0.9, top_k=10, top_p=0.9, min_p=0.05),
    ],
    ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()),
)
@pytest.mark.parametrize("deterministic", [True, False])
def test_chi_square_against_filtered_distribution(params, deterministic):
    # 200,000 draws of one row (each draw its own seed) against the float64
    # reference distribution, in both modes; the test fails when the chi-square
    # p-value < 1e-4.
    N = 200_000
    logits = torch.randn(1, 24, generator=torch.Generator().manual_seed(8)) * 1.5
    probs = ref.filtered_probs(logits[0], **params)
    ids = decodekit.sample_from_logits(
        logits.expand(N, 24), seed=torch.arange(N) + 10**6, deterministic=deterministic, **params
    )
    counts = torch.bincount(ids, minlength=24).double()
    kept = probs > 0
    assert counts[~kept].sum() == 0, "a filtered-out token was drawn"
    expected = probs[kept] * N
    assert expected.min() > 5  # enough samples in every tested cell
    pvalue = scipy_stats.chisquare(counts[kept].numpy(), expected.numpy()).pvalue
    assert pvalue > 1e-4, pvalue


# ------------------------------------------------------ batch invariance ----
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_invariance_any_position_and_thread_count(dtype):
    g = torch.Generator().manual_seed(9)
    V = 32000
    batch = (torch.randn(64, V, generator=g) * 3).to(dtype)
    temps = torch.tensor([0.0, 0.7, 1.5, 1.0] * 16)
    top_k = torch.tensor([0, 50, 0, 20] * 16)
    top_p = torch.tensor([1.0, 0.9, 0.8, 1.0] * 16, dtype=torch.float64)
    min_p = torch.tensor([0.0, 0.0, 0.05, 0.1] * 16)
    seeds = torch.randint(0, 2**40, (64,), generator=g)
    row = batch[37:38].clone()
    threads = torch.get_num_threads()
    try:
        results = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            full = decodekit.sample_from_logits(batch, temps, top_k, top_p, min_p, seed=seeds)
            probs = decodekit.softmax(batch, temps)
            results.append((full, probs))
            for pos in (0, 37, 63):
                b2 = torch.randn(64, V, generator=g).to(dtype)
                b2[pos] = row[0]
                perm = torch.arange(64)
                perm[pos], perm[37] = 37, pos
                out = decodekit.sample_from_logits(
                    b2, temps[perm], top_k[perm], top_p[perm], min_p[perm], seed=seeds[perm]
                )
                assert out[pos] == full[37]
                p2 = decodekit.softmax(b2, temps[perm])
                assert torch.equal(p2[pos], probs[37])
            alone = decodekit.sample_from_logits(
                row, temps[37:38], top_k[37:38], top_p[37:38], min_p[37:38], seed=seeds[37:38]
            )
            assert alone.item() == full[37].item()
            assert torch.equal(decodekit.softmax(row, temps[37:38])[0], probs[37])
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    finally:
        torch.set_num_threads(threads)


def test_same_seed_reproduces_and_other_seed_differs():
    x = torch.randn(8, 1000, generator=torch.Generator().manual_seed(10))
    a = decodekit.sample_from_logits(x, 1.0, seed=42)
    b = decodekit.sample_from_logits(x, 1.0, seed=42)
    c = decodekit.sample_from_logits(x, 1.0, seed=43)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(
        decodekit.sample_from_logits(x, 1.0, generator=g1), decodekit.sample_from_logits(x, 1.0, generator=g2)
    )


def test_golden_ids_are_stable():
    # Pinned outputs of seeded calls: a change here means users' seeded runs changed.
    x = torch.arange(1000, dtype=torch.float32).reshape(4, 250).sin() * 4
    assert decodekit.sample_from_logits(x, 0.8, seed=1234).tolist() == GOLDEN_PLAIN
    assert (
        decodekit.sample_from_logits(x, 0.7, top_k=50, top_p=0.9, seed=torch.tensor([1, 2, 3, 4]), offset=7).tolist()
        == GOLDEN_FILTERED
    )


# Pinned on 2026-11-29; both lists equal the float64 reference's draws with the same uniforms.
GOLDEN_PLAIN = [33, 34, 35, 31]
GOLDEN_FILTERED = [121, 78, 237, 43]


# -------------------------------------------------------------- bad input ----
@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(logits=torch.zeros(3)), ValueError, "logits must be 2-D"),
        (dict(logits=torch.zeros(2, 3, dtype=torch.float64)), TypeError, "logits must be float32"),
        (dict(logits=[[0.0]]), TypeError, "logits must be a torch.Tensor"),
        (dict(temperature=-0.5), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(temperature=torch.tensor([1.0, -1.0])), ValueError, "temperature"),
        (
            dict(temperature=torch.tensor([1.0, 1.0, 1.0])),
            ValueError,
            "temperature must be a scalar or a 1-D tensor of length B=2",
        ),
        (dict(top_p=1.5), ValueError, "top_p must be in \\[0, 1\\]"),
        (dict(top_p=-0.1), ValueError, "top_p"),
        (dict(top_p=float("nan")), ValueError, "top_p"),
        (dict(top_p=torch.tensor([0.5, float("nan")])), ValueError, "top_p"),
        (dict(min_p=1.05), ValueError, "min_p"),
        (dict(min_p=torch.tensor([0.5, 2.0])), ValueError, "min_p"),
        (dict(top_k=2.5), TypeError, "top_k"),
        (dict(top_k=torch.tensor([1.0, 2.0])), TypeError, "top_k must be an int or an integer tensor"),
        (dict(seed=None), ValueError, "seed"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(seed=2**70), ValueError, "seed"),
        (dict(seed=1, generator=torch.Generator()), ValueError, "either seed"),
        (dict(vocab_size=0), ValueError, "vocab_size"),
        (dict(vocab_size=4), ValueError, "vocab_size"),
        (dict(offset=-1), ValueError, "offset"),
        # [B] tensors of the kernel's own dtypes (the wrapper's short path):
        (dict(top_p=torch.tensor([0.5, 1.5], dtype=torch.float64)), ValueError, "top_p"),
        (dict(min_p=torch.tensor([0.5, float("nan")])), ValueError, "min_p"),
        (dict(temperature=torch.tensor([float("inf"), 1.0])), ValueError, "temperature"),
        (dict(offset=torch.tensor([0, -1])), ValueError, "offset"),
        (dict(logits=torch.tensor([[0.0, 1.0, 2.0], [float("nan"), 0.0, 0.0]])), ValueError, "rows \\[1\\]"),
        # values that are out of range only before float32 rounding, or not representable in it
        (dict(temperature=-1e-50), ValueError, "temperature"),
        (dict(min_p=1 + 1e-12), ValueError, "min_p"),
        (dict(temperature=1e39), ValueError, "temperature must be finite and >= 0 and at most float32's largest value"),
        (
            dict(temperature=torch.tensor([1.0, 1e39], dtype=torch.float64)),
            ValueError,
            "temperature.*float32.*rows \\[1\\]",
        ),
        (dict(temperature=10**400), ValueError, "temperature must be finite and >= 0, got an int of"),
        (dict(top_p=10**400), ValueError, "top_p"),
        # an empty batch still checks the parameters
        (dict(logits=torch.empty(0, 3), temperature=-1.0), ValueError, "temperature"),
        (dict(logits=torch.empty(0, 3), top_p=2.0), ValueError, "top_p"),
        (dict(offset=torch.zeros(2, dtype=torch.int64, device="meta")), ValueError, "offset is on meta"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, exc, match):
    args = dict(logits=torch.zeros(2, 3), temperature=1.0, seed=0)
    args.update(kwargs)
    logits = args.pop("logits")
    with pytest.raises(exc, match=match):
        decodekit.sample_from_logits(logits, **args)


def test_short_path_and_full_path_agree_for_every_parameter_kind():
    # Plain numbers and exact-dtype [B] tensors take the wrapper's short path; return_valid=True
    # and other-dtype tensors take the full one. Both must hand the kernel the same parameters.
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 300, generator=g) * 2
    B = logits.size(0)
    cases = [
        dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=11, offset=3),
        dict(temperature=1, top_k=0, top_p=1, min_p=0, seed=-5, offset=0),
        dict(
            temperature=torch.tensor([0.0, 0.5, 1.0, 1.5, 0.7, 2.0]),
            top_k=torch.tensor([0, 1, 5, 300, -1, 40]),
            top_p=torch.tensor([1.0, 0.5, 0.9, 0.0, 0.95, 1.0], dtype=torch.float64),
            min_p=torch.tensor([0.0, 0.1, 0.0, 0.2, 0.0, 0.3]),
            seed=torch.arange(B) * 7 - 3,
            offset=torch.arange(B) + 2**40,
        ),
    ]
    for kw in cases:
        short = decodekit.sample_from_logits(logits, **kw)
        full = decodekit.sample_from_logits(logits, return_valid=True, **kw)
        assert torch.equal(short, full.token_ids) and bool(full.valid.all())
        # the same parameters as other dtypes (converted by the full path) give the same ids
        conv = {
            k: (v.double() if isinstance(v, torch.Tensor) and v.dtype == torch.float32 else v) for k, v in kw.items()
        }
        assert torch.equal(decodekit.sample_from_logits(logits, **conv), short)
        for r in range(B):  # and each row is the reference draw with its own uniform
            row = {k: (v[r].item() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            seed, offset = row.pop("seed"), row.pop("offset")
            assert int(short[r]) == ref.sample(logits[r], seed, offset, **row), (kw, r)


def test_bad_input_softmax_and_argmax():
    with pytest.raises(ValueError, match="temperature"):
        decodekit.softmax(torch.zeros(2, 3), -1.0)
    with pytest.raises(TypeError, match="logits must be float32"):
        decodekit.argmax(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="vocab_size"):
        decodekit.argmax(torch.zeros(2, 3), vocab_size=5)


def test_empty_batch_and_noncontiguous_rows():
    assert decodekit.sample_from_logits(torch.zeros(0, 10), 1.0, seed=1).shape == (0,)
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(11)).t()  # stride(1) != 1
    assert torch.equal(decodekit.argmax(x), decodekit.argmax(x.contiguous()))


# ---------------------------------------------------------- torch.library ----
def test_opcheck_schemas_and_meta_kernels():
    x = torch.randn(3, 50)
    temps = torch.tensor([0.0, 0.5, 1.0])
    torch.library.opcheck(torch.ops.decodekit.softmax.default, (x, temps, 1.0, 50, True))
    torch.library.opcheck(torch.ops.decodekit.argmax.default, (x, 40))
    torch.library.opcheck(
        torch.ops.decodekit.sample_from_logits.default,
        (x, temps, 1.0, None, 5, None, 0.9, None, 0.0, None, 7, None, 0, 50, True, True, 3, False),
    )
    meta = decodekit.sample_from_logits(x.to("meta"), 1.0, seed=1)
    assert meta.shape == (3,) and meta.dtype == torch.int64


def test_import_under_other_torch_fails_naming_both_versions():
    code = "import torch; torch.__version__ = '0.0.1+other'; import decodekit"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "0.0.1+other" in r.stderr and decodekit.BUILT_WITH_TORCH in r.stderr


# --------------------------------------------------------- instruction sets ----
_ISA_SCRIPT = r"""
import hashlib, torch, decodekit
from decodekit import _C
g = torch.Generator().manual_seed(12)
h = hashlib.sha256()
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    x = (torch.randn(16, 5003, generator=g) * 5).to(dtype)
    x[3, 7] = float("inf"); x[5, :] = -float("inf"); x[6, 100] = float("nan")
    temps = torch.tensor([0.0, 0.3, 0.7, 1.0, 1.7, 1e-6, 4.0, 0.9] * 2)
    h.update(decodekit.softmax(x, temps, validate=False).numpy().tobytes())
    h.update(decodekit.argmax(x, return_valid=True)[0].numpy().tobytes())
    for k, p, mp in [(0, 1.0, 0.0), (40, 1.0, 0.0), (0, 0.9, 0.0), (0, 1.0, 0.05), (300, 0.95, 0.01)]:
        out = decodekit.sample_from_logits(x, temps, k, p, mp, seed=torch.arange(16) * 977, return_valid=True)
        h.update(out.token_ids.numpy().tobytes())
w = torch.randn(37, 150, generator=g)
h.update(decodekit.linear(torch.randn(5, 150, generator=g), w, torch.randn(37, generator=g)).numpy().tobytes())
from decodekit import paged_attention
k = torch.randn(12, 16, 2, 64, generator=g); v = torch.randn(12, 16, 2, 64, generator=g)
tables = torch.arange(12).reshape(2, 6); lens = torch.tensor([70, 33])
h.update(paged_attention(torch.randn(2, 3, 6, 64, generator=g), k, v, tables, lens).numpy().tobytes())
print(_C.cpu_isa(), h.hexdigest())
"""


def test_every_instruction_set_gives_the_same_bits():
    # Each build (AVX-512, AVX2, baseline x86-64) runs in its own process, forced by
    # DECODEKIT_CPU_ISA; probs, ids and argmax must hash identically.
    import os

    digests = {}
    for isa in ("avx512", "avx2", "baseline"):
        env = dict(os.environ, DECODEKIT_CPU_ISA=isa)
        r = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], capture_output=True, text=True, env=env, check=True)
        ran, digest = r.stdout.split()
        digests[ran] = digest
    assert "baseline" in digests and len(digests) >= 2 or decodekit._C.cpu_isa() == "baseline"
    assert len(set(digests.values())) == 1, digests


# ---------------------------------------------------------------- logprobs ----
@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=20),
        dict(temperature=1.3, top_p=0.8),
        dict(temperature=0.9, top_k=30, top_p=0.9, min_p=0.05),
        dict(temperature=0.0),
        dict(temperature=1.0, top_k=1),
    ],
    ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()),
)
def test_logprobs_match_reference(params):
    g = torch.Generator().manual_seed(30)
    B, V, n = 8, 700, 5
    logits = torch.randn(B, V, generator=g) * 2
    out = decodekit.sample_from_logits(logits, seed=torch.arange(B), return_logprobs=True, top_logprobs=n, **params)
    raw = decodekit.sample_from_logits(
        logits, seed=torch.arange(B), return_logprobs=True, top_logprobs=n, logprobs_mode="raw", **params
    )
    assert torch.equal(out.token_ids, raw.token_ids) and out.valid is None
    for b in range(B):
        lp = torch.log(ref.filtered_probs(logits[b], **params))
        tok = int(out.token_ids[b])
        assert abs(float(out.logprobs[b]) - float(lp[tok])) < 2e-5
        order = ref.rank_order(logits[b])[:n]
        assert out.top_ids[b].tolist() == order.tolist() == raw.top_ids[b].tolist()
        expected = lp[order].float()
        finite = torch.isfinite(expected)
        assert torch.equal(torch.isfinite(out.top_logprobs[b]), finite)
        torch.testing.assert_close(out.top_logprobs[b][finite], expected[finite], atol=2e-5, rtol=0)
        raw_lp = torch.log_softmax(logits[b].double(), 0)
        assert abs(float(raw.logprobs[b]) - float(raw_lp[tok])) < 2e-5
        torch.testing.assert_close(raw.top_logprobs[b].double(), raw_lp[order], atol=2e-5, rtol=0)


def test_greedy_logprob_is_zero_and_invalid_rows_are_nan():
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0], [float("nan"), 0.0, 0.0, 0.0]])
    out = decodekit.sample_from_logits(x, 0.0, return_logprobs=True, top_logprobs=2, return_valid=True)
    assert out.token_ids.tolist() == [1, -1]
    assert out.logprobs[0] == 0.0 and torch.isnan(out.logprobs[1])
    assert out.top_ids.tolist() == [[1, 2], [-1, -1]]
    assert out.top_logprobs[0].tolist() == [0.0, float("-inf")]
    with pytest.raises(ValueError, match="top_logprobs"):
        decodekit.sample_from_logits(x, 0.0, top_logprobs=5)
    with pytest.raises(ValueError, match="logprobs_mode"):
        decodekit.sample_from_logits(x, 0.0, return_logprobs=True, logprobs_mode="log")


def test_row_alone_and_inside_batch_bit_identical_ids_probs_logprobs():
    g = torch.Generator().manual_seed(31)
    V = 32000
    batch = torch.randn(64, V, generator=g) * 3
    temps = torch.tensor([0.0, 0.7, 1.5] * 21 + [0.7])
    seeds = torch.randint(0, 2**50, (64,), generator=g)
    kw = dict(top_k=40, top_p=0.9, return_logprobs=True, top_logprobs=4)
    full = decodekit.sample_from_logits(batch, temps, seed=seeds, **kw)
    probs = decodekit.softmax(batch, temps)
    for t in (0.0, 0.7, 1.5):
        row = batch[37:38]
        temps37 = temps.clone()
        temps37[37] = t
        full_t = decodekit.sample_from_logits(batch, temps37, seed=seeds, **kw)
        alone = decodekit.sample_from_logits(row, t, seed=seeds[37:38], **kw)
        assert alone.token_ids.item() == full_t.token_ids[37].item()
        assert torch.equal(alone.logprobs, full_t.logprobs[37:38])
        assert torch.equal(alone.top_ids, full_t.top_ids[37:38]) and torch.equal(
            alone.top_logprobs, full_t.top_logprobs[37:38]
        )
        assert torch.equal(decodekit.softmax(row, t)[0], decodekit.softmax(batch, temps37)[37])
    assert full.token_ids.shape == (64,) and probs.shape == (64, V)


# ------------------------------------------------- regressions from trials ----
def test_meta_parameter_beside_cpu_logits_is_an_error_not_garbage():
    L = torch.randn(4, 100)
    with pytest.raises(RuntimeError, match="meta"):
        torch.ops.decodekit.sample_from_logits(
            L,
            torch.ones(4, device="meta"),
            1.0,
            None,
            0,
            None,
            1.0,
            None,
            0.0,
            None,
            1,
            None,
            0,
            100,
            True,
            False,
            0,
            False,
        )
    with pytest.raises(RuntimeError, match="meta"):
        torch.ops.decodekit.softmax(L, torch.ones(4, device="meta"), 1.0, 100, True)


def test_out_of_range_parameters_without_validation_mark_rows_invalid():
    L = torch.randn(4, 100, generator=torch.Generator().manual_seed(50))
    nan = float("nan")
    out = decodekit.sample_from_logits(
        L, torch.tensor([-1.0, nan, 1.0, float("inf")]), seed=1, validate=False, return_valid=True
    )
    assert out.valid.tolist() == [False, False, True, False] and out.token_ids.tolist()[::3] == [-1, -1]
    out = decodekit.sample_from_logits(
        L,
        1.0,
        top_p=torch.tensor([0.5, 1.5, -1.0, nan], dtype=torch.float64),
        min_p=torch.tensor([0.0, 0.0, 0.0, 0.0]),
        seed=1,
        validate=False,
        return_valid=True,
    )
    assert out.valid.tolist() == [True, False, False, False]
    out = decodekit.sample_from_probs(
        torch.softmax(L, -1), min_p=torch.tensor([2.0, 0.1, -1.0, nan]), seed=1, validate=False, return_valid=True
    )
    assert out.valid.tolist() == [False, True, False, False]
    p = torch.ops.decodekit.softmax(L, torch.tensor([nan, -1.0, 1.0, 0.0]), 1.0, 100, True)
    assert torch.isnan(p[:2]).all() and torch.isfinite(p[2:]).all()


def test_outputs_carry_no_autograd_graph():
    x = torch.randn(2, 10, requires_grad=True)
    assert decodekit.softmax(x).grad_fn is None
    assert decodekit.sample_from_logits(x, 1.0, seed=1).grad_fn is None


def test_numpy_scalars_and_empty_batches():
    np = pytest.importorskip("numpy")
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(51))
    a = decodekit.sample_from_logits(x, np.float32(0.7), top_k=np.int64(5), seed=np.int64(3), vocab_size=np.int64(50))
    b = decodekit.sample_from_logits(x, 0.7, top_k=5, seed=3)
    assert torch.equal(a, b)
    assert decodekit.sample_from_logits(torch.randn(0, 10), 1.0).shape == (0,)  # nothing to draw: no seed needed


def test_consistent_type_errors():
    x = torch.randn(2, 10)
    with pytest.raises(TypeError, match="seed"):
        decodekit.sample_from_logits(x, 1.0, seed=torch.tensor(2.0))
    with pytest.raises(TypeError, match="deterministic"):
        decodekit.sample_from_logits(x, 1.0, seed=1, deterministic="no")
    with pytest.raises(ValueError, match="offset"):
        decodekit.sample_from_logits(x, 1.0, generator=torch.Generator(), offset=-1)


def test_per_row_top_k_with_disabled_values_chi_square():
    # Two rows [4, 3, 2, 1]: top_k 2 keeps [0.7311, 0.2689, 0, 0]; the second row's top_k
    # (-1, 0 or 10) disables the filter: the plain softmax. 100,000 draws per row; p > 1e-4.
    N = 100_000
    x = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    for disabled in (-1, 0, 10):
        logits = x.expand(2 * N, 4)
        top_k = torch.tensor([2, disabled]).repeat(N)
        ids = decodekit.sample_from_logits(logits, 1.0, top_k=top_k, seed=torch.arange(2 * N) + disabled * 10**7)
        row0 = torch.bincount(ids[0::2], minlength=4).double()
        row1 = torch.bincount(ids[1::2], minlength=4).double()
        assert row0[2:].sum() == 0
        e0 = torch.tensor([0.7310585786, 0.2689414214], dtype=torch.float64)
        e0 = e0 / e0.sum() * N
        assert scipy_stats.chisquare(row0[:2].numpy(), e0.numpy()).pvalue > 1e-4
        e1 = torch.softmax(x[0].double(), 0)
        e1 = e1 / e1.sum() * N
        assert scipy_stats.chisquare(row1.numpy(), e1.numpy()).pvalue > 1e-4


def test_fast_mode_draws_from_the_same_distribution_on_large_rows():
    # 30,000 draws over V = 5000 (each its own seed): fast and deterministic modes use the
    # same uniforms, so they agree on all but a vanishing fraction of rows (a uniform within
    # ~1e-6 of a CDF edge), and both match the float64 reference's draws.
    g = torch.Generator().manual_seed(52)
    logits = torch.randn(1, 5000, generator=g).expand(30000, 5000) * 2
    seeds = torch.arange(30000)
    det = decodekit.sample_from_logits(logits, 0.9, seed=seeds)
    fast = decodekit.sample_from_logits(logits, 0.9, seed=seeds, deterministic=False)
    assert (det != fast).sum() <= 3


def test_fast_entry_samples_plain_calls_and_declines_everything_else():
    # sample_from_logits sends plain calls to a C++ entry that skips torch.ops; it must
    # draw what the reference draws, and return None (the full wrapper then runs) for
    # anything it does not check itself.
    fast = _C._sample_from_logits_fast
    g = torch.Generator().manual_seed(40)
    x = torch.randn(6, 900, generator=g) * 2
    seeds = torch.arange(6) + 3
    for T, k, p, mp, sd in (
        (0.7, 0, 0.9, 0.0, seeds),
        (1, 20, 1.0, 0.0, 7),
        (0.0, 0, 1.0, 0.0, 0),
        (torch.tensor([0.5, 1.0, 0.0, 2.0, 0.7, 1.3]), torch.tensor([0, 5, 0, 50, 1, 0]), 0.8, 0.05, seeds),
    ):
        ids = fast(x, T, k, p, mp, sd, 4, True)
        assert ids is not None and ids.dtype == torch.int64
        for b in range(6):
            tb = float(T[b]) if isinstance(T, torch.Tensor) else float(T)
            kb = int(k[b]) if isinstance(k, torch.Tensor) else k
            sb = int(sd[b]) if isinstance(sd, torch.Tensor) else sd
            assert int(ids[b]) == ref.sample(x[b], sb, 4, temperature=tb, top_k=kb, top_p=p, min_p=mp)

    class Sub(torch.Tensor):
        pass

    bad_row = x.clone()
    bad_row[2, 5] = float("nan")
    declined = [
        (x.as_subclass(Sub), 0.7, 0, 0.9, 0.0, 1, 0, True),
        (x.clone().requires_grad_(), 0.7, 0, 0.9, 0.0, 1, 0, True),
        (x.to("meta"), 0.7, 0, 0.9, 0.0, 1, 0, True),
        (x[:, ::2], 0.7, 0, 0.9, 0.0, 1, 0, True),  # rows not contiguous
        (x.double(), 0.7, 0, 0.9, 0.0, 1, 0, True),  # dtype
        (x[:0], 0.7, 0, 0.9, 0.0, 1, 0, True),  # empty batch
        (bad_row, 0.7, 0, 0.9, 0.0, 1, 0, True),  # NaN row
        (x, float("nan"), 0, 0.9, 0.0, 1, 0, True),
        (x, 1e-39, 0, 0.9, 0.0, 1, 0, True),  # tiny T: the full path maps it
        (x, 3.5e38, 0, 0.9, 0.0, 1, 0, True),
        (x, -0.5, 0, 0.9, 0.0, 1, 0, True),
        (x, 0.7, 5.0, 0.9, 0.0, 1, 0, True),  # float top_k
        (x, 0.7, True, 0.9, 0.0, 1, 0, True),  # bool
        (x, 0.7, 0, 1.5, 0.0, 1, 0, True),
        (x, 0.7, 0, 0.9, -0.1, 1, 0, True),
        (x, 0.7, 0, 0.9, 0.0, 2**70, 0, True),  # seed past int64
        (x, 0.7, 0, 0.9, 0.0, 1, -1, True),
        (x, 0.7, 0, 0.9, 0.0, 1, torch.tensor([0, 1, 2, -3, 4, 5]), True),
        (x, 0.7, 0, 0.9, 0.0, 1, torch.tensor([0.0] * 6), True),
        (x, 0.7, torch.tensor([1, 2]), 0.9, 0.0, 1, 0, True),  # wrong length
        (x, 0.7, 0, 0.9, 0.0, 1, 0, 1),  # deterministic not a bool
    ]
    for args in declined:
        assert fast(*args) is None, args
    # a torch function mode must see the call: the fast entry steps aside
    from torch.overrides import TorchFunctionMode

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert fast(x, 0.7, 0, 0.9, 0.0, 1, 0, True) is None
        assert decodekit.sample_from_logits(x, 0.7, top_p=0.9, seed=1).shape == (6,)


def test_fast_entry_as_list_for_the_decode_loop():
    """as_list (the decode loop's plain step): the ids as a list of Python ints, equal to the
    reference's draws; logits [B, 1, V] read as [B, V] (a view of a wider buffer too), and only
    with as_list; [B, T > 1, V] declined."""
    fast = _C._sample_from_logits_fast
    g = torch.Generator().manual_seed(43)
    x = torch.randn(4, 700, generator=g) * 2
    for T, k, p in ((0.0, 0, 1.0), (0.8, 0, 0.9), (1.2, 30, 1.0)):
        ids = fast(x[:, None], T, k, p, 0.0, 11, 5, True, True)
        assert type(ids) is list and all(type(i) is int for i in ids)
        assert ids == [ref.sample(x[b], 11, 5, temperature=T, top_k=k, top_p=p) for b in range(4)]
    wide = torch.randn(4, 3, 700, generator=g)
    ids = fast(wide[:, 1:2], 0.0, 0, 1.0, 0.0, 0, 0, True, True)  # rows 2100 floats apart
    assert ids == [int(wide[b, 1].argmax()) for b in range(4)]
    assert fast(x[:, None], 0.0, 0, 1.0, 0.0, 0, 0, True) is None  # 3-d only with as_list
    assert fast(wide, 0.0, 0, 1.0, 0.0, 0, 0, True, True) is None  # T = 3
    assert fast(x[:, None, :0], 0.0, 0, 1.0, 0.0, 0, 0, True, True) is None  # V = 0


def test_softmax_fast_entry_matches_reference_and_declines_the_rest():
    fast = _C._softmax_fast
    g = torch.Generator().manual_seed(41)
    x = torch.randn(5, 700, generator=g) * 3
    temps = torch.tensor([0.0, 0.5, 1.0, 2.0, 1e-3])
    for T in (0.7, 1, 0.0, temps):
        probs = fast(x, T, True)
        assert probs is not None and probs.dtype == torch.float32 and probs.shape == x.shape
        for b in range(5):
            tb = float(temps[b]) if isinstance(T, torch.Tensor) else float(T)
            torch.testing.assert_close(probs[b].double(), ref.softmax(x[b], tb), atol=2e-7, rtol=2e-6)
        assert torch.equal(probs, decodekit.softmax(x, T, validate=False))  # the op's bits
    bad = x.clone()
    bad[1, 3] = float("nan")
    for args in (
        (bad, 0.7, True),
        (x, -1.0, True),
        (x, float("inf"), True),
        (x, 1e-40, True),
        (x, torch.tensor([1.0, 2.0]), True),
        (x, temps.double(), True),
        (x.double(), 0.7, True),
        (x[:, ::2], 0.7, True),
        (x.clone().requires_grad_(), 0.7, True),
        (x, 0.7, None),
    ):
        assert fast(*args) is None
    with pytest.raises(ValueError, match="rows"):
        decodekit.softmax(bad, 0.7)


def test_fast_entries_step_aside_for_torch_func_and_special_tensors():
    # Found by a trial: the C++ entries read data_ptr(), so functionalized, vmapped,
    # negative-bit and zero tensors must take the full path (and give its answers).
    g = torch.Generator().manual_seed(42)
    x = torch.randn(4, 300, generator=g)
    ids = torch.func.functionalize(lambda l: decodekit.sample_from_logits(l, 1.0, top_p=0.9, seed=1))(x)
    assert torch.equal(ids, decodekit.sample_from_logits(x, 1.0, top_p=0.9, seed=1, return_valid=True).token_ids)
    vm = torch.func.vmap(lambda l: decodekit.sample_from_logits(l, 1.0, top_p=0.9, seed=1, return_valid=True).token_ids)
    assert vm(x[None].repeat(2, 1, 1)).shape == (2, 4)
    neg = torch._neg_view(x)
    assert _C._sample_from_logits_fast(neg, 0.0, 0, 1.0, 0.0, 1, 0, True) is None
    assert torch.equal(decodekit.sample_from_logits(neg, 0.0), decodekit.argmax(-x))
    assert torch.equal(
        decodekit.sample_from_logits(x, 1.0, top_k=torch._neg_view(torch.full((4,), -1)), seed=0), decodekit.argmax(x)
    )  # k = 1 is argmax
    assert _C._softmax_fast(neg, 1.0, True) is None
    torch.testing.assert_close(decodekit.softmax(neg, 1.0), torch.softmax(-x, -1), atol=1e-6, rtol=1e-5)
    assert _C._sample_from_logits_fast(torch._efficientzerotensor((2, 5)), 0.7, 0, 0.9, 0.0, 1, 0, True) is None
    with torch.inference_mode():  # plain tensors made here are fine
        y = torch.randn(4, 300, generator=g)
        assert _C._sample_from_logits_fast(y, 0.7, 0, 0.9, 0.0, 1, 0, True) is not None


def test_subnormal_temperature_acts_as_the_smallest_normal_in_every_form():
    # A positive T below 1.18e-38 acts as 1.18e-38 whether it comes as a number, a
    # float64 tensor or a float32 tensor (whose value is passed through as it is).
    x = torch.tensor([[0.0, -1e-38, -2e-38]]).expand(600, 3)
    seeds = torch.arange(600)
    want = decodekit.sample_from_logits(x, 1.1754943508222875e-38, seed=seeds)
    counts = torch.bincount(want, minlength=3).tolist()
    assert counts[0] > counts[1] > counts[2] > 0
    for t in (1e-40, torch.full((600,), 1e-40, dtype=torch.float64), torch.full((600,), 1e-40)):
        assert torch.equal(decodekit.sample_from_logits(x, t, seed=seeds), want)
    probs = decodekit.softmax(x[:1], torch.full((1,), 1e-40))
    assert torch.equal(probs, decodekit.softmax(x[:1], 1e-40))
    torch.testing.assert_close(probs[0].double(), ref.softmax(x[0], 1.1754943508222875e-38), atol=1e-6, rtol=1e-5)


def test_tensor_whose_storage_was_resized_is_an_error_not_a_crash():
    # Found by a trial: the kernels read data_ptr(); a storage resized to 0 under the
    # tensor (with or without a storage offset) must give an error naming the tensor.
    for x in (torch.randn(4, 700), torch.randn(5, 700)[1:]):
        x.untyped_storage().resize_(0)
        assert _C._sample_from_logits_fast(x, 0.8, 0, 1.0, 0.0, 1, 0, True) is None
        assert _C._softmax_fast(x, 0.8, True) is None
        for call in (
            lambda: decodekit.softmax(x, 0.8),  # noqa: B023 (each is called in this iteration)
            lambda: decodekit.sample_from_logits(x, 0.8, seed=1),  # noqa: B023 (each is called in this iteration)
            lambda: decodekit.argmax(x),  # noqa: B023 (each is called in this iteration)
            lambda: decodekit.top_p_renorm_probs(x, 0.5),  # noqa: B023 (each is called in this iteration)
        ):
            with pytest.raises(RuntimeError, match="storage of (logits|probs)"):
                call()
    t = torch.ones(4)
    t.untyped_storage().resize_(0)
    with pytest.raises(RuntimeError, match="storage of temperature"):
        decodekit.sample_from_logits(torch.randn(4, 10), t, seed=1, validate=False)


def test_validation_under_vmap_says_to_pass_validate_false():
    # Found by a trial: vmap cannot run the host-side validity check; the error must say
    # how to skip it, and validate=False must work.
    x = torch.randn(3, 4, 50)
    with pytest.raises(RuntimeError, match="validate=False"):
        torch.func.vmap(lambda l: decodekit.softmax(l, 0.7))(x)
    with pytest.raises(RuntimeError, match="validate=False"):
        torch.func.vmap(lambda l: decodekit.sample_from_logits(l, 0.7, seed=1))(x)
    probs = torch.func.vmap(lambda l: decodekit.softmax(l, 0.7, validate=False))(x)
    torch.testing.assert_close(probs, torch.softmax(x / 0.7, -1), atol=1e-6, rtol=1e-5)
    ids = torch.func.vmap(lambda l: decodekit.sample_from_logits(l, 0.7, seed=1, validate=False))(x)
    assert ids.shape == (3, 4) and bool(((ids >= 0) & (ids < 50)).all())


def test_softmax_large_rows_match_reference_and_thread_count():
    # Rows of 40000 tokens: the maximum early or late, a first or second half with no
    # finite logit, a rising row, NaN or +inf late in the row, and one thread or two.
    g = torch.Generator().manual_seed(43)
    V = 40000
    base = torch.randn(8, V, generator=g) * 3
    base[0, 100] = 30.0  # maximum early
    base[1, V - 7] = 30.0  # maximum late
    base[2, : V // 2 + 300] = float("-inf")  # first half without a finite logit
    base[3, V // 2 + 10 :] = float("-inf")  # second half without a finite logit
    base[4] = torch.linspace(-20, 20, V)  # rising
    temps = torch.tensor([0.7, 1.0, 1.3, 0.5, 2.0, 0.0, 1e-6, 4.0])
    probs = decodekit.softmax(base, temps)
    for b in range(8):
        torch.testing.assert_close(probs[b].double(), ref.softmax(base[b], float(temps[b])), atol=2e-7, rtol=3e-6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decodekit.softmax(base, temps)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, probs)
    for b in range(8):  # a row alone gives the same bits
        assert torch.equal(decodekit.softmax(base[b : b + 1], temps[b : b + 1]), probs[b : b + 1])
    bad = base[:3].clone()
    bad[0, V - 3] = float("nan")
    bad[1, V - 3] = float("inf")
    bad[2] = float("-inf")
    out = decodekit.softmax(bad, 0.7, validate=False)
    assert torch.isnan(out).all()
    with pytest.raises(ValueError, match=r"rows \[0, 1, 2\]"):
        decodekit.softmax(bad, 0.7)


# ------------------------------------------------- new-user trial (2026-12) ----
def _compiled_sampler(**compile_kw):
    def f(x, t):
        return decodekit.sample_from_logits(
            x, t, top_k=20, top_p=0.9, seed=7, offset=3, validate=False, return_valid=True
        )

    torch._dynamo.reset()
    return torch.compile(f, fullgraph=True, backend="aot_eager", **compile_kw)


@pytest.mark.parametrize("dynamic", [None, True])
def test_compile_fullgraph_with_a_changing_python_float_temperature(dynamic):
    # Found by a trial: with validate=False the wrapper called math.isnan on the temperature,
    # which torch.compile makes symbolic once it changes between calls (or with dynamic=True).
    f = _compiled_sampler(dynamic=dynamic)
    g = torch.Generator().manual_seed(3)
    for B, t in ((4, 0.7), (4, 0.9), (3, 1.3), (5, 0.25)):
        x = torch.randn(B, 200, generator=g) * 2
        out = f(x, t)
        expected = [ref.sample(x[b], 7, 3, temperature=t, top_k=20, top_p=0.9) for b in range(B)]
        assert out.token_ids.tolist() == expected and out.valid.all()


def test_compile_with_validate_true_says_pass_validate_false():
    def f(x, t):
        return decodekit.sample_from_logits(x, t, seed=7)

    torch._dynamo.reset()
    with pytest.raises(Exception, match="pass validate=False"):
        torch.compile(f, fullgraph=True, backend="aot_eager")(torch.randn(2, 30), 0.8)


def test_negative_offset_without_validation_marks_the_row_invalid():
    # Found by a trial: a negative offset with validate=False wrapped around to a huge counter.
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(4))
    offset = torch.tensor([0, -1, 5, -(2**40)])
    for sampler, inp in ((decodekit.sample_from_logits, x), (decodekit.sample_from_probs, torch.softmax(x, -1))):
        out = sampler(inp, seed=3, offset=offset, validate=False, return_valid=True, return_logprobs=True)
        assert out.valid.tolist() == [True, False, True, False]
        assert out.token_ids[1] == -1 and out.token_ids[3] == -1 and torch.isnan(out.logprobs[[1, 3]]).all()
        assert int(out.token_ids[0]) >= 0 and int(out.token_ids[2]) >= 0
        whole = sampler(inp, seed=3, offset=-2, validate=False, return_valid=True)
        assert not whole.valid.any() and (whole.token_ids == -1).all()
        with pytest.raises(ValueError, match="offset"):
            sampler(inp, seed=3, offset=offset)
        with pytest.raises(ValueError, match="offset"):
            sampler(inp, seed=3, offset=-1)
    # The valid rows are the reference's draws.
    out = decodekit.sample_from_logits(x, seed=3, offset=offset, validate=False, return_valid=True)
    assert int(out.token_ids[2]) == ref.sample(x[2], 3, 5, temperature=1.0)


def test_unknown_cpu_isa_raises_at_import_with_the_allowed_values():
    env = dict(os.environ, DECODEKIT_CPU_ISA="avx9000")
    r = subprocess.run([sys.executable, "-c", "import decodekit"], capture_output=True, text=True, env=env)
    assert r.returncode != 0
    assert "avx9000" in r.stderr and "avx512, avx2, baseline" in r.stderr
    env["DECODEKIT_CPU_ISA"] = "baseline"
    r = subprocess.run(
        [sys.executable, "-c", "import decodekit; print(decodekit.cpu_isa())"], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0 and r.stdout.strip() == "baseline", r.stderr
    assert decodekit.cpu_isa() in ("avx512", "avx2", "baseline") and "cpu_isa" in decodekit.__all__


def test_version_comes_from_the_package_metadata():
    from importlib import metadata

    assert decodekit.__version__ == metadata.version("decodekit")


def test_readme_first_example_uses_per_row_seeds():
    # Found by a trial: the README's first example gave 8 rows one integer seed, so every row
    # drew with the same random number. It now shows per-row seeds and says why in one line.
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md"), encoding="utf-8").read()
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    sampling = block.split("\nout = ")[0]
    assert "seed=torch.arange(8)" in sampling and "scalar seed" in sampling.lower()
    scope = {}
    exec(sampling, scope)  # the lines before generate(): sampling, softmax, argmax
    ids, logits = scope["ids"], scope["logits"]
    for b in (0, 5):
        assert int(ids[b]) == ref.sample(logits[b], 1234 + b, 0, temperature=0.7, top_k=50, top_p=0.9)


def test_scalar_offset_range_in_the_error():
    x = torch.zeros(1, 4)
    for bad in (-1, 2**64):
        with pytest.raises(ValueError, match=r"offset must be an int in \[0, 2\^64\) or a \[B\] int64 tensor"):
            decodekit.sample_from_logits(x, temperature=1.0, seed=1, offset=bad)
    assert 0 <= int(decodekit.sample_from_logits(x, temperature=1.0, seed=1, offset=2**64 - 1)) < 4


def test_wide_unsigned_parameter_tensors():
    """A uint16 / uint32 / uint64 offset tensor (torch cannot compare them with the range 0
    must be checked against) is a TypeError naming offset; a uint64 seed tensor, which needs no
    range check, draws with the same 64 bits as the int64 tensor of those bits."""
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.uint16, torch.uint32, torch.uint64):
        with pytest.raises(
            TypeError, match=rf"offset must be an int or a signed integer tensor \(int64\), got a {dtype}"
        ):
            decodekit.sample_from_logits(x, 1.0, seed=1, offset=torch.tensor([0, 1, 2, 3], dtype=dtype))
    bits = [0, 1, 2**63 - 1, -(2**63)]  # the last: seed 2^63 as int64 bits
    want = [ref.sample(x[b], s % 2**64, 0, temperature=1.0) for b, s in enumerate(bits)]
    got = decodekit.sample_from_logits(x, 1.0, seed=torch.tensor(bits, dtype=torch.int64).view(torch.uint64))
    assert got.tolist() == want
