"""Property-based fuzzing of the sampling ops: odd shapes, dtypes, parameter values and
non-finite entries must give a valid id, a -1 on a marked-invalid row, or a clear error,
never a crash or an out-of-range id."""

from __future__ import annotations

import math

import pytest
import torch

import decodekit

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SPECIAL = [0.0, -0.0, 1.0, -1.0, 1e30, -1e30, 3e38, -3e38, float("inf"), -float("inf"), float("nan"), 1e-40]


@st.composite
def logits_rows(draw):
    B = draw(st.integers(0, 5))
    V = draw(st.integers(1, 300))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    seed = draw(st.integers(0, 2**32))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g) * draw(st.sampled_from([0.0, 0.1, 1.0, 10.0, 100.0]))
    n_special = draw(st.integers(0, 6))
    for _ in range(n_special):
        if B == 0:
            break
        b = draw(st.integers(0, B - 1))
        v = draw(st.integers(0, V - 1))
        x[b, v] = draw(st.sampled_from(SPECIAL))
    if B and draw(st.booleans()):
        x[draw(st.integers(0, B - 1))] = -float("inf")
    return x.to(dtype)


def expected_valid(x: torch.Tensor, temperature: torch.Tensor, vocab_size: int) -> list[bool]:
    out = []
    for b in range(x.size(0)):
        row = x[b, :vocab_size].float()
        t = float(temperature[b])
        ok = not bool(torch.isnan(row).any()) and float(row.max()) > -math.inf
        if t > 0 and bool((row == math.inf).any()):
            ok = False
        out.append(ok)
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    x=logits_rows(),
    t=st.sampled_from([0.0, 1e-30, 0.01, 0.7, 1.0, 5.0, 1e10]),
    k=st.sampled_from([-5, 0, 1, 2, 3, 50, 299, 300, 10**9]),
    p=st.sampled_from([0.0, 1e-9, 0.3, 0.9, 0.999999, 1.0]),
    mp=st.sampled_from([0.0, 1e-6, 0.1, 0.5, 1.0]),
    per_row=st.booleans(),
    vs_frac=st.sampled_from([None, 0.5, 1.0]),
    seed=st.integers(0, 2**64 - 1),
)
def test_fuzz_sample_from_logits(x, t, k, p, mp, per_row, vs_frac, seed):
    B, V = x.shape
    vocab_size = None if vs_frac is None else max(1, int(V * vs_frac))
    vs = V if vocab_size is None else vocab_size
    temperature = torch.full((B,), t)
    if per_row and B:
        temperature[0] = 0.0
    kw = dict(top_k=k, top_p=p, min_p=mp, seed=seed, vocab_size=vocab_size, return_valid=True)
    out = decodekit.sample_from_logits(x, temperature if per_row else t, **kw)
    ids, valid = out.token_ids, out.valid
    assert ids.shape == (B,) and ids.dtype == torch.int64
    assert valid.tolist() == expected_valid(x, temperature if per_row else torch.full((B,), t), vs)
    for b in range(B):
        if valid[b]:
            assert 0 <= ids[b] < vs
            row = x[b, :vs].float()
            if float(temperature[b] if per_row else t) == 0.0 or k == 1 or p == 0.0:
                assert ids[b] == int(torch.nonzero(row == row.max())[0, 0])
            else:
                assert row[ids[b]] > -math.inf  # zero-probability tokens are never drawn
        else:
            assert ids[b] == -1


@settings(max_examples=150, deadline=None)
@given(x=logits_rows(), t=st.sampled_from([0.0, 1e-30, 0.5, 1.0, 1e10]))
def test_fuzz_softmax_and_argmax(x, t):
    B, V = x.shape
    probs = decodekit.softmax(x, t, validate=False)
    ids, valid = decodekit.argmax(x, return_valid=True)
    ok = expected_valid(x, torch.full((B,), t), V)
    for b in range(B):
        if ok[b]:
            assert torch.isfinite(probs[b]).all() and abs(float(probs[b].double().sum()) - 1.0) < 1e-5
            assert (probs[b] >= 0).all()
        else:
            assert torch.isnan(probs[b]).all()
        argmax_ok = not bool(torch.isnan(x[b].float()).any()) and float(x[b].float().max()) > -math.inf
        assert bool(valid[b]) == argmax_ok
        if argmax_ok:
            row = x[b].float()
            assert ids[b] == int(torch.nonzero(row == row.max())[0, 0])


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(["temperature", "top_k", "top_p", "min_p", "seed", "offset"]),
    value=st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-(2**70), 2**70),
        st.text(max_size=3),
        st.none(),
        st.booleans(),
    ),
)
def test_fuzz_bad_parameters_raise_clear_errors(name, value):
    x = torch.randn(2, 10)
    kwargs = dict(temperature=1.0, seed=0)
    kwargs[name] = value
    try:
        ids = decodekit.sample_from_logits(x, **kwargs)
    except (TypeError, ValueError) as e:
        assert name in str(e) or (name == "seed" and "generator" in str(e))
        return
    assert ids.shape == (2,) and ((ids >= 0) & (ids < 10)).all()


@st.composite
def prob_rows(draw):
    B = draw(st.integers(0, 5))
    V = draw(st.integers(1, 200))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32)))
    kind = draw(st.sampled_from(["softmax", "sparse", "uniform", "unnormalised"]))
    if kind == "softmax":
        p = torch.softmax(torch.randn(B, V, generator=g) * 3, -1)
    elif kind == "sparse":
        p = (torch.rand(B, V, generator=g) > 0.8).float()
    elif kind == "uniform":
        p = torch.full((B, V), 1.0 / V)
    else:
        p = torch.rand(B, V, generator=g) * 5
    for _ in range(draw(st.integers(0, 3))):
        if B == 0:
            break
        p[draw(st.integers(0, B - 1)), draw(st.integers(0, V - 1))] = draw(
            st.sampled_from([0.0, -0.5, float("nan"), float("inf"), 1e-30, 1e30])
        )
    return p


@settings(max_examples=200, deadline=None)
@given(
    p=prob_rows(),
    k=st.sampled_from([-1, 0, 1, 3, 199, 10**6]),
    top_p=st.sampled_from([0.0, 0.5, 0.95, 1.0]),
    mp=st.sampled_from([0.0, 0.2, 1.0]),
    seed=st.integers(0, 2**63),
)
def test_fuzz_probability_ops(p, k, top_p, mp, seed):
    B, V = p.shape
    bad = [bool(torch.isnan(r).any() or torch.isinf(r).any() or (r < 0).any() or not (r > 0).any()) for r in p]
    out = decodekit.sample_from_probs(p, k, top_p, mp, seed=seed, return_valid=True, return_logprobs=True)
    filt = decodekit.filter_probs(p, k, top_p, mp, validate=False)
    assert out.valid.tolist() == [not x for x in bad]
    for b in range(B):
        if bad[b]:
            assert out.token_ids[b] == -1 and torch.isnan(filt[b]).all()
            continue
        t = int(out.token_ids[b])
        assert 0 <= t < V and p[b, t] > 0 and filt[b, t] > 0
        assert (
            torch.isfinite(filt[b]).all()
            and abs(float(filt[b].double().sum()) - float(p[b].double().sum() if torch.equal(filt[b], p[b]) else 1.0))
            < 1e-4
        )
        assert out.logprobs[b] <= 1e-6
