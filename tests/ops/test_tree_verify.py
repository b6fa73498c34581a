"""Tree verification (tree_speculative_sampling, typical_acceptance, greedy_tree_verify): hand
cases, exact enumeration, losslessness by chi-square and total variation, references on random
trees, batch invariance, seeds, and errors for malformed trees."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import decodekit
from reference import speculative as rs
from reference.philox import philox_element, uniform_double
from reference.sampling import draw

scipy_stats = pytest.importorskip("scipy.stats")
ops = torch.ops.decodekit


# ------------------------------------------------------------------ helpers ----
def random_tree(g: torch.Generator, depth: int, branching: int, V: int, max_nodes: int = 20, padding: int = 0):
    """A tree built level by level (so parents come first): every node above `depth` gets 1 to
    `branching` children with random tokens (siblings may repeat a token), at most `max_nodes`
    real nodes; then `padding` padding nodes. Returns (cand, par) lists."""
    cand, par = [int(torch.randint(0, V, (), generator=g))], [-1]
    frontier = [0]
    for _ in range(depth):
        nxt = []
        for node in frontier:
            for _ in range(int(torch.randint(1, branching + 1, (), generator=g))):
                if len(cand) < max_nodes:
                    cand.append(int(torch.randint(0, V, (), generator=g)))
                    par.append(node)
                    nxt.append(len(cand) - 1)
        frontier = nxt
    return cand + [-1] * padding, par + [-1] * padding


def rand_probs(g, *shape, zeros: float = 0.0):
    p = torch.softmax(torch.randn(*shape, generator=g) * 1.2, -1)
    if zeros:
        p = torch.where(torch.rand(*shape, generator=g) < zeros, 0.0, p)
        p[..., 0] += 1e-3  # keep some mass in every row
        p = p / p.sum(-1, keepdim=True)
    return p


def batch(cand, par, probs, B):
    """B copies of one tree (contiguous)."""
    N, V = probs.shape
    return (
        torch.tensor(cand).expand(B, N).contiguous(),
        torch.tensor(par).expand(B, N).contiguous(),
        probs.expand(B, N, V).contiguous(),
    )


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit over the cells with positive probability (all cells with
    probability 0 must be empty); cells expecting fewer than 5 samples are pooled into one
    (added to the largest cell if the pool itself expects fewer than 5)."""
    n = float(counts.sum())
    keep = probs > 0
    assert float(counts[~keep].sum()) == 0
    counts, expected = counts[keep].double(), probs[keep].double() / probs[keep].double().sum() * n
    small = expected < 5
    if bool(small.any()):
        pool_c, pool_e = counts[small].sum(), expected[small].sum()
        counts, expected = counts[~small], expected[~small]
        if float(pool_e) >= 5:
            counts, expected = torch.cat([counts, pool_c[None]]), torch.cat([expected, pool_e[None]])
        else:
            i = int(expected.argmax())
            counts[i] += pool_c
            expected[i] += pool_e
    assert counts.numel() >= 2
    return scipy_stats.chisquare(counts.numpy(), expected.numpy()).pvalue


def outputs_of(out):
    """Per row: the emitted tokens as a tuple."""
    return [tuple(row[:e]) for row, e in zip(out.output_token_ids.tolist(), out.num_emitted.tolist())]


# ---------------------------------------------------------------- hand cases ----
# Root distribution p = [0.5, 0.3, 0.2], two leaf children with tokens 0 and 1 (nodes 1, 2),
# whose rows are A and B. By hand:
#   child 0 accepted with probability p(0) / 1 = 0.5            -> (0, y), y ~ A
#   else r = [0, 0.3, 0.2]: child 1 accepted with 0.3 / 0.5 = 0.6 -> (1, y), y ~ B: 0.5 * 0.6 = 0.3
#   else (0.5 * 0.4 = 0.2) the residual [0, 0, 0.2] emits 2       -> (2,)
# so the first token is 0 / 1 / 2 with 0.5 / 0.3 / 0.2 = p.
HAND_P = [0.5, 0.3, 0.2]
HAND_A = [0.1, 0.2, 0.7]
HAND_B = [0.6, 0.2, 0.2]
HAND_DIST = {
    (0, 0): 0.5 * 0.1,
    (0, 1): 0.5 * 0.2,
    (0, 2): 0.5 * 0.7,
    (1, 0): 0.3 * 0.6,
    (1, 1): 0.3 * 0.2,
    (1, 2): 0.3 * 0.2,
    (2,): 0.2,
}


