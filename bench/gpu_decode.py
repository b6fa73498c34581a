"""GPU benchmark of the decode ops (KV-cache append, paged attention, linear, chain
verification) against the PyTorch baselines (one run, ratios).

Each figure: time per call (CUDA events around back-to-back calls over rotating input sets
several times the 60 MB L2, median of repetitions), the ratio to the baseline measured in the
same run, and the fraction of the device-to-device copy bandwidth (also measured in the same
run) that the op's compulsory bytes represent:
  append_paged_kv_cache   B = 64 sequences x 64 new tokens, SmolLM2-135M's KV heads (3 x 64),
                          float32 and bfloat16: new rows read + cache rows written, vs a
                          device copy of the same bytes (index_copy_ into the flat cache);
  paged_attention         decode (Q = 1), B = 64, 4096-token context, 9 query / 3 KV heads,
                          head_dim 64: the KV bytes read, vs torch SDPA (enable_gqa) over the
                          same keys and values already gathered into contiguous tensors;
  linear                  SmolLM2-135M's projections at M in {1, 8, 64}: weight bytes read,
                          vs torch.matmul (cuBLAS);
  chain verification      B = 64, K = 4, V = 128256 (and 32000): target + draft bytes read,
                          vs the vectorised PyTorch recipe of bench/speculative.py.
First ("loop"), decodekit's model (LlamaModel.forward_paged, SmolLM2-135M's shape, seeded random
weights) with the decode loop's host-side argmax, on this machine's CPU and on the GPU (a replayed
CUDA graph per step, and eagerly): the same 64 greedy tokens on three prompts; tokens/s at batch 1
against HF transformers' generate with the same weights on the same GPU, and total tokens/s at
batch 64. Then ("greedy") the same check on a bare stack of the ops (bit-identical logits).

Usage: python bench/gpu_decode.py --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import decodekit  # (registers torch.ops.decodekit)

ops = torch.ops.decodekit
L2_BYTES = 60 * 2**20
ROTATE_BYTES = 4 * L2_BYTES


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (the ceiling)."""
    a = torch.empty(2**28, dtype=torch.float32, device="cuda").uniform_()
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


def bench(fn, inputs, reps=7, calls=None) -> float:
    """Seconds per call over the rotating input sets (median of `reps` passes)."""
    calls = calls or max(len(inputs), 10)
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


