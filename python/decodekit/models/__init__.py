"""Model definitions and loaders: a float32 Llama-family decoder and its GGUF loader."""

from .gguf_loader import LoadedModel, default_model_path, load_gguf, load_model
from .llama import LlamaConfig, LlamaModel

__all__ = ["LlamaConfig", "LlamaModel", "LoadedModel", "default_model_path", "load_gguf", "load_model"]
