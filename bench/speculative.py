"""Benchmark: chain and tree verification vs straightforward PyTorch implementations.

Chain: B=8 requests, K=4 drafts, V=32000, float32 draft and target probabilities (cold buffers
from a rotating pool), median of 30 calls, one run. The PyTorch version is the vectorised
recipe: gather p(x), q(x), uniform acceptance, the first rejection by cumprod, residual
max(0, p - q) normalised by its sum, torch.multinomial for the recovered and bonus tokens.

Tree: B=8 requests, N=16 nodes (a Medusa-style tree: 4 / 6 / 4 / 1 nodes on levels 1-4, the
candidates the parents' top tokens, as top-k heads propose them), V=49152, float32 target
probabilities (a rotating pool of 6 x 25 MB), median of 30 calls. The PyTorch recipes are
vectorised over the batch and loop over the tree's levels and sibling slots:
tree_speculative_sampling (accept child x when u * sum(r) < r(x), zero r(x) on rejection,
torch.multinomial for the residual / bonus token), typical_acceptance (entropy of every row,
threshold, accepted path by a loop over the nodes), greedy_tree_verify (argmax of every row,
then the same loop).

    python bench/speculative.py [--only chain|tree]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import decodekit


def torch_rejection(draft_probs, draft_ids, target_probs, g):
    B, K, V = draft_probs.shape
    p = target_probs[:, :K].gather(2, draft_ids[..., None])[..., 0]
    q = draft_probs.gather(2, draft_ids[..., None])[..., 0]
    u = torch.rand(B, K, generator=g)
    accept = (u * q < p).to(torch.int64)
    n = torch.cumprod(accept, dim=1).sum(1)  # accepted drafts per row
    residual = (target_probs[:, :K] - draft_probs).clamp_min(0)
    residual = residual / residual.sum(-1, keepdim=True).clamp_min(1e-30)
    dist = torch.cat([residual, target_probs[:, K:]], dim=1)  # [B, K+1, V]
    rows = dist[torch.arange(B), n]
    last = torch.multinomial(rows, 1, generator=g)[:, 0]
    out = torch.full((B, K + 1), -1, dtype=torch.int64)
    keep = torch.arange(K)[None, :] < n[:, None]
    out[:, :K] = torch.where(keep, draft_ids, -1)
    out[torch.arange(B), n] = last
    return out, n


def timeit(fn, bufs, reps=30):
    fn(*bufs[0])
    ts = []
    for i in range(reps):
        args = bufs[(i + 1) % len(bufs)]
        t0 = time.perf_counter()
        fn(*args)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    B, K, V = 8, 4, 32000
    g = torch.Generator().manual_seed(0)
    bufs = []
    for _ in range(12):  # 12 x 9 MB > L3
        q = torch.softmax(torch.randn(B, K, V, generator=g) * 3, -1)
        p = torch.softmax(torch.randn(B, K + 1, V, generator=g) * 3, -1)
        ids = torch.stack([torch.multinomial(q[:, j], 1, generator=g)[:, 0] for j in range(K)], 1)
        bufs.append((q, ids, p))
    seeds = torch.arange(B)
    ours = timeit(lambda q, i, p: decodekit.chain_speculative_sampling(q, i, p, seed=seeds), bufs)
    noval = timeit(lambda q, i, p: decodekit.chain_speculative_sampling(q, i, p, seed=seeds, validate=False), bufs)
    raw = timeit(lambda q, i, p: torch.ops.decodekit.chain_speculative_sampling(q, i, p, seeds, 0, None, 0, V), bufs)
    ref = timeit(lambda q, i, p: torch_rejection(q, i, p, g), bufs)
    print(f"# B={B}, K={K}, V={V}, {torch.get_num_threads()} threads")
    print(
        f"chain_speculative_sampling: {ours * 1e3:.3f} ms validated, {noval * 1e3:.3f} ms with validate=False, "
        f"raw op {raw * 1e3:.3f} ms; PyTorch implementation {ref * 1e3:.3f} ms; speedup {ref / ours:.1f}x "
        f"validated, {ref / noval:.1f}x validate=False, {ref / raw:.1f}x raw"
    )


# ------------------------------------------------------------------ trees ----
# A Medusa-style tree of 16 nodes: parent of each node (node 0 the root), levels of 4 / 6 / 4 / 1.
TREE_PARENTS = [-1, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 5, 5, 6, 8, 11]


def tree_batch(g, B, V):
    """Target rows with a peaked softmax and candidates = the parent's top tokens (sibling rank)."""
    N = len(TREE_PARENTS)
    probs = torch.softmax(torch.randn(B, N, V, generator=g) * 3, -1)
    par = torch.tensor(TREE_PARENTS).expand(B, N).contiguous()
    cand = torch.zeros(B, N, dtype=torch.int64)
    rank = {}
    for n in range(1, N):
        p = TREE_PARENTS[n]
        k = rank.get(p, 0)
        rank[p] = k + 1
        cand[:, n] = probs[:, p].topk(k + 1, -1).indices[:, k]
    return cand, par, probs


def _child_table(par):
    N = len(par)
    kids = [[n for n in range(1, N) if par[n] == c] for c in range(N)]
    width = max(len(k) for k in kids)
    return torch.tensor([k + [-1] * (width - len(k)) for k in kids])