def test_hand_two_children_exact_enumeration_and_counts():
    cand, par = [2, 0, 1], [-1, 0, 0]
    probs = torch.tensor([HAND_P, HAND_A, HAND_B])
    exact = rs.tree_output_distribution(cand, par, probs)
    assert set(exact) == set(HAND_DIST)
    for k, v in HAND_DIST.items():
        assert exact[k] == pytest.approx(v, abs=1e-7)  # float32 inputs
    # 200,000 passes (each its own seed): the 7 output sequences by chi-square (p > 1e-4), and the
    # accepted nodes match the tokens (node 1 for token 0, node 2 for token 1).
    B = 200_000
    c, p, t = batch(cand, par, probs, B)
    out = decodekit.tree_speculative_sampling(c, p, t, seed=torch.arange(B) + 11, offset=5)
    assert out.output_token_ids.shape == (B, 2) and out.accepted_nodes.shape == (B, 2)  # D = 1
    seqs = Counter(outputs_of(out))
    keys = sorted(HAND_DIST)
    assert set(seqs) == set(keys)
    counts = torch.tensor([seqs[k] for k in keys], dtype=torch.float64)
    assert counts.sum() == B
    assert chi2_pvalue(counts, torch.tensor([HAND_DIST[k] for k in keys])) > 1e-4
    first = out.output_token_ids[:, 0]
    acc = out.num_accepted
    assert torch.equal(out.num_emitted, acc + 1)
    assert bool(((acc == 1) == (first <= 1)).all())
    nodes = out.accepted_nodes
    assert torch.equal(nodes[acc == 1, 0], first[acc == 1] + 1)
    assert bool((nodes[acc == 0] == -1).all()) and bool((nodes[:, 1:] == -1).all())
    assert bool((out.output_token_ids[acc == 0, 1:] == -1).all())


def test_hand_duplicate_siblings_and_zero_probability_candidates():
    # Two siblings with token 1: after the first is rejected r(1) = 0, so the second never is
    # accepted: (1, .) has probability 0.3 and the residual [0.5, 0, 0.2] / 0.7 gives 0 or 2.
    # A candidate the target gives probability 0 (token 3) is never accepted.
    cand, par = [0, 1, 1, 3], [-1, 0, 0, 0]
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25] * 4, [1.0, 0, 0, 0], [0.0, 0, 0, 1.0]])
    exact = rs.tree_output_distribution(cand, par, probs)
    assert exact[(0,)] == pytest.approx(0.5) and exact[(2,)] == pytest.approx(0.2)
    assert sum(v for k, v in exact.items() if k[0] == 1) == pytest.approx(0.3)
    B = 50_000
    out = decodekit.tree_speculative_sampling(*batch(cand, par, probs, B), seed=torch.arange(B))
    nodes = out.accepted_nodes[:, 0]
    assert not bool((nodes == 2).any()) and not bool((nodes == 3).any())
    assert set(out.output_token_ids[:, 0].tolist()) == {0, 1, 2}


def test_root_without_children_and_padding_nodes():
    # A root alone: the bonus draw from its row (stream 2^17); padding nodes change nothing.
    g = torch.Generator().manual_seed(3)
    probs = rand_probs(g, 3, 6)
    seeds = torch.arange(20)
    alone = decodekit.tree_speculative_sampling(
        torch.tensor([[4]]).expand(20, 1), torch.tensor([[-1]]).expand(20, 1), probs[:1].expand(20, 1, 6), seed=seeds
    )
    padded = decodekit.tree_speculative_sampling(
        torch.tensor([[4, -1, -1]]).expand(20, 3),
        torch.tensor([[-1, 0, 7]]).expand(20, 3),
        probs.expand(20, 3, 6),
        seed=seeds,
        max_depth=0,
    )
    assert alone.output_token_ids.shape == (20, 1)
    assert torch.equal(alone.output_token_ids, padded.output_token_ids)
    assert (alone.num_accepted == 0).all() and (alone.num_emitted == 1).all()
    for b in range(3):
        expect = draw(probs[0].double(), uniform_double(b, 0, rs.TREE_BONUS, 0))
        assert int(alone.output_token_ids[b, 0]) == expect


def test_padding_in_the_middle():
    # Padding nodes may sit anywhere after the root; a real node after them keeps its index.
    cand, par = [0, -1, 1, -1, 2], [-1, -1, 0, 0, 2]
    g = torch.Generator().manual_seed(4)
    probs = rand_probs(g, 5, 4)
    probs[0] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # token 1 (node 2) certain
    probs[2] = torch.tensor([0.0, 0.0, 1.0, 0.0])  # then token 2 (node 4) certain
    out = decodekit.tree_speculative_sampling(*batch(cand, par, probs, 4), seed=torch.arange(4))
    assert out.accepted_nodes[:, :2].tolist() == [[2, 4]] * 4
    assert out.output_token_ids[:, :2].tolist() == [[1, 2]] * 4 and (out.num_accepted == 2).all()


# ---------------------------------------------------------- losslessness ----
def synthetic_target(g, cand, par, V):
    """The target model of the lossless tests: P0 at the root, P1[y] after a first token y,
    an arbitrary distribution deeper (it does not affect the first two tokens)."""
    P0 = rand_probs(g, V, zeros=0.2)
    P1 = rand_probs(g, V, V, zeros=0.2)
    rows = []
    for n in range(len(cand)):
        d = rs.depth(par, n) if cand[n] >= 0 or n == 0 else 0
        if n == 0:
            rows.append(P0)
        elif cand[n] >= 0 and d == 1:
            rows.append(P1[cand[n]])
        else:
            rows.append(rand_probs(g, V))
    return P0, P1, torch.stack(rows)


