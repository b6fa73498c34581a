"""The sampling family's CUDA kernels against the CPU kernels and the float64 references.

Skipped without a GPU. What must agree (csrc/cuda/sampling.h):
- token ids, validity, kept sets (top_k_mask_logits, the -inf pattern of logprobs and of
  filter_probs) exactly: CPU and CUDA compute the same float32 weights; their masses differ
  only in the rounding of the CPU's float64 sums, which moves an id only when a uniform
  lands within ~1e-13 relative of a cumulative edge (never in these sizes);
- logprobs and probabilities to float32 rounding (rtol 2e-6);
- bitwise, a row's CUDA result alone and inside any batch (one block per row).
"""

from __future__ import annotations

import pytest
import torch

import decodekit
import reference as ref

cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or not decodekit.HAS_CUDA_OPS, reason="needs a GPU and a CUDA build of decodekit"
)
pytestmark = cuda
ops = torch.ops.decodekit


def _logits(B, V, kind, gen, dtype=torch.float32):
    """Real-model-like rows: randn x 1, randn x 4, Zipf-shaped, or tie-heavy (rounded)."""
    if kind == "randn1":
        x = torch.randn(B, V, generator=gen)
    elif kind == "randn4":
        x = torch.randn(B, V, generator=gen) * 4
    elif kind == "zipf":
        ranks = torch.stack([torch.randperm(V, generator=gen) for _ in range(B)]).double() + 1
        x = (-1.1 * torch.log(ranks)).float() * 3
    else:  # ties: few distinct values
        x = torch.randint(0, 8, (B, V), generator=gen).float()
    return x.to(dtype)


