"""Benchmark: Medusa heads and trees on SmolLM2-135M (CPU), one run.

Sections (all by default):

- ``curve``: the cost of one target pass against the number of new tokens ``Q`` in it (a tree of
  ``Q`` nodes costs what ``Q`` chained tokens cost: the tree mask only changes which keys a query
  reads), at a context of ``--context`` tokens, batch 1; the median of ``--reps`` passes.
- ``tree``: the tree for this CPU. On the held-out states of the chat set
  (``scripts/make_chat_data.py``, the sequences ``scripts/train_medusa.py`` held out), the heads'
  candidates are compared with the target's greedy tokens teacher-forced, which gives for any
  tree the expected number of accepted tokens per greedy pass. Nodes are added greedily by their
  acceptance probability (the probability that the node's whole path is accepted, which is what
  a node adds to the expected accepted length); for each size the predicted speed-up
  ``(1 + E[accepted]) * t(1) / t(N)`` uses the measured curve. The best size is printed with
  its paths (what ``DEFAULT_TREE`` ships).
- ``agreement``: the heads' teacher-forced top-1 / top-5 agreement on the held-out chat prompts
  themselves: the target's greedy answers (``--new-tokens``) to the first ``--prompts`` prompts,
  one teacher-forced pass each for the hidden states, and per head the share of answer positions
  whose token ``t + 2 + i`` is the head's first (among its five first) candidate.
- ``e2e``: decode tokens/s (generated tokens over decode seconds, summed over prompts) on the
  held-out chat prompts (``bench/data/heldout_chat_prompts.json``), batch 1, one prompt after
  the other, ``--new-tokens`` each: plain decoding against Medusa (greedy: the tokens must be the
  same as plain greedy's, which is checked; T = 0.7 lossless and typical), the draft model and
  n-gram drafting; mean accepted tokens per pass and the share of time in heads, tree building,
  the target's tree pass and verification.

    python bench/medusa.py [--sections curve tree agreement e2e] [--data build/chat-data] [--prompts 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import decodekit
from decodekit._threads import threads_for_call
from decodekit.decoding import MedusaDrafter
from decodekit.models import load_model
from decodekit.models.medusa import load_medusa_heads

ROOT = Path(__file__).resolve().parent


def curve(lm, context: int, sizes, reps: int) -> dict:
    """Median seconds of one target pass with Q new tokens after ``context`` cached ones. The
    sizes take turns within each repetition (a slow spell of the machine then touches them all
    alike) and every pass rolls the same cached context back. torch's own ops run on one thread
    meanwhile, as in the decode loop (its OpenMP workers and decodekit's pool stall each other)."""
    net = lm.model
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 40000, (1, context), generator=g)
    cache = net.new_paged_cache(num_blocks=(context + max(sizes)) // 16 + 2)
    s = cache.add_sequence()
    net.forward_paged(prompt, cache, [s])
    times = {q: [] for q in sizes}
    torch_threads = torch.get_num_threads()
    with threads_for_call(decodekit.get_num_threads()):  # decodekit's own count stays
        torch.set_num_threads(1)
        try:
            for _ in range(reps):
                for q in sizes:
                    new = torch.randint(100, 40000, (1, q), generator=g)
                    t0 = time.perf_counter()
                    net.forward_paged(new, cache, [s], all_logits=True)
                    times[q].append(time.perf_counter() - t0)
                    cache.truncate(s, context)
        finally:
            torch.set_num_threads(torch_threads)
    out = {q: statistics.median(t) for q, t in times.items()}
    for q in sizes:
        print(f"  Q = {q:3d}: {1e3 * out[q]:7.2f} ms ({out[q] / out[sizes[0]]:.2f}x Q=1)", flush=True)
    return out


def heldout_states(data_dirs, seed: int = 0, frac: float = 0.1):
    """The held-out states of train_medusa.py's split: hidden [n, H] and the true tokens t+1.. t+5."""
    import random

    from safetensors.torch import load_file

    seqs, hidden, seq_index, pos = [], [], [], []
    for d in data_dirs:
        cached = load_file(str(Path(d) / "hidden.safetensors"))
        hidden.append(cached["hidden"])
        seq_index.append(cached["seq_index"].long() + len(seqs))
        pos.append(cached["pos"].long())
        seqs += json.loads((Path(d) / "sequences.json").read_text())["sequences"]
    hidden, seq_index, pos = torch.cat(hidden), torch.cat(seq_index), torch.cat(pos)
    order = list(range(len(seqs)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, int(len(seqs) * frac))])
    sel = torch.tensor([s in held for s in seq_index.tolist()]).nonzero()[:, 0]
    toks = [s["prompt_ids"] + s["answer_ids"] for s in seqs]
    true = torch.full((sel.numel(), 6), -1, dtype=torch.int64)
    for n, i in enumerate(sel.tolist()):
        t, s = int(pos[i]), int(seq_index[i])
        for j in range(6):
            if t + 1 + j < len(toks[s]):
                true[n, j] = toks[s][t + 1 + j]
    return hidden[sel].float(), true


