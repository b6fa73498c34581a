"""The tree-verification family on the GPU: tree_speculative_sampling, typical_acceptance and
greedy_tree_verify, compact_kv_cache / compact_paged_kv_cache and paged_attention with a tree
mask, each against the CPU kernel (itself checked against the Python references in
test_tree_verify.py, test_kv_cache.py and test_attention.py).

Skipped without a GPU. The CUDA tree kernels use the CPU's Philox streams and its draw (the
block sums in the CPU's 16-lane order), so tokens, counts and nodes must equal the CPU's. The
one documented source of a difference (csrc/cuda/speculative.h) is the node masses' float64
rounding (and typical acceptance's entropy sum): an acceptance flips only when u sum(r) lies
within ~1e-15 relative of r(x), far below one in a million per test, so these sizes must match
exactly. The compactions are copies and the masked attention performs the CPU's operations:
the same bits.
"""

from __future__ import annotations

import math

import pytest
import torch
from common_cuda import capture, cuda, no_sync

import decodekit

pytestmark = cuda
ops = torch.ops.decodekit


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _to(device, *xs):
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in xs)


def random_trees(seed: int, B: int, N: int, V: int, vocab_size: int = 0):
    """B random trees padded to N nodes (parents before children, 1-3 children per node, some
    padding nodes and a few malformed ones), probability rows over V tokens (candidates below
    vocab_size, V by default); in even rows each node's first child carries mass 0.6 in its
    parent's row, so that paths several nodes deep are accepted."""
    vs = vocab_size or V
    g = _g(seed)
    cand = torch.full((B, N), -1, dtype=torch.int64)
    par = torch.full((B, N), -1, dtype=torch.int64)
    for b in range(B):
        n = int(torch.randint(1, N + 1, (), generator=g))
        cand[b, :n] = torch.randint(0, vs, (n,), generator=g)
        for i in range(1, n):
            par[b, i] = int(torch.randint(max(0, i - 3), i, (), generator=g))
    probs = torch.softmax(torch.randn(B, N, V, generator=g) * 2.0, -1)
    for b in range(0, B, 2):
        boosted = set()
        for i in range(1, N):
            p = int(par[b, i])
            if cand[b, i] >= 0 and p not in boosted:
                boosted.add(p)
                probs[b, p] *= 0.4
                probs[b, p, cand[b, i]] += 0.6
    # Malformed nodes the kernels must ignore: a token past the vocabulary, a parent after the node.
    if B > 3 and N > 3:
        cand[3, N - 1], par[3, N - 1] = vs + 5, 0
        cand[2, 1], par[2, 1] = 1, N - 1
    return cand, par, probs


def _same(cpu, gpu):
    for c, d in zip(cpu, gpu):
        assert torch.equal(c, d.cpu())


@pytest.mark.parametrize("B,N,V,vs", [(64, 14, 40, 40), (16, 9, 5000, 4100), (4, 16, 128256, 128256)])
def test_tree_sampling_same_as_cpu(B, N, V, vs):
    cand, par, probs = random_trees(B + V, B, N, V, vs)
    seed = torch.randint(-(2**62), 2**62, (B,), generator=_g(1))
    offset = torch.randint(0, 2**40, (B,), generator=_g(2))
    args = (cand, par, probs, seed, 0, offset, 0, vs, N - 1)
    cpu = ops.tree_speculative_sampling(*args)
    dev = _to("cuda", *args)
    with no_sync():
        gpu = ops.tree_speculative_sampling(*dev)
    _same(cpu, gpu)
    assert int(cpu[1].max()) >= 1 and int((cpu[1] == 0).sum()) >= 1  # accepted paths and rejections


@pytest.mark.parametrize("B,N,V", [(64, 14, 40), (8, 16, 128256)])
def test_typical_acceptance_same_as_cpu(B, N, V):
    cand, par, probs = random_trees(7 * B, B, N, V)
    eps = torch.linspace(0.0, 0.6, B, dtype=torch.float64)
    delta = torch.linspace(0.0, 0.5, B, dtype=torch.float64).flip(0)
    seed = torch.arange(B) * 11 + 5
    args = (cand, par, probs, eps, 0.0, delta, 0.0, seed, 0, None, 3, V, N - 1)
    cpu = ops.typical_acceptance(*args)
    with no_sync():
        gpu = ops.typical_acceptance(*_to("cuda", *args))
    _same(cpu, gpu)
    assert int(cpu[1].max()) >= 2


