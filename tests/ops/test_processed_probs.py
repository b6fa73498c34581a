"""torch.ops.decodekit.processed_probs: the distribution sample_from_logits draws from.

The reference below is float64 plain torch written from DESIGN.md ("Selection conventions"), sharing
no code with the kernels. Where the top-p boundary sits within float32 rounding, the reference may
round the other way; there the kernel's kept set must instead equal the tokens sample_from_logits can
draw (its processed logprobs are -inf exactly off its kept set).
"""

from __future__ import annotations

import math

import pytest
import torch

import decodekit  # noqa: F401  (loads the ops)

ops = torch.ops.decodekit


def processed(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, vocab_size=None, deterministic=True):
    """The op with one scalar per parameter (tensors pass straight through)."""
    vs = logits.size(1) if vocab_size is None else vocab_size

    def split(v, dtype):
        return (v, 0) if isinstance(v, torch.Tensor) else (None, v)

    t, tv = split(temperature, torch.float32)
    k, kv = split(top_k, torch.int64)
    p, pv = split(top_p, torch.float64)
    m, mv = split(min_p, torch.float32)
    return ops.processed_probs(logits, t, tv, k, kv, p, pv, m, mv, vs, deterministic)


# ------------------------------------------------------------- reference ----
def reference_row(
    x: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> torch.Tensor:
    """float64 processed distribution of one row of logits (no padding), from DESIGN.md:
    T == 0 one-hot at the first maximum; else rank = logit desc, index asc; top-k keeps the first
    min(k, V) (disabled for k <= 0 or k >= V); softmax(x / T) over the kept; top-p keeps the shortest
    rank-order prefix whose float64 running mass reaches p * total (all when it never does; p == 1 a
    no-op, p == 0 the top token); min-p keeps prob >= min_p * max prob; renormalised."""
    x = x.double()
    V = x.numel()
    out = torch.zeros(V, dtype=torch.float64)
    top = int(torch.nonzero(x == x.max())[0, 0])
    if temperature == 0 or top_k == 1 or top_p == 0:
        out[top] = 1.0
        return out
    order = torch.sort(-x, stable=True).indices  # rank: logit desc, index asc
    if 0 < top_k < V:
        order = order[:top_k]
    w = torch.exp((x[order] - x[top]) / temperature)  # float64 weights in rank order
    if top_p < 1.0:
        run = torch.cumsum(w, 0)  # float64 running sum in rank order
        reach = torch.nonzero(run >= top_p * float(w.sum()))
        if reach.numel():
            n = int(reach[0, 0]) + 1
            order, w = order[:n], w[:n]
    if min_p > 0.0:
        keep = w >= min_p * w.max()
        order, w = order[keep], w[keep]
    out[order] = w / w.sum()
    return out


# ------------------------------------------------------------ hand cases ----
LOG1234 = torch.tensor([[0.0, math.log(2), math.log(3), math.log(4)]])


@pytest.mark.parametrize(
    "params,expected",
    [
        (dict(), [0.1, 0.2, 0.3, 0.4]),
        (dict(top_k=2), [0, 0, 3 / 7, 4 / 7]),
        (dict(top_p=0.5), [0, 0, 3 / 7, 4 / 7]),  # rank masses 0.4, 0.7: two tokens reach 0.5
        (dict(top_p=0.35), [0, 0, 0, 1]),  # 0.4 >= 0.35: the top token alone
        (dict(min_p=0.45), [0, 2 / 9, 3 / 9, 4 / 9]),  # keep p >= 0.45 * 0.4 = 0.18
        (dict(top_k=3, top_p=0.6, min_p=0.0), [0, 0, 3 / 7, 4 / 7]),  # 4/9, 7/9 of the top 3
        (dict(temperature=0.0), [0, 0, 0, 1]),
        (dict(top_k=1), [0, 0, 0, 1]),
        (dict(top_p=0.0), [0, 0, 0, 1]),
    ],
)
def test_hand_computed(params, expected):
    probs, valid = processed(LOG1234, **params)
    assert valid.tolist() == [True]
    torch.testing.assert_close(probs[0].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.equal(probs[0] > 0, torch.tensor(expected) > 0)


def test_temperature_two_and_ties_lowest_index_wins():
    probs, _ = processed(LOG1234, temperature=2.0)  # sqrt weights 1, 1.414, 1.732, 2
    w = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).sqrt()
    torch.testing.assert_close(probs[0].double(), w / w.sum(), atol=1e-6, rtol=0)
    ties = torch.tensor([[1.0, 2.0, 2.0, 2.0]])
    assert processed(ties, top_k=2)[0][0].tolist() == [0.0, 0.5, 0.5, 0.0]
    assert processed(ties, temperature=0.0)[0][0].tolist() == [0.0, 1.0, 0.0, 0.0]
    # Ten equal weights and p = 0.9: the float64 running sum 9 reaches 0.9 * 10, so 9 are kept
    # (a cut on float32 probabilities 0.1f may keep 10).
    probs, _ = processed(torch.zeros(1, 10), top_p=0.9)
    assert probs[0].tolist() == [pytest.approx(1 / 9)] * 9 + [0.0]


def test_padding_invalid_rows_and_one_hot():
    x = torch.tensor(
        [
            [0.0, 1.0, 2.0, 9.0],
            [float("nan"), 0.0, 0.0, 0.0],
            [-float("inf")] * 4,
            [0.0, float("inf"), 0.0, 0.0],
            [0.0, float("inf"), 0.0, 0.0],
        ]
    )
    temps = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    probs, valid = processed(x, temperature=temps, vocab_size=3)
    assert valid.tolist() == [True, False, False, False, True]
    assert probs[0, 3] == 0 and abs(float(probs[0, :3].sum()) - 1) < 1e-6 and probs[0, 2] > probs[0, 1]
    assert torch.isnan(probs[1:4, :3]).all() and (probs[1:4, 3] == 0).all()
    assert probs[4].tolist() == [0.0, 1.0, 0.0, 0.0]  # T == 0: +inf is the maximum
    bad, valid = processed(LOG1234, top_p=1.5)  # out of range: the row is invalid, not an error
    assert valid.tolist() == [False] and torch.isnan(bad).all()


def test_invalid_rows_raise_naming_the_rows_and_the_cause():
    # The public op raises for invalid rows (validate=True) and names +inf with T > 0 too.
    x = torch.tensor([[0.0, 1.0, 2.0], [0.0, float("inf"), 0.0]])
    with pytest.raises(ValueError, match=r"processed_probs: rows \[1\] .*\+inf logits with temperature > 0"):
        decodekit.processed_probs(x, 1.0)
    probs = decodekit.processed_probs(x, 1.0, validate=False)
    assert torch.isnan(probs[1]).all() and abs(float(probs[0].sum()) - 1.0) < 1e-6


# ------------------------------------------------------ against reference ----
@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=20),
        dict(temperature=1.3, top_p=0.8),
        dict(temperature=0.9, top_p=0.95, min_p=0.05),
        dict(temperature=0.9, top_k=30, top_p=0.9, min_p=0.05),
        dict(temperature=1.1, min_p=0.1),
        dict(temperature=0.0),
    ],
    ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()),
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_reference(params, dtype):
    g = torch.Generator().manual_seed(7)
    B, V = 6, 700
    logits = (torch.randn(B, V, generator=g) * 2).to(dtype)
    probs, valid = processed(logits, **params)
    assert valid.all() and probs.dtype == torch.float32 and probs.shape == (B, V)
    for b in range(B):
        ref = reference_row(logits[b].float(), **params)
        assert torch.equal(probs[b] > 0, ref > 0), b
        torch.testing.assert_close(probs[b].double(), ref, atol=2e-6, rtol=1e-5)


