"""float64 references, one module per op family (philox, sampling, penalties, layers,
kv_cache, attention, speculative). ``import reference as ref`` gives every function by name."""

from .attention import paged_attention  # noqa: F401
from .kv_cache import append_kv_cache, append_paged_kv_cache, compact_kv_cache, compact_paged_kv_cache  # noqa: F401
from .layers import decoder_layer, linear, rms_norm, rope, silu_and_mul  # noqa: F401
from .penalties import apply_penalties  # noqa: F401
from .philox import philox4x32_10, philox_element, uniform_double  # noqa: F401
from .sampling import (  # noqa: F401
    argmax,
    draw,
    filter_probs,
    filtered_probs,
    nucleus,
    rank_order,
    sample,
    sample_from_logits,
    softmax,
)
from .speculative import tree_output_distribution, tree_speculative_sampling  # noqa: F401