def _row_params(B, gen):
    t = torch.tensor([[0.0, 0.5, 0.7, 1.0, 1.3][i % 5] for i in range(B)], dtype=torch.float32)
    k = torch.tensor([[0, 1, 2, 50, 700, 5000][i % 6] for i in range(B)], dtype=torch.int64)
    p = torch.tensor([[1.0, 0.9, 0.5, 0.0, 0.95, 0.999][(i // 2) % 6] for i in range(B)], dtype=torch.float64)
    m = torch.tensor([[0.0, 0.0, 0.05, 0.2][(i // 3) % 4] for i in range(B)], dtype=torch.float32)
    seed = torch.randint(-(2**62), 2**62, (B,), generator=gen)
    offset = torch.randint(0, 2**40, (B,), generator=gen)
    return t, k, p, m, seed, offset


def _sample_logits(x, t, k, p, m, seed, offset, vs, lp=False, n_top=0, raw=False):
    d = x.device
    return ops.sample_from_logits(
        x,
        t.to(d),
        0.0,
        k.to(d),
        0,
        p.to(d),
        1.0,
        m.to(d),
        0.0,
        seed.to(d),
        0,
        offset.to(d),
        0,
        vs,
        True,
        lp,
        n_top,
        raw,
    )


def _same_logprobs(a, b):
    a, b = a.cpu(), b.cpu()
    assert torch.equal(torch.isinf(a), torch.isinf(b)) and torch.equal(torch.isnan(a), torch.isnan(b))
    fin = torch.isfinite(a)
    torch.testing.assert_close(a[fin], b[fin], rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("kind", ["randn1", "randn4", "zipf", "ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sample_from_logits_same_ids_as_cpu(kind, dtype):
    gen = torch.Generator().manual_seed(11)
    B, V = 96, 3000
    x = _logits(B, V, kind, gen, dtype)
    x[5, 7] = float("nan")  # an invalid row
    params = _row_params(B, gen)
    vs = V - 17  # padding columns never drawn
    cpu = _sample_logits(x, *params, vs, lp=True, n_top=5)
    gpu = _sample_logits(x.cuda(), *params, vs, lp=True, n_top=5)
    assert torch.equal(cpu[1], gpu[1].cpu()) and not bool(cpu[1][5])
    assert torch.equal(cpu[0], gpu[0].cpu())
    assert torch.equal(cpu[3], gpu[3].cpu())  # top ids
    _same_logprobs(cpu[2], gpu[2])
    _same_logprobs(cpu[4], gpu[4])


@pytest.mark.parametrize("V", [128256, 151936])
def test_long_rows_same_ids_and_raw_logprobs(V):
    gen = torch.Generator().manual_seed(3)
    B = 24
    x = _logits(B, V, "randn4", gen)
    x[:8] = _logits(8, V, "randn1", gen) * 0.05  # flat rows: the radix fallback of top-p
    params = _row_params(B, gen)
    params[2][:8] = 0.95
    for raw in (False, True):
        cpu = _sample_logits(x, *params, V, lp=True, n_top=20, raw=raw)
        gpu = _sample_logits(x.cuda(), *params, V, lp=True, n_top=20, raw=raw)
        assert torch.equal(cpu[0], gpu[0].cpu())
        assert torch.equal(cpu[3], gpu[3].cpu())
        _same_logprobs(cpu[2], gpu[2])
        _same_logprobs(cpu[4], gpu[4])


def test_top_k_large_and_ties_at_the_boundary():
    # k above the 512 per-thread maxima (radix count path) and ties straddling the k-th value.
    gen = torch.Generator().manual_seed(5)
    B, V = 16, 20000
    x = torch.randint(0, 40, (B, V), generator=gen).float() / 4
    t = torch.ones(B)
    k = torch.tensor([3, 600, 1000, 4500, 7000, 19999, 513, 512] * 2)
    p = torch.tensor([1.0] * 8 + [0.8] * 8, dtype=torch.float64)
    m = torch.zeros(B)
    seed = torch.arange(B) * 7919
    off = torch.arange(B)
    cpu = _sample_logits(x, t, k, p, m, seed, off, V, lp=True)
    gpu = _sample_logits(x.cuda(), t, k, p, m, seed, off, V, lp=True)
    assert torch.equal(cpu[0], gpu[0].cpu())
    _same_logprobs(cpu[2], gpu[2])
    mc, _ = ops.top_k_mask_logits(x, k, 0, V)
    mg, _ = ops.top_k_mask_logits(x.cuda(), k.cuda(), 0, V)
    assert torch.equal(mc, mg.cpu())


def test_greedy_is_exact_argmax_and_argmax_matches():
    gen = torch.Generator().manual_seed(1)
    x = _logits(64, 5000, "ties", gen, torch.bfloat16)
    x[3] = float("-inf")
    x[4, 100] = float("inf")
    ids_c, ok_c = ops.argmax(x, 5000)
    ids_g, ok_g = ops.argmax(x.cuda(), 5000)
    assert torch.equal(ids_c, ids_g.cpu()) and torch.equal(ok_c, ok_g.cpu())
    expect = [ref.argmax(r.double()) for r in x.float()]
    assert [int(i) for i in ids_g.cpu()[ok_g.cpu()]] == [e for e, o in zip(expect, ok_c) if o]
    g = decodekit.sample_from_logits(x[5:].cuda(), temperature=0.0, validate=False)
    assert torch.equal(g.cpu(), ids_c[5:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_softmax_matches_reference(dtype):
    gen = torch.Generator().manual_seed(2)
    x = _logits(16, 4000, "randn4", gen, dtype)
    t = torch.tensor([0.0, 0.3, 1.0, 2.0] * 4)
    out = ops.softmax(x.cuda(), t.cuda(), 0.0, 3990, True).cpu()
    for b in range(16):
        r = ref.softmax(x[b, :3990].float(), float(t[b]))
        torch.testing.assert_close(out[b, :3990].double(), r, rtol=2e-6, atol=1e-12)
        assert torch.all(out[b, 3990:] == 0)
    cpu = ops.softmax(x, t, 0.0, 3990, True)
    torch.testing.assert_close(out, cpu, rtol=2e-6, atol=1e-12)


def test_probs_ops_same_as_cpu():
    gen = torch.Generator().manual_seed(4)
    B, V = 60, 6000
    probs = torch.softmax(_logits(B, V, "randn4", gen), dim=-1)
    probs[7] *= 3.0  # unnormalised rows are fine
    probs[8, :10] = 0.0
    probs[9, 3] = -1.0  # invalid
    probs[10] *= 1e-25  # a maximum below 2^-60: lifted by an exact power of two on the GPU
    probs[11] = probs[11] * 1e-37 * 1e-3  # subnormal entries
    _, k, p, m, seed, offset = _row_params(B, gen)
    args = (k, 0, p, 1.0, m, 0.0)
    oc, vc = ops.filter_probs(probs, *args, V)
    og, vg = ops.filter_probs(probs.cuda(), *(a.cuda() if torch.is_tensor(a) else a for a in args), V)
    og = og.cpu()
    assert torch.equal(vc, vg.cpu())
    assert torch.equal(oc[vc] == 0, og[vc] == 0)
    torch.testing.assert_close(og[vc], oc[vc], rtol=2e-6, atol=0)
    assert torch.isnan(og[~vc]).all()
    sc = ops.sample_from_probs(probs, *args, seed, 0, offset, 0, V, True, True, 4, False)
    sg = ops.sample_from_probs(
        probs.cuda(),
        *(a.cuda() if torch.is_tensor(a) else a for a in args),
        seed.cuda(),
        0,
        offset.cuda(),
        0,
        V,
        True,
        True,
        4,
        False,
    )
    assert torch.equal(sc[0], sg[0].cpu()) and torch.equal(sc[3], sg[3].cpu())
    _same_logprobs(sc[2], sg[2])
    _same_logprobs(sc[4], sg[4])


def test_batch_invariance_bitwise():
    gen = torch.Generator().manual_seed(9)
    B, V = 64, 32000
    x = _logits(B, V, "randn4", gen).cuda()
    params = [a.cuda() for a in _row_params(B, gen)]
    full = _sample_logits(x, *params, V, lp=True, n_top=3)
    sm = ops.softmax(x, params[0], 0.0, V, True)
    for r in (0, 17, 63):
        one = _sample_logits(x[r : r + 1], *[a[r : r + 1] for a in params], V, lp=True, n_top=3)
        for a, b in zip(full, one):
            if a.numel():
                assert torch.equal(a[r : r + 1], b)
        assert torch.equal(sm[r], ops.softmax(x[r : r + 1], params[0][r : r + 1], 0.0, V, True)[0])
    # the same row among other neighbours and at another position
    perm = torch.randperm(B, generator=gen).cuda()
    again = _sample_logits(x[perm], *[a[perm] for a in params], V)
    assert torch.equal(again[0], full[0][perm])


def test_no_sync_and_cuda_graph_capture():
    gen = torch.Generator().manual_seed(6)
    B, V = 8, 32000
    x = _logits(B, V, "randn1", gen).cuda()
    params = [a.cuda() for a in _row_params(B, gen)]
    probs = torch.softmax(x, -1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = _sample_logits(x, *params, V, lp=True, n_top=2)
        ops.softmax(x, params[0], 0.0, V, True)
        ops.argmax(x, V)
        ops.top_k_mask_logits(x, params[1], 0, V)
        ops.filter_probs(probs, params[1], 0, params[2], 1.0, params[3], 0.0, V)
        ops.sample_from_probs(
            probs, params[1], 0, params[2], 1.0, params[3], 0.0, params[4], 0, params[5], 0, V, True, False, 0, False
        )
    finally:
        torch.cuda.set_sync_debug_mode(0)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _sample_logits(x, *params, V, lp=True, n_top=2)  # warm-up on the side stream
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out = _sample_logits(x, *params, V, lp=True, n_top=2)
    g.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, out):
        assert torch.equal(a, b)
    params[5].add_(1)  # new offsets: the replay draws afresh from the same buffers
    g.replay()
    fresh = _sample_logits(x, *params, V, lp=True, n_top=2)
    assert torch.equal(out[0], fresh[0])


def _chi_square_p(counts, probs):
    from scipy.stats import chisquare

    keep = probs > 0
    assert counts[~keep].sum() == 0, "a zero-probability token was drawn"
    return chisquare(counts[keep], probs[keep] * counts.sum()).pvalue


def test_chi_square_logits_chain_on_cuda():
    # 40000 draws (per-row offsets), top-k 6 -> top-p 0.8 -> min-p 0.1 at T = 0.8; threshold p > 1e-4.
    logits = torch.tensor([2.0, 1.5, 1.4, 0.3, 0.2, -0.5, -1.0, 3.0, 0.0, -2.0])
    N = 40000
    x = logits.repeat(N, 1).cuda()
    ids = decodekit.sample_from_logits(
        x, temperature=0.8, top_k=6, top_p=0.8, min_p=0.1, seed=1234, offset=torch.arange(N).cuda(), validate=False
    ).cpu()
    expect = ref.filtered_probs(logits, temperature=0.8, top_k=6, top_p=0.8, min_p=0.1)
    counts = torch.bincount(ids, minlength=10).double()
    assert _chi_square_p(counts, expect) > 1e-4


def test_chi_square_probs_on_cuda():
    probs = torch.tensor([0.05, 0.3, 0.0, 0.25, 0.1, 0.2, 0.1])
    N = 40000
    ids = decodekit.sample_from_probs(
        probs.repeat(N, 1).cuda(), top_p=0.9, seed=torch.arange(N).cuda() * 31 + 7, validate=False
    ).cpu()
    expect = ref.filter_probs(probs, top_p=0.9)
    counts = torch.bincount(ids, minlength=7).double()
    assert _chi_square_p(counts, expect.double()) > 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_penalties_same_bits_as_cpu(dtype):
    gen = torch.Generator().manual_seed(8)
    B, V = 6, 5000
    x = _logits(B, V, "randn4", gen, dtype)
    rep = torch.tensor([1.0, 1.3, 0.8, 1.1, 1.0, 2.0])
    freq = torch.tensor([0.0, 0.5, 0.1, 0.0, 0.2, 0.3])
    pres = torch.tensor([0.0, 0.2, 0.0, 0.7, 0.1, 0.0])
    ids = torch.randint(-1, V + 3, (B, 300), generator=gen)
    ids[:, 150:] = ids[:, :150]  # duplicates
    bias_ids = torch.randint(0, V, (B, 9), generator=gen)
    bias_ids[:, 5] = bias_ids[:, 2]  # the same id twice: added in list order
    bias_vals = torch.randn(B, 9, generator=gen)
    dense = torch.randn(B, V, generator=gen)
    mask = torch.rand(B, V, generator=gen) > 0.1
    counts = torch.randint(0, 3, (B, V), generator=gen)
    for allows in (True, False):
        a = (rep, 1.0, freq, 0.0, pres, 0.0, ids, None, dense, bias_ids, bias_vals, mask, allows, V - 3)
        c = ops.apply_penalties(x, *a)
        g = ops.apply_penalties(x.cuda(), *(t.cuda() if torch.is_tensor(t) else t for t in a)).cpu()
        assert torch.equal(c, g)
    long_ids = torch.randint(0, V, (B, 6000), generator=gen)  # longer than the shared-memory sort
    for idsx, cnt in ((long_ids, None), (None, counts)):
        a = (rep, 1.0, freq, 0.0, pres, 0.0, idsx, cnt, None, None, None, None, False, V)
        c = ops.apply_penalties(x, *a)
        g = ops.apply_penalties(x.cuda(), *(t.cuda() if torch.is_tensor(t) else t for t in a)).cpu()
        assert torch.equal(c, g)


@pytest.mark.parametrize("cluster", ["1", "0"])
@pytest.mark.parametrize("V", [3000, 32000, 128256, 151936])
def test_ids_without_logprobs_cluster_and_one_block_paths(V, cluster, monkeypatch):
    # Without logprobs, compute capability >= 9 rows go through the cluster path
    # (sampling_cluster.cu) unless DECODEKIT_CUDA_CLUSTER=0; rows it leaves (top-k > 512,
    # candidate overflow on flat rows) go to the one-block kernel. Ids equal the CPU's either way.
    monkeypatch.setenv("DECODEKIT_CUDA_CLUSTER", cluster)
    gen = torch.Generator().manual_seed(V)
    B = 36
    for kind, dtype in (
        ("randn4", torch.float32),
        ("zipf", torch.bfloat16),
        ("ties", torch.float16),
        ("randn1", torch.float32),
    ):
        x = _logits(B, V, kind, gen, dtype)
        x[1] = (torch.randn(V, generator=gen) * 0.01).to(dtype)  # flat: more candidates than fit
        x[2, 5] = float("nan")
        params = _row_params(B, gen)
        params[2][1] = 0.95
        vs = V - 3
        cpu = _sample_logits(x, *params, vs)
        gpu = _sample_logits(x.cuda(), *params, vs)
        assert torch.equal(cpu[1], gpu[1].cpu()), kind
        assert torch.equal(cpu[0], gpu[0].cpu()), kind


def test_cluster_path_batch_invariance_and_graph_capture():
    gen = torch.Generator().manual_seed(21)
    B, V = 40, 128256
    x = _logits(B, V, "randn4", gen).cuda()
    params = [a.cuda() for a in _row_params(B, gen)]
    full = _sample_logits(x, *params, V)
    for r in (0, 13, 39):
        one = _sample_logits(x[r : r + 1], *[a[r : r + 1] for a in params], V)
        assert torch.equal(one[0], full[0][r : r + 1]) and torch.equal(one[1], full[1][r : r + 1])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _sample_logits(x, *params, V)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = _sample_logits(x, *params, V)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out[0], full[0])
    torch.cuda.set_sync_debug_mode("error")
    try:
        _sample_logits(x, *params, V)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_processed_probs_same_as_cpu(dtype):
    gen = torch.Generator().manual_seed(13)
    B, V = 48, 7000
    x = _logits(B, V, "randn4", gen, dtype)
    x[4, 9] = float("nan")
    t, k, p, m, _, _ = _row_params(B, gen)
    a = (t, 0.0, k, 0, p, 1.0, m, 0.0, V - 4, True)
    pc, vc = ops.processed_probs(x, *a)
    pg, vg = ops.processed_probs(x.cuda(), *(z.cuda() if torch.is_tensor(z) else z for z in a))
    pg = pg.cpu()
    assert torch.equal(vc, vg.cpu()) and not bool(vc[4])
    assert torch.equal(pc[vc] == 0, pg[vc] == 0)  # the same kept sets
    torch.testing.assert_close(pg[vc], pc[vc], rtol=2e-6, atol=0)
    assert torch.isnan(pg[~vc][:, : V - 4]).all()
