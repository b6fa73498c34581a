"""Tests of sample_from_probs, filter_probs (and its top-k / top-p / min-p forms) and
top_k_mask_logits against hand-computed values and tests/reference.py."""

from __future__ import annotations

import pytest
import torch

import decodekit
import reference as ref

scipy_stats = pytest.importorskip("scipy.stats")


def close(a, b, tol=1e-6):
    return torch.allclose(
        torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=0
    )


# ------------------------------------------------------------- hand cases ----
def test_top_p_hand_cases():
    p = torch.tensor([[0.25, 0.125, 0.125, 0.5]])
    assert close(decodekit.top_p_renorm_probs(p, 0.75)[0], [1 / 3, 0, 0, 2 / 3])
    q = torch.tensor([[0.3, 0.1, 0.1, 0.5]])
    out = decodekit.top_p_renorm_probs(q, 0.8)[0]
    assert (out > 0).nonzero().flatten().tolist() == [0, 3]
    # 0.5 + 0.25 < 0.8: the next token is index 1 (lowest index among the 0.125 tie).
    assert close(decodekit.top_p_renorm_probs(p, 0.8)[0], [0.25 / 0.875, 0.125 / 0.875, 0, 0.5 / 0.875])


def test_top_p_one_is_bit_identical():
    p = torch.tensor([[0.999] + [5e-5] * 20])
    out = decodekit.top_p_renorm_probs(p, 1.0)
    assert torch.equal(out, p) and out.data_ptr() != p.data_ptr()
    assert torch.equal(decodekit.filter_probs(p, 0, 1.0, 0.0), p)


def test_top_k_hand_case_and_never_drawn():
    p = torch.tensor([[0.4, 0.3, 0.3, 0.0]])
    assert close(decodekit.top_k_renorm_probs(p, 2)[0], [4 / 7, 3 / 7, 0, 0])
    ids = decodekit.sample_from_probs(p.expand(20000, 4), top_k=2, seed=torch.arange(20000))
    assert set(ids.tolist()) == {0, 1}


def test_top_k_mask_logits_ties_and_all_equal():
    x = torch.tensor([[1.0, 2.0, 5.0, 4.0, 5.0], [3.0, 3.0, 3.0, 3.0, 3.0]])
    out = decodekit.top_k_mask_logits(x, 2)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [2, 4]
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [0, 1]
    assert torch.isfinite(decodekit.top_k_mask_logits(x, 1)).nonzero().tolist() == [[0, 2], [1, 0]]
    for dtype in (torch.float16, torch.bfloat16):
        o = decodekit.top_k_mask_logits(x.to(dtype), 2)
        assert o.dtype == dtype and torch.equal(torch.isfinite(o), torch.isfinite(out))
        assert torch.equal(o[0, [2, 4]], x.to(dtype)[0, [2, 4]])
    assert torch.equal(decodekit.top_k_mask_logits(x, 0), x)
    assert torch.isinf(decodekit.top_k_mask_logits(x, 0, vocab_size=3)[:, 3:]).all()


