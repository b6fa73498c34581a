"""Benchmark: every decodekit sampling-family op vs the PyTorch recipe users write today.

One run prints, for B in {1, 8, 64} and V in {32000, 49152, 128256}, our time, the
recipe's time, the speedup and the fraction of the machine's memory read bandwidth
(bytes of input read / time / bandwidth) measured in the same run. Inputs come from a
rotating pool of buffers >= 3x the last-level cache, so every call reads cold memory.
Median of --reps calls (a quarter as many for the slow recipes). Writes a JSON file
and a PNG plot of the speedups (one panel per op, speedup vs batch, a line per vocab).

    python bench/sampling.py [--reps 20] [--json bench/out/sampling.json] [--png bench/out/sampling.png]
    python bench/sampling.py --flat --batches 8 --vocabs 128256   # only the flat-row top-p cases

Flat rows: top-p 0.9 alone from a peaked row (a nucleus of a few tokens) to flat ones (nucleus
~10^3 to ~10^5 tokens, what models give at T >= 1): time, ratio to the peaked row, speedup over
the recipe, and the fraction of the read bandwidth (torch.sum) and of a torch copy's read rate.

The recipes (what HF transformers' warpers and common sampling loops do):
  sample:   logits / T; topk mask; sort + softmax + cumsum top-p mask; softmax; multinomial
  probs:    topk mask; sort + cumsum top-p mask; renormalise; multinomial
  filter:   the probs recipe without the draw
  top_k_mask: torch.topk + masked_fill
  softmax:  torch.softmax(logits / T)
  argmax:   torch.argmax
  penalties: gather / scatter repetition penalty, bincount frequency + presence
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

POOL_BYTES = 96 * 2**20  # 3x the 32 MiB L3 here


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


def copy_bandwidth_gbs(reps: int = 9) -> float:
    """Bytes read per second by a torch copy of a 256 MiB float32 tensor (all threads), median."""
    x = torch.ones(64 * 2**20, dtype=torch.float32)
    y = torch.empty_like(x)
    y.copy_(x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        y.copy_(x)
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times) / 1e9


def pin_malloc() -> bool:
    """Keep freed memory in the process (glibc mallopt), so that the temporaries of the
    PyTorch recipes (logits / T, sort outputs, ...) are not returned to the OS and faulted
    in again on every call. Without it the same `torch.softmax(logits / T)` measured
    0.3 ms or 2.1 ms at B=8, V=128256 depending on the heap's history; pinned, every
    recipe gets its best case. Returns False where glibc is not available."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**30))


