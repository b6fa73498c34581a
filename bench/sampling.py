"""Benchmark: decodekit's sampling ops vs the PyTorch recipes users write today.

One run prints, for B in {1, 8, 64} and V in {32000, 49152, 128256}:
  * sample_from_logits (T 0.7, top_k 50, top_p 0.9) vs the PyTorch recipe
    (logits / T, torch.topk mask, sort + cumsum top-p mask, softmax, multinomial);
  * sample_from_logits with top_k off (T 0.7, top_p 0.9) vs the same recipe;
  * softmax(logits / T) vs torch.softmax(logits / T);
with the speedup and the fraction of the machine's memory read bandwidth
(bytes of logits read / time / bandwidth) measured in the same run on buffers
larger than the last-level cache. Logits come from a rotating pool of cold
buffers (>= 2x LLC). Median of --reps timed calls.

    python bench/sampling.py [--reps 20] [--json bench/out/sampling.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

import decodekit

POOL_BYTES = 96 * 2**20  # >= 2x the 32 MiB L3 here


def read_bandwidth_gbs(reps: int = 9) -> float:
    """Machine read bandwidth: torch.sum over a 256 MiB float32 tensor (all threads), median."""
    x = torch.ones(64 * 2**20, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times) / 1e9


def pool(B: int, V: int, dtype=torch.float32):
    n = max(2, POOL_BYTES // (B * V * torch.finfo(dtype).bits // 8))
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(B, V, generator=g) * 4).to(dtype) for _ in range(min(n, 64))]


def timeit(fn, bufs, reps: int) -> float:
    for i in range(3):
        fn(bufs[i % len(bufs)])
    times = []
    for i in range(reps):
        x = bufs[(i + 3) % len(bufs)]
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def torch_recipe(logits, temperature, top_k, top_p, generator):
    """The sampling recipe users write in PyTorch today (HF transformers' warpers)."""
    x = logits / temperature
    if top_k > 0:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, idx = torch.sort(x, descending=False, dim=-1)
        cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= 1 - top_p
        remove[..., -1:] = False
        x = x.masked_fill(remove.scatter(1, idx, remove), float("-inf"))
    probs = torch.softmax(x, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--vocabs", type=int, nargs="+", default=[32000, 49152, 128256])
    ap.add_argument("--json", default=None, help="write results as JSON to this path")
    args = ap.parse_args()

    bw = read_bandwidth_gbs()
    info = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                threads=torch.get_num_threads(), torch=torch.__version__, read_bandwidth_gbs=bw)
    print(f"# read bandwidth {bw:.1f} GB/s, {info['threads']} threads, torch {torch.__version__}")
    print(f"{'case':<34}{'B':>4}{'V':>8}{'ours ms':>10}{'torch ms':>10}{'speedup':>9}{'% bw':>7}")
    g = torch.Generator().manual_seed(1)
    results = []
    cases = [
        ("sample T0.7 k50 p0.9", dict(temperature=0.7, top_k=50, top_p=0.9)),
        ("sample T0.7 p0.9 (no top-k)", dict(temperature=0.7, top_k=0, top_p=0.9)),
        ("sample T0.7 (no filter)", dict(temperature=0.7, top_k=0, top_p=1.0)),
    ]
    for V in args.vocabs:
        for B in args.batches:
            bufs = pool(B, V)
            nbytes = B * V * 4
            for name, prm in cases:
                ours = timeit(lambda x: decodekit.sample_from_logits(x, prm["temperature"], prm["top_k"], prm["top_p"], seed=1), bufs, args.reps)
                ref = timeit(lambda x: torch_recipe(x, prm["temperature"], prm["top_k"], prm["top_p"], g), bufs, max(3, args.reps // 4))
                results.append(dict(op=name, B=B, V=V, ours_s=ours, torch_s=ref, speedup=ref / ours,
                                    bw_fraction=nbytes / ours / 1e9 / bw))
                print(f"{name:<34}{B:>4}{V:>8}{ours*1e3:>10.3f}{ref*1e3:>10.3f}{ref/ours:>8.1f}x{100*nbytes/ours/1e9/bw:>6.1f}%")
            ours = timeit(lambda x: decodekit.softmax(x, 0.7), bufs, args.reps)
            ref = timeit(lambda x: torch.softmax(x / 0.7, dim=-1), bufs, args.reps)
            results.append(dict(op="softmax T0.7", B=B, V=V, ours_s=ours, torch_s=ref, speedup=ref / ours,
                                bw_fraction=nbytes / ours / 1e9 / bw))
            print(f"{'softmax T0.7':<34}{B:>4}{V:>8}{ours*1e3:>10.3f}{ref*1e3:>10.3f}{ref/ours:>8.1f}x{100*nbytes/ours/1e9/bw:>6.1f}%")
            del bufs
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(info=info, results=results), f, indent=1)


if __name__ == "__main__":
    main()