@pytest.mark.parametrize("depth,branching", [(1, 1), (1, 3), (2, 2), (3, 3), (4, 1), (4, 2)])
def test_lossless_first_two_tokens(depth, branching):
    # 200,000 requests per tree, V = 5. Pass 1 runs the tree; a request that emitted only one token
    # runs pass 2 on a second random tree whose root row is P1[first token] (other offset). The
    # joint of the first two tokens must be P0(y1) P1[y1](y2) (chi-square over the 25 cells, cells
    # of probability 0 empty, p > 1e-4), and the output sequences of pass 1 must follow the exact
    # enumeration (chi-square over the sequences expecting >= 5, p > 1e-4).
    V, B = 5, 200_000
    g = torch.Generator().manual_seed(100 * depth + branching)
    cand, par = random_tree(g, depth, branching, V, padding=1)
    P0, P1, probs = synthetic_target(g, cand, par, V)
    seeds = torch.arange(B) + 1000 * depth + branching
    out = decodekit.tree_speculative_sampling(*batch(cand, par, probs, B), seed=seeds, offset=17)
    assert int(out.num_accepted.max()) <= depth
    t1 = out.output_token_ids[:, 0].clone()
    t2 = out.output_token_ids[:, 1].clone()
    one = out.num_emitted == 1
    cand2, par2 = random_tree(g, 2, 2, V)
    rows2 = rand_probs(g, len(cand2), V).expand(B, len(cand2), V).clone()
    rows2[:, 0] = P1[t1]
    out2 = decodekit.tree_speculative_sampling(
        torch.tensor(cand2).expand(B, -1).contiguous(),
        torch.tensor(par2).expand(B, -1).contiguous(),
        rows2,
        seed=seeds,
        offset=18,
    )
    t2 = torch.where(one, out2.output_token_ids[:, 0], t2)
    counts = torch.bincount(t1 * V + t2, minlength=V * V)
    joint = (P0.double()[:, None] * P1.double()).flatten()
    assert chi2_pvalue(counts, joint) > 1e-4
    # Pass 1 against the exact enumeration of the walk.
    exact = rs.tree_output_distribution(cand, par, probs)
    assert sum(exact.values()) == pytest.approx(1.0, abs=1e-12)
    seqs = Counter(outputs_of(out))
    assert set(seqs) <= set(exact)
    big = sorted(k for k, v in exact.items() if v * B >= 20)
    index = {k: i for i, k in enumerate(big)}
    seq_counts = torch.zeros(len(big) + 1, dtype=torch.float64)
    for s, k in seqs.items():
        seq_counts[index.get(s, len(big))] += k
    cell_p = torch.tensor([exact[k] for k in big] + [1.0 - sum(exact[k] for k in big)])
    if float(cell_p[-1]) * B < 5:  # merge a tiny rest into the last cell
        seq_counts[-2] += seq_counts[-1]
        cell_p[-2] += cell_p[-1]
        seq_counts, cell_p = seq_counts[:-1], cell_p[:-1]
    assert chi2_pvalue(seq_counts, cell_p.clamp_min(0)) > 1e-4


def test_first_token_total_variation_at_one_million():
    # 10^6 passes (4 calls of 250,000 requests, each request its own seed, offsets 0-3) of one tree
    # of depth 3, V = 8: the total variation between the first token's frequencies and the root's
    # distribution is at most 0.01 (its expected value here is about 0.001).
    V, B = 8, 250_000
    g = torch.Generator().manual_seed(7)
    cand, par = random_tree(g, 3, 3, V, max_nodes=12)
    probs = rand_probs(g, len(cand), V, zeros=0.2)
    c, p, t = batch(cand, par, probs, B)
    counts = torch.zeros(V, dtype=torch.float64)
    for offset in range(4):
        out = decodekit.tree_speculative_sampling(c, p, t, seed=torch.arange(B), offset=offset)
        counts += torch.bincount(out.output_token_ids[:, 0], minlength=V).double()
    freq = counts / counts.sum()
    target = probs[0].double() / probs[0].double().sum()
    assert 0.5 * float((freq - target).abs().sum()) <= 0.01


# ----------------------------------------------------- exact replays ----
def random_batch(seed: int, B: int, V: int, N: int, zeros: float = 0.1):
    """B random trees padded to N nodes, with random probability rows."""
    g = torch.Generator().manual_seed(seed)
    cands, pars = [], []
    for _ in range(B):
        c, p = random_tree(g, int(torch.randint(1, 5, (), generator=g)), 3, V, max_nodes=N)
        cands.append(c + [-1] * (N - len(c)))
        pars.append(p + [-1] * (N - len(p)))
    probs = rand_probs(g, B, N, V, zeros=zeros)
    return torch.tensor(cands), torch.tensor(pars), probs


