"""decodekit: fused, deterministic kernels for LLM token decoding.

Ops (validated wrappers of ``torch.ops.decodekit.*``, one module per family in
:mod:`decodekit.ops`):
    sampling: softmax, argmax, sample_from_logits, sample_from_probs, filter_probs,
    top_k_renorm_probs, top_p_renorm_probs, min_p_renorm_probs, top_k_mask_logits,
    processed_probs, SamplingOutput;
    penalties: apply_penalties;
    layers: linear (batch-invariant x @ W.T + b, float32 or QuantizedWeight), rms_norm, silu_and_mul, rope_,
    decoder_layer (one Llama block of the paged forward in one call);
    kv_cache: append_kv_cache, append_paged_kv_cache, compact_kv_cache, compact_paged_kv_cache;
    attention: paged_attention, tree_mask_from_parents;
    speculative: chain_speculative_sampling, chain_speculative_sampling_from_logits,
    greedy_verify, SpeculativeOutput; trees: tree_speculative_sampling, typical_acceptance,
    greedy_tree_verify, TreeOutput.

KV-cache managers (:mod:`decodekit.cache`): ContiguousKVCache, PagedKVCache, OutOfBlocksError.

Sampling parameters (:mod:`decodekit.params`): SamplingParams, validated once.

Threads: set_num_threads, get_num_threads (the CPU kernels' thread count; see :mod:`decodekit._threads`).

Decode loop (:mod:`decodekit.decoding`): generate (plain), speculative_generate (with a
drafter: NgramDrafter, DraftModelDrafter, MedusaDrafter, or any :class:`Drafter`), GenerationResult; vote
(majority of ``n`` samples, Vote), confidence (greedy vs sampled, Confidence).
"""

from importlib import metadata as _metadata

from ._loader import BUILT_WITH_TORCH, HAS_CUDA_OPS, cpu_isa  # noqa: F401  (checks the torch version first)
from ._threads import get_num_threads, set_num_threads
from .cache import ContiguousKVCache, OutOfBlocksError, PagedKVCache
from .decoding import (
    Confidence,
    Drafter,
    DraftModelDrafter,
    GenerationResult,
    MedusaDrafter,
    NgramDrafter,
    SpeculativeResult,
    Vote,
    confidence,
    generate,
    speculative_generate,
    vote,
)
from .ops import (
    QuantizedWeight,
    SamplingOutput,
    SpeculativeOutput,
    TreeOutput,
    append_kv_cache,
    append_paged_kv_cache,
    apply_penalties,
    argmax,
    chain_speculative_sampling,
    chain_speculative_sampling_from_logits,
    compact_kv_cache,
    compact_paged_kv_cache,
    decoder_layer,
    filter_probs,
    greedy_tree_verify,
    greedy_verify,
    linear,
    min_p_renorm_probs,
    paged_attention,
    processed_probs,
    rms_norm,
    rope_,
    sample_from_logits,
    sample_from_probs,
    silu_and_mul,
    softmax,
    top_k_mask_logits,
    top_k_renorm_probs,
    top_p_renorm_probs,
    tree_mask_from_parents,
    tree_speculative_sampling,
    typical_acceptance,
)
from .params import SamplingParams

try:
    __version__ = _metadata.version("decodekit")
except _metadata.PackageNotFoundError:  # pragma: no cover - a source tree without an install
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "cpu_isa",
    "set_num_threads",
    "get_num_threads",
    # sampling
    "SamplingOutput",
    "softmax",
    "argmax",
    "sample_from_logits",
    "sample_from_probs",
    "filter_probs",
    "top_k_renorm_probs",
    "top_p_renorm_probs",
    "min_p_renorm_probs",
    "top_k_mask_logits",
    "processed_probs",
    # penalties, layers
    "apply_penalties",
    "QuantizedWeight",
    "linear",
    "rms_norm",
    "silu_and_mul",
    "rope_",
    "decoder_layer",
    # kv cache, attention
    "append_kv_cache",
    "append_paged_kv_cache",
    "compact_kv_cache",
    "compact_paged_kv_cache",
    "ContiguousKVCache",
    "PagedKVCache",
    "OutOfBlocksError",
    "paged_attention",
    "tree_mask_from_parents",
    # speculative
    "SpeculativeOutput",
    "chain_speculative_sampling",
    "chain_speculative_sampling_from_logits",
    "greedy_verify",
    "TreeOutput",
    "tree_speculative_sampling",
    "typical_acceptance",
    "greedy_tree_verify",
    # decoding
    "SamplingParams",
    "generate",
    "speculative_generate",
    "GenerationResult",
    "SpeculativeResult",
    "Drafter",
    "NgramDrafter",
    "DraftModelDrafter",
    "MedusaDrafter",
    "vote",
    "Vote",
    "confidence",
    "Confidence",
]