@pytest.mark.parametrize("kind", ["logits", "ids", "bf16"])
def test_greedy_tree_same_as_cpu(kind):
    B, N, V = 32, 12, 300
    cand, par, _ = random_trees(5, B, N, V)
    logits = torch.randn(B, N, V, generator=_g(6)) * 3
    logits[0, 2, 7] = logits[0, 2, 9] = 100.0  # a tie: the lowest index wins
    logits[1, 0] = float("nan")  # an invalid row: nothing accepted, nothing emitted
    top = logits.argmax(-1)
    top[1, 0] = -1  # the ids form of the invalid row (torch.argmax gives 0 for an all-NaN row)
    for i in range(1, N):  # most candidates follow the target's argmax
        follow = (cand[:, i] >= 0) & (cand[:, i] % 4 != 0)
        cand[:, i] = torch.where(follow, top.gather(1, par[:, i : i + 1].clamp_min(0))[:, 0], cand[:, i])
    target = {"logits": logits, "ids": top, "bf16": logits.bfloat16()}[kind]
    cpu = ops.greedy_tree_verify(cand, par, target, V, N - 1)
    with no_sync():
        gpu = ops.greedy_tree_verify(*_to("cuda", cand, par, target), V, N - 1)
    _same(cpu, gpu)
    assert int(cpu[1].max()) >= 2


def _bad_rows(probs, cand, par):
    """Invalid and empty rows for the walks: a NaN in row 0's root, a negative entry in row 2's
    first accepted-looking node, an all-zero row 4 root, an inf in row 6's second node."""
    probs = probs.clone()
    probs[0, 0, 3] = float("nan")
    first = int((par[2] == 0).nonzero()[0]) if bool((par[2] == 0).any()) else 0
    probs[2, first, 1] = -0.5
    probs[4, 0] = 0.0
    probs[6, 1, 0] = float("inf")
    return probs


@pytest.mark.parametrize("max_depth", [0, 1, 2])
@pytest.mark.parametrize("vs", [3000, 2500])
def test_tree_ops_shallow_depth_bad_rows_and_vocab_size(max_depth, vs):
    B, N, V = 16, 12, 3000
    cand, par, probs = random_trees(40 + max_depth, B, N, V, vs)
    probs = _bad_rows(probs, cand, par)
    seed = torch.arange(B) * 3 + 1
    calls = [
        lambda d: ops.tree_speculative_sampling(*d[:3], d[3], 0, None, 4, vs, max_depth),
        lambda d: ops.typical_acceptance(*d[:3], None, 0.05, None, 0.2, d[3], 0, None, 4, vs, max_depth),
        lambda d: ops.greedy_tree_verify(d[0], d[1], d[2].log(), vs, max_depth),
    ]
    args = (cand, par, probs, seed)
    for fn in calls:
        cpu = fn(args)
        with no_sync():
            gpu = fn(_to("cuda", *args))
        _same(cpu, gpu)
        assert int(cpu[1].max()) <= max_depth


@pytest.mark.parametrize("B,N", [(0, 5), (3, 1)])
def test_tree_ops_empty_batch_and_root_only(B, N):
    V = 50
    cand = torch.randint(0, V, (B, N), generator=_g(3))
    par = torch.full((B, N), -1, dtype=torch.int64)
    if N > 1:
        par[:, 1:] = 0
    probs = torch.softmax(torch.randn(B, N, V, generator=_g(4)), -1)
    args = (cand, par, probs, torch.arange(B))
    for fn in (
        lambda d: ops.tree_speculative_sampling(*d[:3], d[3], 0, None, 0, V, N - 1),
        lambda d: ops.typical_acceptance(*d[:3], None, 0.1, None, 0.2, d[3], 0, None, 0, V, N - 1),
        lambda d: ops.greedy_tree_verify(d[0], d[1], d[2], V, N - 1),
    ):
        cpu = fn(args)
        gpu = fn(_to("cuda", *args))
        _same(cpu, gpu)


