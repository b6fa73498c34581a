"""Benchmark: chain_speculative_sampling vs a straightforward PyTorch implementation.

B=8 requests, K=4 drafts, V=32000, float32 draft and target probabilities (cold buffers from
a rotating pool), median of 30 calls, one run. The PyTorch version is the vectorised recipe:
gather p(x), q(x), uniform acceptance, the first rejection by cumprod, residual
max(0, p - q) normalised by its sum, torch.multinomial for the recovered and bonus tokens.

    python bench/speculative.py
"""

from __future__ import annotations

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


if __name__ == "__main__":
    main()
