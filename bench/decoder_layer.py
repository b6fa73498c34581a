"""Decode speed at batch 1 with the model's layer op on and off (the same tokens either way).

    .venv/bin/python bench/decoder_layer.py [--reps 7] [--tokens 128] [--threads N] [--json PATH]

Loads the default model (SmolLM2-135M, its GGUF's Q4_1 / Q8_0 blocks) once and runs
decodekit.generate(chat prompt of bench/anchors/e2e/common.SINGLE_PROMPT, max_new_tokens=--tokens,
temperature=0, EOS ignored) --reps times per setting, alternating layer_op = True / False, so
both settings see the same machine load. Reports each setting's best and median decode tokens/s
(GenerationResult.decode_tokens_per_second), the prefill tokens/s, and the CPU time other
processes used during the runs (foreign cores, from /proc/stat: 2 = both cores busy with other
jobs). Checks that both settings produce the same tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

import decodekit
from decodekit.models import load_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "anchors" / "e2e"))
from common import SINGLE_PROMPT, CpuMeter, loadavg, stamp  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        decodekit.set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    lm = load_model()
    kw = dict(model=lm, max_new_tokens=args.tokens, temperature=0.0, stop_on_eos=False)
    decodekit.generate(SINGLE_PROMPT, **{**kw, "max_new_tokens": 8})  # warm-up
    res = {
        "start": stamp(),
        "load_start": loadavg(),
        "threads": decodekit.get_num_threads(),
        "isa": decodekit.cpu_isa(),
    }
    runs = {True: [], False: []}
    tokens = {}
    with CpuMeter() as meter:
        for _ in range(args.reps):
            for flag in (True, False):
                lm.model.layer_op = flag
                r = decodekit.generate(SINGLE_PROMPT, **kw)
                runs[flag].append((r.decode_tokens_per_second, r.prefill_tokens_per_second))
                tokens.setdefault(flag, r.token_ids)
    lm.model.layer_op = True
    res["foreign_cores"] = meter.foreign_cores
    res["load_end"] = loadavg()
    res["same_tokens"] = tokens[True] == tokens[False]
    for flag, name in ((True, "layer_op"), (False, "per_op")):
        dec = [d for d, _ in runs[flag]]
        pre = [p for _, p in runs[flag]]
        res[name] = {
            "decode_tok_s_best": max(dec),
            "decode_tok_s_median": statistics.median(dec),
            "prefill_tok_s_best": max(pre),
            "decode_tok_s_all": dec,
        }
    res["speedup_best"] = res["layer_op"]["decode_tok_s_best"] / res["per_op"]["decode_tok_s_best"]
    res["speedup_median"] = res["layer_op"]["decode_tok_s_median"] / res["per_op"]["decode_tok_s_median"]
    res["end"] = stamp()
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0 if res["same_tokens"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