def test_tree_rows_do_not_depend_on_the_batch():
    B, N, V = 24, 10, 3000
    cand, par, probs = random_trees(9, B, N, V)
    seed = torch.arange(B) + 100
    dev = _to("cuda", cand, par, probs, seed)
    full = ops.tree_speculative_sampling(dev[0], dev[1], dev[2], dev[3], 0, None, 0, V, N - 1)
    typ = ops.typical_acceptance(dev[0], dev[1], dev[2], None, 0.1, None, 0.2, dev[3], 0, None, 0, V, N - 1)
    for b in (0, 5, 23):
        one = ops.tree_speculative_sampling(
            dev[0][b : b + 1], dev[1][b : b + 1], dev[2][b : b + 1], dev[3][b : b + 1], 0, None, 0, V, N - 1
        )
        for f, o in zip(full, one):
            assert torch.equal(f[b : b + 1], o)
        one = ops.typical_acceptance(
            dev[0][b : b + 1], dev[1][b : b + 1], dev[2][b : b + 1], None, 0.1, None, 0.2, dev[3][b : b + 1], 0,
            None, 0, V, N - 1,
        )  # fmt: skip
        for f, o in zip(typ, one):
            assert torch.equal(f[b : b + 1], o)


def test_tree_ops_in_a_cuda_graph():
    B, N, V = 8, 9, 2000
    cand, par, probs = random_trees(12, B, N, V)
    seed = torch.arange(B)
    dev = _to("cuda", cand, par, probs, seed)
    calls = [
        lambda: ops.tree_speculative_sampling(dev[0], dev[1], dev[2], dev[3], 0, None, 0, V, N - 1),
        lambda: ops.typical_acceptance(dev[0], dev[1], dev[2], None, 0.1, None, 0.2, dev[3], 0, None, 0, V, N - 1),
        lambda: ops.greedy_tree_verify(dev[0], dev[1], dev[2], V, N - 1),
    ]
    for fn in calls:
        eager = fn()
        g, out = capture(fn)
        g.replay()
        torch.cuda.synchronize()
        for e, o in zip(eager, out):
            assert torch.equal(e, o)


def test_raw_tree_ops_read_malformed_trees_safely():
    g = _g(8)
    B, N, V = 64, 9, 7
    cand = torch.randint(-3, V + 3, (B, N), generator=g)
    par = torch.randint(-3, N + 3, (B, N), generator=g)
    probs = torch.softmax(torch.randn(B, N, V, generator=g), -1)
    dev = _to("cuda", cand, par, probs)
    cpu_outs = (
        ops.tree_speculative_sampling(cand, par, probs, torch.arange(B), 0, None, 0, V, N - 1),
        ops.typical_acceptance(cand, par, probs, None, 0.09, None, 0.0, None, 1, None, 0, V, N - 1),
        ops.greedy_tree_verify(cand, par, probs, V, N - 1),
    )
    gpu_outs = (
        ops.tree_speculative_sampling(*dev, torch.arange(B, device="cuda"), 0, None, 0, V, N - 1),
        ops.typical_acceptance(*dev, None, 0.09, None, 0.0, None, 1, None, 0, V, N - 1),
        ops.greedy_tree_verify(*dev, V, N - 1),
    )
    for c, d in zip(cpu_outs, gpu_outs):
        _same(c, d)


