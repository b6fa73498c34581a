"""Penalties family: :func:`apply_penalties` (repetition, frequency and presence penalties,
logit bias, allowed / banned tokens), the first step of the sampling chain."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from .._checks import REPETITION_PENALTY_MIN, RowParam, check_logits, check_vocab_size, has_data, host_bool, row_param

ops = torch.ops.decodekit

# +inf would make the row's logit +inf, which no sampler can draw from (an invalid row).
_FORCE_HINT = "-inf bans a token; to force one, pass allowed_token_ids=[token]"

__all__ = ["apply_penalties", "PENALTY_KEYS"]

PENALTY_KEYS = (
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "token_ids",
    "token_counts",
    "logit_bias",
    "allowed_token_ids",
    "banned_token_ids",
)


def _id_matrix(value, name: str, op: str, B: int, device) -> Optional[torch.Tensor]:
    """A [B, L] int64 tensor (-1 padding) from a tensor or per-row lists of ids."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 2 or value.size(0) != B:
            raise ValueError(f"{op}: {name} must be [B={B}, L] token ids (-1 padding), got shape {tuple(value.shape)}")
        if value.dtype.is_floating_point or value.dtype == torch.bool or value.dtype.is_complex:
            raise TypeError(f"{op}: {name} must be an integer tensor, got {value.dtype}")
        return value.to(device=device, dtype=torch.int64).contiguous()
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"{op}: {name} must be an integer [B, L] tensor or a list of B lists of ids, got {type(value).__name__}"
        )
    rows = list(value)
    if len(rows) != B:
        raise ValueError(f"{op}: {name} must have one list of ids per row (B={B}), got {len(rows)}")
    if not all(isinstance(r, (list, tuple, torch.Tensor)) for r in rows):
        raise TypeError(f"{op}: {name} must be a list of B lists of ids (one list per row), got {value!r:.80}")
    L = max((len(r) for r in rows), default=0)
    out = torch.full((B, max(L, 1)), -1, dtype=torch.int64)
    for b, r in enumerate(rows):
        ids = r.tolist() if isinstance(r, torch.Tensor) else list(r)
        if any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in ids):
            raise TypeError(f"{op}: {name}[{b}] must contain ints")
        if any(not -(2**63) <= i < 2**63 for i in ids):
            raise ValueError(f"{op}: {name}[{b}] holds ids outside the int64 range")
        if ids:
            out[b, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return out.to(device)


def _check_ids_range(t: Optional[torch.Tensor], name: str, op: str, vocab_size: int, allow_pad: bool) -> None:
    if t is None or not has_data(t):  # meta tensors: shapes only
        return
    lo = -1 if allow_pad else 0
    bad = (t < lo) | (t >= vocab_size)
    if host_bool(bad.any(), op):
        where = torch.nonzero(bad)[0].tolist()
        raise ValueError(
            f"{op}: {name} must be in [{lo}, vocab_size={vocab_size}) ({'-1 is padding' if allow_pad else ''}); "
            f"entry {where} is {int(t[tuple(where)])}"
        )


def _token_mask(value, name: str, op: str, B: int, V: int, device) -> Optional[torch.Tensor]:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.bool or tuple(value.shape) != (B, V):
            raise ValueError(
                f"{op}: {name} as a tensor must be a bool mask [B={B}, V={V}], got "
                f"{value.dtype} {tuple(value.shape)} (or pass a list of ids, or B lists)"
            )
        return value.to(device).contiguous()
    rows = (
        value
        if (isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple, torch.Tensor)))
        else [value] * B
    )
    ids = _id_matrix(rows, name, op, B, device)
    _check_ids_range(ids, name, op, V, allow_pad=True)
    mask = torch.zeros(B, V + 1, dtype=torch.bool, device=device)
    mask.scatter_(1, torch.where(ids < 0, V, ids), True)
    return mask[:, :V].contiguous()


