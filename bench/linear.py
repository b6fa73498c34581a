"""Benchmark: decodekit.linear (batch-invariant) vs torch.nn.functional.linear.

SmolLM2-135M's projection shapes at decode-time row counts M, in one run: our time,
torch's, the ratio, and the weight bytes read per second as a fraction of the machine's
read bandwidth (at small M a linear layer is memory-bound on its weights). Then one
decode step of the built-in model with each GEMM, and the share of the step spent
outside the model's matmuls (sampling, cache, attention and glue).

    python bench/linear.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

import decodekit

SHAPES = {"q/o proj": (576, 576), "k+v proj": (384, 576), "gate+up": (3072, 576), "down": (576, 1536),
          "lm head": (49152, 576)}


def bandwidth_gbs() -> float:
    x = torch.ones(64 * 2**20)
    x.sum()
    ts = []
    for _ in range(7):
        t0 = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(ts) / 1e9


def timeit(fn, reps=30) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    bw = bandwidth_gbs()
    print(f"# read bandwidth {bw:.1f} GB/s, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'layer':<10}{'N':>7}{'K':>6}{'M':>4}{'ours us':>10}{'torch us':>10}{'torch/ours':>11}{'% bw':>7}")
    g = torch.Generator().manual_seed(0)
    for name, (N, K) in SHAPES.items():
        w = torch.randn(N, K, generator=g)
        for M in (1, 4, 16, 64):
            x = torch.randn(M, K, generator=g)
            ours = timeit(lambda: decodekit.linear(x, w))
            ref = timeit(lambda: F.linear(x, w))
            frac = N * K * 4 / ours / 1e9 / bw
            print(f"{name:<10}{N:>7}{K:>6}{M:>4}{ours * 1e6:>10.1f}{ref * 1e6:>10.1f}{ref / ours:>10.2f}x{100 * frac:>6.1f}%")

    from decodekit.models.gguf_loader import load_model

    lm = load_model()
    model = lm.model
    for det in (True, False):
        model.deterministic = det
        cache = model.new_paged_cache(num_blocks=64)  # the path decodekit.generate takes
        seq = cache.add_sequence()
        model.forward_paged(torch.tensor([list(range(1, 513))]), cache, [seq])
        tok = torch.tensor([[42]])
        step = timeit(lambda: model.forward_paged(tok, cache, [seq]), reps=40)
        # matmul share: time the same linears alone (30 layers x 4 + LM head) at M = 1
        ws = [w for b in model.blocks for w in (b.wqkv, b.wo, b.w_gate_up, b.w_down)] + [model.lm_head]
        x1 = {w.size(1): torch.randn(1, w.size(1)) for w in ws}
        mm = timeit(lambda: [model._linear(x1[w.size(1)], w) for w in ws], reps=20)
        print(f"decode step, paged cache at ~540 tokens ({'decodekit.linear' if det else 'torch GEMM'}): "
              f"{step * 1e3:.2f} ms, "
              f"matmuls alone {mm * 1e3:.2f} ms, outside matmuls {100 * max(0.0, 1 - mm / step):.0f}%")


if __name__ == "__main__":
    main()