def n_sets(bytes_per_set: int) -> int:
    return max(2, min(64, ROTATE_BYTES // max(1, bytes_per_set) + 1))


ROWS = []


def report(name, t, t_base, nbytes, bw, base_name):
    row = {
        "op": name,
        "us": t * 1e6,
        "baseline": base_name,
        "baseline_us": t_base * 1e6 if t_base else None,
        "speedup": (t_base / t) if t_base else None,
        "bytes": nbytes,
        "frac_copy_bw": nbytes / t / bw,
    }
    ROWS.append(row)
    sp = f"{row['speedup']:.2f}x" if row["speedup"] else "-"
    print(
        f"{name:58s} {t * 1e6:9.1f} us  {base_name}: {row['baseline_us'] or float('nan'):9.1f} us  "
        f"speedup {sp:>7s}  {100 * row['frac_copy_bw']:5.1f}% of copy bw",
        flush=True,
    )


# ------------------------------------------------------------------ append ----
def bench_append(bw):
    B, T, H, D, bs = 64, 64, 3, 64, 16
    N = B * T
    for dtype in (torch.float32, torch.bfloat16):
        es = torch.tensor([], dtype=dtype).element_size()
        NB = B * 4096 // bs  # a 4096-token pool per sequence
        k = torch.zeros(NB, bs, H, D, dtype=dtype, device="cuda")
        v = torch.zeros_like(k)
        per_set = 2 * N * H * D * es
        sets = []
        for _ in range(n_sets(per_set)):
            key = torch.randn(N, H, D, device="cuda").to(dtype)
            value = torch.randn(N, H, D, device="cuda").to(dtype)
            # Each sequence appends T tokens at a random offset of its own blocks.
            start = torch.randint(0, 4096 - T, (B,), device="cuda")
            slots = torch.arange(B, device="cuda")[:, None] * 4096 + start[:, None] + torch.arange(T, device="cuda")
            sets.append((key, value, slots.reshape(-1)))
        t = bench(lambda s, k=k, v=v: ops.append_paged_kv_cache(k, v, s[0], s[1], s[2], "NHD"), sets)
        kf, vf = k.view(NB * bs, H * D), v.view(NB * bs, H * D)

        def base(s, kf=kf, vf=vf):
            kf.index_copy_(0, s[2], s[0].view(N, H * D))
            vf.index_copy_(0, s[2], s[1].view(N, H * D))

        tb = bench(base, sets)
        report(f"append_paged_kv_cache B=64 T=64 {str(dtype)[6:]}", t, tb, 2 * per_set, bw, "index_copy_")
        del k, v, kf, vf, sets


# --------------------------------------------------------------- attention ----
def bench_attention(bw):
    B, Hq, Hkv, D, bs, ctx = 64, 9, 3, 64, 16, 4096
    for dtype in (torch.float32, torch.bfloat16):
        es = torch.tensor([], dtype=dtype).element_size()
        NB = B * ctx // bs
        k = torch.randn(NB, bs, Hkv, D, device="cuda").to(dtype)
        v = torch.randn(NB, bs, Hkv, D, device="cuda").to(dtype)
        tables = torch.randperm(NB, device="cuda").view(B, ctx // bs)
        lens = torch.full((B,), ctx, device="cuda")
        kv_bytes = 2 * B * ctx * Hkv * D * es
        qs = [torch.randn(B, 1, Hq, D, device="cuda") for _ in range(4)]
        scale = 1.0 / math.sqrt(D)
        attn = lambda q, k=k, v=v, t=tables, n=lens, sc=scale: ops.paged_attention(q, k, v, t, n, sc, "NHD")
        t = bench(attn, qs, calls=8)
        # SDPA over the same keys and values gathered contiguously (the gather not timed).
        kc = k[tables].reshape(B, ctx, Hkv, D).transpose(1, 2).contiguous()
        vc = v[tables].reshape(B, ctx, Hkv, D).transpose(1, 2).contiguous()
        qsd = [q.transpose(1, 2).to(dtype) for q in qs]
        try:
            sdpa = lambda q, kc=kc, vc=vc, sc=scale: F.scaled_dot_product_attention(  # noqa: E731
                q, kc, vc, scale=sc, enable_gqa=True
            )
            tb = bench(sdpa, qsd, calls=8)
        except Exception as exc:  # noqa: BLE001
            print("SDPA failed:", exc)
            tb = None
        report(f"paged_attention decode B=64 ctx=4096 9/3x64 {str(dtype)[6:]}", t, tb, kv_bytes, bw, "SDPA")
        del k, v, kc, vc


# ------------------------------------------------------------------ linear ----
def bench_linear(bw):
    shapes = [
        ("qkv 576->960", 960, 576),
        ("gate_up 576->3072", 3072, 576),
        ("down 1536->576", 576, 1536),
        ("lm_head 576->49152", 49152, 576),
    ]
    for M in (1, 8, 64):
        for name, N, K in shapes:
            wb = N * K * 4
            ws = [torch.randn(N, K, device="cuda") * 0.05 for _ in range(n_sets(wb))]
            x = torch.randn(M, K, device="cuda")
            t = bench(lambda w, x=x: ops.linear(x, w, None), ws)
            tb = bench(lambda w, x=x: torch.matmul(x, w.t()), ws)
            report(f"linear M={M} {name}", t, tb, wb + M * (K + N) * 4, bw, "matmul")
            del ws


# ------------------------------------------------------------------- chain ----
def torch_rejection(draft_probs, draft_ids, target_probs):
    """The vectorised PyTorch recipe (as bench/speculative.py), on the GPU."""
    B, K, V = draft_probs.shape
    p = target_probs[:, :K].gather(2, draft_ids[..., None])[..., 0]
    q = draft_probs.gather(2, draft_ids[..., None])[..., 0]
    u = torch.rand(B, K, device=draft_probs.device)
    accept = (u * q < p).to(torch.int64)
    n = torch.cumprod(accept, dim=1).sum(1)
    residual = (target_probs[:, :K] - draft_probs).clamp_min(0)
    residual = residual / residual.sum(-1, keepdim=True).clamp_min(1e-30)
    dist = torch.cat([residual, target_probs[:, K:]], dim=1)
    rows = dist[torch.arange(B, device=dist.device), n]
    extra = torch.multinomial(rows, 1)[:, 0]
    return n, extra


def bench_chain(bw):
    B, K = 64, 4
    for V in (128256, 32000):
        per = B * (2 * K + 1) * V * 4
        sets = []
        for i in range(n_sets(per)):
            target = torch.softmax(torch.randn(B, K + 1, V, device="cuda") * 3, -1)
            draft = torch.softmax(torch.randn(B, K, V, device="cuda") * 3, -1)
            if i % 2 == 0:  # half the sets: drafts close to the target (most accepted)
                draft = 0.9 * target[:, :K] + 0.1 * draft
            ids = torch.multinomial(draft.view(-1, V), 1).view(B, K)
            seed = torch.randint(0, 2**62, (B,), device="cuda")
            sets.append((draft, ids, target, seed))
        t = bench(lambda s, V=V: ops.chain_speculative_sampling(s[0], s[1], s[2], s[3], 0, None, 0, V), sets)
        tb = bench(lambda s: torch_rejection(s[0], s[1], s[2]), sets)
        acc = sum(int(ops.chain_speculative_sampling(s[0], s[1], s[2], s[3], 0, None, 0, V)[1].sum()) for s in sets)
        # Compulsory bytes: every target and draft row the kernel reads (an upper bound: rows
        # after the first rejection are not read).
        report(
            f"chain_speculative_sampling B=64 K=4 V={V} (accepted {acc / len(sets) / B:.2f}/row)",
            t,
            tb,
            per,
            bw,
            "torch recipe",
        )
        del sets


# ------------------------------------------------------------------ greedy ----
class TinyStack:
    """SmolLM2-135M's shape (30 layers, hidden 576, 9 query / 3 KV heads of 64, MLP 1536,
    vocabulary 49152) with seeded random weights, written with decodekit's ops only (rms_norm,
    linear, rope_, append_paged_kv_cache, paged_attention, silu_and_mul, argmax) plus
    elementwise adds, so that the same code runs on either device. Not the decode loop of
    decodekit.generate: a check of the ops along a real decode step's path."""

    def __init__(self, device, layers=30, hidden=576, hq=9, hkv=3, hd=64, inter=1536, vocab=49152, bs=16):
        g = torch.Generator().manual_seed(1234)
        r = lambda *shape, s=0.02: (torch.randn(*shape, generator=g) * s).to(device)  # noqa: E731
        self.L, self.hq, self.hkv, self.hd, self.bs, self.device = layers, hq, hkv, hd, bs, device
        self.emb = r(vocab, hidden)
        self.w = [
            dict(
                n1=1.0 + r(hidden, s=0.1),
                qkv=r((hq + 2 * hkv) * hd, hidden),
                o=r(hidden, hq * hd),
                n2=1.0 + r(hidden, s=0.1),
                gu=r(2 * inter, hidden),
                down=r(hidden, inter),
            )
            for _ in range(layers)
        ]
        self.norm = 1.0 + r(hidden, s=0.1)
        self.head = r(vocab, hidden, s=0.05)  # untied, so the greedy tokens vary
        pos = torch.arange(4096, dtype=torch.float64)[:, None]
        inv = 1.0 / (100000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        ang = torch.cat([pos * inv, pos * inv], 1)
        self.cos, self.sin = torch.cos(ang).float().to(device), torch.sin(ang).float().to(device)

    def generate(self, prompt, steps):
        dev, L, hq, hkv, hd, bs = self.device, self.L, self.hq, self.hkv, self.hd, self.bs
        nb = (len(prompt) + steps + bs - 1) // bs
        kc = [torch.zeros(nb, bs, hkv, hd, device=dev) for _ in range(L)]
        vc = [torch.zeros(nb, bs, hkv, hd, device=dev) for _ in range(L)]
        table = torch.arange(nb, device=dev)[None]
        ids = torch.tensor(prompt, device=dev)
        start, out, all_logits = 0, [], []
        for _ in range(steps):
            N = ids.numel()
            pos = torch.arange(start, start + N, device=dev)
            lens = torch.tensor([start + N], device=dev)
            x = self.emb[ids]
            for w, k_cache, v_cache in zip(self.w, kc, vc):
                h = ops.rms_norm(x, w["n1"], 1e-5)
                qkv = ops.linear(h, w["qkv"], None)
                q = qkv[:, : hq * hd].contiguous()
                k = qkv[:, hq * hd : (hq + hkv) * hd].contiguous()
                v = qkv[:, (hq + hkv) * hd :]
                ops.rope_(q, hq, self.cos, self.sin, pos)
                ops.rope_(k, hkv, self.cos, self.sin, pos)
                ops.append_paged_kv_cache(k_cache, v_cache, k.view(N, hkv, hd), v.reshape(N, hkv, hd), pos, "NHD")
                a = ops.paged_attention(q.view(1, N, hq, hd), k_cache, v_cache, table, lens, hd**-0.5, "NHD")
                x = x + ops.linear(a.view(N, hq * hd), w["o"], None)
                h = ops.rms_norm(x, w["n2"], 1e-5)
                x = x + ops.linear(ops.silu_and_mul(ops.linear(h, w["gu"], None)), w["down"], None)
            logits = ops.linear(ops.rms_norm(x[-1:], self.norm, 1e-5), self.head, None)
            nxt = ops.argmax(logits, logits.size(1))[0]
            out.append(nxt)
            all_logits.append(logits)
            start, ids = start + N, nxt
        return torch.cat(out).tolist(), torch.cat(all_logits)


def check_greedy(_bw):
    """Greedy tokens of the same weights on this machine's CPU and on the GPU (must be equal:
    every op above gives the CPU's bits on CUDA), and the GPU's eager tokens/s at batch 1."""
    prompts = [[1, 2, 3, 4, 5], [100, 2000, 30000], [7] * 12]
    steps = 64
    cpu_model, gpu_model = TinyStack("cpu"), TinyStack("cuda")
    same = 0
    for p in prompts:
        t_cpu, l_cpu = cpu_model.generate(p, steps)
        torch.cuda.synchronize()
        t0 = time.time()
        t_gpu, l_gpu = gpu_model.generate(p, steps)
        torch.cuda.synchronize()
        dt = time.time() - t0
        bits = torch.equal(l_gpu.cpu(), l_cpu)
        first = next((i for i, (a, b) in enumerate(zip(t_cpu, t_gpu)) if a != b), None)
        same += t_cpu == t_gpu
        print(
            f"greedy prompt {p[:4]}...: {'SAME' if t_cpu == t_gpu else f'DIFFER at step {first}'} tokens "
            f"({steps}), all logits bit-identical: {bits}; GPU eager {steps / dt:.0f} tokens/s",
            flush=True,
        )
    print(f"greedy CPU == GPU on {same}/{len(prompts)} prompts", flush=True)
    ROWS.append(
        {
            "op": "greedy CPU == GPU prompts",
            "us": 0.0,
            "baseline": "cpu",
            "baseline_us": None,
            "speedup": None,
            "bytes": 0,
            "frac_copy_bw": 0.0,
            "same": same,
            "of": len(prompts),
        }
    )


# --------------------------------------------------------------- the model ----
def smollm2_like(seed: int = 1234):
    """decodekit's LlamaModel with SmolLM2-135M's exact shape (30 layers, hidden 576, 9 / 3 heads
    of 64, MLP 1536, vocabulary 49152, RoPE base 1e5) and seeded random weights
    (the GGUF cannot travel to the GPU machine) and an untied head, so that greedy tokens vary,
    on the CPU."""
    from decodekit.models.llama import LlamaConfig, LlamaLayerWeights, LlamaModel, LlamaWeights

    c = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5, max_seq_len=2048)  # fmt: skip
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.02):
        return torch.randn(*shape, generator=g) * s

    H, q, kv, inter = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    layers = [
        LlamaLayerWeights(
            attn_norm=1.0 + r(H, s=0.1),
            wq=r(q, H),
            wk=r(kv, H),
            wv=r(kv, H),
            wo=r(H, q),
            ffn_norm=1.0 + r(H, s=0.1),
            w_gate=r(inter, H),
            w_up=r(inter, H),
            w_down=r(H, inter),
        )  # fmt: skip
        for _ in range(c.num_layers)
    ]
    embed, norm, head = r(c.vocab_size, H), 1.0 + r(H, s=0.1), r(c.vocab_size, H, s=0.05)  # untied: tokens vary
    return LlamaModel(c, LlamaWeights(embed=embed, layers=layers, norm=norm, lm_head=head))


def greedy_with(model, prompts, steps):
    """What decodekit's decode loop does per step, with greedy sampling: forward_paged (on the
    model's device; a replayed CUDA graph there in deterministic mode), the logits to the host,
    decodekit's argmax. All rows together after one prefill each. Returns (tokens per row, the
    seconds of decode steps 2 .. steps - 1: the first step, which captures, is not timed)."""
    cache = model.new_paged_cache(sum(-(-(len(p) + steps) // 16) for p in prompts), 16)
    seqs = [cache.add_sequence() for _ in prompts]
    last = [model.forward_paged(torch.tensor([p]), cache, [s]).cpu() for p, s in zip(prompts, seqs)]
    nxt = [int(decodekit.argmax(x)[0]) for x in last]
    out = [[t] for t in nxt]
    t0 = None
    for step in range(steps - 1):
        if step == 1:  # the clock starts after the first decode step (it captures the graph)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.time()
        logits = model.forward_paged(torch.tensor(nxt)[:, None], cache, seqs).cpu()
        nxt = decodekit.argmax(logits).tolist()
        for o, t in zip(out, nxt):
            o.append(t)
    return out, (time.time() - t0 if t0 is not None else 0.0)


def check_loop(_bw):
    """decodekit's model (LlamaModel.forward_paged with the loop's host-side argmax) on the GPU
    against the same weights on this machine's CPU: the same 64 greedy tokens on three prompts,
    with the CUDA graph and without; tokens/s at batch 1 (graph, eager) against HF transformers'
    generate with the same weights on the same GPU; total tokens/s at batch 64."""
    prompts = [[1, 2, 3, 4, 5], [100, 2000, 30000, 7, 7, 7], list(range(200, 240))]
    steps = 64
    cpu_model = smollm2_like()
    gpu_model = smollm2_like().to("cuda")
    cpu_tokens = [greedy_with(cpu_model, [p], steps)[0][0] for p in prompts]
    same = {}
    for graphs in (True, False):
        gpu_model.cuda_graphs = graphs
        got = [greedy_with(gpu_model, [p], steps)[0][0] for p in prompts]
        same[graphs] = sum(a == b for a, b in zip(cpu_tokens, got))
        print(f"loop greedy CPU == GPU ({'graph' if graphs else 'eager'}): {same[graphs]}/{len(prompts)} prompts",
              flush=True)  # fmt: skip
    n = 128
    rates = {}
    for graphs in (True, False):
        gpu_model.cuda_graphs = graphs
        _, dt = greedy_with(gpu_model, [prompts[0]], n)
        rates[graphs] = (n - 2) / dt
    gpu_model.cuda_graphs = True
    hf_rate = None
    try:
        hf_rate = hf_tokens_per_second(gpu_model, prompts[0], n)
    except Exception as exc:  # noqa: BLE001  (transformers absent or incompatible: reported, not fatal)
        print(f"HF transformers: not measured ({type(exc).__name__}: {exc})", flush=True)
    B = 64
    batch = [[(7 * b + j) % 49152 for j in range(16)] for b in range(B)]
    graph_tokens, dt = greedy_with(gpu_model, batch, 64)
    total = B * 62 / dt
    gpu_model.cuda_graphs = False
    eager_tokens, _ = greedy_with(gpu_model, batch, 64)
    gpu_model.cuda_graphs = True
    rows_same = sum(a == b for a, b in zip(graph_tokens, eager_tokens))
    print(f"loop batch {B}: graph == eager tokens on {rows_same}/{B} rows", flush=True)
    hf_txt = f"{hf_rate:.0f} tokens/s, ratio {rates[True] / hf_rate:.2f}x" if hf_rate else "not measured"
    print(f"loop batch 1: graph {rates[True]:.0f} tokens/s, eager {rates[False]:.0f}; HF generate {hf_txt}; "
          f"batch {B}: {total:.0f} total tokens/s", flush=True)  # fmt: skip
    ROWS.append({"op": "loop greedy CPU == GPU (graph / eager)", "us": 0.0, "baseline": "cpu", "baseline_us": None,
                 "speedup": None, "bytes": 0, "frac_copy_bw": 0.0, "same": [same[True], same[False]],
                 "of": len(prompts)})  # fmt: skip
    ROWS.append({"op": "loop decode batch 1 (graph) vs HF generate", "us": 1e6 / rates[True],
                 "baseline": "hf generate", "baseline_us": 1e6 / hf_rate if hf_rate else None,
                 "speedup": rates[True] / hf_rate if hf_rate else None, "bytes": 0, "frac_copy_bw": 0.0,
                 "eager_tokens_per_s": rates[False], "batch64_tokens_per_s": total,
                 "batch64_graph_eq_eager_rows": rows_same})  # fmt: skip


def hf_tokens_per_second(model, prompt, n, device="cuda"):
    """HF transformers' LlamaForCausalLM with the same weights (float32, on the GPU), greedy
    generate of n tokens (min_new_tokens = n): tokens per second of its decode (the prefill
    measured alone and subtracted)."""
    import transformers

    c = model.config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_seq_len, tie_word_embeddings=False,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(hf_cfg).to(device).eval()
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(model.embed)
        hf.model.norm.weight.copy_(model.norm)
        hf.lm_head.weight.copy_(model.lm_head)
        for layer, blk in zip(hf.model.layers, model.blocks):
            wq, wk, wv = blk.wqkv.split((q, kv, kv))
            gate, up = blk.w_gate_up.chunk(2)
            layer.self_attn.q_proj.weight.copy_(wq)
            layer.self_attn.k_proj.weight.copy_(wk)
            layer.self_attn.v_proj.weight.copy_(wv)
            layer.self_attn.o_proj.weight.copy_(blk.wo)
            layer.mlp.gate_proj.weight.copy_(gate)
            layer.mlp.up_proj.weight.copy_(up)
            layer.mlp.down_proj.weight.copy_(blk.w_down)
            layer.input_layernorm.weight.copy_(blk.attn_norm)
            layer.post_attention_layernorm.weight.copy_(blk.ffn_norm)
    ids = torch.tensor([prompt], device=device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    first = hf.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)[0, len(prompt) :].tolist()  # warm-up
    ours = greedy_with(model, [prompt], 8)[0][0]
    print(f"HF greedy tokens equal decodekit's for {sum(a == b for a, b in zip(first, ours))}/8 (same weights)",
          flush=True)  # fmt: skip
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.time()
    hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    sync()
    t_prefill = time.time() - t0
    t0 = time.time()
    hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
    sync()
    return (n - 1) / (time.time() - t0 - t_prefill)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default="loop,greedy,append,attention,linear,chain")
    a = ap.parse_args()
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    bw = copy_bandwidth()
    print(f"device copy bandwidth: {bw / 1e9:.0f} GB/s (read + write)", flush=True)
    t0 = time.time()
    for part in a.only.split(","):
        try:
            parts = {
                "greedy": check_greedy,
                "loop": check_loop,
                "append": bench_append,
                "attention": bench_attention,
                "linear": bench_linear,
                "chain": bench_chain,
            }
            parts[part](bw)
        except Exception as exc:  # noqa: BLE001  (one failing part must not hide the others)
            print(f"{part}: FAILED {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        torch.cuda.empty_cache()
    print(f"bench time {time.time() - t0:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_bw": bw, "rows": ROWS}, f, indent=1)
    print("\n== summary ==")
    for r in ROWS:
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        frac = 100 * r["frac_copy_bw"]
        print(f"{r['op'][:62]:62s} {r['us']:9.1f} us {sp:>7s} vs {r['baseline']:12s} {frac:5.1f}% bw")


if __name__ == "__main__":
    main()
