"""Hugging Face transformers adapter: decodekit's penalties and filters as logits processors.

Each class follows transformers' ``LogitsProcessor`` interface,
``__call__(input_ids [B, L] int64, scores [B, V] float) -> scores [B, V]``, so it goes
into ``model.generate(..., logits_processor=...)``. The filters set removed tokens to
-inf and keep ``logits / T`` elsewhere, so the softmax that ``generate`` takes next is
exactly decodekit's processed distribution (temperature -> top-k -> top-p -> min-p,
DESIGN.md conventions: lowest index wins ties, ``top_k=1`` is argmax, at least one token
kept). Pass ``do_sample=True, temperature=1.0, top_k=0, top_p=1.0`` to ``generate`` so
its own warpers do not act a second time (or use :func:`generate_kwargs`).

transformers is an optional dependency (``pip install decodekit[hf]``); this module
imports it lazily and raises ImportError with that hint when it is missing.

Example:
    >>> from decodekit import hf
    >>> out = model.generate(ids, max_new_tokens=32,
    ...                      **hf.generate_kwargs(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05))
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from ._checks import T_TINY
from .ops import apply_penalties, processed_probs

__all__ = [
    "DecodekitPenalties",
    "DecodekitSamplingFilter",
    "DecodekitTemperature",
    "DecodekitTopK",
    "DecodekitTopP",
    "DecodekitMinP",
    "logits_processor_list",
    "generate_kwargs",
]


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("decodekit.hf needs transformers: pip install 'decodekit[hf]'") from exc
    return transformers


class _Processor:
    """Base: a callable with transformers' LogitsProcessor signature (duck-typed, no import needed)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        raise NotImplementedError


class DecodekitSamplingFilter(_Processor):
    """Temperature -> top-k -> top-p -> min-p in one processor.

    Args:
        temperature: float > 0 (use greedy decoding instead of 0).
        top_k: int; ``<= 0`` disables.
        top_p: float in ``[0, 1]``; 1 disables.
        min_p: float in ``[0, 1]``; 0 disables.

    ``scores`` ``[B, V]`` (float32/float16/bfloat16) -> float32 ``[B, V]``: ``scores / T`` on
    the kept tokens, -inf elsewhere. Top-k ranks the raw scores; top-p and min-p act on the
    renormalised probabilities (decodekit's ``filter_probs``).
    """

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
        name = type(self).__name__
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, numbers.Real)
            or not (0 < temperature < math.inf)
        ):
            raise ValueError(f"{name}: temperature must be finite and > 0, got {temperature!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
            raise TypeError(f"{name}: top_k must be an int (<= 0 disables), got {top_k!r}")
        for pname, value in (("top_p", top_p), ("min_p", min_p)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: {pname} must be in [0, 1], got {value!r}")
        self.temperature, self.top_k, self.top_p, self.min_p = (
            float(temperature),
            int(top_k),
            float(top_p),
            float(min_p),
        )

    def __call__(self, input_ids, scores):
        top_k = self.top_k if 0 < self.top_k < scores.size(-1) else 0
        kept = processed_probs(scores, self.temperature, top_k, self.top_p, self.min_p) > 0
        t = max(self.temperature, T_TINY)  # as the kernels: below 1.18e-38, the T -> 0+ limit
        scaled = scores.float() / t
        if not bool(torch.isfinite(scaled[kept]).all()):
            # A tiny T overflows logits / T: shift by each row's maximum first (the same
            # softmax, finite at the top token).
            x = scores.float()
            scaled = (x - x.amax(-1, keepdim=True)) / t
        return torch.where(kept, scaled, torch.full_like(scaled, float("-inf")))


class DecodekitTemperature(DecodekitSamplingFilter):
    """``scores / temperature`` (temperature > 0)."""

    def __init__(self, temperature: float):
        super().__init__(temperature=temperature)


class DecodekitTopK(DecodekitSamplingFilter):
    """Keeps the ``top_k`` highest scores (lowest index on ties), -inf elsewhere."""

    def __init__(self, top_k: int):
        super().__init__(top_k=top_k)


class DecodekitTopP(DecodekitSamplingFilter):
    """Keeps the smallest set (score desc, index asc) whose probability mass is >= ``top_p``."""

    def __init__(self, top_p: float):
        super().__init__(top_p=top_p)


class DecodekitMinP(DecodekitSamplingFilter):
    """Keeps tokens with ``p >= min_p * max(p)``."""

    def __init__(self, min_p: float):
        super().__init__(min_p=min_p)


class DecodekitPenalties(_Processor):
    """Repetition / frequency / presence penalties over the ids generated so far, plus logit bias.

    ``input_ids`` ``[B, L]`` are the counted tokens: prompt and output, as HF's
    ``RepetitionPenaltyLogitsProcessor`` counts them, for all three penalties (note that
    :func:`decodekit.generate` counts only the output for frequency and presence, as the
    OpenAI API does). Ids outside ``[0, V)`` are ignored. Arguments as in
    :func:`decodekit.apply_penalties`; returns float32 ``[B, V]``.
    """

    def __init__(
        self,
        repetition_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        logit_bias: Optional[dict] = None,
    ):
        for pname, value in (
            ("repetition_penalty", repetition_penalty),
            ("frequency_penalty", frequency_penalty),
            ("presence_penalty", presence_penalty),
        ):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"DecodekitPenalties: {pname} must be a finite number, got {value!r}")
        if not repetition_penalty > 0:
            raise ValueError(f"DecodekitPenalties: repetition_penalty must be > 0, got {repetition_penalty!r}")
        self.kwargs = dict(
            repetition_penalty=repetition_penalty,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            logit_bias=logit_bias,
        )

    def __call__(self, input_ids, scores):
        # Ids past the scores' width (or negative) name no token of these scores: they are dropped.
        ids = input_ids.masked_fill((input_ids >= scores.size(-1)) | (input_ids < 0), -1)
        return apply_penalties(scores, token_ids=ids, **self.kwargs)


def logits_processor_list(
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    logit_bias: Optional[dict] = None,
):
    """A ``transformers.LogitsProcessorList``: penalties (when any) then the sampling filter."""
    transformers = _transformers()
    procs = []
    if repetition_penalty != 1.0 or frequency_penalty or presence_penalty or logit_bias:
        procs.append(DecodekitPenalties(repetition_penalty, frequency_penalty, presence_penalty, logit_bias))
    procs.append(DecodekitSamplingFilter(temperature, top_k, top_p, min_p))
    return transformers.LogitsProcessorList(procs)


def generate_kwargs(**params) -> dict:
    """Keyword arguments for ``model.generate`` that sample with decodekit's processors.

    ``params`` are those of :func:`logits_processor_list`. transformers' own temperature /
    top-k / top-p are neutralised so nothing is applied twice.
    """
    return dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, logits_processor=logits_processor_list(**params))
