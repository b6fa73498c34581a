"""Medusa heads: a few small heads on the target's last hidden state that predict the tokens
2, 3, ... positions ahead (Medusa-1: the backbone stays frozen; Cai et al., 2024, "Medusa: Simple
LLM Inference Acceleration Framework with Multiple Decoding Heads").

Head ``i`` (0-based) is one residual block on the final-normed hidden state ``h [H]`` (the LM
head's input) followed by an LM projection:

    u_i = h + SiLU(W_i h + b_i)            W_i [H, H], b_i [H]
    logits_i = E_r u_i                      E_r [N, H]: rows of the target's (tied) LM head

and predicts token ``t + 2 + i`` from the state at position ``t`` (head 0 predicts one past the
target's own next token). ``E_r`` is the target's LM head restricted to a reduced vocabulary
(``token_ids``, e.g. the 8192 tokens the target says most often): four full-vocabulary
projections would cost about as much as the whole model per step on a CPU, and verification by
the target keeps the output exact whatever the candidates. All heads' first products are one
matrix product (``[K H, H]``), and so are their projections (``K`` rows against ``E_r``).

A heads file (safetensors) holds ``weight`` float16/float32 ``[K, H, H]``, ``bias`` ``[K, H]``,
``token_ids`` int32 ``[N]`` and metadata (strings): ``format`` (``decodekit-medusa-v1``),
``num_heads``, ``target_vocab_size``, ``target_hidden_size``, ``target_embed_checksum``
(:func:`decodekit.models.draft.embedding_checksum`: heads are never paired with another target)
and the training facts. The shipped heads for SmolLM2-135M-Instruct,
``smollm2-135m-medusa.safetensors`` next to this module, are reproduced by
``scripts/make_chat_data.py`` and ``scripts/train_medusa.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from ..ops import linear as _dk_linear
from ..ops.layers import QuantizedWeight
from .draft import read_target_file
from .gguf_loader import LoadedModel
from .llama import LlamaModel

__all__ = ["MEDUSA_FORMAT", "MedusaHeads", "default_medusa_path", "load_medusa_heads"]

MEDUSA_FORMAT = "decodekit-medusa-v1"
DEFAULT_MEDUSA_FILE = "smollm2-135m-medusa.safetensors"


def default_medusa_path() -> Path:
    """Path of the Medusa heads shipped with the package for SmolLM2-135M-Instruct."""
    return Path(__file__).resolve().parent / "data" / DEFAULT_MEDUSA_FILE


def _target_embed(net: LlamaModel) -> torch.Tensor:
    e = net.lm_head
    return e.dequantize() if isinstance(e, QuantizedWeight) else e


class MedusaHeads:
    """``K`` Medusa heads over a reduced vocabulary of ``N`` tokens.

    Args:
        weight: float32 ``[K, H, H]`` (``W_i``, ``[out, in]``).
        bias: float32 ``[K, H]``.
        token_ids: int64 ``[N]`` distinct token ids of the target's vocabulary.
        lm_rows: the target's LM head rows of ``token_ids``: float32 ``[N, H]`` or a
            :class:`~decodekit.QuantizedWeight` of those rows.
        metadata: the file's metadata (strings).

    The products go through :func:`decodekit.linear` (or the quantized kernel), so a row's
    head logits do not depend on the other rows of the call (batch-invariant).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, token_ids: torch.Tensor, lm_rows, metadata=None):
        if weight.dim() != 3 or weight.shape[1] != weight.shape[2]:
            raise ValueError(f"MedusaHeads: weight must be [K, H, H], got {tuple(weight.shape)}")
        K, H, _ = weight.shape
        if tuple(bias.shape) != (K, H):
            raise ValueError(f"MedusaHeads: bias must be [K={K}, H={H}], got {tuple(bias.shape)}")
        if token_ids.dim() != 1 or tuple(lm_rows.shape) != (token_ids.numel(), H):
            raise ValueError(
                f"MedusaHeads: token_ids [N] and lm_rows [N, H={H}] must agree, got {tuple(token_ids.shape)} "
                f"and {tuple(lm_rows.shape)}"
            )
        self.num_heads = K
        self.hidden_size = H
        self.w = weight.float().reshape(K * H, H).contiguous()  # every head's W_i as one matrix
        self.b = bias.float().reshape(K * H).contiguous()
        self.token_ids = token_ids.to(torch.int64).contiguous()
        self.lm_rows = lm_rows if isinstance(lm_rows, QuantizedWeight) else lm_rows.float().contiguous()
        self.metadata: Dict[str, str] = dict(metadata or {})

    def __repr__(self) -> str:
        return (
            f"MedusaHeads({self.num_heads} heads, H={self.hidden_size}, vocabulary of {self.token_ids.numel()} "
            f"tokens, head-0 top-1 {self.metadata.get('heldout_top1', '?')})"
        )

    @torch.inference_mode()
    def logits(self, h: torch.Tensor, num_heads: Optional[int] = None) -> torch.Tensor:
        """Head logits over the reduced vocabulary.

        Args:
            h: float32 ``[B, H]``: final-normed hidden states (the LM head's input).
            num_heads: compute only the first ``num_heads`` heads (a tree of that depth needs no
                more); ``None`` for all ``K``. The heads computed get the same bits either way.

        Returns:
            float32 ``[B, K', N]`` (``K'`` the heads computed): ``logits[b, i, j]`` scores token
            ``token_ids[j]`` for head ``i``.

        Raises:
            ValueError: ``h`` not ``[B, H]``; ``num_heads`` outside ``[1, K]``.
            TypeError: ``num_heads`` not an int (bool refused) or None.
        """
        if not isinstance(h, torch.Tensor) or h.dim() != 2 or h.shape[1] != self.hidden_size:
            got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
            raise ValueError(f"MedusaHeads: h must be a float32 [B, H={self.hidden_size}] tensor, got {got}")
        B, H = h.shape
        K = self.num_heads if num_heads is None else num_heads
        if isinstance(K, bool) or not isinstance(K, int):
            raise TypeError(
                f"MedusaHeads: num_heads must be an int in [1, {self.num_heads}] or None, got {num_heads!r}"
            )
        if not 1 <= K <= self.num_heads:
            raise ValueError(f"MedusaHeads: num_heads must be in [1, {self.num_heads}], got {num_heads}")
        if B == 0:
            return h.new_empty(0, K, self.token_ids.numel())
        w, b = (self.w, self.b) if K == self.num_heads else (self.w[: K * H], self.b[: K * H])
        a = _dk_linear(h, w, b).view(B, K, H)  # W_i h + b_i, all heads at once
        u = (h[:, None, :] + torch.nn.functional.silu(a)).reshape(B * K, H)
        return _dk_linear(u, self.lm_rows).view(B, K, -1)

    @torch.inference_mode()
    def top_ids(self, h: torch.Tensor, k: int, num_heads: Optional[int] = None) -> torch.Tensor:
        """Each head's ``k`` best tokens, as target token ids.

        Args:
            h: float32 ``[B, H]``.
            k: candidates per head (``1 <= k <= N``).
            num_heads: only the first ``num_heads`` heads (as :meth:`logits`).

        Returns:
            int64 ``[B, K', k]``, best first; equal logits are ordered by the lower reduced-vocabulary
            index (a stable sort), so the candidates never depend on the batch.

        Raises:
            ValueError: ``k`` not an int in ``[1, N]``; and as :meth:`logits`.
        """
        n = self.token_ids.numel()
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ValueError(f"MedusaHeads.top_ids: k must be an int in [1, {n}] (the heads' vocabulary), got {k!r}")
        lg = self.logits(h, num_heads)
        if k + 8 < n:
            # The k + 8 largest, then ordered by (logit descending, index ascending); exact unless
            # a tie reaches past them, which falls back to a full stable sort.
            vals, idx = lg.topk(k + 8, dim=-1)
            if bool((vals[..., k - 1] > vals[..., -1]).all()):
                idx = idx.gather(-1, torch.sort(idx, dim=-1).indices)  # index order first...
                vals = lg.gather(-1, idx)
                order = torch.sort(vals, dim=-1, descending=True, stable=True).indices[..., :k]
                return self.token_ids[idx.gather(-1, order)]  # ...then a stable sort by logit
        order = torch.sort(lg, dim=-1, descending=True, stable=True).indices[..., :k]
        return self.token_ids[order]