def test_tree_sampling_replays_the_python_walk():
    # 150 random trees (V = 40, N = 14) with the ops' Philox numbers replayed in Python (float64
    # sums): the same tokens and accepted nodes, row by row. Small V makes acceptances frequent.
    cand, par, probs = random_batch(21, 150, 40, 14, zeros=0.3)
    # Make the first candidate likely: half the rows put mass 0.6 on it.
    for b in range(0, 150, 2):
        for n in range(1, 14):
            if cand[b, n] >= 0:
                probs[b, par[b, n]] *= 0.4
                probs[b, par[b, n], cand[b, n]] += 0.6
    seeds = torch.arange(150) * 7 + 3
    out = decodekit.tree_speculative_sampling(cand, par, probs, seed=seeds, offset=torch.arange(150))
    for b in range(150):
        toks, nodes = rs.tree_speculative_sampling(cand[b].tolist(), par[b].tolist(), probs[b], int(seeds[b]), b)
        a = len(nodes)
        assert int(out.num_accepted[b]) == a and int(out.num_emitted[b]) == a + 1
        assert out.output_token_ids[b, : a + 1].tolist() == toks, b
        assert out.accepted_nodes[b, :a].tolist() == nodes
        assert bool((out.output_token_ids[b, a + 1 :] == -1).all()) and bool((out.accepted_nodes[b, a:] == -1).all())
    assert int(out.num_accepted.max()) >= 2


def test_unnormalised_rows_and_vocab_padding():
    # Rows scaled by 10 and mass in padding columns (vocab_size=4 of V=6) give the same outputs as
    # the normalised rows over the vocabulary (the acceptance compares u * sum(r) with r(x)).
    cand, par, probs = random_batch(22, 40, 4, 8)
    seeds = torch.arange(40)
    ref = decodekit.tree_speculative_sampling(cand, par, probs, seed=seeds)
    wide = torch.cat([probs * 10, torch.full((40, 8, 2), 3.0)], -1)
    got = decodekit.tree_speculative_sampling(cand, par, wide, seed=seeds, vocab_size=4)
    assert (got.output_token_ids < 4).all()
    same = (got.output_token_ids == ref.output_token_ids).all(1)
    assert int(same.sum()) >= 38  # rescaling may move a uniform across a rounding edge, rarely


# ------------------------------------------------------ typical acceptance ----
def test_typical_acceptance_hand_thresholds():
    # Confident p = [0.95, 0.04, 0.01]: H = 0.2235 nats (by hand), 0.3 * exp(-H) = 0.2399, so the
    # threshold is min(0.09, 0.2389) = 0.09: token 0 (0.95) is accepted, token 1 (0.04) is not.
    # Flat p = [0.02, then 0.98 / 9 = 0.1089 for 9 tokens]: H = 2.2513, 0.3 * exp(-H) = 0.0316, so
    # the threshold is 0.0316: token 0 (0.02) is rejected, token 1 (0.1089) accepted. (A flatter
    # distribution lowers the threshold: 0.04 would pass here but not in the confident case.)
    conf = torch.tensor([0.95, 0.04, 0.01] + [0.0] * 7)
    flat = torch.tensor([0.02] + [0.98 / 9] * 9)
    assert rs.entropy(conf) == pytest.approx(0.2235, abs=1e-4)
    assert rs.entropy(flat) == pytest.approx(2.2513, abs=1e-4)
    cases = [(conf, 0, True), (conf, 1, False), (flat, 0, False), (flat, 1, True)]
    for p, x, accepted in cases:
        rows = torch.stack([p, torch.full((10,), 0.1)])
        out = decodekit.typical_acceptance(torch.tensor([[5, x]]), torch.tensor([[-1, 0]]), rows[None], seed=0)
        assert int(out.num_accepted[0]) == int(accepted), (p, x)
        assert rs.typical_accepts(p, x, 0.09, 0.3) == accepted


def test_typical_acceptance_strict_thresholds_and_parameters():
    # q = [0.25, 0.75] (exact in float32). With delta large the threshold is epsilon: 0.25 > 0.25 is
    # false, 0.25 > 0.2499 true. With epsilon = 1 the threshold is delta * exp(-H), H = 0.5623:
    # 0.25 > delta * 0.5699 iff delta < 0.4387: accepted at 0.43, rejected at 0.45. delta = 0 accepts
    # any token with q > 0 and never one with q = 0 (third candidate below). Per-row tensors.
    rows = torch.tensor([[0.25, 0.75, 0.0], [0.3, 0.3, 0.4]])
    cand = torch.tensor([[1, 0]]).expand(5, 2)
    par = torch.tensor([[-1, 0]]).expand(5, 2)
    eps = torch.tensor([0.25, 0.2499, 1.0, 1.0, 0.0])
    delta = torch.tensor([100.0, 100.0, 0.43, 0.45, 0.0])
    out = decodekit.typical_acceptance(cand, par, rows[None].expand(5, 2, 3), eps, delta, seed=1)
    assert out.num_accepted.tolist() == [0, 1, 1, 0, 1]
    assert out.accepted_nodes[:, 0].tolist() == [-1, 1, 1, -1, 1]
    zero = decodekit.typical_acceptance(
        torch.tensor([[0, 2]]), torch.tensor([[-1, 0]]), rows[None, :2], 0.0, 0.0, seed=1
    )
    assert int(zero.num_accepted[0]) == 0


