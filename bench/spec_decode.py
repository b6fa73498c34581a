"""Benchmark: speculative decoding on SmolLM2-135M (CPU) against plain greedy decoding, one run.

Cases (greedy, so every speculative output must equal the plain output, which is checked;
generation stops at the end-of-turn token or after --new-tokens):

- ``code-edit``, ``text-edit``, ``code-rewrite``: input-grounded prompts (a function or a
  paragraph in the prompt, "copy it with a comment added", "fix the spelling", "rewrite it
  with one change"), chat template, n-gram (prompt lookup) drafter, K in {4, 8};
- ``prose``: held-out Shakespeare (Hamlet, never trained on) continued without the chat
  template, the trained draft model (``smollm2-135m-draft.safetensors``), K in {2, 3, 4};
- ``chat``: a chat prompt about a play, the draft model.

Plain decoding and each speculative configuration run interleaved, ``--reps`` times; the
median decode tokens/s of each is reported with the speedup, tokens emitted per target pass,
acceptance rate, and for the draft model the draft/target cost ratio (mean draft forward pass
time over mean plain decode step time).

    python bench/spec_decode.py [--new-tokens 96] [--reps 3] [--markdown]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import decodekit
from decodekit.models import load_model
from decodekit.models.draft import load_draft_model

CODE_PROMPT = """def moving_average(values, window):
    result = []
    for i in range(len(values) - window + 1):
        chunk = values[i:i + window]
        result.append(sum(chunk) / window)
    return result

Rewrite this function exactly, but rename the variable chunk to segment."""

FUNCTION = """def moving_average(values, window):
    result = []
    for i in range(len(values) - window + 1):
        chunk = values[i:i + window]
        result.append(sum(chunk) / window)
    return result"""

CODE_EDIT_PROMPT = "```python\n" + FUNCTION + "\n```\n\nCopy this code and add a comment at the end of the first line."

TEXT = (
    "The quick brown fox jumps over the lazy dog. The dog was not amused, and it barked loudly at the fox, "
    "who ran away into the forest. Later that day, the fox returned with a friend, a small rabbit, and "
    "together they watched the dog sleep in the afternoon sun."
)
TEXT_EDIT_PROMPT = "Fix the spelling mistakes in this text and output the corrected text:\n\n" + TEXT.replace(
    "quick", "quikc"
).replace("forest", "forrest")

CHAT_PROMPT = "Write a short speech in the style of Shakespeare about a king who has lost his crown."


def heldout_prose(lm, n_tokens: int = 200) -> list:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import train_draft

    text = train_draft.load_plays()["hamlet"]
    ids = lm.tokenizer.encode(text, add_bos=False)
    return ids[30000 : 30000 + n_tokens]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    lm = load_model()
    draft = load_draft_model(target=lm)
    prose = heldout_prose(lm)
    cases = [
        ("code-edit", CODE_EDIT_PROMPT, True, [("ngram", None, 4), ("ngram", None, 8)]),
        ("text-edit", TEXT_EDIT_PROMPT, True, [("ngram", None, 4), ("ngram", None, 8)]),
        ("code-rewrite", CODE_PROMPT, True, [("ngram", None, 4), ("ngram", None, 8)]),
        ("prose", prose, False, [("draft", None, 2), ("draft", None, 3), ("draft", None, 4)]),
        ("chat", CHAT_PROMPT, True, [("draft", None, 3), ("ngram", None, 4)]),
    ]
    rows = []
    for name, prompt, chat, configs in cases:
        plain_rates, plain_step = [], []
        spec = {i: [] for i in range(len(configs))}
        plain = None
        for _ in range(args.reps):
            plain = decodekit.generate(
                prompt, model=lm, max_new_tokens=args.new_tokens, temperature=0, chat_template=chat, stop_on_eos=True
            )
            plain_rates.append(plain.decode_tokens_per_second)
            plain_step.append(1.0 / plain.decode_tokens_per_second)
            for i, (kind, _, k) in enumerate(configs):
                drafter = decodekit.DraftModelDrafter(draft) if kind == "draft" else decodekit.NgramDrafter()
                r = decodekit.speculative_generate(
                    prompt,
                    model=lm,
                    drafter=drafter,
                    num_draft_tokens=k,
                    max_new_tokens=args.new_tokens,
                    temperature=0,
                    chat_template=chat,
                    stop_on_eos=True,
                )
                if r.token_ids != plain.token_ids:
                    raise SystemExit(f"{name}/{kind} K={k}: speculative output differs from plain greedy")
                cost = (
                    (drafter.forward_seconds / drafter.forward_passes)
                    if kind == "draft" and drafter.forward_passes
                    else None
                )
                spec[i].append((r.decode_tokens_per_second, r.tokens_per_pass, r.acceptance_rate, cost))
        base = statistics.median(plain_rates)
        step = statistics.median(plain_step)
        rows.append((name, "plain", "-", base, 1.0, 1.0, None, None))
        for i, (kind, _, k) in enumerate(configs):
            rates = [s[0] for s in spec[i]]
            med = statistics.median(rates)
            tpp = statistics.median(s[1] for s in spec[i])
            acc = statistics.median(s[2] for s in spec[i])
            costs = [s[3] for s in spec[i] if s[3] is not None]
            ratio = statistics.median(costs) / step if costs else None
            rows.append((name, kind, k, med, med / base, tpp, acc, ratio))
        print(f"# {name}: {plain.text[:70]!r}...", flush=True)
    hdr = ("case", "drafter", "K", "decode tok/s", "speedup", "tokens/pass", "acceptance", "draft/target cost")
    if args.markdown:
        print("| " + " | ".join(hdr) + " |")
        print("|" + "---|" * len(hdr))
    else:
        print("  ".join(f"{h:>14}" for h in hdr))
    for name, kind, k, rate, sp, tpp, acc, ratio in rows:
        cells = (
            name,
            kind,
            str(k),
            f"{rate:.1f}",
            f"{sp:.2f}x",
            f"{tpp:.2f}",
            "-" if acc is None else f"{100 * acc:.0f}%",
            "-" if ratio is None else f"{ratio:.3f}",
        )
        print(("| " + " | ".join(cells) + " |") if args.markdown else "  ".join(f"{c:>14}" for c in cells))
    print(f"\n# torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
