"""Benchmark: the CPU kernels and the decode loop on an idle machine and under load.

"Under load" (issue 15) means a second *process* running 2-thread torch matrix products,
``a @ a`` on a 512 x 512 float32 matrix in a loop, as a second inference process would. A
parallel region that waits at a barrier for a worker the OS has not scheduled stalls for a
scheduler time slice there; decodekit's pool (csrc/cpu/common/thread_pool.cpp) lets the
caller finish the work nobody claimed instead.

Workloads, each with decodekit's thread count at 1, 2 and the default (torch's count; for
``generate`` the ``threads=`` argument, which sets torch's count for the call as well):
  sample:  decodekit.sample_from_logits, B = 8, V = 128256, top-k 50 + top-p 0.9, T = 0.7
  linear:  decodekit.linear, 576 -> 1536 at M = 1 (SmolLM2-135M's MLP down projection shape, transposed)
  decode:  decodekit.generate on SmolLM2-135M-Instruct, 128 new tokens, greedy; the time of
           each decode step, taken from the stream callback's timestamps

For each: mean, median and p99 of the per-call (per-step) time in ms, and per condition the
ratio of the default's mean to the best setting's mean (the goal: <= 1.5 under load). The mean
matters: a stall shows in the mean and the p99, not in the median.

    python bench/load.py [--reps 300] [--tokens 128] [--runs 2] [--skip-decode] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import decodekit
from decodekit import _C

LOAD_CODE = """
import torch
torch.set_num_threads(2)
a = torch.randn(512, 512)
while True:
    b = a @ a
"""


def start_load() -> subprocess.Popen:
    """The load: another process doing 2-thread 512 x 512 float32 matrix products in a loop."""
    p = subprocess.Popen([sys.executable, "-c", LOAD_CODE], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.5)  # import torch and start multiplying
    if p.poll() is not None:
        raise RuntimeError("the load process exited")
    return p


def stop_load(p: subprocess.Popen) -> None:
    p.terminate()
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def stats_ms(times_s: list[float]) -> dict:
    ms = sorted(t * 1e3 for t in times_s)
    p99 = ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))]
    return {"mean": statistics.fmean(ms), "median": statistics.median(ms), "p99": p99, "n": len(ms)}


def time_calls(fn, reps: int, warmup: int = 10) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def kernel_workloads():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 128256, generator=g) * 3
    seeds = torch.arange(8)
    w = torch.randn(1536, 576, generator=g) / 24
    x = torch.randn(1, 576, generator=g)
    return {
        "sample": lambda: decodekit.sample_from_logits(logits, 0.7, 50, 0.9, seed=seeds),
        "linear": lambda: decodekit.linear(x, w),
    }


def decode_step_times(lm, tokens: int, threads, runs: int) -> list[float]:
    """Per-step times of greedy generate (the gaps between stream pieces; the first piece,
    which follows the prefill, is left out)."""
    out = []
    for _ in range(runs):
        stamps = []
        decodekit.generate(
            "Write a short story about a lighthouse keeper.",
            model=lm,
            max_new_tokens=tokens,
            temperature=0.0,
            stop_on_eos=False,
            stream=lambda piece: stamps.append(time.perf_counter()),
            threads=threads,
        )
        out.extend(b - a for a, b in zip(stamps, stamps[1:]))
    return out


def measure(condition: str, settings, args, lm) -> dict:
    res = {}
    kernels = kernel_workloads()
    for name, fn in kernels.items():
        res[name] = {}
        for label, nt in settings:
            decodekit.set_num_threads(nt)
            res[name][label] = stats_ms(time_calls(fn, args.reps))
            print(f"  {condition:5s} {name:7s} threads={label:8s} mean {res[name][label]['mean']:8.3f} ms", flush=True)
        decodekit.set_num_threads(None)
    if lm is not None:
        res["decode"] = {}
        decode_step_times(lm, 8, None, 1)  # warm-up
        for label, nt in settings:
            res["decode"][label] = stats_ms(decode_step_times(lm, args.tokens, nt, args.runs))
            mean = res["decode"][label]["mean"]
            print(f"  {condition:5s} decode  threads={label:8s} mean {mean:8.3f} ms", flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=300, help="timed calls per kernel and setting (default 300)")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per decode run (default 128)")
    ap.add_argument("--runs", type=int, default=2, help="decode runs per setting (default 2)")
    ap.add_argument("--skip-decode", action="store_true", help="kernels only (no model load)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    default_threads = torch.get_num_threads()
    settings = [("1", 1), ("2", 2), (f"default({default_threads})", None)]
    lm = None
    if not args.skip_decode:
        from decodekit.models import load_model

        lm = load_model(None)

    results = {}
    print("idle:", flush=True)
    results["idle"] = measure("idle", settings, args, lm)
    print("under load (another process: 2-thread torch a @ a, 512 x 512 float32, in a loop):", flush=True)
    load = start_load()
    try:
        results["load"] = measure("load", settings, args, lm)
    finally:
        stop_load(load)

    default_label = settings[-1][0]
    ratios = {}
    print()
    print(f"{'condition':9s} {'workload':8s} {'threads':12s} {'mean ms':>9s} {'median ms':>10s} {'p99 ms':>9s}")
    for cond, per in results.items():
        for name, by in per.items():
            best = min(s["mean"] for s in by.values())
            ratios[f"{cond}/{name}"] = by[default_label]["mean"] / best
            for label, s in by.items():
                print(f"{cond:9s} {name:8s} {label:12s} {s['mean']:9.3f} {s['median']:10.3f} {s['p99']:9.3f}")
            print(f"{cond:9s} {name:8s} {'default/best':12s} {ratios[f'{cond}/{name}']:9.2f}  (means)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": {
                        "platform": platform.platform(),
                        "cpus": os.cpu_count(),
                        "torch": torch.__version__,
                        "torch_threads": default_threads,
                        "cpu_isa": _C.cpu_isa(),
                    },
                    "settings": [label for label, _ in settings],
                    "results": results,
                    "default_over_best_mean": ratios,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