# ------------------------------------------------------------- compaction ----
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize(
    "dtype,D",
    [
        (torch.float32, 64),
        (torch.bfloat16, 64),
        (torch.float16, 64),
        (torch.bfloat16, 20),
        (torch.bfloat16, 6),
        (torch.float16, 3),
    ],
)  # fmt: skip  (head rows of 256, 128, 40, 12 and 6 bytes: copy vectors of 16, 8, 4 and 2 bytes)
def test_compact_kv_cache_same_as_cpu(layout, dtype, D):
    B, S, H = 5, 40, 3
    shape = (B, S, H, D) if layout == "NHD" else (B, H, S, D)
    k = torch.randn(shape, generator=_g(1)).to(dtype)
    v = torch.randn(shape, generator=_g(2)).to(dtype)
    start = torch.tensor([3, 0, 30, -1, 38])
    acc = torch.tensor(
        [[0, 2, 5, 6, -1], [1, 2, 3, 4, 9], [-1, -1, -1, -1, -1], [0, 1, 2, -1, -1], [0, 1, 4, 7, 8]]
    )  # row 2 empty, row 3 skipped (start < 0), row 4 runs past the cache
    ck, cv = k.clone(), v.clone()
    ops.compact_kv_cache(ck, cv, start, acc, layout)
    gk, gv = k.cuda(), v.cuda()
    with no_sync():
        ops.compact_kv_cache(gk, gv, *_to("cuda", start, acc), layout)
    assert torch.equal(gk.cpu(), ck) and torch.equal(gv.cpu(), cv)
    assert not torch.equal(ck, k)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize(
    "dtype,D", [(torch.float32, 64), (torch.float32, 24), (torch.bfloat16, 20), (torch.float16, 3)]
)
def test_compact_paged_kv_cache_same_as_cpu(layout, dtype, D):
    NB, bs, H = 12, 4, 3
    shape = (NB, bs, H, D) if layout == "NHD" else (NB, H, bs, D)
    k = torch.randn(shape, generator=_g(3)).to(dtype)
    v = torch.randn(shape, generator=_g(4)).to(dtype)
    # 40: outside the pool; row 3 repeats a block id of its own; row 4 starts past its table
    tables = torch.tensor([[5, 1, 3, 7], [0, 6, -1, -1], [2, 8, 9, 40], [10, 11, 10, -1], [4, -1, -1, -1]])
    start = torch.tensor([2, 3, 6, 1, 16])
    acc = torch.tensor([[0, 3, 4, 6, 9], [1, 5, -1, -1, -1], [0, 2, 3, 5, 7], [0, 2, 5, 6, -1], [0, 1, 2, 3, 4]])
    ck, cv = k.clone(), v.clone()
    ops.compact_paged_kv_cache(ck, cv, tables, start, acc, layout)
    gk, gv = k.cuda(), v.cuda()
    with no_sync():
        ops.compact_paged_kv_cache(gk, gv, *_to("cuda", tables, start, acc), layout)
    assert torch.equal(gk.cpu(), ck) and torch.equal(gv.cpu(), cv)
    assert not torch.equal(ck, k)


def test_compact_in_a_cuda_graph():
    B, S, H, D = 4, 32, 3, 64
    k = torch.randn(B, S, H, D, generator=_g(5)).cuda()
    v = torch.randn(B, S, H, D, generator=_g(6)).cuda()
    start = torch.tensor([1, 2, 3, 4], device="cuda")
    acc = torch.tensor([[0, 2, 3], [0, 1, 5], [1, 2, 3], [-1, -1, -1]], device="cuda")
    expect_k, expect_v = k.cpu(), v.cpu()
    ops.compact_kv_cache(expect_k, expect_v, start.cpu(), acc.cpu(), "NHD")
    work_k, work_v = k.clone(), v.clone()
    g, _ = capture(lambda: ops.compact_kv_cache(work_k, work_v, start, acc, "NHD"))
    work_k.copy_(k), work_v.copy_(v)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(work_k.cpu(), expect_k) and torch.equal(work_v.cpu(), expect_v)


# --------------------------------------------------------- tree attention ----
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_mask_attention_same_bits_as_cpu(layout, dtype):
    B, Q, Hq, Hkv, D, bs, NB, max_blocks = 3, 7, 9, 3, 64, 16, 30, 6
    shape = (NB, bs, Hkv, D) if layout == "NHD" else (NB, Hkv, bs, D)
    k = torch.randn(shape, generator=_g(7)).to(dtype)
    v = torch.randn(shape, generator=_g(8)).to(dtype)
    tables = torch.stack([torch.randperm(NB, generator=_g(9 + b))[:max_blocks] for b in range(B)])
    lens = torch.tensor([Q + 20, Q, max_blocks * bs])  # a tree after 20 cached tokens, a tree alone, a full table
    parents = torch.tensor([[-1, 0, 0, 1, 1, 2, 5], [-1, 0, 1, 2, 3, 4, 5], [-1, -1, 0, 0, 0, 2, 3]])
    mask = decodekit.tree_mask_from_parents(parents)
    q = torch.randn(B, Q, Hq, D, generator=_g(10))
    args = (q, k, v, tables, lens, 1.0 / math.sqrt(D), layout, mask)
    cpu = ops.paged_attention(*args)
    with no_sync():
        gpu = ops.paged_attention(*_to("cuda", *args))
    assert torch.equal(gpu.cpu(), cpu)
    # A mask allowing every earlier new token gives the causal bits.
    causal = torch.tril(torch.ones(Q, Q, dtype=torch.bool)).expand(B, Q, Q).contiguous()
    full = ops.paged_attention(*_to("cuda", q, k, v, tables, lens, 1.0 / math.sqrt(D), layout, causal))
    plain = ops.paged_attention(*_to("cuda", q, k, v, tables, lens, 1.0 / math.sqrt(D), layout))
    assert torch.equal(full, plain)
