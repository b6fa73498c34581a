"""Speculative verification: hand cases, losslessness by chi-square, seeds and batching."""

from __future__ import annotations

import pytest
import torch

import decodekit

scipy_stats = pytest.importorskip("scipy.stats")


def test_greedy_hand_cases():
    V = 10
    drafts = torch.tensor([[1, 2, 3, 5, 7]])
    logits = torch.full((1, 6, V), -1.0)
    for j, t in enumerate([1, 2, 3, 4, 6, 8]):
        logits[0, j, t] = 1.0
    out = decodekit.greedy_verify(drafts, logits)
    assert out.output_token_ids.tolist() == [[1, 2, 3, 4, -1, -1]]
    assert out.num_accepted.tolist() == [3] and out.num_emitted.tolist() == [4]
    logits[0, 3, 4], logits[0, 3, 5], logits[0, 4, 6], logits[0, 4, 7] = -1.0, 1.0, -1.0, 1.0  # all 5 match
    out = decodekit.greedy_verify(drafts, logits)
    assert out.output_token_ids.tolist() == [[1, 2, 3, 5, 7, 8]] and out.num_accepted.tolist() == [5]
    ties = torch.zeros(1, 2, 4)  # all equal: argmax is token 0
    assert decodekit.greedy_verify(torch.tensor([[1]]), ties).output_token_ids.tolist() == [[0, -1]]
    padded = decodekit.greedy_verify(torch.tensor([[1, -1, 3]]), logits[:, :4, :])
    assert padded.output_token_ids.tolist() == [[1, 2, -1, -1]] and padded.num_accepted.tolist() == [1]


def test_greedy_verify_errors_name_request_and_position():
    logits = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match=r"draft_token_ids must be in \[-1, vocab_size=5\).*\(1, 1\).*\[7\]"):
        decodekit.greedy_verify(torch.tensor([[0, 1], [2, 7]]), logits)
    with pytest.raises(ValueError, match=r"vocab_size=4"):
        decodekit.greedy_verify(torch.tensor([[0, 4], [2, 1]]), logits, vocab_size=4)
    with pytest.raises(ValueError, match=r"-1, vocab_size"):
        decodekit.greedy_verify(torch.tensor([[0, -2], [2, 1]]), logits)
    logits[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"target_logits rows \(request, position\) \[\(1, 2\)\]"):
        decodekit.greedy_verify(torch.tensor([[0, 1], [2, 1]]), logits)


def test_padded_drafts_never_emit_minus_one():
    g = torch.Generator().manual_seed(1)
    N, V = 4000, 4
    target = torch.softmax(torch.randn(N, 6, V, generator=g), -1)
    drafts = torch.tensor([[1, 0, 1, -1, -1]]).expand(N, 5).contiguous()
    out = decodekit.chain_speculative_sampling(None, drafts, target, seed=torch.arange(N))
    assert int(out.num_accepted.max()) <= 3 and int(out.num_accepted.min()) >= 0
    assert torch.equal(out.num_emitted, out.num_accepted + 1)
    emitted = out.output_token_ids.gather(1, out.num_accepted[:, None])[:, 0]
    assert (emitted >= 0).all() and (emitted < V).all()
    lengths = (out.output_token_ids >= 0).sum(1)
    assert torch.equal(lengths, out.num_emitted)


def test_zero_probability_draft_is_never_accepted():
    target = torch.tensor([[[0.6316, 0.3684, 0.0], [0.3, 0.3, 0.4]]]).expand(20000, 2, 3).contiguous()
    drafts = torch.full((20000, 1), 2)
    draft_probs = torch.tensor([[[0.0, 0.0, 1.0]]]).expand(20000, 1, 3).contiguous()
    out = decodekit.chain_speculative_sampling(draft_probs, drafts, target, seed=torch.arange(20000))
    assert (out.num_accepted == 0).all()
    assert set(out.output_token_ids[:, 0].tolist()) <= {0, 1}


def test_one_position_marginal_is_the_target_not_the_draft():
    # p = [0.6, 0.4], drafts drawn from q = [0.2, 0.8]: 10^6 trials; the first emitted
    # token must follow p (chi-square p-value > 1e-4), far from q and from the
    # [0.44, 0.56] a softmax-normalised residual would give.
    N = 1_000_000
    g = torch.Generator().manual_seed(2)
    q = torch.tensor([0.2, 0.8])
    drafts = torch.multinomial(q, N, replacement=True, generator=g)[:, None]
    target = torch.tensor([[0.6, 0.4], [0.5, 0.5]]).expand(N, 2, 2).contiguous()
    out = decodekit.chain_speculative_sampling(q.expand(N, 1, 2).contiguous(), drafts, target, seed=torch.arange(N))
    first = out.output_token_ids[:, 0]
    counts = torch.bincount(first, minlength=2).double()
    assert (
        scipy_stats.chisquare(counts.numpy(), (torch.tensor([0.6, 0.4], dtype=torch.float64) * N).numpy()).pvalue > 1e-4
    )
    assert abs(float(counts[0]) / N - 0.44) > 0.1