def apply_penalties(
    logits: torch.Tensor,
    *,
    repetition_penalty: RowParam = 1.0,
    frequency_penalty: RowParam = 0.0,
    presence_penalty: RowParam = 0.0,
    token_ids=None,
    token_counts: Optional[torch.Tensor] = None,
    logit_bias=None,
    allowed_token_ids=None,
    banned_token_ids=None,
    vocab_size: Optional[int] = None,
    validate: bool = True,
) -> torch.Tensor:
    """Penalties and biases, the first step of the sampling chain (out of place).

    In this order, per row: ``logit_bias`` is added; each counted token's
    logit is divided by ``repetition_penalty`` when positive and multiplied by
    it otherwise (CTRL, Keskar et al. 2019, as HF transformers'
    ``RepetitionPenaltyLogitsProcessor``), then reduced by
    ``frequency_penalty * count`` and by ``presence_penalty`` (OpenAI / vLLM
    semantics); finally tokens outside ``allowed_token_ids`` or inside
    ``banned_token_ids`` get -inf.

    Args:
        logits: ``[B, V]`` float32, float16 or bfloat16 on the CPU (not modified).
        repetition_penalty: number or ``[B]`` tensor, finite and ``> 0``; 1 disables.
        frequency_penalty, presence_penalty: numbers or ``[B]`` tensors,
            finite (negative values encourage repetition); 0 disables.
        token_ids: the tokens to count per row: an integer ``[B, L]`` tensor
            with -1 padding, or a list of B lists of ids (e.g. the ids each
            request has produced, or prompt + output for HF-style repetition).
        token_counts: alternatively, int ``[B, V]`` counts per token.
        logit_bias: a float ``[B, V]`` tensor, a dict ``{token_id: bias}`` for
            every row, or a list of B such dicts. ``-inf`` bans a token; ``+inf``
            and NaN are errors naming ``logit_bias`` (force a token with
            ``allowed_token_ids=[token]``).
        allowed_token_ids / banned_token_ids: a bool ``[B, V]`` mask, a list
            of ids for every row, or a list of B lists (not both).
        vocab_size: columns at or past it are padding (-inf in the output).
        validate: check ids and parameter values (synchronises).

    Returns:
        float32 ``[B, V]`` processed logits.

    Raises:
        TypeError / ValueError naming the argument: wrong shapes or dtypes,
        ids outside ``[0, vocab_size)`` (-1 allowed as padding in
        ``token_ids``), non-positive or non-finite ``repetition_penalty``,
        both ``token_ids`` and ``token_counts``, both masks.
    """
    op = "apply_penalties"
    logits = check_logits(logits, op)
    B, V = logits.shape
    vs = check_vocab_size(vocab_size, V, op)
    common = dict(op=op, ref=logits, validate=validate, integer=False, dtype=torch.float32)
    r_t, r_v = row_param(
        repetition_penalty,
        "repetition_penalty",
        lo=REPETITION_PENALTY_MIN,
        hi=None,
        allowed=f"finite and >= {REPETITION_PENALTY_MIN:g}",
        **common,
    )
    f_t, f_v = row_param(frequency_penalty, "frequency_penalty", lo=None, hi=None, allowed="finite", **common)
    p_t, p_v = row_param(presence_penalty, "presence_penalty", lo=None, hi=None, allowed="finite", **common)
    if token_ids is not None and token_counts is not None:
        raise ValueError(f"{op}: pass token_ids or token_counts, not both")
    ids = _id_matrix(token_ids, "token_ids", op, B, logits.device)
    if validate:
        _check_ids_range(ids, "token_ids", op, vs, allow_pad=True)
    counts = None
    if token_counts is not None:
        if not isinstance(token_counts, torch.Tensor) or tuple(token_counts.shape) != (B, V):
            raise ValueError(f"{op}: token_counts must be an integer [B={B}, V={V}] tensor")
        if token_counts.dtype.is_floating_point or token_counts.dtype == torch.bool:
            raise TypeError(f"{op}: token_counts must be an integer tensor, got {token_counts.dtype}")
        counts = token_counts.to(device=logits.device, dtype=torch.int64).contiguous()
        if validate and has_data(counts) and host_bool((counts < 0).any(), op):
            raise ValueError(f"{op}: token_counts must be >= 0")
    dense = bias_ids = bias_vals = None
    if isinstance(logit_bias, torch.Tensor):
        if tuple(logit_bias.shape) != (B, V) or not logit_bias.dtype.is_floating_point:
            raise ValueError(
                f"{op}: logit_bias as a tensor must be float [B={B}, V={V}], got "
                f"{tuple(logit_bias.shape)} {logit_bias.dtype}"
            )
        dense = logit_bias.to(device=logits.device, dtype=torch.float32).contiguous()
        if validate and has_data(dense) and host_bool((torch.isnan(dense) | torch.isposinf(dense)).any(), op):
            raise ValueError(f"{op}: logit_bias must not contain NaN or +inf ({_FORCE_HINT})")
    elif logit_bias is not None:
        if not isinstance(logit_bias, (dict, list, tuple)):
            raise TypeError(
                f"{op}: logit_bias must be a [B, V] tensor, a dict, or a list of B dicts, "
                f"got {type(logit_bias).__name__}"
            )
        dicts = [logit_bias] * B if isinstance(logit_bias, dict) else list(logit_bias)
        if not all(isinstance(d, dict) for d in dicts):
            raise TypeError(f"{op}: logit_bias must be a [B, V] tensor, a dict, or a list of B dicts")
        if len(dicts) != B:
            raise ValueError(f"{op}: logit_bias has {len(dicts)} dicts for B={B} rows")
        M = max(1, max(len(d) for d in dicts))
        bias_ids = torch.full((B, M), -1, dtype=torch.int64)
        bias_vals = torch.zeros((B, M), dtype=torch.float32)
        for b, d in enumerate(dicts):
            for j, (tok, val) in enumerate(d.items()):
                if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < vs:
                    raise ValueError(f"{op}: logit_bias token ids must be ints in [0, vocab_size={vs}), got {tok!r}")
                try:
                    fval = float(val) if isinstance(val, (int, float)) and not isinstance(val, bool) else math.nan
                except OverflowError:
                    fval = math.nan
                if math.isnan(fval) or fval == math.inf:
                    raise ValueError(
                        f"{op}: logit_bias values must be numbers below +inf ({_FORCE_HINT}), got "
                        f"{val!r:.60} for token {tok}"
                    )
                bias_ids[b, j], bias_vals[b, j] = tok, fval
        bias_ids, bias_vals = bias_ids.to(logits.device), bias_vals.to(logits.device)
    if allowed_token_ids is not None and banned_token_ids is not None:
        raise ValueError(f"{op}: pass allowed_token_ids or banned_token_ids, not both")
    allows = allowed_token_ids is not None
    mask = _token_mask(
        allowed_token_ids if allows else banned_token_ids,
        "allowed_token_ids" if allows else "banned_token_ids",
        op,
        B,
        V,
        logits.device,
    )
    return ops.apply_penalties(
        logits,
        r_t,
        float(r_v),
        f_t,
        float(f_v),
        p_t,
        float(p_v),
        ids,
        counts,
        dense,
        bias_ids,
        bias_vals,
        mask,
        allows,
        vs,
    )