def test_typical_acceptance_longest_path_and_ties():
    # Every candidate accepted (delta = 0 and positive probabilities): the longest path wins, and
    # between two equally deep ends the lower node index (node 3 over node 4).
    #        0
    #      1   2
    #     4     3   (node 3 is 2's child, node 4 is 1's child)
    cand = torch.tensor([[0, 1, 2, 1, 2]])
    par = torch.tensor([[-1, 0, 0, 2, 1]])
    probs = torch.full((1, 5, 3), 1 / 3)
    out = decodekit.typical_acceptance(cand, par, probs, 0.09, 0.0, seed=3)
    assert out.accepted_nodes[0, :2].tolist() == [2, 3] and out.output_token_ids[0, :2].tolist() == [2, 1]
    assert out.output_token_ids.shape == (1, 3) and int(out.num_emitted[0]) == 3


def test_typical_acceptance_matches_reference_on_random_trees():
    # 120 random trees, V = 12: accepted nodes by the float64 reference (Medusa's formula with exp),
    # the emitted token by the reference draw on stream 2^17.
    cand, par, probs = random_batch(31, 120, 12, 16, zeros=0.3)
    eps = torch.rand(120, generator=torch.Generator().manual_seed(1)).double() * 0.3
    delta = torch.rand(120, generator=torch.Generator().manual_seed(2)).double() * 2
    seeds = torch.arange(120) + 50
    out = decodekit.typical_acceptance(cand, par, probs, eps, delta, seed=seeds, offset=9)
    for b in range(120):
        toks, nodes = rs.typical_acceptance(
            cand[b].tolist(), par[b].tolist(), probs[b], float(eps[b]), float(delta[b]), int(seeds[b]), 9
        )
        assert out.accepted_nodes[b, : len(nodes)].tolist() == nodes, b
        assert out.output_token_ids[b, : len(toks)].tolist() == toks, b
        assert int(out.num_accepted[b]) == len(nodes)
    assert int(out.num_accepted.max()) >= 2


def test_typical_acceptance_on_one_hot_rows_is_greedy_and_needs_no_seed():
    # Greedy processing (temperature 0) gives one-hot rows: typical acceptance then keeps exactly
    # the argmax path, as greedy_tree_verify on the logits, and needs no seed.
    cand, par, _ = random_batch(41, 30, 6, 12)
    logits = torch.randn(30, 12, 6, generator=torch.Generator().manual_seed(5))
    logits[:, :, 2] += 1.5  # candidates often match
    cand = torch.where(cand >= 0, torch.where(torch.rand(30, 12) < 0.6, 2, cand), cand)
    cand[:, 0] = 0
    one_hot = decodekit.processed_probs(logits.reshape(-1, 6), 0.0).reshape(30, 12, 6)
    typ = decodekit.typical_acceptance(cand, par, one_hot)
    greedy = decodekit.greedy_tree_verify(cand, par, logits)
    for a, b in zip(typ, greedy):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="seed"):
        decodekit.typical_acceptance(cand, par, torch.softmax(logits, -1))


