"""decodekit: fused, deterministic kernels for LLM token decoding.

Ops (validated wrappers of ``torch.ops.decodekit.*``):
    softmax, argmax, sample_from_logits

Decode loop:
    generate (a real model, SmolLM2-135M-Instruct by default)
"""

from ._loader import BUILT_WITH_TORCH, HAS_CUDA_OPS  # noqa: F401  (checks the torch version first)
from .ops import SamplingOutput, argmax, sample_from_logits, softmax
from .generate import GenerationResult, generate  # model packages load lazily, on first use

__version__ = "0.1.0"

__all__ = ["SamplingOutput", "argmax", "sample_from_logits", "softmax", "generate", "GenerationResult",
           "__version__"]
