"""GPU benchmark of the sampling family against the PyTorch recipes (one run, ratios).

For B in {1, 8, 64, 256} and V in {32000, 128256, 151936}: time per call (CUDA events,
median of rotating input buffers several times the 60 MB L2), the ratio to the recipe users
write today, and the fraction of the device-to-device copy bandwidth measured in the same
run (bytes: the logits read once plus the outputs written). Also: B = 1 inside a CUDA graph,
deterministic vs fast mode, and CPU == CUDA token ids on 100,000 random rows.

Usage: python bench/gpu_sampling.py --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import decodekit

ops = torch.ops.decodekit
L2_BYTES = 60 * 2**20


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (the ceiling)."""
    n = 2**29  # 2 GiB of float32... halved below
    a = torch.empty(n // 2, dtype=torch.float32, device="cuda").uniform_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * a.numel() * 4 / statistics.median(times)


def bench(fn, inputs, reps=5, calls=20) -> float:
    """Seconds per call: `calls` back-to-back calls over the rotating input sets between two
    events (median of `reps`). Includes the host's launch cost where it exceeds the GPU's."""
    for i in range(3):
        fn(inputs[i % len(inputs)])
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for c in range(calls):
            fn(inputs[c % len(inputs)])
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3 / calls)
    return statistics.median(times)