def choose_tree(heads, hidden, true, costs: dict, max_nodes: int, top_k: int = 4) -> list:
    """Greedy tree growth by path acceptance probability; returns [(N, E[acc], predicted speed-up, paths)]."""
    K = heads.num_heads
    top = torch.cat([heads.top_ids(hidden[i : i + 512], top_k) for i in range(0, hidden.shape[0], 512)])
    # hit[n, head, rank]: head's rank-th candidate equals the true token t + 2 + head
    hit = top == true[:, 1 : 1 + K, None]
    hit &= true[:, 1 : 1 + K, None] >= 0

    def path_ok(path):
        ok = torch.ones(hit.shape[0], dtype=torch.bool)
        for d, r in enumerate(path):
            ok &= hit[:, d, r]
        return ok

    chosen, frontier, results = [], [(r,) for r in range(top_k)], []
    prob = {}
    acc = 0.0
    while len(chosen) + 1 < max_nodes and frontier:
        for p in frontier:
            if p not in prob:
                prob[p] = float(path_ok(p).double().mean())
        best = max(frontier, key=lambda p: (prob[p], [-x for x in p]))
        frontier.remove(best)
        chosen.append(best)
        acc += prob[best]  # E[accepted] = sum over nodes of P(path accepted), greedy verification
        if len(best) < K:
            frontier += [best + (r,) for r in range(top_k)]
        n = len(chosen) + 1
        if n in costs:
            results.append((n, acc, (1 + acc) * costs[1] / costs[n], list(chosen)))
    return results