def torch_tree_sampling(cand, par, probs, g):
    """Lossless tree verification in plain PyTorch (one tree shape for the batch)."""
    B, N, V = probs.shape
    table = _child_table(par[0].tolist())
    rows = torch.arange(B)
    cur = torch.zeros(B, dtype=torch.int64)
    active = torch.ones(B, dtype=torch.bool)
    out = torch.full((B, N + 1), -1, dtype=torch.int64)
    depth = torch.zeros(B, dtype=torch.int64)
    while bool(active.any()):
        r = probs[rows, cur].clone()
        kids = table[cur]  # [B, width]
        leaf = kids[:, 0] < 0
        nxt = torch.full((B,), -1, dtype=torch.int64)
        rsum = r.sum(-1).double()  # sum(r), updated on each rejection
        for k in range(table.size(1)):
            n = kids[:, k]
            live = active & ~leaf & (nxt < 0) & (n >= 0)
            x = cand[rows, n.clamp_min(0)]
            rx = r.gather(1, x[:, None])[:, 0]
            u = torch.rand(B, generator=g, dtype=torch.float64)
            acc = live & (u * rsum < rx.double())
            nxt = torch.where(acc, n, nxt)
            rej = live & ~acc & (rx > 0)
            r[rej, x[rej]] = 0.0
            rsum = torch.where(rej, rsum - rx.double(), rsum)
        finish = active & (nxt < 0)
        if bool(finish.any()):
            dist = torch.where(leaf[:, None], probs[rows, cur], r)[finish]
            out[finish, depth[finish]] = torch.multinomial(dist, 1, generator=g)[:, 0]
        step = active & (nxt >= 0)
        out[step, depth[step]] = cand[rows, nxt.clamp_min(0)][step]
        depth = depth + step.long()
        cur = torch.where(step, nxt, cur)
        active = step
    return out


def _torch_longest_path(cand, par, ok_edge):
    """The deepest node whose root path is all accepted (lowest index on ties), per row."""
    B, N = cand.shape
    ok = torch.zeros(B, N, dtype=torch.bool)
    ok[:, 0] = True
    depth = torch.zeros(B, N, dtype=torch.int64)
    best = torch.zeros(B, dtype=torch.int64)
    best_d = torch.zeros(B, dtype=torch.int64)
    for n in range(1, N):
        p = par[:, n]
        ok[:, n] = ok.gather(1, p[:, None])[:, 0] & ok_edge[:, n]
        depth[:, n] = depth.gather(1, p[:, None])[:, 0] + 1
        better = ok[:, n] & (depth[:, n] > best_d)
        best = torch.where(better, n, best)
        best_d = torch.where(better, depth[:, n], best_d)
    return best


def torch_typical(cand, par, probs, g, eps=0.09, delta=0.3):
    B, N, V = probs.shape
    logp = torch.log(probs.clamp_min(1e-38))
    H = -(probs * logp).sum(-1)  # [B, N]
    thr = torch.minimum(torch.full_like(H, eps), delta * torch.exp(-H))
    px_parent = probs[torch.arange(B)[:, None], par.clamp_min(0), cand]  # p(cand[n]) at the parent
    ok = px_parent > thr.gather(1, par.clamp_min(0))
    end = _torch_longest_path(cand, par, ok)
    return torch.multinomial(probs[torch.arange(B), end], 1, generator=g)[:, 0], end


def torch_greedy_tree(cand, par, logits):
    top = logits.argmax(-1)
    ok = cand == top.gather(1, par.clamp_min(0))
    end = _torch_longest_path(cand, par, ok)
    return top.gather(1, end[:, None])[:, 0], end


def main_tree():
    B, V = 8, 49152
    N = len(TREE_PARENTS)
    g = torch.Generator().manual_seed(0)
    bufs = [tree_batch(g, B, V) for _ in range(6)]  # 6 x 25 MB > L3
    seeds = torch.arange(B)
    D = 4
    dk = decodekit
    rows = [
        (
            "tree_speculative_sampling",
            timeit(lambda c, p, t: dk.tree_speculative_sampling(c, p, t, seed=seeds, max_depth=D), bufs),
            timeit(
                lambda c, p, t: dk.tree_speculative_sampling(c, p, t, seed=seeds, max_depth=D, validate=False), bufs
            ),
            timeit(lambda c, p, t: torch_tree_sampling(c, p, t, g), bufs),
        ),
        (
            "typical_acceptance",
            timeit(lambda c, p, t: dk.typical_acceptance(c, p, t, seed=seeds, max_depth=D), bufs),
            timeit(lambda c, p, t: dk.typical_acceptance(c, p, t, seed=seeds, max_depth=D, validate=False), bufs),
            timeit(lambda c, p, t: torch_typical(c, p, t, g), bufs),
        ),
        (
            "greedy_tree_verify (logits in)",
            timeit(lambda c, p, t: dk.greedy_tree_verify(c, p, t, max_depth=D), bufs),
            timeit(lambda c, p, t: dk.greedy_tree_verify(c, p, t, max_depth=D, validate=False), bufs),
            timeit(lambda c, p, t: torch_greedy_tree(c, p, t), bufs),
        ),
    ]
    print(f"# trees: B={B}, N={N}, V={V}, max_depth={D}, {torch.get_num_threads()} threads")
    for name, ours, noval, ref in rows:
        print(
            f"{name}: {ours * 1e3:.3f} ms validated, {noval * 1e3:.3f} ms with validate=False; PyTorch recipe "
            f"{ref * 1e3:.3f} ms; speedup {ref / ours:.1f}x validated, {ref / noval:.1f}x validate=False"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["chain", "tree"], default=None)
    only = ap.parse_args().only
    if only != "tree":
        main()
    if only != "chain":
        main_tree()
