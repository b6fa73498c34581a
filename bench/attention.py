"""Benchmark: paged decode attention vs torch SDPA over an already-gathered contiguous cache.

SmolLM2-135M's attention shape (H_q=9, H_kv=3, D=64), B=8 sequences of 2048 cached tokens,
Q in {1, 5} new tokens, float32, block size 16, blocks shuffled. The SDPA baseline gets the
cache already contiguous per sequence ([B, H_q, S, D] after the GQA expansion), i.e. it pays
neither the paging nor the gather: ">= 1x" means paging costs nothing.

Tree verification (Medusa-style): the Q = 26 new tokens are the nodes of a random token tree
and each reads the prefix and its ancestors (``tree_mask``); the plain-PyTorch recipe is SDPA
with the same explicit boolean mask [Q, S] on the contiguous cache (again without paging or
gather). The causal Q = 26 call is printed beside it (the mask's own cost).

    python bench/attention.py
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F

from decodekit import paged_attention, tree_mask_from_parents


def timeit(fn, reps=20):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    B, S, Hq, Hkv, D, bs = 8, 2048, 9, 3, 64, 16
    g = torch.Generator().manual_seed(0)
    nblk = S // bs
    k = torch.randn(B * nblk, bs, Hkv, D, generator=g)
    v = torch.randn(B * nblk, bs, Hkv, D, generator=g)
    tables = torch.randperm(B * nblk, generator=g).reshape(B, nblk)
    lens = torch.full((B,), S)
    kc = k[tables].reshape(B, S, Hkv, D).permute(0, 2, 1, 3).repeat_interleave(Hq // Hkv, 1).contiguous()
    vc = v[tables].reshape(B, S, Hkv, D).permute(0, 2, 1, 3).repeat_interleave(Hq // Hkv, 1).contiguous()
    kg = k[tables].reshape(B, S, Hkv, D).permute(0, 2, 1, 3).contiguous()  # [B, H_kv, S, D] (enable_gqa)
    vg = v[tables].reshape(B, S, Hkv, D).permute(0, 2, 1, 3).contiguous()
    print(f"# B={B}, S={S}, H_q={Hq}, H_kv={Hkv}, D={D}, float32, {torch.get_num_threads()} threads")
    for Q in (1, 5):
        q = torch.randn(B, Q, Hq, D, generator=g)
        qs = q.transpose(1, 2).contiguous()
        mask = torch.arange(S)[None, :] <= torch.arange(S - Q, S)[:, None]
        ours = timeit(lambda: paged_attention(q, k, v, tables, lens, validate=False))
        sdpa = timeit(lambda: F.scaled_dot_product_attention(qs, kc, vc, attn_mask=mask, scale=1 / math.sqrt(D)))
        sdpa_gqa = timeit(
            lambda: F.scaled_dot_product_attention(qs, kg, vg, attn_mask=mask, scale=1 / math.sqrt(D), enable_gqa=True)
        )
        print(
            f"Q={Q}: paged (ours) {ours * 1e3:.3f} ms | SDPA on contiguous expanded cache {sdpa * 1e3:.3f} ms "
            f"({sdpa / ours:.2f}x) | SDPA enable_gqa {sdpa_gqa * 1e3:.3f} ms ({sdpa_gqa / ours:.2f}x)"
        )
    # A random token tree of 26 nodes (node 0 the root, each other node under an earlier one).
    Q = 26
    parents = torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, Q)])
    tree = tree_mask_from_parents(parents.expand(B, Q).contiguous())
    q = torch.randn(B, Q, Hq, D, generator=g)
    qs = q.transpose(1, 2).contiguous()
    full = torch.ones(B, 1, Q, S, dtype=torch.bool)
    full[:, 0, :, S - Q :] = tree
    ours = timeit(lambda: paged_attention(q, k, v, tables, lens, tree_mask=tree, validate=False))
    causal = timeit(lambda: paged_attention(q, k, v, tables, lens, validate=False))
    sdpa = timeit(lambda: F.scaled_dot_product_attention(qs, kc, vc, attn_mask=full, scale=1 / math.sqrt(D)))
    print(
        f"tree Q={Q}: paged + tree_mask (ours) {ours * 1e3:.3f} ms (causal {causal * 1e3:.3f} ms) | "
        f"SDPA + boolean mask on contiguous expanded cache {sdpa * 1e3:.3f} ms ({sdpa / ours:.2f}x)"
    )


if __name__ == "__main__":
    main()