@torch.inference_mode()
def agreement(lm, heads, prompts, new_tokens: int) -> dict:
    """Per head: top-1 and top-5 agreement with the target's greedy answers, teacher-forced."""
    K = heads.num_heads
    net = lm.model
    res = decodekit.generate(prompts, model=lm, max_new_tokens=new_tokens, temperature=0)
    top1, top5, count = [0] * K, [0] * K, [0] * K
    for r in res:
        ids = list(r.prompt_token_ids) + list(r.token_ids)
        P, A = len(r.prompt_token_ids), len(r.token_ids)
        cache = net.new_paged_cache(num_blocks=len(ids) // 16 + 2)
        s = cache.add_sequence()
        _, h = net.forward_paged(torch.tensor([ids]), cache, [s], all_logits=True, return_hidden=True)
        states = h[0, P - 1 : P + A - 1]  # state t chooses answer token t + 1
        top = heads.top_ids(states, 5)  # [A, K, 5]
        for i in range(K):
            for n in range(A):
                t = P - 1 + n + 2 + i  # head i predicts token t + 2 + i from the state at t
                if t < len(ids):
                    count[i] += 1
                    top1[i] += int(top[n, i, 0] == ids[t])
                    top5[i] += int((top[n, i] == ids[t]).any())
    return {
        "positions": count,
        "top1": [a / max(c, 1) for a, c in zip(top1, count)],
        "top5": [a / max(c, 1) for a, c in zip(top5, count)],
    }


def e2e(lm, prompts, new_tokens: int, configs) -> list:
    """Every configuration on every prompt, batch 1. The configurations take turns on each prompt
    (in an order rotated from one prompt to the next), so a slow spell of the machine touches
    them alike."""
    res = {name: [] for name, _, _ in configs}
    walls = {name: 0.0 for name, _, _ in configs}
    drafters = {name: kw.pop("drafter_obj", None) for name, _, kw in configs}
    for i, p in enumerate(prompts):
        for j in range(len(configs)):
            name, kind, kw = configs[(i + j) % len(configs)]
            t0 = time.perf_counter()
            if kind == "plain":
                r = decodekit.generate(p, model=lm, max_new_tokens=new_tokens, **kw)
            else:
                r = decodekit.speculative_generate(
                    p, model=lm, max_new_tokens=new_tokens, drafter=drafters[name] or kind, **kw
                )
            walls[name] += time.perf_counter() - t0
            res[name].append(r)
    rows = []
    plain_tokens = [r.token_ids for r in res["plain greedy"]] if "plain greedy" in res else None
    for name, kind, kw in configs:
        rs, drafter = res[name], drafters[name]
        toks = sum(len(r.token_ids) for r in rs)
        dec = sum(r.decode_seconds for r in rs)
        row = dict(name=name, tokens=toks, decode_s=dec, tok_s=toks / dec, wall_s=walls[name])
        if kind != "plain":
            drafted = sum(r.drafted for r in rs)
            accepted = sum(r.accepted for r in rs)
            passes = sum(r.decode_steps for r in rs)
            row.update(accepted_per_pass=accepted / max(passes, 1), acceptance=accepted / max(drafted, 1))
        if isinstance(drafter, MedusaDrafter):
            row.update(
                tree_passes=drafter.passes,
                accepted_per_tree_pass=drafter.mean_accepted,
                heads_share=drafter.heads_seconds / dec,
                tree_share=drafter.tree_seconds / dec,
                forward_share=drafter.forward_seconds / dec,
                verify_share=drafter.verify_seconds / dec,
            )
        if kw.get("temperature") == 0 and kind != "plain" and plain_tokens is not None:
            row["same_as_plain"] = [r.token_ids for r in rs] == plain_tokens
        rows.append(row)
        print("  " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", nargs="+", default=["curve", "tree", "agreement", "e2e"])
    ap.add_argument("--data", nargs="+", default=["build/chat-data"])
    ap.add_argument("--heads", default=None, help="heads file (default: the shipped one)")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--max-nodes", type=int, default=32)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--configs", nargs="+", default=None, help="e2e: only these runs (by name, e.g. 'plain greedy' 'draft greedy')"
    )
    args = ap.parse_args()
    lm = load_model()
    heads = load_medusa_heads(args.heads, target=lm)
    print(f"{heads}", flush=True)
    out = {}
    sizes = [1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32]
    if "curve" in args.sections or "tree" in args.sections:
        print(f"target pass cost against new tokens (context {args.context}):", flush=True)
        costs = curve(lm, args.context, [s for s in sizes if s <= args.max_nodes], args.reps)
        out["curve_ms"] = {q: 1e3 * t for q, t in costs.items()}
    if "tree" in args.sections:
        hidden, true = heldout_states(args.data)
        print(f"tree choice on {hidden.shape[0]} held-out states:", flush=True)
        res = choose_tree(heads, hidden, true, costs, args.max_nodes)
        for n, acc, speed, _paths in res:
            print(f"  N = {n:3d}: E[accepted] {acc:.3f}, predicted speed-up {speed:.2f}x", flush=True)
        best = max(res, key=lambda x: x[2])
        print(f"best: N = {best[0]}, paths = {[list(p) for p in best[3]]}", flush=True)
        out["tree"] = [dict(nodes=n, expected_accepted=a, predicted_speedup=s) for n, a, s, _ in res]
        out["best_tree"] = [list(p) for p in best[3]]
    prompts = json.loads((ROOT / "data" / "heldout_chat_prompts.json").read_text())["prompts"][: args.prompts]
    if "agreement" in args.sections:
        agr = agreement(lm, heads, prompts, args.new_tokens)
        print(f"teacher-forced agreement on {len(prompts)} held-out chat prompts ({agr['positions'][0]} positions):")
        for i, (a1, a5) in enumerate(zip(agr["top1"], agr["top5"])):
            print(f"  head {i}: top-1 {a1:.3f}, top-5 {a5:.3f}", flush=True)
        out["agreement"] = agr
    if "e2e" in args.sections:
        tree = out.get("best_tree")
        configs = [
            ("plain greedy", "plain", dict(temperature=0)),
            ("medusa greedy", "medusa", dict(temperature=0, drafter_obj=MedusaDrafter(heads, tree=tree))),
            (
                "medusa greedy constant",  # a tree pass every step: what the passes alone give
                "medusa",
                dict(temperature=0, draft_schedule="constant", drafter_obj=MedusaDrafter(heads, tree=tree)),
            ),
            ("draft greedy", "draft", dict(temperature=0)),
            ("ngram greedy", "ngram", dict(temperature=0)),
            ("plain T=0.7", "plain", dict(temperature=0.7, seed=1)),
            ("draft T=0.7", "draft", dict(temperature=0.7, seed=1)),
            ("ngram T=0.7", "ngram", dict(temperature=0.7, seed=1)),
            (
                "medusa T=0.7 lossless",
                "medusa",
                dict(temperature=0.7, seed=1, drafter_obj=MedusaDrafter(heads, tree=tree)),
            ),
            (
                "medusa T=0.7 typical",
                "medusa",
                dict(temperature=0.7, seed=1, drafter_obj=MedusaDrafter(heads, tree=tree, acceptance="typical")),
            ),
        ]
        if args.configs:
            unknown = set(args.configs) - {c[0] for c in configs}
            if unknown:
                raise SystemExit(f"--configs: unknown runs {sorted(unknown)}; choose from {[c[0] for c in configs]}")
            configs = [c for c in configs if c[0] in args.configs]
        print(f"end to end on {len(prompts)} held-out chat prompts, {args.new_tokens} new tokens:", flush=True)
        rows = e2e(lm, prompts, args.new_tokens, configs)
        base = {r["name"].split()[-1]: r["tok_s"] for r in rows if r["name"].startswith("plain")}
        for r in rows:
            key = "greedy" if "greedy" in r["name"] else "T=0.7"
            ref = base.get(key) or base.get("T=0.7")
            r["speedup"] = r["tok_s"] / ref if ref else None
        print("\n| run | tokens/s | vs plain | accepted/pass | same as plain |", flush=True)
        print("|---|---:|---:|---:|---|")
        for r in rows:
            print(
                f"| {r['name']} | {r['tok_s']:.1f} | {r['speedup']:.2f}x | {r.get('accepted_per_pass', 0):.2f} | "
                f"{r.get('same_as_plain', '')} |"
            )
        out["e2e"] = rows
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