@pytest.mark.parametrize("K", [1, 4, 8])
@pytest.mark.parametrize("one_hot", [False, True])
def test_lossless_every_emitted_position(K, one_hot):
    # Random p, q over V = 6. 200,000 rows, each its own seed; drafts sampled from q
    # (or from a one-hot q when one_hot). For every position j, the tokens of rows that
    # reached j follow p_j by a chi-square test (p-value > 1e-4); positions where some cell
    # expects fewer than 5 samples are skipped (at least the first is always tested).
    N, V = 200_000, 6
    g = torch.Generator().manual_seed(10 * K + one_hot)
    p = torch.softmax(torch.randn(K + 1, V, generator=g), -1)
    if one_hot:
        draft_tokens = torch.randint(0, V, (K,), generator=g)
        drafts = draft_tokens.expand(N, K).contiguous()
        q = None
    else:
        q = torch.softmax(torch.randn(K, V, generator=g), -1)
        drafts = torch.stack([torch.multinomial(q[j], N, replacement=True, generator=g) for j in range(K)], 1)
    out = decodekit.chain_speculative_sampling(
        None if q is None else q.expand(N, K, V).contiguous(),
        drafts,
        p.expand(N, K + 1, V).contiguous(),
        seed=torch.arange(N) + 7,
    )
    tested = 0
    for j in range(K + 1):
        reached = out.num_emitted > j
        n = int(reached.sum())
        expected = p[j].double() * n
        if n == 0 or float(expected.min()) < 5:
            continue
        counts = torch.bincount(out.output_token_ids[reached, j], minlength=V).double()
        assert scipy_stats.chisquare(counts.numpy(), (expected / expected.sum() * n).numpy()).pvalue > 1e-4, j
        tested += 1
    assert tested >= 1


def test_seeded_rows_reproduce_and_ignore_batching():
    g = torch.Generator().manual_seed(3)
    V, K = 50, 4
    target = torch.softmax(torch.randn(6, K + 1, V, generator=g), -1)
    q = torch.softmax(torch.randn(6, K, V, generator=g), -1)
    drafts = torch.randint(0, V, (6, K), generator=g)
    two = decodekit.chain_speculative_sampling(q[:2], drafts[:2], target[:2], seed=torch.tensor([1, 2]))
    again = decodekit.chain_speculative_sampling(q[:2], drafts[:2], target[:2], seed=torch.tensor([1, 2]))
    assert torch.equal(two.output_token_ids, again.output_token_ids)
    swapped = decodekit.chain_speculative_sampling(q[[1, 0]], drafts[[1, 0]], target[[1, 0]], seed=torch.tensor([2, 1]))
    assert torch.equal(swapped.output_token_ids, two.output_token_ids[[1, 0]])
    q2, d2, t2 = q[[0, 1]], drafts[[0, 1]], target[[0, 1]]
    big2 = decodekit.chain_speculative_sampling(
        torch.cat([q[2:3], q2[:1], q[4:6], q2[1:]]),
        torch.cat([drafts[2:3], d2[:1], drafts[4:6], d2[1:]]),
        torch.cat([target[2:3], t2[:1], target[4:6], t2[1:]]),
        seed=torch.tensor([8, 1, 7, 6, 2]),
    )
    assert torch.equal(big2.output_token_ids[1], two.output_token_ids[0])
    assert torch.equal(big2.output_token_ids[4], two.output_token_ids[1])


def test_bad_input():
    t = torch.full((2, 3, 4), 0.25)
    with pytest.raises(ValueError, match="draft_token_ids"):
        decodekit.chain_speculative_sampling(None, torch.tensor([[5, 0], [0, 0]]), t, seed=1)
    with pytest.raises(ValueError, match="target_probs"):
        decodekit.chain_speculative_sampling(None, torch.zeros(2, 2, dtype=torch.long), t[:, :2], seed=1)
    with pytest.raises(ValueError, match="target_probs"):
        bad = t.clone()
        bad[0, 0, 0] = float("nan")
        decodekit.chain_speculative_sampling(None, torch.zeros(2, 2, dtype=torch.long), bad, seed=1)
    with pytest.raises(ValueError, match="seed"):
        decodekit.chain_speculative_sampling(None, torch.zeros(2, 2, dtype=torch.long), t)
    with pytest.raises(TypeError, match="draft_token_ids"):
        decodekit.greedy_verify(torch.zeros(2, 2), torch.zeros(2, 3, 4))