@pytest.mark.parametrize("V", [7, 255, 256, 257, 1000, 4097, 32000])
def test_top_k_sets_match_reference_across_chunk_sizes(V):
    # The kernel pre-selects 256-token chunks by their maxima; ties that straddle
    # chunks, -inf entries, k around the number of chunks and V not a multiple of
    # the chunk size must still give the exact top-k (value desc, index asc).
    g = torch.Generator().manual_seed(V)
    rows = [
        torch.randint(-3, 4, (V,), generator=g).float(),  # heavy ties
        torch.randn(V, generator=g) * 3,
        torch.where(torch.rand(V, generator=g) < 0.9, float("-inf"), torch.randn(V, generator=g)),
    ]
    x = torch.stack(rows)
    x[2, V // 2] = 0.5  # at least one finite logit in the sparse row
    nch = (V + 255) // 256
    for k in sorted({1, 2, 3, 50, nch, nch + 1, 2 * nch + 5, V - 1}):
        if not 1 <= k < V:
            continue
        for dtype in (torch.float32, torch.bfloat16):
            xd = x.to(dtype)
            out = decodekit.top_k_mask_logits(xd, k)
            for r in range(x.size(0)):
                order = ref.rank_order(xd[r].float())
                finite = xd[r].float() > float("-inf")
                want = sorted(i for i in order[:k].tolist() if finite[i])
                got = torch.isfinite(out[r]).nonzero().flatten().tolist()
                assert got == want, (V, k, dtype, r)
            p = torch.softmax(x.double(), -1).float()
            kept = decodekit.top_k_renorm_probs(p, k) > 0
            for r in range(x.size(0)):
                order = ref.rank_order(p[r])
                want = sorted(i for i in order[:k].tolist() if p[r, i] > 0)
                assert kept[r].nonzero().flatten().tolist() == want, (V, k, r)


def test_flush_to_zero_in_the_caller_changes_nothing():
    # torch.set_flush_denormal(True) sets FTZ/DAZ on the calling thread only; the kernels run
    # with IEEE denormals on every thread, so ties at 0.0 (the top-k lower bound) and denormal
    # logits give the same answer on every thread and with the flag off.
    L = torch.full((1, 1024), -1.0)
    L[0, [10, 300, 600, 900]] = 0.0
    tiny = torch.zeros(6, 300)
    tiny[:, 7] = 1e-45  # a denormal maximum: the argmax is 7, not a tie at 0
    batch = torch.cat([L.repeat(7, 1)[:, :300], tiny])
    expected = {
        "mask": decodekit.top_k_mask_logits(L, 3),
        "ids": decodekit.sample_from_logits(L.repeat(64, 1), 1.0, top_k=3, seed=torch.arange(64)),
        "argmax": decodekit.argmax(tiny),
        "batch": decodekit.sample_from_logits(batch, 0.5, top_k=2, seed=torch.arange(13)),
    }
    assert torch.isfinite(expected["mask"]).nonzero()[:, 1].tolist() == [10, 300, 600]
    assert (expected["argmax"] == 7).all()
    was = torch.get_num_threads()
    try:
        assert torch.set_flush_denormal(True)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert torch.equal(decodekit.top_k_mask_logits(L, 3), expected["mask"])
            assert torch.equal(
                decodekit.sample_from_logits(L.repeat(64, 1), 1.0, top_k=3, seed=torch.arange(64)), expected["ids"]
            )
            assert torch.equal(decodekit.argmax(tiny), expected["argmax"])
            assert torch.equal(
                decodekit.sample_from_logits(batch, 0.5, top_k=2, seed=torch.arange(13)), expected["batch"]
            )
        # tiny number parameters are converted to float32 with IEEE denormals too (values that
        # torch itself converts in the wrapper, e.g. logit_bias dicts, follow the caller's mode)
        zeros = torch.zeros(1, 4)
        assert decodekit.sample_from_logits(zeros, 0.0, frequency_penalty=1e-40, token_ids=[[0]]).tolist() == [1]
        assert torch.equal(decodekit.rms_norm(zeros, torch.ones(4), eps=1e-40), zeros)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(was)


def test_one_hot_with_huge_top_k():
    p = torch.zeros(64, 32000)
    p[:, 1] = 1.0
    ids = decodekit.sample_from_probs(p, top_k=2**30, seed=torch.arange(64))
    assert (ids == 1).all()


def test_zero_probability_never_drawn():
    p = torch.tensor([[0.0, 1.0]]).repeat(100000, 1)
    ids = decodekit.sample_from_probs(p, seed=torch.arange(100000))
    assert (ids == 1).all()
    q = torch.tensor([[0.33, 0.34, 0.0, 0.33]]).repeat(200000, 1)
    ids = decodekit.sample_from_probs(q, seed=torch.arange(200000) + 7)
    assert (ids != 2).all()


def test_min_p_hand_cases():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    assert torch.equal(decodekit.min_p_renorm_probs(p, 0.0), p)
    assert torch.equal(decodekit.min_p_renorm_probs(p, 0.24), p)
    assert close(decodekit.min_p_renorm_probs(p, 0.26)[0], [0, 2 / 9, 3 / 9, 4 / 9])
    assert close(decodekit.min_p_renorm_probs(p, 0.51)[0], [0, 0, 3 / 7, 4 / 7])
    assert close(decodekit.min_p_renorm_probs(p, 0.76)[0], [0, 0, 0, 1])
    assert close(decodekit.min_p_renorm_probs(p, 1.0)[0], [0, 0, 0, 1])
    with pytest.raises(ValueError, match="min_p"):
        decodekit.min_p_renorm_probs(p, 1.05)


def test_joint_filter_order_top_k_then_top_p():
    # top-k 4 keeps {0,1,2,3} (mass 0.85); renormalised [0.4118, 0.2941, 0.2353, 0.0588];
    # top-p 0.82 then keeps {0, 1, 2} (cumulative 0.9412 >= 0.82 only at the third).
    p = torch.tensor([[0.35, 0.25, 0.20, 0.05, 0.03] + [0.01] * 12])
    before = p.clone()
    out = decodekit.filter_probs(p, top_k=4, top_p=0.82)[0]
    assert (out > 0).nonzero().flatten().tolist() == [0, 1, 2]
    assert close(out[:3], torch.tensor([0.35, 0.25, 0.20]) / 0.8)
    ids = decodekit.sample_from_probs(p.expand(30000, 17), top_k=4, top_p=0.82, seed=torch.arange(30000))
    assert set(ids.tolist()) == {0, 1, 2}
    logit_ids = decodekit.sample_from_logits(
        p.log().expand(30000, 17), 1.0, top_k=4, top_p=0.82, seed=torch.arange(30000)
    )
    assert set(logit_ids.tolist()) == {0, 1, 2}
    assert torch.equal(p, before)


def test_vocab_size_masks_padding_columns():
    p = torch.tensor([[0.1, 0.1, 0.1, 0.7]])
    out = decodekit.filter_probs(p, top_k=2, vocab_size=3)
    assert out[0, 3] == 0 and (out[0, :3] > 0).sum() == 2
    ids = decodekit.sample_from_probs(p.expand(3000, 4), seed=torch.arange(3000), vocab_size=3)
    assert ids.max() <= 2
    # The row is its first vocab_size entries: with nothing removed there, they come back as they
    # are (the padding's mass is not renormalised away); a filter that removes one renormalises.
    q = torch.tensor([[0.3, 0.3, 0.4]])
    assert decodekit.filter_probs(q, vocab_size=2).tolist() == [[0.30000001192092896, 0.30000001192092896, 0.0]]
    assert torch.allclose(decodekit.filter_probs(q, top_k=1, vocab_size=2), torch.tensor([[1.0, 0.0, 0.0]]))


def test_invalid_rows():
    p = torch.tensor([[0.5, float("nan")], [0.0, 0.0], [-0.1, 1.1], [0.3, 0.7], [float("inf"), 0.0]])
    out = decodekit.sample_from_probs(p, seed=torch.arange(5), return_valid=True)
    assert out.valid.tolist() == [False, False, False, True, False]
    assert out.token_ids.tolist()[:3] == [-1, -1, -1] and out.token_ids[4] == -1
    with pytest.raises(ValueError, match=r"rows \[0, 1, 2, 4\]"):
        decodekit.sample_from_probs(p, seed=1)
    with pytest.raises(ValueError, match=r"rows \[0, 1, 2, 4\]"):
        decodekit.filter_probs(p, top_p=0.5)
    f = decodekit.filter_probs(p, top_p=0.5, validate=False)
    assert torch.isnan(f[[0, 1, 2, 4]]).all() and close(f[3], [0, 1])


def test_bad_arguments():
    with pytest.raises(TypeError, match="probs must be float32"):
        decodekit.filter_probs(torch.ones(2, 3, dtype=torch.float64) / 3)
    with pytest.raises(ValueError, match="probs must be 2-D"):
        decodekit.sample_from_probs(torch.ones(3) / 3, seed=1)
    with pytest.raises(ValueError, match="top_p"):
        decodekit.top_p_renorm_probs(torch.ones(2, 3) / 3, 1.5)
    with pytest.raises(ValueError, match="seed"):
        decodekit.sample_from_probs(torch.ones(2, 3) / 3)
    with pytest.raises(TypeError, match="top_k"):
        decodekit.top_k_mask_logits(torch.zeros(2, 3), 1.5)


# ------------------------------------------------------------- reference ----
@pytest.mark.parametrize(
    "params",
    [
        dict(top_k=5),
        dict(top_p=0.9),
        dict(min_p=0.1),
        dict(top_k=40, top_p=0.8, min_p=0.02),
        dict(top_k=2000, top_p=0.95),
        dict(top_p=0.3, min_p=0.5),
    ],
)
def test_filter_matches_reference_on_random_rows(params):
    g = torch.Generator().manual_seed(20)
    probs = torch.softmax(torch.randn(16, 3000, generator=g) * 2.5, dim=-1)
    out = decodekit.filter_probs(probs, **params)
    for b in range(16):
        expected = ref.filter_probs(probs[b], **params)
        assert torch.equal(out[b] > 0, expected > 0), b
        torch.testing.assert_close(out[b].double(), expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "params", [dict(), dict(top_k=4), dict(top_p=0.7), dict(min_p=0.2), dict(top_k=8, top_p=0.9, min_p=0.05)]
)
def test_sample_from_probs_chi_square(params):
    # 200,000 draws of one row (each its own seed) against the float64 reference;
    # fails when the chi-square p-value is below 1e-4.
    N = 200_000
    probs = torch.softmax(torch.randn(1, 20, generator=torch.Generator().manual_seed(21)), dim=-1)
    expected = ref.filter_probs(probs[0], **params)
    ids = decodekit.sample_from_probs(probs.expand(N, 20), seed=torch.arange(N) + 5 * 10**6, **params)
    counts = torch.bincount(ids, minlength=20).double()
    kept = expected > 0
    assert counts[~kept].sum() == 0
    assert (expected[kept] * N).min() > 5
    assert (
        scipy_stats.chisquare(counts[kept].numpy(), (expected[kept] / expected[kept].sum() * N).numpy()).pvalue > 1e-4
    )


def test_sample_from_probs_batch_invariance():
    g = torch.Generator().manual_seed(22)
    batch = torch.softmax(torch.randn(64, 8000, generator=g) * 3, dim=-1)
    top_k = torch.tensor([0, 50, 0, 5] * 16)
    top_p = torch.tensor([1.0, 0.9, 0.8, 1.0] * 16, dtype=torch.float64)
    seeds = torch.arange(64) * 31
    full = decodekit.sample_from_probs(batch, top_k, top_p, seed=seeds)
    filt = decodekit.filter_probs(batch, top_k, top_p)
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            for b in (0, 37, 63):
                alone = decodekit.sample_from_probs(
                    batch[b : b + 1], top_k[b : b + 1], top_p[b : b + 1], seed=seeds[b : b + 1]
                )
                assert alone.item() == full[b].item()
                assert torch.equal(
                    decodekit.filter_probs(batch[b : b + 1], top_k[b : b + 1], top_p[b : b + 1])[0], filt[b]
                )
    finally:
        torch.set_num_threads(threads)


def test_opcheck_probability_ops():
    p = torch.softmax(torch.randn(3, 40), dim=-1)
    torch.library.opcheck(torch.ops.decodekit.filter_probs.default, (p, None, 5, None, 0.9, None, 0.0, 40))
    torch.library.opcheck(
        torch.ops.decodekit.sample_from_probs.default,
        (p, None, 0, None, 0.8, None, 0.0, None, 3, None, 0, 40, True, True, 2, False),
    )
    torch.library.opcheck(torch.ops.decodekit.top_k_mask_logits.default, (torch.randn(3, 40), None, 4, 40))


def test_sample_from_probs_logprobs_match_reference():
    g = torch.Generator().manual_seed(32)
    probs = torch.softmax(torch.randn(6, 500, generator=g) * 2, dim=-1)
    out = decodekit.sample_from_probs(
        probs, top_k=30, top_p=0.9, seed=torch.arange(6), return_logprobs=True, top_logprobs=3
    )
    raw = decodekit.sample_from_probs(
        probs, top_k=30, top_p=0.9, seed=torch.arange(6), return_logprobs=True, logprobs_mode="raw"
    )
    for b in range(6):
        lp = torch.log(ref.filter_probs(probs[b], top_k=30, top_p=0.9))
        tok = int(out.token_ids[b])
        assert abs(float(out.logprobs[b]) - float(lp[tok])) < 2e-5
        order = ref.rank_order(probs[b])[:3]
        assert out.top_ids[b].tolist() == order.tolist()
        torch.testing.assert_close(out.top_logprobs[b].double(), lp[order], atol=2e-5, rtol=0)
        assert abs(float(raw.logprobs[b]) - float(torch.log(probs[b, tok].double() / probs[b].double().sum()))) < 2e-6


def test_uniform_row_top_p_keeps_exactly_the_lowest_indices():
    # 32000 equal probabilities with top_p 0.9999: exactly the 31997 lowest indices kept.
    p = torch.full((1, 32000), 1 / 32000)
    out = decodekit.top_p_renorm_probs(p, 0.9999)[0]
    kept = (out > 0).nonzero().flatten()
    assert kept.numel() == 31997 and int(kept.max()) == 31996
    logits_out = decodekit.sample_from_logits(torch.zeros(3000, 32000), 1.0, top_p=0.9999, seed=torch.arange(3000))
    assert int(logits_out.max()) <= 31996
    for top_p in (0.9999999, 1 - 1e-9):
        out = decodekit.top_p_renorm_probs(torch.full((1, 100), 0.01), top_p)[0]
        assert int((out > 0).sum()) == 100


def test_zero_probability_never_drawn_in_ten_million_draws():
    # [0.33, 0.34, 0, 0.33]: 10^7 draws (each its own seed), token 2 never drawn.
    q = torch.tensor([[0.33, 0.34, 0.0, 0.33]]).expand(1_000_000, 4)
    for chunk in range(10):
        ids = decodekit.sample_from_probs(q, seed=torch.arange(1_000_000) + chunk * 1_000_000)
        assert not bool((ids == 2).any())


def test_missing_seed_error_names_what_samples():
    """Without a seed, the error says what makes the op draw, in the op's own arguments."""
    with pytest.raises(ValueError, match=r"sample_from_probs: a seed .* is required when any row samples \(top_k != 1"):
        decodekit.sample_from_probs(torch.tensor([[0.5, 0.5]]))
    assert int(decodekit.sample_from_probs(torch.tensor([[0.25, 0.75]]), top_k=1)) == 1  # greedy: no seed needed
