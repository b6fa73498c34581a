"""Majority vote over ``n`` samples (self-consistency: Wang et al., ICLR 2023, "Self-Consistency
Improves Chain of Thought Reasoning in Language Models"): :func:`vote` and its result
:class:`Vote`; :class:`Voted` pairs a prompt's samples with their vote (what
``generate(..., n=N, vote=True)`` returns per prompt)."""

from __future__ import annotations

from typing import Callable, Dict, Hashable, List, NamedTuple, Optional, Sequence

from .request import GenerationResult

__all__ = ["Vote", "Voted", "vote"]


class Vote(NamedTuple):
    """The outcome of :func:`vote`.

    Attributes:
        winner: the answer extracted most often (ties: the one seen first).
        counts: ``{answer: count}`` of every extracted answer, in the order first seen; the
            counts sum to the number of samples.
        agreement: ``counts[winner] / n`` (a float in ``(0, 1]``).
        winner_indices: the indices, in sample order, of the samples whose answer is the winner.
    """

    winner: Hashable
    counts: Dict[Hashable, int]
    agreement: float
    winner_indices: List[int]


class Voted(NamedTuple):
    """One prompt's result of ``generate(..., n=N, vote=True)``: ``samples`` (the N
    :class:`GenerationResult`, sample order) and their ``vote`` (:class:`Vote`). It unpacks as
    ``samples, vote = generate(...)``."""

    samples: List[GenerationResult]
    vote: Vote


def _default_extract(r) -> str:
    return r.text.strip()


def vote(results: Sequence[GenerationResult], extract: Optional[Callable[[GenerationResult], Hashable]] = None) -> Vote:
    """The majority answer of ``results``.

    Args:
        results: a non-empty sequence of :class:`GenerationResult` (e.g. the ``n`` samples of
            one prompt), or of any objects ``extract`` accepts.
        extract: maps a result to its answer (any hashable, e.g. the number at the end of the
            text); default: the text with surrounding whitespace stripped.

    Returns:
        :class:`Vote` ``(winner, counts, agreement, winner_indices)``. A tie goes to the
        answer seen first (lowest sample index), so a fixed list always gives the same vote.

    Raises:
        ValueError: ``results`` is empty. TypeError: ``extract`` is not callable, or returns
            an unhashable answer.

    Example:
        >>> samples = decodekit.generate("What is 2+2? Answer with a number.", n=5, seed=1)
        >>> decodekit.vote(samples).winner
    """
    if isinstance(results, (str, bytes)) or not hasattr(results, "__len__") or len(results) == 0:
        raise ValueError("vote: results must be a non-empty list of generation results")
    if extract is None:
        extract = _default_extract
    elif not callable(extract):
        raise TypeError(f"vote: extract must be a callable (result -> answer) or None, got {type(extract).__name__}")
    counts: Dict[Hashable, int] = {}
    answers = []
    for r in results:
        a = extract(r)
        try:
            hash(a)
        except TypeError:
            raise TypeError(f"vote: extract returned an unhashable answer of type {type(a).__name__}") from None
        answers.append(a)
        counts[a] = counts.get(a, 0) + 1
    winner = max(counts, key=lambda a: counts[a])  # max keeps the first of equal counts
    return Vote(
        winner=winner,
        counts=counts,
        agreement=counts[winner] / len(answers),
        winner_indices=[i for i, a in enumerate(answers) if a == winner],
    )
