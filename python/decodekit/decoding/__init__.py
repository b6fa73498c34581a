"""One decode loop for plain and speculative decoding (:mod:`~decodekit.decoding.loop`), its
drafters (:mod:`~decodekit.decoding.drafters`), the request and result types
(:mod:`~decodekit.decoding.request`) and the entry points :func:`generate` and
:func:`speculative_generate` (:mod:`~decodekit.decoding.generate`)."""

from .drafters import Drafter, DraftModelDrafter, NgramDrafter, SamplingDrafter
from .generate import generate, speculative_generate
from .request import GenerationResult, SpeculativeResult

__all__ = [
    "generate",
    "speculative_generate",
    "GenerationResult",
    "SpeculativeResult",
    "Drafter",
    "SamplingDrafter",
    "NgramDrafter",
    "DraftModelDrafter",
]