def load_medusa_heads(
    path: Union[None, str, os.PathLike] = None, *, target: Union[None, LoadedModel, LlamaModel] = None
) -> MedusaHeads:
    """Load a Medusa heads file for ``target``.

    Args:
        path: a heads ``.safetensors`` file (format in the module docstring), or ``None`` for the
            shipped SmolLM2-135M-Instruct heads (:func:`default_medusa_path`).
        target: the target (``LoadedModel`` or ``LlamaModel``), or ``None`` for
            :func:`decodekit.load_model`'s default model.

    Returns:
        :class:`MedusaHeads`, whose LM rows are the target's own (quantized rows stay quantized).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not a safetensors file or not a decodekit Medusa file, heads trained for another
            target (vocabulary size, hidden size or embedding checksum differ), wrong shapes.
    """
    path = default_medusa_path() if path is None else Path(path)
    net, meta, tensors = read_target_file(
        path, MEDUSA_FORMAT, target, "load_medusa_heads", "Medusa heads", checksum_of="lm_head"
    )
    c = net.config
    if net.head_token_ids is not None:
        raise ValueError("load_medusa_heads: the target must have a full-vocabulary LM head")
    missing = [n for n in ("weight", "bias", "token_ids") if n not in tensors]
    if missing:
        raise ValueError(f"load_medusa_heads: {path.name} lacks the tensors {missing}")
    ids = tensors["token_ids"]
    if ids.dtype.is_floating_point or ids.dim() != 1 or ids.numel() == 0:
        raise ValueError("load_medusa_heads: token_ids must be a non-empty 1-D integer tensor")
    ids = ids.to(torch.int64)
    if int(ids.min()) < 0 or int(ids.max()) >= c.vocab_size or ids.unique().numel() != ids.numel():
        raise ValueError(f"load_medusa_heads: token_ids must be distinct ids in [0, {c.vocab_size})")
    weight, bias = tensors["weight"].float(), tensors["bias"].float()
    if weight.dim() != 3 or tuple(weight.shape[1:]) != (c.hidden_size, c.hidden_size):
        raise ValueError(
            f"load_medusa_heads: weight must be [K, {c.hidden_size}, {c.hidden_size}], got {tuple(weight.shape)}"
        )
    rows = (
        net.lm_head.rows(ids)
        if isinstance(net.lm_head, QuantizedWeight)
        else net.lm_head[ids].float().cpu().contiguous()
    )
    return MedusaHeads(weight, bias, ids, rows, meta)