def test_opcheck():
    t = torch.softmax(torch.randn(2, 3, 5), -1)
    q = torch.softmax(torch.randn(2, 2, 5), -1)
    torch.library.opcheck(
        torch.ops.decodekit.chain_speculative_sampling.default,
        (q, torch.tensor([[1, 2], [0, -1]]), t, None, 3, None, 0, 5),
    )


def test_from_logits_min_p_hand_case():
    # Target probs [0.6, 0.35, 0.05] after min_p 0.1 -> [0.6316, 0.3684, 0]: a one-hot draft of
    # token 2 is never accepted, and the recovered token is 0 or 1.
    from decodekit import processed_probs

    logits = torch.log(torch.tensor([[0.6, 0.35, 0.05]]))
    probs = processed_probs(logits, 1.0, min_p=0.1)
    assert torch.allclose(probs, torch.tensor([[0.6 / 0.95, 0.35 / 0.95, 0.0]]), atol=1e-6)
    N = 20000
    target = torch.log(torch.tensor([[0.6, 0.35, 0.05], [0.3, 0.3, 0.4]])).expand(N, 2, 3).contiguous()
    out = decodekit.chain_speculative_sampling_from_logits(
        None, torch.full((N, 1), 2), target, 1.0, min_p=0.1, seed=torch.arange(N)
    )
    assert (out.num_accepted == 0).all() and set(out.output_token_ids[:, 0].tolist()) <= {0, 1}


@pytest.mark.parametrize("params", [dict(temperature=0.7, top_k=3), dict(temperature=1.3, top_p=0.8, min_p=0.05)])
def test_from_logits_lossless_with_filters(params):
    # 200,000 rows, K=3, V=6: each emitted position follows the processed target distribution
    # (chi-square p > 1e-4; positions with fewer than 5 expected per kept cell skipped).
    from decodekit import processed_probs

    N, K, V = 200_000, 3, 6
    g = torch.Generator().manual_seed(40)
    t_logits = torch.randn(K + 1, V, generator=g) * 1.5
    d_logits = torch.randn(K, V, generator=g) * 1.5
    q = processed_probs(d_logits, **params)
    p = processed_probs(t_logits, **params).double()
    drafts = torch.stack([torch.multinomial(q[j], N, replacement=True, generator=g) for j in range(K)], 1)
    out = decodekit.chain_speculative_sampling_from_logits(
        d_logits.expand(N, K, V).contiguous(),
        drafts,
        t_logits.expand(N, K + 1, V).contiguous(),
        seed=torch.arange(N) + 3,
        **params,
    )
    tested = 0
    for j in range(K + 1):
        reached = out.num_emitted > j
        n = int(reached.sum())
        kept = p[j] > 0
        expected = p[j][kept] / p[j][kept].sum() * n
        counts = torch.bincount(out.output_token_ids[reached, j], minlength=V).double()
        assert counts[~kept].sum() == 0
        if n == 0 or float(expected.min()) < 5:
            continue
        assert scipy_stats.chisquare(counts[kept].numpy(), expected.numpy()).pvalue > 1e-4, j
        tested += 1
    assert tested >= 1


def test_unnormalised_rows_and_padding_columns_are_renormalised():
    # Target mass in padding columns (vocab_size=2) or rows summing to 10: the emitted token
    # must follow the renormalised distribution over the vocabulary (uniform here).
    N = 100_000
    for target, vs in ((torch.full((N, 2, 4), 0.25), 2), (torch.full((N, 2, 4), 2.5), None)):
        out = decodekit.chain_speculative_sampling(
            None, torch.zeros(N, 1, dtype=torch.long), target, seed=torch.arange(N), vocab_size=vs
        )
        first = out.output_token_ids[:, 0]
        k = 2 if vs else 4
        counts = torch.bincount(first, minlength=k).double()[:k]
        assert counts.sum() == N
        assert scipy_stats.chisquare(counts.numpy()).pvalue > 1e-4


def test_from_logits_greedy_needs_no_seed_and_empty_drafts():
    L = torch.randn(2, 2, 6)
    out = decodekit.chain_speculative_sampling_from_logits(None, torch.zeros(2, 1, dtype=torch.long), L, 0.0)
    assert torch.equal(out.output_token_ids[:, -1][out.num_accepted == 1], L[out.num_accepted == 1, 1].argmax(-1))
    decodekit.chain_speculative_sampling_from_logits(None, torch.zeros(2, 1, dtype=torch.long), L, 1.0, 1)
    empty = decodekit.chain_speculative_sampling_from_logits(
        torch.zeros(2, 0, 6), torch.zeros(2, 0, dtype=torch.long), L[:, :1], 1.0, seed=1
    )
    assert empty.output_token_ids.shape == (2, 1) and (empty.num_emitted == 1).all()