def pool(B: int, V: int, probs: bool = False):
    n = max(2, min(64, POOL_BYTES // (B * V * 4)))
    g = torch.Generator().manual_seed(0)
    bufs = [torch.randn(B, V, generator=g) * 4 for _ in range(n)]
    return [torch.softmax(b, dim=-1) for b in bufs] if probs else bufs


def timeit(fn, bufs, reps: int) -> float:
    for i in range(2):
        fn(bufs[i % len(bufs)])
    times = []
    for i in range(reps):
        x = bufs[(i + 2) % len(bufs)]
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------- recipes ----
def top_p_mask(probs_or_logits, top_p, from_logits: bool):
    """HF TopPLogitsWarper's mask: ascending sort, cumsum, drop mass <= 1 - p (keep the last)."""
    sorted_x, idx = torch.sort(probs_or_logits, descending=False, dim=-1)
    cum = (sorted_x.softmax(dim=-1) if from_logits else sorted_x).cumsum(dim=-1)
    remove = cum <= 1 - top_p
    remove[..., -1:] = False
    return remove.scatter(1, idx, remove)


def recipe_sample(logits, T, top_k, top_p, g):
    x = logits / T
    if top_k > 0:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        x = x.masked_fill(top_p_mask(x, top_p, True), float("-inf"))
    return torch.multinomial(torch.softmax(x, dim=-1), 1, generator=g).squeeze(1)


def recipe_filter_probs(probs, top_k, top_p):
    p = probs
    if top_k > 0:
        kth = torch.topk(p, top_k, dim=-1).values[..., -1:]
        p = p.masked_fill(p < kth, 0.0)
        p = p / p.sum(-1, keepdim=True)
    if top_p < 1.0:
        p = p.masked_fill(top_p_mask(p, top_p, False), 0.0)
        p = p / p.sum(-1, keepdim=True)
    return p


def recipe_penalties(logits, ids, rep, freq, pres):
    x = logits.clone()
    score = torch.gather(x, 1, ids)
    score = torch.where(score < 0, score * rep, score / rep)
    x.scatter_(1, ids, score)
    counts = torch.zeros_like(x).scatter_add_(1, ids, torch.ones_like(ids, dtype=x.dtype))
    return x - freq * counts - pres * (counts > 0)


def cases(g):
    """(name, ours(x), recipe(x), input is probs)."""
    ids_cache = {}

    def pen_ids(x):
        key = x.shape
        if key not in ids_cache:
            ids_cache[key] = torch.randint(0, x.shape[1], (x.shape[0], 256), generator=torch.Generator().manual_seed(1))
        return ids_cache[key]

    return [
        (
            "sample T0.7 k50 p0.9",
            lambda x: decodekit.sample_from_logits(x, 0.7, 50, 0.9, seed=1),
            lambda x: recipe_sample(x, 0.7, 50, 0.9, g),
            False,
        ),
        (
            "sample T0.7 p0.9 (no top-k)",
            lambda x: decodekit.sample_from_logits(x, 0.7, 0, 0.9, seed=1),
            lambda x: recipe_sample(x, 0.7, 0, 0.9, g),
            False,
        ),
        (
            "sample T0.7 (no filter)",
            lambda x: decodekit.sample_from_logits(x, 0.7, seed=1),
            lambda x: recipe_sample(x, 0.7, 0, 1.0, g),
            False,
        ),
        (
            "sample T0.7 k50 p0.9 fast mode",
            lambda x: decodekit.sample_from_logits(x, 0.7, 50, 0.9, seed=1, deterministic=False),
            lambda x: recipe_sample(x, 0.7, 50, 0.9, g),
            False,
        ),
        (
            "sample_from_probs p0.9",
            lambda x: decodekit.sample_from_probs(x, 0, 0.9, seed=1),
            lambda x: torch.multinomial(recipe_filter_probs(x, 0, 0.9), 1, generator=g),
            True,
        ),
        (
            "filter_probs k50 p0.9",
            lambda x: decodekit.filter_probs(x, 50, 0.9),
            lambda x: recipe_filter_probs(x, 50, 0.9),
            True,
        ),
        (
            "top_k_mask_logits k50",
            lambda x: decodekit.top_k_mask_logits(x, 50),
            lambda x: x.masked_fill(x < torch.topk(x, 50, dim=-1).values[..., -1:], float("-inf")),
            False,
        ),
        ("softmax T0.7", lambda x: decodekit.softmax(x, 0.7), lambda x: torch.softmax(x / 0.7, dim=-1), False),
        ("argmax", lambda x: decodekit.argmax(x), lambda x: torch.argmax(x, dim=-1), False),
        (
            "apply_penalties (256 ids)",
            lambda x: decodekit.apply_penalties(
                x, repetition_penalty=1.2, frequency_penalty=0.1, presence_penalty=0.1, token_ids=pen_ids(x)
            ),
            lambda x: recipe_penalties(x, pen_ids(x), 1.2, 0.1, 0.1),
            False,
        ),
    ]


# Flat rows: top-p alone on logits N(0, (scale T)^2) at T = 0.7, so the tempered logits are
# N(0, scale^2) and the p = 0.9 nucleus holds about V * Q(scale - 1.28) tokens (Q: the normal's
# upper tail). scale 5.7 is the peaked case of pool() (std 4 at T = 0.7: a nucleus of a few tokens).
FLAT_SCALES = [
    ("peaked", 4.0 / 0.7),
    ("flat s=3.5", 3.5),
    ("flat s=2.5", 2.5),
    ("flat s=1.43", 1.0 / 0.7),
    ("flat s=0.5", 0.5),
]
FLAT_T, FLAT_P = 0.7, 0.9


def nucleus_tokens(x: torch.Tensor, T: float, p: float) -> float:
    """Mean p-nucleus size of the rows of x at temperature T (float64 sort + cumsum)."""
    probs = torch.softmax(x.double() / T, dim=-1)
    c = torch.sort(probs, dim=-1, descending=True).values.cumsum(-1)
    return float(((c < p).sum(-1) + 1).double().mean())


def flat_rows(batches, vocabs, reps, read_bw, copy_bw):
    """Top-p 0.9 alone from peaked to flat rows: time, ratio to the peaked row, speedup over the
    PyTorch recipe (sort + softmax + cumsum + multinomial) and fractions of the read bandwidths."""
    print(
        f"\n# top-p {FLAT_P} alone at T {FLAT_T}, peaked to flat rows; copy bandwidth {copy_bw:.1f} GB/s (bytes read)"
    )
    print(
        f"{'row':<14}{'B':>4}{'V':>8}{'nucleus':>9}{'ours ms':>10}{'/peaked':>9}{'torch ms':>10}{'speedup':>9}"
        f"{'% read bw':>10}{'% copy bw':>10}"
    )
    g = torch.Generator().manual_seed(1)
    out = []
    for V in vocabs:
        for B in batches:
            peaked = None
            for name, scale in FLAT_SCALES:
                n = max(2, min(64, POOL_BYTES // (B * V * 4)))
                gen = torch.Generator().manual_seed(0)
                bufs = [torch.randn(B, V, generator=gen) * (scale * FLAT_T) for _ in range(n)]
                nuc = nucleus_tokens(bufs[0][: min(B, 4)], FLAT_T, FLAT_P)
                ours = timeit(lambda x: decodekit.sample_from_logits(x, FLAT_T, 0, FLAT_P, seed=1), bufs, reps)
                ref = timeit(lambda x: recipe_sample(x, FLAT_T, 0, FLAT_P, g), bufs, max(3, reps // 4))
                peaked = ours if peaked is None else peaked
                rate = B * V * 4 / ours / 1e9
                out.append(
                    dict(
                        op=f"top-p {FLAT_P} T{FLAT_T} {name}",
                        B=B,
                        V=V,
                        nucleus=nuc,
                        ours_s=ours,
                        torch_s=ref,
                        speedup=ref / ours,
                        vs_peaked=ours / peaked,
                        bw_fraction=rate / read_bw,
                        copy_bw_fraction=rate / copy_bw,
                    )
                )
                print(
                    f"{name:<14}{B:>4}{V:>8}{nuc:>9.0f}{ours * 1e3:>10.3f}{ours / peaked:>8.2f}x{ref * 1e3:>10.3f}"
                    f"{ref / ours:>8.1f}x{100 * rate / read_bw:>9.1f}%{100 * rate / copy_bw:>9.1f}%",
                    flush=True,
                )
                del bufs
    return out


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in results))
    cols = 4
    rows = (len(ops) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, op in zip(axes.flat, ops):
        for V in sorted({r["V"] for r in results}):
            pts = sorted((r["B"], r["speedup"]) for r in results if r["op"] == op and r["V"] == V)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"V={V}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(op, fontsize=9)
        ax.set_xlabel("batch B")
        ax.set_ylabel("speedup vs PyTorch recipe")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(ops) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--vocabs", type=int, nargs="+", default=[32000, 49152, 128256])
    ap.add_argument("--only", default=None, help="run only ops whose name contains this text")
    ap.add_argument("--json", default=None, help="write the results as JSON here")
    ap.add_argument("--png", default=None, help="write a plot of the speedups here (needs matplotlib)")
    ap.add_argument("--markdown", default=None, help="also write the results as a Markdown table here")
    ap.add_argument("--flat", action="store_true", help="only the flat-row top-p cases (peaked to flat rows)")
    ap.add_argument("--no-flat", action="store_true", help="skip the flat-row top-p cases")
    ap.add_argument(
        "--no-pin-malloc",
        action="store_true",
        help="leave glibc's malloc trimming on (the PyTorch recipes then often pay page faults)",
    )
    args = ap.parse_args()
    pinned = False if args.no_pin_malloc else pin_malloc()

    bw = read_bandwidth_gbs()
    copy_bw = copy_bandwidth_gbs()
    info = dict(
        date=time.strftime("%Y-%m-%d"),
        machine=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        cpu_isa=decodekit._C.cpu_isa(),
        read_bandwidth_gbs=bw,
        copy_bandwidth_gbs=copy_bw,
        malloc_pinned=pinned,
    )
    print(
        f"# {info['date']}: read bandwidth {bw:.1f} GB/s, {info['threads']} threads, torch {torch.__version__}, "
        f"kernels {info['cpu_isa']}"
    )
    print(f"{'op':<34}{'B':>4}{'V':>8}{'ours ms':>10}{'torch ms':>10}{'speedup':>9}{'% bw':>7}")
    g = torch.Generator().manual_seed(1)
    results = []
    all_cases = [c for c in cases(g) if (args.only is None or args.only in c[0]) and not args.flat]
    for V in args.vocabs:
        for B in args.batches:
            bufs, pbufs = pool(B, V), None
            nbytes = B * V * 4
            for name, ours_fn, ref_fn, is_probs in all_cases:
                if is_probs and pbufs is None:
                    pbufs = pool(B, V, probs=True)
                data = pbufs if is_probs else bufs
                ours = timeit(ours_fn, data, args.reps)
                ref = timeit(ref_fn, data, max(3, args.reps // 4))
                frac = nbytes / ours / 1e9 / bw
                results.append(dict(op=name, B=B, V=V, ours_s=ours, torch_s=ref, speedup=ref / ours, bw_fraction=frac))
                print(
                    f"{name:<34}{B:>4}{V:>8}{ours * 1e3:>10.3f}{ref * 1e3:>10.3f}{ref / ours:>8.1f}x{100 * frac:>6.1f}%",
                    flush=True,
                )
            del bufs, pbufs
    flat = [] if args.no_flat else flat_rows(args.batches, args.vocabs, args.reps, bw, copy_bw)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(info=info, results=results, flat_rows=flat), f, indent=1)
    if args.png and not results:
        print(f"--png: no op results to plot (--flat runs only the flat-row cases); {args.png} not written")
    elif args.png:
        os.makedirs(os.path.dirname(args.png) or ".", exist_ok=True)
        plot(results, args.png)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(
                f"Read bandwidth {bw:.1f} GB/s (torch.sum, 256 MiB, {info['threads']} threads); "
                f"torch {torch.__version__}; kernels {info['cpu_isa']}; {info['date']}.\n\n"
            )
            f.write("| op | B | V | ours ms | torch ms | speedup | % bw |\n|---|---:|---:|---:|---:|---:|---:|\n")
            for r in results:
                f.write(
                    f"| {r['op']} | {r['B']} | {r['V']} | {r['ours_s'] * 1e3:.3f} | {r['torch_s'] * 1e3:.3f} | "
                    f"{r['speedup']:.1f}x | {100 * r['bw_fraction']:.1f}% |\n"
                )
            if flat:
                f.write(
                    f"\nTop-p {FLAT_P} alone at T {FLAT_T}, peaked to flat rows "
                    f"(copy bandwidth {copy_bw:.1f} GB/s).\n\n"
                    "| row | B | V | nucleus | ours ms | / peaked | torch ms | speedup | % read bw | % copy bw |\n"
                    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
                )
                for r in flat:
                    f.write(
                        f"| {r['op']} | {r['B']} | {r['V']} | {r['nucleus']:.0f} | {r['ours_s'] * 1e3:.3f} | "
                        f"{r['vs_peaked']:.2f}x | {r['torch_s'] * 1e3:.3f} | {r['speedup']:.1f}x | "
                        f"{100 * r['bw_fraction']:.1f}% | {100 * r['copy_bw_fraction']:.1f}% |\n"
                    )


if __name__ == "__main__":
    main()
