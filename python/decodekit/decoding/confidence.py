"""A cheap confidence check: the greedy (T = 0) answer against ``n`` samples at T = 1
(:func:`confidence`), with the token-level measures it uses (:func:`token_agreement`,
:func:`levenshtein`)."""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence

from .request import GenerationResult

__all__ = ["Confidence", "confidence", "token_agreement", "levenshtein", "edit_distance"]


class Confidence(NamedTuple):
    """The outcome of :func:`confidence`.

    Attributes:
        greedy_text: the greedy (T = 0) answer.
        sampled_texts: the ``n`` answers sampled at T = 1 (sample order).
        token_agreement: the fraction of positions, up to the shorter of the two token lists,
            where the greedy and the sampled token ids agree, averaged over the samples (in
            ``[0, 1]``; 1.0 for two empty lists, 0.0 when exactly one is empty).
        edit_distance: the Levenshtein distance between the greedy and the sampled token ids
            divided by the longer length, averaged over the samples (in ``[0, 1]``; 0.0 for two
            empty lists).
        greedy_mean_logprob: the mean natural-log probability of the greedy tokens under the
            model's T = 1 distribution (``log_softmax`` of the logits); NaN for no tokens.
        sampled_mean_logprobs: the same, per sample (they were drawn at T = 1).
    """

    greedy_text: str
    sampled_texts: List[str]
    token_agreement: float
    edit_distance: float
    greedy_mean_logprob: float
    sampled_mean_logprobs: List[float]


def levenshtein(a: Sequence[int], b: Sequence[int]) -> int:
    """The Levenshtein distance between two token id lists: the fewest insertions, deletions
    and substitutions of one token that turn ``a`` into ``b`` (Wagner-Fischer dynamic
    programme, O(len(a) * len(b)) time, O(len(b)) memory)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def token_agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """The fraction of positions ``i < min(len(a), len(b))`` with ``a[i] == b[i]``; 1.0 when
    both are empty, 0.0 when only one is."""
    m = min(len(a), len(b))
    if m == 0:
        return 1.0 if len(a) == len(b) else 0.0
    return sum(x == y for x, y in zip(a[:m], b[:m])) / m


def edit_distance(a: Sequence[int], b: Sequence[int]) -> float:
    """:func:`levenshtein` divided by the longer length (0.0 when both are empty)."""
    m = max(len(a), len(b))
    return levenshtein(a, b) / m if m else 0.0


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def confidence(
    prompt, n: int = 1, *, model=None, max_new_tokens: int = 64, seed: Optional[int] = None, **kwargs
) -> Confidence:
    """Compare the greedy answer with ``n`` answers sampled at T = 1: when they agree, the
    model is likely sure of its answer.

    Runs :func:`decodekit.generate` twice on ``prompt``: once greedy (``temperature=0``) and
    once with ``n`` samples at ``temperature=1, top_p=1, top_k=0, min_p=0`` (the model's own
    distribution) from ``seed``, both with ``logprobs_mode="raw"`` so that the mean logprobs are
    of the T = 1 distribution.

    Args:
        prompt: one prompt (text or token ids), as in :func:`decodekit.generate`.
        n: the number of samples (int >= 1, default 1).
        model, max_new_tokens, seed: as in :func:`decodekit.generate` (a random seed is drawn
            when ``seed`` is None).
        **kwargs: other arguments of :func:`decodekit.generate` for both runs (penalties,
            ``stop``, ``chat_template``, ...), except the sampling parameters set here.

    Returns:
        :class:`Confidence` (token agreement and normalised edit distance averaged over the
        samples; see its attributes).

    Raises:
        ValueError / TypeError: as :func:`decodekit.generate`; a batch of prompts; ``n`` not
            an int >= 1; a sampling parameter or ``n``/``vote``/``logprobs`` in ``kwargs``.

    Example:
        >>> c = decodekit.confidence("What is the capital of France?", n=4, seed=0, max_new_tokens=16)
        >>> c.token_agreement, c.edit_distance
    """
    from .generate import generate
    from .request import MAX_N, is_prompt_batch

    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise ValueError(f"confidence: n must be an int in [1, {MAX_N}], got {n!r}")
    fixed = ("temperature", "top_p", "top_k", "min_p", "n", "vote", "logprobs", "top_logprobs", "logprobs_mode")
    clash = sorted(set(kwargs) & set(fixed))
    if clash:
        raise ValueError(f"confidence: {', '.join(clash)} cannot be set here (confidence fixes the sampling)")
    if is_prompt_batch(prompt):
        raise ValueError("confidence: takes one prompt, not a list of prompts")
    common = dict(model=model, max_new_tokens=max_new_tokens, logprobs=True, logprobs_mode="raw", **kwargs)
    greedy: GenerationResult = generate(prompt, temperature=0.0, **common)
    samples: List[GenerationResult] = generate(
        prompt, n=n, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=seed, **common
    )
    g = greedy.token_ids
    return Confidence(
        greedy_text=greedy.text,
        sampled_texts=[s.text for s in samples],
        token_agreement=_mean([token_agreement(g, s.token_ids) for s in samples]),
        edit_distance=_mean([edit_distance(g, s.token_ids) for s in samples]),
        greedy_mean_logprob=_mean(greedy.logprobs),
        sampled_mean_logprobs=[_mean(s.logprobs) for s in samples],
    )