@pytest.mark.parametrize("V,vs", [(37, 37), (37, 20), (64, 33), (5, 5)])
def test_probability_row_check(V, vs):
    # The wrapper's one-pass C++ check: any negative / NaN / inf entry (padding columns too) is
    # status 1; a target row with no positive mass in [0, vocab_size) is status 2.
    check = torch.ops.decodekit.check_probability_rows
    t = torch.rand(3, 4, V) + 0.01
    assert check(t, vs, True) == 0
    for bad in (-1e-9, float("nan"), float("inf")):
        for col in (0, vs - 1, V - 1):
            u = t.clone()
            u[2, 3, col] = bad
            assert check(u, vs, True) == 1, (bad, col)
    u = t.clone()
    u[1, 2, :vs] = 0
    assert check(u, vs, True) == 2 and check(u, vs, False) == 0
    with pytest.raises(ValueError, match="positive mass"):
        decodekit.chain_speculative_sampling(None, torch.zeros(3, 3, dtype=torch.long), u, seed=1, vocab_size=vs)


def test_zero_draft_probability_token_is_rejected_and_invalid_rows_marked():
    # A draft token with q(x) = 0 cannot come from q: never accepted (accepting it would bias
    # the output); with validate=False a row read with NaN / inf / negative entries is marked
    # (-1, num_emitted == num_accepted), never answered.
    N = 2000
    p = torch.full((N, 2, 4), 0.25)
    q = torch.tensor([0.0, 0.5, 0.5, 0.0])[None, None].expand(N, 1, 4).contiguous()
    out = decodekit.chain_speculative_sampling(q, torch.zeros(N, 1, dtype=torch.long), p, seed=torch.arange(N))
    assert (out.num_accepted == 0).all()
    assert set(out.output_token_ids[:, 0].tolist()) <= {0, 3}  # the residual max(0, p - q)
    t = torch.full((2, 3, 10), 0.1)
    t[0, 0, 7] = float("inf")  # the first row request 0 reads
    ids = torch.tensor([[1, 2], [1, 2]])
    out = decodekit.chain_speculative_sampling(None, ids, t, seed=torch.tensor([0, 0]), validate=False)
    assert int(out.num_emitted[0]) == int(out.num_accepted[0]) == 0
    assert (out.output_token_ids[0] == -1).all()
    assert int(out.num_emitted[1]) == int(out.num_accepted[1]) + 1


# ------------------------------------------------- new-user trial (2026-12) ----
def test_from_logits_checks_vocab_size():
    # Found by a trial: vocab_size=-1 silently dropped the last column.
    t = torch.randn(2, 3, 10)
    ids = torch.tensor([[1, 2], [3, 4]])
    for bad in (-1, 0, 11):
        with pytest.raises(ValueError, match=r"vocab_size must be in \[1, V=10\]"):
            decodekit.chain_speculative_sampling_from_logits(None, ids, t, 0.0, vocab_size=bad)
    with pytest.raises(TypeError, match="vocab_size"):
        decodekit.chain_speculative_sampling_from_logits(None, ids, t, 0.0, vocab_size=2.5)
    # a valid vocab_size: greedy verification never emits a padding column
    t[:, :, 9] = 100.0
    out = decodekit.chain_speculative_sampling_from_logits(None, ids, t, 0.0, vocab_size=9)
    assert (out.output_token_ids < 9).all()


def test_meta_tensors():
    # Found by a trial: the wrapper refused meta tensors although the op has a Meta kernel.
    B, K, V = 3, 2, 16
    for draft in (None, torch.empty(B, K, V, device="meta")):
        out = decodekit.chain_speculative_sampling(
            draft, torch.zeros(B, K, dtype=torch.long, device="meta"), torch.empty(B, K + 1, V, device="meta"), seed=1
        )
        assert out.output_token_ids.device.type == "meta" and out.output_token_ids.shape == (B, K + 1)
        assert out.num_accepted.shape == (B,) and out.num_emitted.shape == (B,)


def test_missing_seed_error_names_the_draws():
    with pytest.raises(ValueError, match=r"chain_speculative_sampling: a seed .* is required for the acceptance tests"):
        decodekit.chain_speculative_sampling(None, torch.tensor([[0]]), torch.full((1, 2, 2), 0.5))