# ------------------------------------------------------ greedy tree verify ----
def test_greedy_tree_hand_case():
    # argmax after the root is token 3, after node 1 token 4, after node 2 token 7. Both node 1 and
    # node 2 carry token 3 (equally deep paths of length 2 under them): node 3 (under 1, token 4)
    # and node 4 (under 2, token 7) both match, so the end is the lower index: node 3; the bonus is
    # the argmax after node 3 (token 9).
    V = 10
    cand = torch.tensor([[1, 3, 3, 4, 7, 5]])
    par = torch.tensor([[-1, 0, 0, 1, 2, 0]])
    logits = torch.zeros(1, 6, V)
    for n, t in enumerate([3, 4, 7, 9, 8, 0]):
        logits[0, n, t] = 1.0
    out = decodekit.greedy_tree_verify(cand, par, logits)
    assert out.output_token_ids.tolist() == [[3, 4, 9]]
    assert out.accepted_nodes.tolist() == [[1, 3, -1]]
    assert out.num_accepted.tolist() == [2] and out.num_emitted.tolist() == [3]
    logits[0, 0] = 0.0  # all tied: token 0 wins, no candidate matches, the bonus is 0
    out = decodekit.greedy_tree_verify(cand, par, logits)
    assert out.output_token_ids.tolist() == [[0, -1, -1]] and out.num_accepted.tolist() == [0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_tree_matches_python_reference(dtype):
    # 100 random trees, V = 8, integer logits in [0, 3] (many ties: lowest index wins).
    cand, par, _ = random_batch(51, 100, 8, 16)
    logits = torch.randint(0, 4, (100, 16, 8), generator=torch.Generator().manual_seed(9)).to(dtype)
    # Steer many candidates onto the argmax so that paths get long.
    top = logits.float().argmax(-1)
    steer = torch.rand(100, 16, generator=torch.Generator().manual_seed(10)) < 0.7
    for n in range(1, 16):
        real = cand[:, n] >= 0
        cand[:, n] = torch.where(real & steer[:, n], top.gather(1, par[:, n : n + 1].clamp_min(0))[:, 0], cand[:, n])
    out = decodekit.greedy_tree_verify(cand, par, logits)
    raw = ops.greedy_tree_verify(cand, par, logits, 8, out.output_token_ids.size(1) - 1)
    for a, b in zip(out, raw):
        assert torch.equal(a, b)
    for b in range(100):
        toks, nodes = rs.greedy_tree_verify(cand[b].tolist(), par[b].tolist(), logits[b])
        assert out.output_token_ids[b, : len(toks)].tolist() == toks, b
        assert out.accepted_nodes[b, : len(nodes)].tolist() == nodes, b
        assert int(out.num_emitted[b]) == len(toks)
    assert int(out.num_accepted.max()) >= 3


def test_greedy_tree_invalid_rows_and_vocab_size():
    cand = torch.tensor([[0, 1, 2]])
    par = torch.tensor([[-1, 0, 1]])
    logits = torch.tensor([[[0.0, 5.0, 0.0, 9.0], [0.0, 0.0, 5.0, 9.0], [float("nan"), 0, 0, 0]]])
    with pytest.raises(ValueError, match=r"target_logits rows \(request, node\) \[\(0, 2\)\]"):
        decodekit.greedy_tree_verify(cand, par, logits, vocab_size=3)
    out = decodekit.greedy_tree_verify(cand, par, logits, vocab_size=3, validate=False)
    assert out.output_token_ids.tolist() == [[1, 2, -1]] and out.num_emitted.tolist() == [2]
    # Column 3 is padding: without vocab_size it would be the argmax everywhere.
    full = decodekit.greedy_tree_verify(cand[:, :2], par[:, :2], logits[:, :2])
    assert full.output_token_ids.tolist() == [[3, -1]]


# ----------------------------------------------- batches and reproducibility ----
@pytest.mark.parametrize("which", ["sampling", "typical"])
def test_batch_invariance_and_seeds(which):
    # Each row alone, and in a shuffled batch, gives the same outputs; the same seeds reproduce;
    # another offset changes some rows.
    cand, par, probs = random_batch(61, 12, 30, 12, zeros=0.2)
    seeds = torch.arange(12) * 31 + 1

    def run(idx, offset=3):
        if which == "sampling":
            return decodekit.tree_speculative_sampling(
                cand[idx], par[idx], probs[idx], seed=seeds[idx], offset=offset, max_depth=4
            )
        return decodekit.typical_acceptance(
            cand[idx], par[idx], probs[idx], 0.09, 0.3, seed=seeds[idx], offset=offset, max_depth=4
        )

    whole = run(torch.arange(12))
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    shuffled = run(perm)
    for a, b in zip(whole, shuffled):
        assert torch.equal(a[perm], b)
    for b in (0, 5, 11):
        alone = run(torch.tensor([b]))
        for a, c in zip(whole, alone):
            assert torch.equal(a[b : b + 1], c)
    again = run(torch.arange(12))
    assert all(torch.equal(a, b) for a, b in zip(whole, again))
    other = run(torch.arange(12), offset=4)
    assert not torch.equal(other.output_token_ids, whole.output_token_ids)


def test_max_depth_derived_given_and_generator():
    cand = torch.tensor([[0, 1, 2, -1], [0, 1, -1, -1]])
    par = torch.tensor([[-1, 0, 1, -1], [-1, 0, -1, -1]])
    probs = torch.full((2, 4, 3), 1 / 3)
    assert decodekit.tree_speculative_sampling(cand, par, probs, seed=1).output_token_ids.shape == (2, 3)
    assert decodekit.tree_speculative_sampling(cand, par, probs, seed=1, max_depth=3).output_token_ids.shape == (2, 4)
    with pytest.raises(ValueError, match="max_depth=1 but a tree is 2 levels deep"):
        decodekit.tree_speculative_sampling(cand, par, probs, seed=1, max_depth=1)
    with pytest.raises(ValueError, match=r"max_depth must be in \[0, N - 1 = 3\]"):
        decodekit.tree_speculative_sampling(cand, par, probs, seed=1, max_depth=4)
    # validate=False prunes deeper nodes: node 2 is never accepted.
    pruned = decodekit.tree_speculative_sampling(
        cand, par, probs, seed=torch.tensor([1, 2]), max_depth=1, validate=False
    )
    assert (pruned.num_accepted <= 1).all() and pruned.output_token_ids.shape == (2, 2)
    g = torch.Generator().manual_seed(5)
    out = decodekit.tree_speculative_sampling(cand, par, probs, generator=g)
    assert out.output_token_ids.shape == (2, 3)


# ------------------------------------------------------------------- errors ----
def _good():
    cand = torch.tensor([[4, 1, 2, 3, -1]])
    par = torch.tensor([[-1, 0, 0, 1, -1]])
    probs = torch.full((1, 5, 5), 0.2)
    return cand, par, probs


@pytest.mark.parametrize(
    "edit,match",
    [
        (
            lambda c, p, t: p.__setitem__((0, 3), 7),
            r"parents must be node indices in \[0, N=5\).*\[\(0, 3\)\] have \[7\]",
        ),
        (lambda c, p, t: p.__setitem__((0, 3), -4), r"parents must be node indices in \[0, N=5\)"),
        (lambda c, p, t: p.__setitem__((0, 1), 3), r"smaller index \(topological order\).*\[\(0, 1\)\] have \[3\]"),
        (lambda c, p, t: p.__setitem__((0, 2), 2), r"smaller index"),
        (lambda c, p, t: p.__setitem__((0, 2), -1), r"only node 0 may be the root.*\[\(0, 2\)\]"),
        (lambda c, p, t: p.__setitem__((0, 0), 1), r"the root is node 0, with parent -1; requests \[0\]"),
        (lambda c, p, t: c.__setitem__((0, 0), -1), r"node 0 is the root and must hold a real token"),
        (
            lambda c, p, t: c.__setitem__((0, 1), -1),
            r"padding nodes \(candidates -1\) cannot have real children.*\(0, 3\)",
        ),
        (
            lambda c, p, t: c.__setitem__((0, 2), 5),
            r"candidates must be in \[-1, vocab_size=5\).*\[\(0, 2\)\] have \[5\]",
        ),
        (lambda c, p, t: c.__setitem__((0, 2), -3), r"candidates must be in \[-1, vocab_size=5\)"),
        (lambda c, p, t: t.__setitem__((0, 3, 1), float("nan")), r"target_probs must be finite and >= 0.*\(0, 3\)"),
        (lambda c, p, t: t.__setitem__((0, 2, slice(None)), 0.0), r"positive mass.*\(0, 2\)"),
    ],
)
def test_malformed_trees_raise_clear_errors(edit, match):
    cand, par, probs = _good()
    edit(cand, par, probs)
    for call in (
        lambda: decodekit.tree_speculative_sampling(cand, par, probs, seed=1),
        lambda: decodekit.typical_acceptance(cand, par, probs, seed=1),
    ):
        with pytest.raises(ValueError, match=match):
            call()
    if "target_probs" not in match and "mass" not in match:
        with pytest.raises(ValueError, match=match):
            decodekit.greedy_tree_verify(cand, par, probs.log())


def test_padding_rows_may_hold_anything():
    cand, par, probs = _good()
    probs[0, 4] = float("nan")  # node 4 is padding: its row is never read
    out = decodekit.tree_speculative_sampling(cand, par, probs, seed=1)
    assert int(out.num_emitted[0]) == int(out.num_accepted[0]) + 1


def test_shapes_dtypes_and_arguments():
    cand, par, probs = _good()
    with pytest.raises(ValueError, match=r"target_probs must be \[B=1, N=5, V\] \(one row per tree node\)"):
        decodekit.tree_speculative_sampling(cand, par, probs[:, :4], seed=1)
    with pytest.raises(ValueError, match=r"one row per tree node"):
        decodekit.tree_speculative_sampling(cand[:, :4], par[:, :4], probs, seed=1)
    with pytest.raises(TypeError, match="candidates must be an integer"):
        decodekit.tree_speculative_sampling(cand.float(), par, probs, seed=1)
    with pytest.raises(TypeError, match="parents must be an integer"):
        decodekit.tree_speculative_sampling(cand, par.float(), probs, seed=1)
    with pytest.raises(TypeError, match="target_probs must be float32"):
        decodekit.tree_speculative_sampling(cand, par, probs.double(), seed=1)
    with pytest.raises(ValueError, match="same shape"):
        decodekit.tree_speculative_sampling(cand, par[:, :4], probs, seed=1)
    with pytest.raises(ValueError, match=r"N in \[1, 65536\]"):
        decodekit.tree_speculative_sampling(cand[:, :0], par[:, :0], probs[:, :0], seed=1)
    with pytest.raises(ValueError, match="seed"):
        decodekit.tree_speculative_sampling(cand, par, probs)
    with pytest.raises(ValueError, match=r"epsilon must be in \[0, 1\]"):
        decodekit.typical_acceptance(cand, par, probs, 1.5, seed=1)
    with pytest.raises(ValueError, match="delta must be a finite number >= 0"):
        decodekit.typical_acceptance(cand, par, probs, 0.09, -0.1, seed=1)
    with pytest.raises(ValueError, match="delta must be"):
        decodekit.typical_acceptance(cand, par, probs, 0.09, float("nan"), seed=1)
    with pytest.raises(TypeError, match="target_logits must be float32, float16 or bfloat16"):
        decodekit.greedy_tree_verify(cand, par, probs.double())
    # The raw ops check shapes and dtypes themselves (ValueError / TypeError), never reading out of bounds.
    with pytest.raises(ValueError, match="target_probs must be a contiguous float32"):
        ops.tree_speculative_sampling(cand, par, probs[:, :4].contiguous(), None, 1, None, 0, 5, 2)
    with pytest.raises(TypeError, match="candidates and parents must be int64"):
        ops.tree_speculative_sampling(cand.int(), par, probs, None, 1, None, 0, 5, 2)
    with pytest.raises(ValueError, match="max_depth must be in"):
        ops.greedy_tree_verify(cand, par, probs, 5, 5)
    with pytest.raises(ValueError, match="vocab_size must be in"):
        ops.typical_acceptance(cand, par, probs, None, 0.09, None, 0.3, None, 1, None, 0, 6, 2)


def test_raw_ops_read_malformed_trees_safely():
    # validate=False semantics of the kernels: malformed nodes are ignored, never read out of bounds.
    g = torch.Generator().manual_seed(8)
    B, N, V = 64, 9, 7
    cand = torch.randint(-3, V + 3, (B, N), generator=g)
    par = torch.randint(-3, N + 3, (B, N), generator=g)
    probs = rand_probs(g, B, N, V)
    for out in (
        ops.tree_speculative_sampling(cand, par, probs, torch.arange(B), 0, None, 0, V, N - 1),
        ops.typical_acceptance(cand, par, probs, None, 0.09, None, 0.0, None, 1, None, 0, V, N - 1),
        ops.greedy_tree_verify(cand, par, probs, V, N - 1),
    ):
        tokens, acc, emit, nodes = out
        assert ((tokens >= -1) & (tokens < V)).all() and ((nodes >= -1) & (nodes < N)).all()
        assert torch.equal(emit, acc + 1)
        for b in range(B):
            path = nodes[b, : int(acc[b])].tolist()
            prev = 0
            for n in path:  # each accepted node is a well-formed child of the previous one
                assert 0 < n < N and int(par[b, n]) == prev and 0 <= int(cand[b, n]) < V
                prev = n


def test_meta_and_opcheck():
    cand, par, probs = _good()
    m = [x.to("meta") for x in (cand, par, probs)]
    out = decodekit.tree_speculative_sampling(*m, seed=1, max_depth=2)
    assert all(t.device.type == "meta" for t in out) and out.output_token_ids.shape == (1, 3)
    out = decodekit.typical_acceptance(*m, seed=1, max_depth=2)
    assert out.accepted_nodes.shape == (1, 3)
    with pytest.raises(ValueError, match="pass max_depth"):
        decodekit.tree_speculative_sampling(*m, seed=1)
    torch.library.opcheck(
        ops.tree_speculative_sampling.default, (cand, par, probs, None, 3, torch.tensor([2]), 0, 5, 2)
    )
    torch.library.opcheck(
        ops.typical_acceptance.default,
        (cand, par, probs, torch.tensor([0.1], dtype=torch.float64), 0.0, None, 0.3, None, 3, None, 0, 5, 2),
    )
    torch.library.opcheck(ops.greedy_tree_verify.default, (cand, par, probs.log(), 5, 2))
    torch.library.opcheck(ops.greedy_tree_verify.default, (cand, par, probs.argmax(-1), 5, 2))


def test_golden_outputs():
    # Pinned outputs of seeded calls: stable across versions (DESIGN.md, "Randomness").
    cand, par, probs = random_batch(71, 4, 10, 10)
    out = decodekit.tree_speculative_sampling(cand, par, probs, seed=torch.tensor([1, 2, 3, 4]), offset=100)
    assert out.output_token_ids.tolist() == [[2, 2, 0, -1], [6, -1, -1, -1], [3, -1, -1, -1], [1, -1, -1, -1]]
    assert out.accepted_nodes[0].tolist() == [2, 7, -1, -1] and out.num_accepted.tolist() == [2, 0, 0, 0]
    expected = [
        rs.tree_speculative_sampling(cand[b].tolist(), par[b].tolist(), probs[b], b + 1, 100)[0] for b in range(4)
    ]
    assert outputs_of(out) == [tuple(e) for e in expected]
    typ = decodekit.typical_acceptance(cand, par, probs, seed=torch.tensor([1, 2, 3, 4]), offset=100)
    assert typ.output_token_ids.tolist() == [[2, 2, 0, -1], [3, 3, 0, -1], [3, -1, -1, -1], [0, 6, 5, -1]]
    assert typ.accepted_nodes[:, :2].tolist() == [[2, 7], [2, 7], [-1, -1], [3, 7]]


def test_stream_numbers_in_the_design():
    # The tree streams of DESIGN.md: node n's acceptance uniform is stream 2^16 + n, elements 0-1;
    # the residual draw after n's children are all rejected, elements 2-3; the bonus draw 2^17.
    assert rs.TREE_NODE == 65536 and rs.TREE_BONUS == 131072
    a = philox_element(5, 6, rs.TREE_NODE + 3, 2)
    b = philox_element(5, 6, rs.TREE_NODE + 3, 3)
    assert uniform_double(5, 6, rs.TREE_NODE + 3, 1) == ((a >> 5) * 2**26 + (b >> 6)) * 2.0**-53
    assert math.isfinite(uniform_double(5, 6, rs.TREE_BONUS, 0))