def test_large_rows_one_read_paths_match_reference():
    # V > 2^15 (the capture cap) and flat rows exercise every plan: plain, top-p one-read (cut and
    # fallback), chain with top-k, min-p alone.
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(4, 40000, generator=g) * torch.tensor([[3.0], [0.01], [1.0], [6.0]])
    for params in (dict(), dict(top_p=0.9), dict(top_k=50, top_p=0.95), dict(min_p=0.2), dict(top_p=0.5, min_p=0.3)):
        probs, valid = processed(logits, temperature=0.8, **params)
        assert valid.all()
        for b in range(4):
            ref = reference_row(logits[b], 0.8, **params)
            assert torch.equal(probs[b] > 0, ref > 0), (params, b)
            torch.testing.assert_close(probs[b].double(), ref, atol=1e-7, rtol=1e-5)


# ------------------------------------------- the sampler's own kept set ----
def _boundary_rows(g, B, V):
    """Rows whose top-p value equals the float64 mass of a rank prefix computed from float32 weights,
    so the boundary sits within float32 rounding of p."""
    logits = torch.randn(B, V, generator=g) * 2
    ps = []
    for b in range(B):
        w = torch.exp(logits[b] - logits[b].max()).double()  # float32 weights, summed in float64
        order = torch.argsort(-logits[b], stable=True)
        cum = torch.cumsum(w[order], 0) / w.sum()
        ps.append(float(cum[3 + b % 7]))
    return logits, torch.tensor(ps, dtype=torch.float64)


