"""decodekit: fused, deterministic kernels for LLM token decoding.

Ops (validated wrappers of ``torch.ops.decodekit.*``):
    apply_penalties, softmax, argmax, sample_from_logits, sample_from_probs, filter_probs,
    top_k_renorm_probs, top_p_renorm_probs, min_p_renorm_probs, top_k_mask_logits,
    linear (batch-invariant x @ W.T + b), rms_norm, silu_and_mul, apply_rope_ (the per-token
    layer kernels the built-in model uses)

KV cache (decodekit.kv_cache):
    append_kv_cache, append_paged_kv_cache, ContiguousKVCache, PagedKVCache, OutOfBlocksError

Speculative decoding (decodekit.speculative, decodekit.spec_decode):
    chain_speculative_sampling, greedy_verify, SpeculativeOutput; speculative_generate with
    NgramDrafter or DraftModelDrafter (a trained draft model, decodekit.models.draft)

Decode loop:
    generate (a real model, SmolLM2-135M-Instruct by default)
"""

from ._loader import BUILT_WITH_TORCH, HAS_CUDA_OPS  # noqa: F401  (checks the torch version first)
from .ops import (
    SamplingOutput,
    apply_penalties,
    apply_rope_,
    argmax,
    filter_probs,
    linear,
    min_p_renorm_probs,
    rms_norm,
    sample_from_logits,
    sample_from_probs,
    silu_and_mul,
    softmax,
    top_k_mask_logits,
    top_k_renorm_probs,
    top_p_renorm_probs,
)
from .kv_cache import (
    ContiguousKVCache,
    OutOfBlocksError,
    PagedKVCache,
    append_kv_cache,
    append_paged_kv_cache,
)
from .speculative import (
    SpeculativeOutput,
    chain_speculative_sampling,
    chain_speculative_sampling_from_logits,
    greedy_verify,
)
from .generate import GenerationResult, generate  # model packages load lazily, on first use
from .spec_decode import DraftModelDrafter, NgramDrafter, SpeculativeResult, speculative_generate

__version__ = "0.1.0"

__all__ = [
    "SamplingOutput", "apply_penalties", "argmax", "softmax", "sample_from_logits", "sample_from_probs", "filter_probs",
    "top_k_renorm_probs", "top_p_renorm_probs", "min_p_renorm_probs", "top_k_mask_logits", "linear",
    "rms_norm", "silu_and_mul", "apply_rope_",
    "generate", "GenerationResult", "__version__",
]
__all__ += ["append_kv_cache", "append_paged_kv_cache", "ContiguousKVCache", "PagedKVCache", "OutOfBlocksError"]
__all__ += ["SpeculativeOutput", "chain_speculative_sampling", "chain_speculative_sampling_from_logits", "greedy_verify"]
__all__ += ["speculative_generate", "SpeculativeResult", "NgramDrafter", "DraftModelDrafter"]
