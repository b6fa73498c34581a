"""Benchmark: KV-cache appends (decodekit.append_kv_cache / append_paged_kv_cache) vs plain torch.

One "step" writes the keys and values of T new tokens for every one of --layers layers
(B=8 sequences, H=8 KV heads, D=128 by default), the way a decoder does per forward pass.
For T in {1, 64}, float16 and float32, layouts NHD and HND, contiguous and paged caches, one
run prints the median time per step of:

  op        torch.ops.decodekit.append_*kv_cache (the kernel + dispatcher only)
  wrap      decodekit.append_*kv_cache(validate=False) (shape/dtype/device checks)
  wrap+val  decodekit.append_*kv_cache() (plus the data checks: lengths, slots)
  torch     the plain torch recipe: advanced-indexing assignment (contiguous: cache[rows, pos] = key;
            paged HND: cache[block, :, offset] = key) or index_copy_ (paged NHD on the flat slot view)
  copy_     dst.copy_(src) of the same number of bytes into the cache's memory (the bandwidth reference)

and the ratios torch / op and copy_ / op (> 1: decodekit is faster), with the written
payload in GB/s. Every step writes fresh positions (lengths move by T per step, wrapping), rows
have different lengths, and the paged caches use shuffled block tables of 16-position blocks.

A second table times the compaction after tree verification (compact_kv_cache /
compact_paged_kv_cache): each of B sequences appended a token tree of 26 nodes after 100
cached tokens and keeps an accepted path of 1 to 6 nodes; one step moves the paths in every
layer. The plain-PyTorch recipe gathers the source rows by advanced indexing and writes them
with index_copy_ (paged NHD on the flat slot view) or indexed assignment.

    python bench/kv_cache.py [--reps 30] [--layers 32] [--batch 8] [--heads 8] [--head-dim 128]
                             [--sections append,compact]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import decodekit

S_MAX = 256
BLOCK = 16


def median_times(steps: dict, reps: int) -> dict:
    """Median seconds per call of each step function, called round-robin (so that a noisy
    moment or a cold start hurts every variant alike) after two warm-up rounds."""
    times = {name: [] for name in steps}
    for r in range(reps + 2):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step(r)
            if r >= 2:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_config(dtype, layout, paged: bool, T: int, args) -> dict:
    L, B, H, D = args.layers, args.batch, args.heads, args.head_dim
    g = torch.Generator().manual_seed(0)
    nb = B * S_MAX // BLOCK
    if paged:
        shape = (nb, BLOCK, H, D) if layout == "NHD" else (nb, H, BLOCK, D)
    else:
        shape = (B, S_MAX, H, D) if layout == "NHD" else (B, H, S_MAX, D)
    kc = [torch.zeros(shape, dtype=dtype) for _ in range(L)]
    vc = [torch.zeros(shape, dtype=dtype) for _ in range(L)]
    keys = [torch.randn(B, T, H, D, generator=g).to(dtype) for _ in range(L)]
    vals = [torch.randn(B, T, H, D, generator=g).to(dtype) for _ in range(L)]
    n_pos = 16  # distinct length vectors the steps cycle through
    # Rows 8 positions apart, all moving by T per step (wrapping) so that every step writes fresh memory.
    spread = 8 if S_MAX - T - 8 * (B - 1) >= 0 else 0
    wrap_at = S_MAX - T - spread * (B - 1) + 1
    lens = [torch.arange(B) * spread + (r * T) % wrap_at for r in range(n_pos)]
    tables = torch.randperm(nb, generator=g).reshape(B, S_MAX // BLOCK)
    rows = torch.arange(B)[:, None].expand(B, T)
    pos = [x[:, None] + torch.arange(T)[None, :] for x in lens]
    slots = [(tables[rows, p // BLOCK] * BLOCK + p % BLOCK).flatten() for p in pos]
    blk, off = [s // BLOCK for s in slots], [s % BLOCK for s in slots]
    flat_keys = [k.view(B * T, H, D) for k in keys]
    flat_vals = [v.view(B * T, H, D) for v in vals]
    n = B * T * H * D
    ops = torch.ops.decodekit

    if paged:

        def op(r):
            s = slots[r % n_pos]
            for i in range(L):
                ops.append_paged_kv_cache(kc[i], vc[i], flat_keys[i], flat_vals[i], s, layout)

        def wrap(r, validate=False):
            s = slots[r % n_pos]
            for i in range(L):
                decodekit.append_paged_kv_cache(
                    kc[i], vc[i], flat_keys[i], flat_vals[i], s, kv_layout=layout, validate=validate
                )

        if layout == "NHD":

            def recipe(r):
                s = slots[r % n_pos]
                for i in range(L):
                    kc[i].view(-1, H, D).index_copy_(0, s, flat_keys[i])
                    vc[i].view(-1, H, D).index_copy_(0, s, flat_vals[i])
        else:

            def recipe(r):
                bi, oi = blk[r % n_pos], off[r % n_pos]
                for i in range(L):
                    kc[i][bi, :, oi] = flat_keys[i]
                    vc[i][bi, :, oi] = flat_vals[i]
    else:

        def op(r):
            x = lens[r % n_pos]
            for i in range(L):
                ops.append_kv_cache(kc[i], vc[i], keys[i], vals[i], x, layout)

        def wrap(r, validate=False):
            x = lens[r % n_pos]
            for i in range(L):
                decodekit.append_kv_cache(kc[i], vc[i], keys[i], vals[i], x, kv_layout=layout, validate=validate)

        def recipe(r):
            p = pos[r % n_pos]
            for i in range(L):
                if layout == "NHD":
                    kc[i][rows, p] = keys[i]
                    vc[i][rows, p] = vals[i]
                else:
                    kc[i][rows, :, p] = keys[i]
                    vc[i][rows, :, p] = vals[i]

    def copy(r):
        # Same bytes, plain memcpy into the caches' memory (a position range that moves per step).
        start = (r % n_pos) * (kc[0].numel() // n_pos)
        start = min(start, kc[0].numel() - n)
        for i in range(L):
            kc[i].view(-1)[start : start + n].copy_(keys[i].view(-1))
            vc[i].view(-1)[start : start + n].copy_(vals[i].view(-1))

    reps = args.reps if T == 1 else max(5, args.reps // 3)
    t = median_times(
        {"op": op, "wrap": wrap, "wrap+val": lambda r: wrap(r, True), "torch": recipe, "copy_": copy}, reps
    )
    # Check once that the op and the recipe write the same caches.
    for c in kc + vc:
        c.zero_()
    recipe(0)
    expected = [c.clone() for c in kc + vc]
    for c in kc + vc:
        c.zero_()
    op(0)
    assert all(torch.equal(a, b) for a, b in zip(kc + vc, expected)), "op and recipe disagree"
    t["bytes"] = 2 * L * n * keys[0].element_size()
    return t


def bench_compact(dtype, layout, paged: bool, args) -> dict:
    """Median seconds per step of the compaction of B accepted paths in every layer."""
    L, B, H, D = args.layers, args.batch, args.heads, args.head_dim
    g = torch.Generator().manual_seed(1)
    Q, prefix = 26, 100
    nb = B * S_MAX // BLOCK
    if paged:
        shape = (nb, BLOCK, H, D) if layout == "NHD" else (nb, H, BLOCK, D)
    else:
        shape = (B, S_MAX, H, D) if layout == "NHD" else (B, H, S_MAX, D)
    kc = [torch.randn(shape, generator=g).to(dtype) for _ in range(L)]
    vc = [torch.randn(shape, generator=g).to(dtype) for _ in range(L)]
    tables = torch.randperm(nb, generator=g).reshape(B, S_MAX // BLOCK)
    start = torch.full((B,), prefix, dtype=torch.int64) + torch.arange(B)
    acc = torch.full((B, 6), -1, dtype=torch.int64)
    src_pos, dst_pos, rows = [], [], []
    for b in range(B):
        n = 1 + b % 6
        nodes = torch.cat(
            [torch.zeros(1, dtype=torch.int64), torch.randperm(Q - 1, generator=g)[: n - 1].sort().values + 1]
        )
        acc[b, :n] = nodes
        src_pos.append(start[b] + nodes)
        dst_pos.append(start[b] + torch.arange(n))
        rows.append(torch.full((n,), b))
    src_pos, dst_pos, rows = torch.cat(src_pos), torch.cat(dst_pos), torch.cat(rows)
    src_slot = tables[rows, src_pos // BLOCK] * BLOCK + src_pos % BLOCK
    dst_slot = tables[rows, dst_pos // BLOCK] * BLOCK + dst_pos % BLOCK
    ops = torch.ops.decodekit

    if paged:

        def op(r):
            for i in range(L):
                ops.compact_paged_kv_cache(kc[i], vc[i], tables, start, acc, layout)

        def wrap(r):
            for i in range(L):
                decodekit.compact_paged_kv_cache(kc[i], vc[i], tables, start, acc, kv_layout=layout)

        def recipe(r):
            for i in range(L):
                for c in (kc[i], vc[i]):
                    if layout == "NHD":
                        flat = c.view(-1, H, D)
                        flat.index_copy_(0, dst_slot, flat[src_slot])
                    else:
                        c[dst_slot // BLOCK, :, dst_slot % BLOCK] = c[src_slot // BLOCK, :, src_slot % BLOCK]
    else:

        def op(r):
            for i in range(L):
                ops.compact_kv_cache(kc[i], vc[i], start, acc, layout)

        def wrap(r):
            for i in range(L):
                decodekit.compact_kv_cache(kc[i], vc[i], start, acc, kv_layout=layout)

        def recipe(r):
            for i in range(L):
                for c in (kc[i], vc[i]):
                    if layout == "NHD":
                        c[rows, dst_pos] = c[rows, src_pos]
                    else:
                        c[rows, :, dst_pos] = c[rows, :, src_pos]

    # The op and the recipe move the same rows (from the same starting caches).
    saved = [c.clone() for c in kc + vc]
    recipe(0)
    expected = [c.clone() for c in kc + vc]
    for c, s in zip(kc + vc, saved):
        c.copy_(s)
    op(0)
    assert all(torch.equal(a, b) for a, b in zip(kc + vc, expected)), "compact: op and recipe disagree"
    t = median_times({"op": op, "wrap+val": wrap, "torch": recipe}, args.reps)
    t["bytes"] = 2 * L * int(rows.numel()) * H * D * kc[0].element_size()
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--sections", default="append,compact", help="append, compact or both (comma-separated)")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, decodekit ISA {decodekit._C.cpu_isa()}"
    )
    print(
        f"# one step = {args.layers} layers x (K + V), B={args.batch} H={args.heads} D={args.head_dim}, "
        f"S_max={S_MAX}, paged block {BLOCK}; median microseconds per step"
    )
    hdr = (
        f"{'cache':<10} {'layout':<6} {'dtype':<8} {'T':>3} {'MiB':>6} | {'op':>8} {'wrap':>8} {'wrap+val':>8} "
        f"{'torch':>8} {'copy_':>8} | {'torch/op':>8} {'copy_/op':>8} {'op GB/s':>8}"
    )
    if "append" in sections:
        print(hdr)
        print("-" * len(hdr))
    for paged in (False, True) if "append" in sections else ():
        for T in (1, 64):
            for dtype in (torch.float16, torch.float32):
                for layout in ("NHD", "HND"):
                    t = bench_config(dtype, layout, paged, T, args)
                    us = {k: v * 1e6 for k, v in t.items() if k != "bytes"}
                    print(
                        f"{'paged' if paged else 'contiguous':<10} {layout:<6} {str(dtype)[6:]:<8} {T:>3} "
                        f"{t['bytes'] / 2**20:>6.2f} | {us['op']:>8.1f} {us['wrap']:>8.1f} {us['wrap+val']:>8.1f} "
                        f"{us['torch']:>8.1f} {us['copy_']:>8.1f} | {t['torch'] / t['op']:>8.2f} "
                        f"{t['copy_'] / t['op']:>8.2f} {t['bytes'] / t['op'] / 1e9:>8.2f}",
                        flush=True,
                    )

    if "compact" in sections:
        print(
            f"\n# compaction after tree verification: B={args.batch} trees of 26 nodes after ~100 tokens, paths "
            f"of 1-6 nodes, {args.layers} layers x (K + V); median microseconds per step"
        )
        hdr = (
            f"{'cache':<10} {'layout':<6} {'dtype':<8} {'KiB':>6} | {'op':>8} {'wrap+val':>8} {'torch':>8} | "
            f"{'torch/op':>8}"
        )
        print(hdr)
        print("-" * len(hdr))
        for paged in (False, True):
            for dtype in (torch.float16, torch.float32):
                for layout in ("NHD", "HND"):
                    t = bench_compact(dtype, layout, paged, args)
                    us = {k: v * 1e6 for k, v in t.items() if k != "bytes"}
                    print(
                        f"{'paged' if paged else 'contiguous':<10} {layout:<6} {str(dtype)[6:]:<8} "
                        f"{t['bytes'] / 2**10:>6.1f} | {us['op']:>8.1f} {us['wrap+val']:>8.1f} {us['torch']:>8.1f} | "
                        f"{t['torch'] / t['op']:>8.2f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