def bench_graph(fn, inputs, reps=5) -> float:
    """Seconds per call of the GPU work alone: one call per input set captured in a CUDA
    graph, the graph replayed (median of `reps`)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for x in inputs:
            fn(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for x in inputs:
            fn(x)
    g.replay()
    times = []
    for _ in range(reps):
        st, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(st.elapsed_time(e) / 1e3 / len(inputs))
    return statistics.median(times)


def make_inputs(B, V, kind="randn4"):
    per = B * V * 4
    n = max(3, min(16, (4 * L2_BYTES) // per + 1))
    out = []
    for _ in range(n):
        if kind == "zipf":
            r = torch.rand(B, V, device="cuda").argsort(dim=-1).float() + 1
            out.append(-1.1 * torch.log(r) * 3)
        elif kind == "flat":
            out.append(torch.randn(B, V, device="cuda") * 0.05)
        else:
            out.append(torch.randn(B, V, device="cuda") * 4)
    return out


def recipe_top_k_top_p(x, T=0.7, k=50, p=0.9):
    probs = torch.softmax(x / T, dim=-1)
    v, i = torch.topk(probs, k, dim=-1)
    c = torch.cumsum(v, dim=-1)
    v = torch.where(c - v >= p, 0.0, v)
    return i.gather(1, torch.multinomial(v, 1)).squeeze(1)


def recipe_top_p(x, T=0.7, p=0.9):
    probs = torch.softmax(x / T, dim=-1)
    sp, si = torch.sort(probs, dim=-1, descending=True)
    c = torch.cumsum(sp, dim=-1)
    sp = torch.where(c - sp >= p, 0.0, sp)
    return si.gather(1, torch.multinomial(sp, 1)).squeeze(1)


def recipe_temperature(x, T=0.7):
    return torch.multinomial(torch.softmax(x / T, dim=-1), 1).squeeze(1)


def ours(x, T=0.7, k=0, p=1.0, det=True):
    B = x.size(0)
    seed = torch.arange(B, device="cuda")
    return ops.sample_from_logits(
        x, None, T, None, k, None, p, None, 0.0, seed, 0, None, 0, x.size(1), det, False, 0, False
    )[0]


def cpu_equals_cuda(rows=100_000, V=32000, chunk=2000):
    """Token ids on CPU and CUDA for the same logits and seeds; counts the differences."""
    diff = total = 0
    g = torch.Generator(device="cuda").manual_seed(0)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        kind = (start // chunk) % 3
        if kind == 0:
            x = torch.randn(n, V, device="cuda", generator=g)
        elif kind == 1:
            x = torch.randn(n, V, device="cuda", generator=g) * 4
        else:
            r = torch.rand(n, V, device="cuda", generator=g).argsort(dim=-1).float() + 1
            x = -1.1 * torch.log(r) * 3
        seed = torch.arange(start, start + n, device="cuda") * 2654435761
        T = torch.tensor([0.0, 0.6, 1.0, 1.4], device="cuda").repeat(n // 4 + 1)[:n]
        k = torch.tensor([0, 50, 0, 1000, 20], device="cuda").repeat(n // 5 + 1)[:n]
        p = torch.tensor([1.0, 0.9, 0.95, 0.5, 1.0, 0.8], device="cuda", dtype=torch.float64).repeat(n // 6 + 1)[:n]
        m = torch.tensor([0.0, 0.0, 0.1], device="cuda").repeat(n // 3 + 1)[:n]
        args = (T, 0.0, k, 0, p, 1.0, m, 0.0, seed, 0, None, 7, V, True, False, 0, False)
        gpu = ops.sample_from_logits(x, *args)[0].cpu()
        cpu = ops.sample_from_logits(x.cpu(), *(a.cpu() if torch.is_tensor(a) else a for a in args))[0]
        diff += int((gpu != cpu).sum())
        total += n
    return total, diff


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, decodekit {decodekit.__version__}")
    print(f"copy bandwidth (read + write): {bw / 1e12:.2f} TB/s")
    results = {"copy_bandwidth_Bps": bw, "rows": []}
    Bs = [1, 8, 64, 256] if not args.quick else [1, 64]
    Vs = [32000, 128256, 151936] if not args.quick else [128256]
    cases = [
        ("top_k50_top_p0.9", lambda x: ours(x, k=50, p=0.9), recipe_top_k_top_p, "randn4"),
        ("top_p0.9", lambda x: ours(x, p=0.9), recipe_top_p, "randn4"),
        ("top_p0.9_flat", lambda x: ours(x, p=0.9), recipe_top_p, "flat"),
        ("temperature", lambda x: ours(x), recipe_temperature, "randn4"),
        (
            "softmax",
            lambda x: ops.softmax(x, None, 0.7, x.size(1), True),
            lambda x: torch.softmax(x / 0.7, -1),
            "randn4",
        ),
        ("argmax", lambda x: ops.argmax(x, x.size(1)), lambda x: torch.argmax(x, -1), "randn4"),
        (
            "top_k_mask50",
            lambda x: ops.top_k_mask_logits(x, None, 50, x.size(1)),
            lambda x: x.masked_fill(x < torch.topk(x, 50, -1).values[:, -1:], float("-inf")),
            "randn4",
        ),
    ]
    for V in Vs:
        for B in Bs:
            inputs = {kind: make_inputs(B, V, kind) for kind in ("randn4", "flat")}
            for name, fn, rec, kind in cases:
                t = bench(fn, inputs[kind])
                tg = bench_graph(fn, inputs[kind])
                tr = bench(rec, inputs[kind], reps=3)
                out_bytes = B * V * 4 if name in ("softmax", "top_k_mask50") else B * 8
                frac = (B * V * 4 + out_bytes) / tg / bw
                row = {
                    "op": name,
                    "B": B,
                    "V": V,
                    "us": t * 1e6,
                    "graph_us": tg * 1e6,
                    "recipe_us": tr * 1e6,
                    "speedup": tr / t,
                    "bw_frac_graph": frac,
                }
                results["rows"].append(row)
                print(
                    f"{name:18s} B={B:4d} V={V:6d}  eager {t * 1e6:8.1f} us  graph {tg * 1e6:8.1f} us  "
                    f"recipe {tr * 1e6:8.1f} us  x{tr / t:6.2f}  {100 * frac:5.1f}% of copy bw (graph)",
                    flush=True,
                )
    # deterministic vs fast mode (one path today: same kernels)
    x = make_inputs(64, 128256)
    td = bench_graph(lambda a: ours(a, k=50, p=0.9, det=True), x)
    tf = bench_graph(lambda a: ours(a, k=50, p=0.9, det=False), x)
    for name, kw in (("top_k50_top_p0.9", dict(k=50, p=0.9)), ("top_p0.9", dict(p=0.9)), ("temperature", {})):
        results.setdefault("cluster_path", {})[name] = bench_graph(lambda a, kw=kw: ours(a, **kw), x) * 1e6
    results["det_vs_fast"] = {"det_us": td * 1e6, "fast_us": tf * 1e6}
    print(f"deterministic {td * 1e6:.1f} us vs fast {tf * 1e6:.1f} us (B=64, V=128256, top-k 50 + top-p 0.9)")
    os.environ["DECODEKIT_CUDA_CLUSTER"] = "0"
    for name, kw in (("top_k50_top_p0.9", dict(k=50, p=0.9)), ("top_p0.9", dict(p=0.9)), ("temperature", {})):
        t1 = bench_graph(lambda a, kw=kw: ours(a, **kw), x)
        results.setdefault("one_block_path", {})[name] = t1 * 1e6
        print(
            f"B=64 V=128256 {name}: cluster path {results['cluster_path'][name]:.1f} us, "
            f"one block per row (DECODEKIT_CUDA_CLUSTER=0) {t1 * 1e6:.1f} us (graph)"
        )
    del os.environ["DECODEKIT_CUDA_CLUSTER"]
    # B = 1 in a CUDA graph
    x1 = torch.randn(1, 128256, device="cuda") * 4
    seed = torch.zeros(1, dtype=torch.int64, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.sample_from_logits(
            x1, None, 0.7, None, 50, None, 0.9, None, 0.0, seed, 0, None, 0, 128256, True, False, 0, False
        )
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(20):
            ops.sample_from_logits(
                x1, None, 0.7, None, 50, None, 0.9, None, 0.0, seed, 0, None, 0, 128256, True, False, 0, False
            )
    tg = bench(lambda _: g.replay(), [None], reps=5, calls=5) / 20
    results["graph_B1_us"] = tg * 1e6
    print(f"B=1 V=128256 top-k 50 + top-p 0.9 in a CUDA graph: {tg * 1e6:.2f} us per call")
    t0 = time.time()
    total, diff = cpu_equals_cuda(rows=20_000 if args.quick else 100_000)
    results["cpu_equals_cuda"] = {"rows": total, "different_ids": diff}
    print(f"CPU == CUDA ids: {total - diff}/{total} rows equal ({time.time() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
