"""decodekit: fused, deterministic kernels for LLM token decoding.

Ops (validated wrappers of ``torch.ops.decodekit.*``):
    softmax, argmax, sample_from_logits

Decode loop:
    generate (a real model, SmolLM2-135M-Instruct by default)
"""

from ._loader import BUILT_WITH_TORCH, HAS_CUDA_OPS  # noqa: F401  (checks the torch version first)
from .ops import SamplingOutput, argmax, sample_from_logits, softmax

__version__ = "0.1.0"

__all__ = ["SamplingOutput", "argmax", "sample_from_logits", "softmax", "generate", "__version__"]


def __getattr__(name):
    # The decode loop imports the model stack (gguf, tokenizers); load it on first use.
    if name == "generate":
        from .generate import generate

        return generate
    raise AttributeError(f"module 'decodekit' has no attribute {name!r}")
