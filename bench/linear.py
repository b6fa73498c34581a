"""Benchmark: decodekit.linear (batch-invariant) vs torch.nn.functional.linear.

SmolLM2-135M's projection shapes at decode-time row counts M, in one run: our time,
torch's, the ratio, and the weight bytes read per second as a fraction of the machine's
read bandwidth (at small M a linear layer is memory-bound on its weights). Then the same
for decodekit.linear on a QuantizedWeight (Q4_1 / Q8_0 blocks, as in the GGUF file)
against the float32 kernel on the dequantized weights and torch's ``x @ w.T``, with GB/s
of block bytes read. Then one decode step of the built-in model with each GEMM, and the
share of the step spent outside the model's matmuls (sampling, cache, attention and glue),
and the quantized model against the float32 one: decode tokens/s at batch 1, time to first
token, resident memory.

    python bench/linear.py [--quick]   # --quick: only the quantized kernels and the models
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

import decodekit

SHAPES = {
    "q/o proj": (576, 576),
    "k+v proj": (384, 576),
    "gate+up": (3072, 576),
    "down": (576, 1536),
    "lm head": (49152, 576),
}


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


# (name, N, K, block type): the model's Q4_1 projections and its Q8_0 (tied) LM head.
QUANT_SHAPES = [
    ("gate/up 576->1536", 1536, 576, "q4_1"),
    ("down 1536->576", 576, 1536, "q4_1"),
    ("gate+up fused", 3072, 576, "q4_1"),
    ("head 576->49152", 49152, 576, "q8_0"),
    ("head as q4_1", 49152, 576, "q4_1"),
]


def quantized_kernels(bw: float) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from reference.layers import dequantize_blocks, random_blocks

    print(
        f"{'quantized':<20}{'M':>4}{'quant us':>10}{'f32 us':>9}{'x@w.T us':>10}{'f32/quant':>10}"
        f"{'torch/quant':>12}{'quant GB/s':>11}{'f32 GB/s':>9}"
    )
    g = torch.Generator().manual_seed(0)
    for name, N, K, bt in QUANT_SHAPES:
        # Enough copies that the float32 ones fill 256 MB: each call reads its weights from
        # memory, not from the cache, as in a model's step.
        copies = max(1, (256 << 20) // (N * K * 4))
        qws, ws = [], []
        for _ in range(copies):
            blocks = random_blocks(bt, N, K, g)
            qws.append(decodekit.QuantizedWeight(blocks, bt, (N, K)))
            ws.append(dequantize_blocks(blocks, bt, N, K))
        for M in (1, 16):
            x = torch.randn(M, K, generator=g)
            it = {"q": 0, "f": 0, "t": 0}

            def nxt(key, seq):
                it[key] = (it[key] + 1) % len(seq)
                return seq[it[key]]

            tq = timeit(lambda: decodekit.linear(x, nxt("q", qws)))
            tf = timeit(lambda: decodekit.linear(x, nxt("f", ws)))
            tt = timeit(lambda: x @ nxt("t", ws).T)
            assert torch.equal(decodekit.linear(x, qws[0]), decodekit.linear(x, ws[0]))
            print(
                f"{name + ' ' + bt:<20}{M:>4}{tq * 1e6:>10.1f}{tf * 1e6:>9.1f}{tt * 1e6:>10.1f}{tf / tq:>9.2f}x"
                f"{tt / tq:>11.2f}x{qws[0].nbytes / tq / 1e9:>11.1f}{N * K * 4 / tf / 1e9:>9.1f}"
            )
        del qws, ws


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def decode_models(new_tokens: int = 64) -> None:
    """Quantized vs float32 model: batch-1 greedy decode tokens/s, time to first token, RSS.
    Each model in a fresh process so that its RSS is its own."""
    import subprocess
    import sys

    code = f"""
import time, torch, statistics, sys
sys.path.insert(0, {str(__file__)!r}.rsplit('/', 1)[0])
from linear import rss_mb
import decodekit
from decodekit.models.gguf_loader import load_gguf, default_model_path
r0 = rss_mb()
t0 = time.perf_counter()
lm = load_gguf(default_model_path(), dequantize=DEQ)
model = lm.model
ids = lm.tokenizer.encode("The history of the printing press")
cache = model.new_paged_cache(num_blocks=16)
seq = cache.add_sequence()
logits = model.forward_paged(torch.tensor([ids]), cache, [seq])
ttft = time.perf_counter() - t0
steps = []
for _ in range({new_tokens}):
    nxt = logits.argmax(-1)
    t1 = time.perf_counter()
    logits = model.forward_paged(nxt[:, None], cache, [seq])
    steps.append(time.perf_counter() - t1)
print(f"{{'quantized' if not DEQ else 'float32':<10}} decode {{1 / statistics.median(steps):6.1f}} tok/s "
      f"(mean {{len(steps) / sum(steps):6.1f}}), load + prefill (time to first token) {{ttft * 1e3:7.0f}} ms, "
      f"RSS {{rss_mb():6.0f}} MB (before loading {{r0:4.0f}} MB)")
"""
    for deq in (False, True, False, True):
        subprocess.run([sys.executable, "-c", code.replace("DEQ", str(deq))], check=True)


def main() -> None:
    import sys

    bw = bandwidth_gbs()
    print(f"# read bandwidth {bw:.1f} GB/s, {torch.get_num_threads()} threads, torch {torch.__version__}")
    quantized_kernels(bw)
    decode_models()
    if "--quick" in sys.argv:
        return
    print(f"{'layer':<10}{'N':>7}{'K':>6}{'M':>4}{'ours us':>10}{'torch us':>10}{'torch/ours':>11}{'% bw':>7}")
    g = torch.Generator().manual_seed(0)
    for name, (N, K) in SHAPES.items():
        w = torch.randn(N, K, generator=g)
        for M in (1, 4, 16, 64):
            x = torch.randn(M, K, generator=g)
            ours = timeit(lambda: decodekit.linear(x, w))
            ref = timeit(lambda: F.linear(x, w))
            frac = N * K * 4 / ours / 1e9 / bw
            print(
                f"{name:<10}{N:>7}{K:>6}{M:>4}{ours * 1e6:>10.1f}{ref * 1e6:>10.1f}{ref / ours:>10.2f}x{100 * frac:>6.1f}%"
            )

    from decodekit.models.gguf_loader import load_model

    lm = load_model(dequantize=True)
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
        print(
            f"decode step, paged cache at ~540 tokens ({'decodekit.linear' if det else 'torch GEMM'}): "
            f"{step * 1e3:.2f} ms, "
            f"matmuls alone {mm * 1e3:.2f} ms, outside matmuls {100 * max(0.0, 1 - mm / step):.0f}%"
        )


if __name__ == "__main__":
    main()
