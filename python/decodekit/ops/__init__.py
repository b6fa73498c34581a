"""Validated Python wrappers of the compiled ops (``torch.ops.decodekit.*``), one module per
family: :mod:`~decodekit.ops.sampling`, :mod:`~decodekit.ops.penalties`,
:mod:`~decodekit.ops.layers`, :mod:`~decodekit.ops.kv_cache`, :mod:`~decodekit.ops.attention`,
:mod:`~decodekit.ops.speculative`. Every name here is also exported by :mod:`decodekit`."""

from .attention import paged_attention, tree_mask_from_parents
from .kv_cache import append_kv_cache, append_paged_kv_cache, compact_kv_cache, compact_paged_kv_cache
from .layers import QuantizedWeight, decoder_layer, linear, rms_norm, rope_, silu_and_mul
from .penalties import apply_penalties
from .sampling import (
    SamplingOutput,
    argmax,
    filter_probs,
    min_p_renorm_probs,
    processed_probs,
    sample_from_logits,
    sample_from_probs,
    softmax,
    top_k_mask_logits,
    top_k_renorm_probs,
    top_p_renorm_probs,
)
from .speculative import (
    SpeculativeOutput,
    TreeOutput,
    chain_speculative_sampling,
    chain_speculative_sampling_from_logits,
    greedy_tree_verify,
    greedy_verify,
    tree_speculative_sampling,
    typical_acceptance,
)

__all__ = [
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
    "apply_penalties",
    "QuantizedWeight",
    "linear",
    "rms_norm",
    "silu_and_mul",
    "rope_",
    "decoder_layer",
    "append_kv_cache",
    "append_paged_kv_cache",
    "compact_kv_cache",
    "compact_paged_kv_cache",
    "paged_attention",
    "tree_mask_from_parents",
    "SpeculativeOutput",
    "chain_speculative_sampling",
    "chain_speculative_sampling_from_logits",
    "greedy_verify",
    "TreeOutput",
    "tree_speculative_sampling",
    "typical_acceptance",
    "greedy_tree_verify",
]
