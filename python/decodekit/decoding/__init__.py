"""One decode loop for plain and speculative decoding (:mod:`~decodekit.decoding.loop`), its
drafters (:mod:`~decodekit.decoding.drafters`), the request and result types
(:mod:`~decodekit.decoding.request`), the entry points :func:`generate` and
:func:`speculative_generate` (:mod:`~decodekit.decoding.generate`), the majority vote over ``n``
samples (:mod:`~decodekit.decoding.vote`), Medusa's candidate trees (:mod:`~decodekit.decoding.tree`) and the greedy-vs-sampled confidence check
(:mod:`~decodekit.decoding.confidence`)."""

from .confidence import Confidence, confidence
from .drafters import Drafter, DraftModelDrafter, MedusaDrafter, NgramDrafter, SamplingDrafter
from .generate import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, generate, speculative_generate
from .request import GenerationResult, SpeculativeResult
from .tree import DEFAULT_TREE, Tree
from .vote import Vote, Voted, vote

__all__ = [
    "generate",
    "speculative_generate",
    "GenerationResult",
    "SpeculativeResult",
    "Drafter",
    "SamplingDrafter",
    "NgramDrafter",
    "DraftModelDrafter",
    "MedusaDrafter",
    "Tree",
    "DEFAULT_TREE",
    "vote",
    "Vote",
    "Voted",
    "confidence",
    "Confidence",
    "DEFAULT_TEMPERATURE",
    "DEFAULT_TOP_P",
]