@pytest.mark.parametrize("V", [60, 5000])
def test_kept_set_equals_what_sample_from_logits_can_draw(V):
    g = torch.Generator().manual_seed(V)
    B = 16
    logits, ps = _boundary_rows(g, B, V)
    for k in (0, 25):
        probs, valid = processed(logits, temperature=1.0, top_k=k, top_p=ps)
        assert valid.all()
        # The sampler's processed logprobs of every token: -inf exactly off its kept set.
        out = ops.sample_from_logits(
            logits, None, 1.0, None, k, ps, 1.0, None, 0.0, None, 1, None, 0, V, True, True, V, False
        )
        top_ids, top_lp = out[3], out[4]
        lp = torch.full((B, V), float("nan"))
        lp.scatter_(1, top_ids, top_lp)
        assert torch.equal(probs > 0, lp > -float("inf")), k
        torch.testing.assert_close(probs, lp.exp(), atol=1e-6, rtol=1e-5)


def test_support_over_many_seeds():
    # One boundary row drawn 4000 times: every drawn token is kept, every kept token is drawn.
    g = torch.Generator().manual_seed(3)
    logits, ps = _boundary_rows(g, 1, 300)
    probs, _ = processed(logits, temperature=1.0, top_p=ps)
    n = 4000
    rows = logits.expand(n, -1).contiguous()
    ids = ops.sample_from_logits(
        rows,
        None,
        1.0,
        None,
        0,
        ps.expand(n).contiguous(),
        1.0,
        None,
        0.0,
        torch.arange(n),
        0,
        None,
        0,
        300,
        True,
        False,
        0,
        False,
    )[0]
    drawn = torch.zeros(300, dtype=torch.bool)
    drawn[ids] = True
    assert torch.equal(drawn, probs[0] > 0)


# ------------------------------------------------------ batch invariance ----
def test_row_alone_equals_row_in_batch_any_threads():
    g = torch.Generator().manual_seed(31)
    V = 32000
    batch = torch.randn(24, V, generator=g) * 3
    temps = torch.tensor([0.0, 0.7, 1.5] * 8)
    ks = torch.tensor([0, 40, 0, 7] * 6)
    ps = torch.tensor([1.0, 0.9, 0.95, 0.5, 1.0, 0.8] * 4, dtype=torch.float64)
    full, _ = processed(batch, temperature=temps, top_k=ks, top_p=ps)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for r in (0, 5, 13, 23):
            alone, _ = processed(batch[r : r + 1], temperature=float(temps[r]), top_k=int(ks[r]), top_p=float(ps[r]))
            assert torch.equal(alone[0], full[r]), r
    finally:
        torch.set_num_threads(threads)


def test_fast_mode_keeps_the_same_set():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 9000, generator=g)
    a, _ = processed(logits, temperature=0.9, min_p=0.01, deterministic=True)
    b, _ = processed(logits, temperature=0.9, min_p=0.01, deterministic=False)
    assert torch.equal(a > 0, b > 0)
    torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------ torch.library ----
def test_opcheck_and_meta():
    x = torch.randn(3, 50)
    temps = torch.tensor([0.0, 0.5, 1.0])
    torch.library.opcheck(ops.processed_probs.default, (x, temps, 1.0, None, 5, None, 0.9, None, 0.0, 50, True))
    torch.library.opcheck(
        ops.processed_probs.default,
        (
            x,
            None,
            0.8,
            torch.tensor([0, 3, 60]),
            0,
            torch.tensor([1.0, 0.5, 0.9], dtype=torch.float64),
            1.0,
            torch.tensor([0.0, 0.1, 0.0]),
            0.0,
            40,
            False,
        ),
    )
    probs, valid = processed(x.to("meta"))
    assert probs.shape == (3, 50) and probs.dtype == torch.float32 and valid.shape == (3,) and valid.dtype == torch.bool
