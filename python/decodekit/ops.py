"""Validated Python wrappers of the compiled ops (``torch.ops.decodekit.*``).

Every wrapper checks shapes, dtypes, devices and parameter ranges and raises
``TypeError``/``ValueError`` naming the argument, what was given and what is
allowed. The checks that look at tensor *data* (parameter tensors out of range,
NaN rows) synchronise with the device; ``validate=False`` skips them (for CUDA
graphs and ``torch.compile``), in which case invalid rows (bad data, or a
parameter out of range) come back marked (-1 and ``valid == False``; NaN rows
for softmax and filters) instead of raising. The ops are not differentiable:
their outputs carry no autograd graph. Conventions (tie-breaks, RNG keying, chain order) are those
of the project's DESIGN.md.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import NamedTuple, Optional, Union

import torch

from ._loader import HAS_CUDA_OPS, _C, ops

__all__ = [
    "SamplingOutput", "apply_penalties", "softmax", "argmax", "sample_from_logits", "sample_from_probs", "filter_probs",
    "top_k_renorm_probs", "top_p_renorm_probs", "min_p_renorm_probs", "top_k_mask_logits", "linear",
]

Number = Union[int, float]
RowParam = Union[Number, torch.Tensor]

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The wrappers whose op has a CUDA kernel, as the dispatcher says (renorm wrappers run filter_probs).
_SCHEMA_OF = {"top_k_renorm_probs": "filter_probs", "top_p_renorm_probs": "filter_probs",
              "min_p_renorm_probs": "filter_probs"}


def _has_cuda_kernel(op: str) -> bool:
    name = "decodekit::" + _SCHEMA_OF.get(op, op)
    return HAS_CUDA_OPS and torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
_INT64_MIN, _UINT64_END = -(2**63), 2**64
_FLT_MAX = 3.4028234663852886e38
# Positive temperatures below float32's smallest normal number act as it: the T -> 0+
# limit (uniform over the tied maxima), never T = 0 (greedy) by rounding.
_T_TINY = 1.1754943508222875e-38
# The C++ entries of the common calls (see sample_from_logits and softmax): the result,
# or None for the full path.
_sample_from_logits_fast = _C._sample_from_logits_fast
_softmax_fast = _C._softmax_fast


class SamplingOutput(NamedTuple):
    """What a sampling op returns when more than the ids is asked for.

    ``token_ids``: int64 ``[B]`` (-1 for invalid rows). ``valid``: bool ``[B]``
    (None unless ``return_valid``). ``logprobs``, ``top_ids``, ``top_logprobs``:
    reserved for the logprob outputs; None when not requested.
    """

    token_ids: torch.Tensor
    logprobs: Optional[torch.Tensor] = None
    top_ids: Optional[torch.Tensor] = None
    top_logprobs: Optional[torch.Tensor] = None
    valid: Optional[torch.Tensor] = None


# ----------------------------------------------------------------- checks ----
def _check_logits(logits, op: str) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{op}: logits must be a torch.Tensor [B, V], got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be 2-D [B, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"{op}: logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.size(1) < 1:
        raise ValueError(f"{op}: logits must have at least one column (V >= 1), got shape {tuple(logits.shape)}")
    if logits.size(1) >= 2**31:
        raise ValueError(f"{op}: V must be < 2^31, got {logits.size(1)}")
    dev = logits.device.type
    if dev == "meta":
        return logits
    if dev != "cpu" and not (dev == "cuda" and _has_cuda_kernel(op)):
        have = "CPU" + (" and CUDA" if _has_cuda_kernel(op) else "")
        raise ValueError(f"{op}: logits are on {logits.device}, but this op has kernels for: {have}")
    if logits.requires_grad:
        logits = logits.detach()  # the ops are not differentiable; outputs carry no graph
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return logits


def _check_probs(probs, op: str) -> torch.Tensor:
    if not isinstance(probs, torch.Tensor):
        raise TypeError(f"{op}: probs must be a torch.Tensor [B, V], got {type(probs).__name__}")
    if probs.dim() != 2:
        raise ValueError(f"{op}: probs must be 2-D [B, V], got shape {tuple(probs.shape)}")
    if probs.dtype != torch.float32:
        raise TypeError(f"{op}: probs must be float32, got {probs.dtype}")
    if probs.size(1) < 1 or probs.size(1) >= 2**31:
        raise ValueError(f"{op}: probs must have 1 <= V < 2^31 columns, got shape {tuple(probs.shape)}")
    if probs.device.type not in ("cpu", "meta") and not (probs.device.type == "cuda" and _has_cuda_kernel(op)):
        have = "CPU" + (" and CUDA" if _has_cuda_kernel(op) else "")
        raise ValueError(f"{op}: probs are on {probs.device}, but this op has kernels for: {have}")
    if probs.requires_grad:
        probs = probs.detach()  # the ops are not differentiable; outputs carry no graph
    if probs.stride(1) != 1:
        probs = probs.contiguous()
    return probs


def _check_vocab_size(vocab_size, V: int, op: str) -> int:
    if vocab_size is None:
        return V
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral):
        raise TypeError(f"{op}: vocab_size must be an int or None, got {type(vocab_size).__name__}")
    vocab_size = operator.index(vocab_size)
    if not 1 <= vocab_size <= V:
        raise ValueError(f"{op}: vocab_size must be in [1, V={V}], got {vocab_size}")
    return vocab_size


def _row_param(
    value,
    name: str,
    op: str,
    logits: torch.Tensor,
    *,
    integer: bool,
    dtype: torch.dtype,
    lo: Optional[float],
    hi: Optional[float],
    validate: bool,
    allowed: str,
    tiny_positive: Optional[float] = None,
):
    """Splits a per-row parameter into (tensor or None, scalar) for the kernel.

    Values of a float32 parameter must also be finite in float32 (|x| <= 3.4e38); with
    ``tiny_positive``, positive values below it become it (a positive temperature never
    turns into 0 when rounded to float32)."""
    B = logits.size(0)
    if isinstance(value, torch.Tensor):
        if integer and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
            raise TypeError(f"{op}: {name} must be an int or an integer tensor, got a {value.dtype} tensor")
        if value.dim() == 0:
            if value.device.type == "cpu" or (validate and value.device.type != "meta"):
                value = value.item()
            else:
                value = value.reshape(1).expand(B)
        if isinstance(value, torch.Tensor):
            if value.dim() != 1 or value.size(0) != B:
                raise ValueError(f"{op}: {name} must be a scalar or a 1-D tensor of length B={B}, got shape {tuple(value.shape)}")
            if value.device != logits.device and logits.device.type != "meta":
                raise ValueError(f"{op}: {name} is on {value.device} but logits are on {logits.device}")
            if integer and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
                raise TypeError(f"{op}: {name} must be an integer tensor, got {value.dtype}")
            if not integer and not (value.dtype.is_floating_point or value.dtype in (torch.int32, torch.int64)):
                raise TypeError(f"{op}: {name} must be a floating-point tensor, got {value.dtype}")
            t = value.to(dtype).contiguous()
            if tiny_positive is not None and value.dtype != dtype:
                t = torch.where((value > 0) & (t < tiny_positive), torch.full_like(t, tiny_positive), t)
            if validate and B > 0 and t.device.type != "meta":
                check = value.double() if not integer else value
                bad = torch.isnan(check) if not integer else torch.zeros_like(check, dtype=torch.bool)
                if lo is not None:
                    bad |= check < lo
                if hi is not None:
                    bad |= check > hi
                if not integer:
                    bad |= torch.isinf(check)
                    if dtype == torch.float32:
                        bad |= check.abs() > _FLT_MAX
                if _host_bool(bad.any(), op):
                    rows = torch.nonzero(bad).flatten().tolist()[:8]
                    vals = [check[r].item() for r in rows]
                    f32 = (" and at most float32's largest value 3.4028234663852886e+38"
                           if dtype == torch.float32 and not integer else "")
                    raise ValueError(f"{op}: {name} must be {allowed}{f32}; rows {rows} have {vals}")
            return t, 0
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a number or a [B] tensor, got {type(value).__name__}")
    if integer:
        if isinstance(value, numbers.Integral):
            value = operator.index(value)
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise TypeError(f"{op}: {name} must be an int, got {value!r}")
    else:
        try:
            value = float(value)
        except OverflowError:
            raise ValueError(f"{op}: {name} must be {allowed}, got an int of {value.bit_length()} bits") from None
    if not integer and (math.isnan(value) or math.isinf(value)):
        raise ValueError(f"{op}: {name} must be {allowed}, got {value}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{op}: {name} must be {allowed}, got {value}")
    if not integer and dtype == torch.float32 and abs(value) > _FLT_MAX:
        raise ValueError(f"{op}: {name} must be {allowed} and at most float32's largest value "
                         f"3.4028234663852886e+38, got {value!r}")
    if tiny_positive is not None and 0.0 < value < tiny_positive:
        value = tiny_positive
    return None, value


def _host_bool(t: torch.Tensor, op: str) -> bool:
    """bool(t) for a validation check. Under vmap, torch.compile or fake tensors the value
    is not known on the host: the error then says how to skip the check."""
    try:
        return bool(t)
    except RuntimeError as exc:  # vmap's data-dependent control flow, fake tensors' data-dependent output
        raise RuntimeError(
            f"{op}: validate=True checks values on the host, which is not possible here (vmap, torch.compile "
            "or fake tensors); pass validate=False (invalid rows then come back as -1 or NaN, and "
            "return_valid=True marks them)") from exc


def _to_int64_bits(v: int, name: str, op: str) -> int:
    """Maps an int in [-2^63, 2^64) to the int64 with the same low 64 bits."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
    v = operator.index(v)
    if not _INT64_MIN <= v < _UINT64_END:
        raise ValueError(f"{op}: {name} must be in [-2^63, 2^64), got {v}")
    return v - _UINT64_END if v >= 2**63 else v


_WHY_LOGITS = "have a NaN, no finite logit, or +inf logits with temperature > 0"
_WHY_PROBS = "have a NaN, a negative or infinite entry, or no positive entry"


def _check_bool(value, name: str, op: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be True or False, got {value!r}")
    return value


def _raise_invalid_rows(op: str, valid: torch.Tensor, why: str = _WHY_LOGITS, hint: bool = True) -> None:
    rows = torch.nonzero(~valid).flatten().tolist()
    shown = rows[:16]
    more = "" if len(rows) <= 16 else f" (and {len(rows) - 16} more)"
    tail = ("; pass return_valid=True to get -1 for those rows and a validity mask instead" if hint
            else "; pass validate=False to get those rows back unchanged (NaN for probabilities)")
    raise ValueError(f"{op}: rows {shown}{more} {why}{tail}")


# -------------------------------------------------------------------- ops ----
def softmax(
    logits: torch.Tensor,
    temperature: RowParam = 1.0,
    *,
    vocab_size: Optional[int] = None,
    deterministic: bool = True,
    validate: bool = True,
) -> torch.Tensor:
    """Fused ``softmax(logits / temperature)`` per row, in float32.

    Args:
        logits: ``[B, V]`` float32, float16 or bfloat16 (CPU, or CUDA when built
            with CUDA). Arithmetic is float32.
        temperature: a number or a ``[B]`` tensor, each ``>= 0`` and finite in
            float32 (at most 3.4e38). ``0`` gives one-hot probabilities at the
            argmax of the raw logits (lowest index on ties), never a division by
            a tiny epsilon; a positive value below 1.18e-38 (float32's smallest
            normal) acts as 1.18e-38, the ``T -> 0+`` limit (uniform over tied
            maxima), never as ``0``.
        vocab_size: columns at or past it are padding and get probability 0.
        deterministic: bit-identical rows whatever the batch, row position,
            neighbours and thread count (the default); ``False`` allows the
            kernel to choose its splits.
        validate: check data-dependent conditions (synchronises).

    Returns:
        probs: ``[B, V]`` float32, each row summing to 1 within float32 rounding.

    Raises:
        TypeError / ValueError naming the argument for a wrong type, rank,
        dtype, device or range; ValueError naming the rows whose logits contain
        a NaN, no finite value, or +inf with temperature > 0 (with
        ``validate=False`` such rows come back as NaN).

    Source: max-subtracted softmax computed in one read of the logits (each
    256-token chunk relative to the running maximum, rescaled at the end, as in
    online softmax, Milakov & Gimelshein 2018); our own float32 ``exp``
    (``2^(x log2 e)``, a degree-6 polynomial) so every instruction set gives
    the same bits.

    Example:
        >>> decodekit.softmax(torch.tensor([[1.0, 2.0, 3.0]]), 0.5)
    """
    if vocab_size is None and validate is True:
        probs = _softmax_fast(logits, temperature, deterministic)  # as in sample_from_logits
        if probs is not None:
            return probs
    op = "softmax"
    logits = _check_logits(logits, op)
    vs = _check_vocab_size(vocab_size, logits.size(1), op)
    t_tensor, t_val = _row_param(
        temperature, "temperature", op, logits, integer=False, dtype=torch.float32, lo=0.0, hi=None,
        validate=validate, allowed="finite and >= 0",
        tiny_positive=_T_TINY,
    )
    probs = ops.softmax(logits, t_tensor, float(t_val), vs, _check_bool(deterministic, "deterministic", op))
    if validate and probs.numel() and probs.device.type != "meta":
        bad = torch.isnan(probs[:, 0])
        if _host_bool(bad.any(), op):
            _raise_invalid_rows(op, ~bad, hint=False)
    return probs


def argmax(
    logits: torch.Tensor,
    *,
    vocab_size: Optional[int] = None,
    return_valid: bool = False,
    validate: bool = True,
):
    """Index of the largest logit per row; the lowest index wins ties.

    Args:
        logits: ``[B, V]`` float32, float16 or bfloat16 on the CPU.
        vocab_size: only columns ``< vocab_size`` are considered.
        return_valid: also return a bool ``[B]`` mask (rows with a NaN or with
            every entry -inf are invalid and get id -1) instead of raising.
        validate: raise for invalid rows (synchronises).

    Returns:
        int64 ``[B]`` ids, or ``(ids, valid)`` when ``return_valid``.

    Raises:
        TypeError / ValueError naming the argument; ValueError naming the rows
        with a NaN or no value above -inf (unless ``return_valid``).

    Source: a single streaming pass with 16 lanes, each keeping its first
    maximum; lanes combine by (value desc, index asc).
    """
    op = "argmax"
    logits = _check_logits(logits, op)
    vs = _check_vocab_size(vocab_size, logits.size(1), op)
    ids, valid = ops.argmax(logits, vs)
    if return_valid:
        return ids, valid
    if validate and valid.numel() and valid.device.type != "meta" and not _host_bool(valid.all(), op):
        _raise_invalid_rows(op, valid)
    return ids


def _seed_and_offset(seed, offset, generator, B: int, logits: torch.Tensor, op: str, needs_rng: bool, validate: bool):
    if seed is not None and generator is not None:
        raise ValueError(f"{op}: pass either seed (with offset) or generator, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"{op}: generator must be a torch.Generator, got {type(generator).__name__}")
        drawn = int(torch.randint(-(2**63), 2**63 - 1, (), generator=generator, device=generator.device, dtype=torch.int64))
        if isinstance(offset, (torch.Tensor, bool)) or not isinstance(offset, numbers.Integral) or offset < 0:
            raise ValueError(f"{op}: with a generator, offset must be an int >= 0, got {offset!r}")
        base = operator.index(offset)
        # Each row gets its own counter so rows drawn from one generator are independent.
        offs = torch.arange(B, dtype=torch.int64, device=logits.device) + _to_int64_bits(base, "offset", op)
        return None, drawn, offs, 0
    if seed is None:
        if needs_rng:
            raise ValueError(
                f"{op}: a seed (int or [B] int64 tensor) or a torch.Generator is required when any row samples "
                "(temperature > 0 with top_k != 1 and top_p > 0)"
            )
        seed = 0
    if isinstance(seed, torch.Tensor):
        s_t, s_v = _row_param(seed, "seed", op, logits, integer=True, dtype=torch.int64, lo=None, hi=None,
                              validate=False, allowed="an int64")
        if s_t is None:
            s_v = _to_int64_bits(int(s_v), "seed", op)
    else:
        s_t, s_v = None, _to_int64_bits(seed, "seed", op)
    if isinstance(offset, torch.Tensor):
        o_t, o_v = _row_param(offset, "offset", op, logits, integer=True, dtype=torch.int64, lo=0, hi=None,
                              validate=validate, allowed=">= 0")
        if o_t is None:
            o_v = _to_int64_bits(int(o_v), "offset", op)
    else:
        if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or offset < 0:
            raise ValueError(f"{op}: offset must be an int >= 0 or a [B] int64 tensor, got {offset!r}")
        o_t, o_v = None, _to_int64_bits(offset, "offset", op)
    return s_t, s_v, o_t, o_v


def _logprob_args(op: str, top_logprobs, logprobs_mode, vocab_size: int):
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, numbers.Integral):
        raise TypeError(f"{op}: top_logprobs must be an int, got {type(top_logprobs).__name__}")
    top_logprobs = operator.index(top_logprobs)
    if not 0 <= top_logprobs <= vocab_size:
        raise ValueError(f"{op}: top_logprobs must be in [0, vocab_size={vocab_size}], got {top_logprobs}")
    if logprobs_mode not in ("processed", "raw"):
        raise ValueError(f"{op}: logprobs_mode must be 'processed' or 'raw', got {logprobs_mode!r}")
    return top_logprobs, logprobs_mode == "raw"


def _sampling_result(op, ids, valid, lp, top_ids, top_lp, return_valid, return_logprobs, n_top, validate, why):
    if (validate and ids.numel() and ids.device.type != "meta" and not return_valid
            and not _host_bool(valid.all(), op)):
        _raise_invalid_rows(op, valid, why)
    if not (return_valid or return_logprobs or n_top):
        return ids
    return SamplingOutput(
        token_ids=ids,
        logprobs=lp if return_logprobs else None,
        top_ids=top_ids if n_top else None,
        top_logprobs=top_lp if n_top else None,
        valid=valid if return_valid else None,
    )


def _top_n_rank(lp: torch.Tensor, n: int):
    """The n largest per row, lowest index first on ties (stable sort of the negated values)."""
    order = torch.sort(-lp, dim=-1, stable=True).indices[:, :n]
    return lp.gather(1, order).float(), order


def _all_greedy(t_tensor, t_val, k_tensor, k_val, p_tensor, p_val) -> bool:
    """True when no row samples (T == 0, top_k == 1 or top_p == 0 in every row)."""
    greedy = None
    for tensor, val, test in (
        (t_tensor, t_val, lambda x: x == 0),
        (k_tensor, k_val, lambda x: x == 1),
        (p_tensor, p_val, lambda x: x == 0),
    ):
        g = test(tensor) if tensor is not None else torch.tensor(bool(test(val)))
        greedy = g if greedy is None else (greedy | g)
    return bool(greedy.all())



def sample_from_logits(
    logits: torch.Tensor,
    temperature: RowParam = 1.0,
    top_k: RowParam = 0,
    top_p: RowParam = 1.0,
    min_p: RowParam = 0.0,
    *,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Union[int, torch.Tensor] = 0,
    generator: Optional[torch.Generator] = None,
    vocab_size: Optional[int] = None,
    deterministic: bool = True,
    return_valid: bool = False,
    return_logprobs: bool = False,
    top_logprobs: int = 0,
    logprobs_mode: str = "processed",
    validate: bool = True,
    **penalties,
):
    """Samples one token per row: penalties -> temperature -> top-k -> top-p -> min-p.

    One pass over the logits and no sort of the vocabulary: the streaming read
    records each 256-token chunk's maximum, the top-k candidates are gathered
    from the few chunks whose maximum reaches the k-th largest chunk maximum
    (a lower bound of the k-th value), top-p looks only at the tokens that can
    be in the nucleus, and the draw is an inverse CDF over the
    kept tokens in ascending index order with one float64 Philox uniform.

    Args:
        logits: ``[B, V]`` float32, float16 or bfloat16 on the CPU.
        temperature: number or ``[B]`` tensor, ``>= 0`` and finite in float32.
            ``0`` is exact greedy: the argmax of the raw logits, lowest index on
            ties; a positive value below 1.18e-38 acts as 1.18e-38 (the
            ``T -> 0+`` limit, uniform over tied maxima), never as ``0``.
        top_k: int or ``[B]`` integer tensor; keep the ``k`` highest logits
            (lowest index wins ties at the boundary). ``k <= 0`` or
            ``k >= vocab_size`` disables; ``k == 1`` is exactly argmax.
        top_p: number or ``[B]`` tensor in ``[0, 1]``; keep the shortest prefix
            in rank order (logit desc, index asc) whose float64 probability
            mass (after top-k renormalisation) is ``>= top_p``: the running
            float64 sum of the weights ``exp((x - max) / T)`` reaches the
            float64 product ``top_p * total`` (so 9 of 10 tied tokens reach
            0.9). ``1`` disables exactly; ``0`` keeps only the top token.
        min_p: number or ``[B]`` tensor in ``[0, 1]``; keep tokens with
            ``prob >= min_p * max_prob`` (after top-k and top-p). ``0`` disables.
        seed: int (every row the same Philox key) or ``[B]`` int64 tensor. The
            random numbers of a row depend only on (seed, offset), never on the
            batch. Required (or ``generator``) unless every row is greedy.
        offset: int ``>= 0`` or ``[B]`` int64 tensor: the Philox counter, e.g.
            the decoding step.
        generator: a ``torch.Generator`` instead of ``seed``: one seed is drawn
            from it per call and row ``b`` uses offset ``offset + b``.
        vocab_size: columns at or past it are padding and never sampled.
        deterministic: bit-identical result per row whatever the batch size,
            row position, neighbours, thread count and instruction set.
        return_valid: return a :class:`SamplingOutput` whose ``valid`` mask
            marks rows that could not be sampled (id -1) instead of raising.
        return_logprobs: also return the drawn token's logprob, float32 ``[B]``.
        top_logprobs: also return the ``n`` best tokens per row and their
            logprobs (int64 and float32 ``[B, n]``), in rank order of the raw
            logits (value desc, lowest index first on ties), which is also
            logprob order; in "processed" mode tokens the filters removed
            come after the kept ones, at -inf, still in that rank order.
            ``0 <= n <= vocab_size``.
        logprobs_mode: ``"processed"`` (default): logprobs of the distribution
            actually sampled (after temperature and filters, renormalised;
            filtered tokens are -inf; a greedy row is one-hot: 0 and -inf);
            ``"raw"``: ``log_softmax`` of the raw logits (NaN for a row with
            +inf logits, where it is undefined).
        validate: check parameter tensors' values and raise for invalid rows
            (synchronises); ``False`` for CUDA graphs / ``torch.compile``.
        **penalties: the keyword arguments of :func:`apply_penalties`
            (``repetition_penalty``, ``frequency_penalty``,
            ``presence_penalty``, ``token_ids`` or ``token_counts``,
            ``logit_bias``, ``allowed_token_ids`` or ``banned_token_ids``),
            applied first; "raw" logprobs stay those of the logits passed in.

    Returns:
        int64 ``[B]`` token ids in ``[0, vocab_size)``, or a
        :class:`SamplingOutput` when ``return_valid``, ``return_logprobs`` or
        ``top_logprobs`` is asked for (unrequested fields None; invalid rows
        have id -1 and NaN logprobs).

    Raises:
        TypeError / ValueError naming the argument for a wrong type, shape,
        dtype, device or range (temperature < 0, NaN or inf; top_p or min_p
        outside [0, 1] or NaN; a [B] tensor of the wrong length; neither seed
        nor generator while some row samples). ValueError naming the rows
        with a NaN, no finite logit, or +inf at temperature > 0 (unless
        ``return_valid``).

    Source: the chain order of HF transformers' logits warpers; nucleus
    sampling (Holtzman et al., ICLR 2020); min-p (Nguyen et al., 2024); Philox
    4x32-10 (Salmon et al., SC'11).

    Example:
        >>> ids = decodekit.sample_from_logits(logits, 0.7, top_k=50, top_p=0.9, seed=1234)
    """
    if (not penalties and generator is None and vocab_size is None and validate is True and not return_valid
            and not return_logprobs and top_logprobs == 0 and (type(seed) is int or type(seed) is torch.Tensor)):
        # The common call: plain arguments checked and the CPU op called directly, without
        # the torch.ops dispatch that costs tens of microseconds on cold caches (a model
        # forward runs between two calls). None for anything else: the full path below
        # then runs and raises the precise error.
        ids = _sample_from_logits_fast(logits, temperature, top_k, top_p, min_p, seed, offset, deterministic)
        if ids is not None:
            return ids
    op = "sample_from_logits"
    logits = _check_logits(logits, op)
    B, V = logits.shape
    vs = _check_vocab_size(vocab_size, V, op)
    unknown = set(penalties) - set(_PENALTY_KEYS)
    if unknown:
        raise TypeError(f"{op}: unexpected keyword arguments {sorted(unknown)}; penalties are {list(_PENALTY_KEYS)}")
    raw_logits = logits
    if any(v is not None for v in penalties.values()):
        logits = apply_penalties(logits, vocab_size=vocab_size, validate=validate, **penalties)
    t_t, t_v = _row_param(temperature, "temperature", op, logits, integer=False, dtype=torch.float32, lo=0.0,
                          hi=None, validate=validate, allowed="finite and >= 0", tiny_positive=_T_TINY)
    k_t, k_v, p_t, p_v, m_t, m_v = _filter_args(op, logits, top_k, top_p, min_p, validate)
    needs_rng = B > 0 and logits.device.type != "meta"  # shape-only calls draw nothing
    if seed is None and generator is None and needs_rng:
        needs_rng = not _all_greedy(t_t, t_v, k_t, k_v, p_t, p_v)
    s_t, s_v, o_t, o_v = _seed_and_offset(seed, offset, generator, B, logits, op, needs_rng, validate)
    n_top, raw = _logprob_args(op, top_logprobs, logprobs_mode, vs)
    ids, valid, lp, top_ids, top_lp = ops.sample_from_logits(
        logits, t_t, float(t_v), k_t, int(k_v), p_t, float(p_v), m_t, float(m_v),
        s_t, int(s_v), o_t, int(o_v), vs, _check_bool(deterministic, "deterministic", op),
        _check_bool(return_logprobs, "return_logprobs", op), n_top, raw,
    )
    if raw and logits is not raw_logits and B > 0 and (return_logprobs or n_top):
        # Raw logprobs are of the logits passed in, before the penalties.
        raw_lp = torch.log_softmax(raw_logits[:, :vs].double(), dim=-1)
        safe = ids.clamp(min=0)
        lp = raw_lp.gather(1, safe[:, None])[:, 0].float().masked_fill(~valid, float("nan")) if return_logprobs else lp
        if n_top:
            top_lp, top_ids = _top_n_rank(raw_lp, n_top)
    return _sampling_result(op, ids, valid, lp, top_ids, top_lp, return_valid, return_logprobs, n_top, validate,
                            _WHY_LOGITS)


# ------------------------------------------------------- probability ops ----
def _filter_args(op: str, x: torch.Tensor, top_k, top_p, min_p, validate: bool):
    common = dict(op=op, logits=x, validate=validate)
    k_t, k_v = _row_param(top_k, "top_k", integer=True, dtype=torch.int64, lo=None, hi=None,
                          allowed="an int (<= 0 disables)", **common)
    p_t, p_v = _row_param(top_p, "top_p", integer=False, dtype=torch.float64, lo=0.0, hi=1.0,
                          allowed="in [0, 1]", **common)
    m_t, m_v = _row_param(min_p, "min_p", integer=False, dtype=torch.float32, lo=0.0, hi=1.0,
                          allowed="in [0, 1]", **common)
    if isinstance(k_v, int):
        k_v = max(min(k_v, 2**62), -(2**62))
    return k_t, int(k_v), p_t, float(p_v), m_t, float(m_v)


def sample_from_probs(
    probs: torch.Tensor,
    top_k: RowParam = 0,
    top_p: RowParam = 1.0,
    min_p: RowParam = 0.0,
    *,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Union[int, torch.Tensor] = 0,
    generator: Optional[torch.Generator] = None,
    vocab_size: Optional[int] = None,
    deterministic: bool = True,
    return_valid: bool = False,
    return_logprobs: bool = False,
    top_logprobs: int = 0,
    logprobs_mode: str = "processed",
    validate: bool = True,
):
    """Samples one token per row of a probability matrix after top-k -> top-p -> min-p.

    The same fused chain as :func:`sample_from_logits`, ranking by probability
    (lowest index wins ties) and renormalising between filters; the draw is an
    inverse CDF over the kept tokens in ascending index order with one float64
    Philox uniform (stream 0).

    Args:
        probs: ``[B, V]`` float32 on the CPU, non-negative (rows need not sum
            to exactly 1: they are used as weights).
        top_k, top_p, min_p: as in :func:`sample_from_logits` (numbers or
            ``[B]`` tensors; ``0``, ``1.0``, ``0.0`` disable). min-p keeps
            ``p >= min_p * max(p)`` compared in float32.
        seed, offset, generator, vocab_size, deterministic, return_valid,
        return_logprobs, top_logprobs, logprobs_mode, validate: as in
        :func:`sample_from_logits` ("raw" logprobs are ``log(p / sum(p))``).

    Returns:
        int64 ``[B]`` ids in ``[0, vocab_size)``; a zero-probability token is
        never drawn. A :class:`SamplingOutput` when ``return_valid``.

    Raises:
        TypeError / ValueError naming the argument (rank, dtype, device,
        ranges, missing seed); ValueError naming the rows with a NaN, a
        negative or infinite entry, or no positive entry (unless ``return_valid``).

    Source: nucleus sampling (Holtzman et al., ICLR 2020); min-p (Nguyen et
    al., 2024); Philox 4x32-10 (Salmon et al., SC'11).

    Example:
        >>> decodekit.sample_from_probs(torch.tensor([[0.1, 0.2, 0.7]]), top_p=0.9, seed=3)
    """
    op = "sample_from_probs"
    probs = _check_probs(probs, op)
    B, V = probs.shape
    vs = _check_vocab_size(vocab_size, V, op)
    k_t, k_v, p_t, p_v, m_t, m_v = _filter_args(op, probs, top_k, top_p, min_p, validate)
    needs_rng = B > 0 and probs.device.type != "meta"  # shape-only calls draw nothing
    if seed is None and generator is None and needs_rng:
        needs_rng = not _all_greedy(None, 1.0, k_t, k_v, p_t, p_v)
    s_t, s_v, o_t, o_v = _seed_and_offset(seed, offset, generator, B, probs, op, needs_rng, validate)
    n_top, raw = _logprob_args(op, top_logprobs, logprobs_mode, vs)
    ids, valid, lp, top_ids, top_lp = ops.sample_from_probs(
        probs, k_t, k_v, p_t, p_v, m_t, m_v, s_t, int(s_v), o_t, int(o_v), vs,
        _check_bool(deterministic, "deterministic", op), _check_bool(return_logprobs, "return_logprobs", op), n_top, raw,
    )
    return _sampling_result(op, ids, valid, lp, top_ids, top_lp, return_valid, return_logprobs, n_top, validate,
                            _WHY_PROBS)


def filter_probs(
    probs: torch.Tensor,
    top_k: RowParam = 0,
    top_p: RowParam = 1.0,
    min_p: RowParam = 0.0,
    *,
    vocab_size: Optional[int] = None,
    validate: bool = True,
    _op: str = "filter_probs",
) -> torch.Tensor:
    """Applies top-k -> top-p -> min-p to probability rows and renormalises.

    Args:
        probs: ``[B, V]`` float32 on the CPU (not modified).
        top_k: keep the ``k`` largest probabilities (lowest index on ties);
            ``<= 0`` or ``>= vocab_size`` disables.
        top_p: keep the shortest prefix (prob desc, index asc) whose float64
            mass, after top-k renormalisation, is ``>= top_p``; ``1`` disables
            exactly, ``0`` keeps only the top token.
        min_p: keep ``p >= min_p * max(p)`` (float32, ties kept); ``0`` disables.
        vocab_size: columns at or past it are padding and come back as 0.
        validate: raise for invalid rows and out-of-range parameter tensors
            (synchronises); with ``False`` invalid rows come back as NaN.

    Returns:
        ``[B, V]`` float32: kept entries divided by their float64 sum, the rest
        0. A row from which no positive entry is removed is returned bit for
        bit unchanged (no renormalisation).

    Raises:
        TypeError / ValueError naming the argument; ValueError naming the rows
        with a NaN, a negative or infinite entry, or no positive entry.

    Source: the chain order of HF transformers' logits warpers; nucleus
    sampling (Holtzman et al., 2020); min-p (Nguyen et al., 2024). No sort of
    the vocabulary: exact top-k candidates from one pass, top-p by a
    quickselect over the tokens that can be in the nucleus.
    """
    op = _op
    probs = _check_probs(probs, op)
    vs = _check_vocab_size(vocab_size, probs.size(1), op)
    k_t, k_v, p_t, p_v, m_t, m_v = _filter_args(op, probs, top_k, top_p, min_p, validate)
    out, valid = ops.filter_probs(probs, k_t, k_v, p_t, p_v, m_t, m_v, vs)
    if validate and valid.numel() and valid.device.type != "meta" and not _host_bool(valid.all(), op):
        _raise_invalid_rows(op, valid, _WHY_PROBS, hint=False)
    return out


def top_k_renorm_probs(probs: torch.Tensor, top_k: RowParam, **kwargs) -> torch.Tensor:
    """``filter_probs(probs, top_k=top_k)``: keep the k largest probabilities per row and renormalise.

    Shapes, dtypes, errors and keyword arguments (``vocab_size``, ``validate``)
    as in :func:`filter_probs`.
    """
    return filter_probs(probs, top_k=top_k, _op="top_k_renorm_probs", **kwargs)


def top_p_renorm_probs(probs: torch.Tensor, top_p: RowParam, **kwargs) -> torch.Tensor:
    """``filter_probs(probs, top_p=top_p)``: keep the nucleus of mass >= top_p per row and renormalise.

    Shapes, dtypes, errors and keyword arguments as in :func:`filter_probs`.
    """
    return filter_probs(probs, top_p=top_p, _op="top_p_renorm_probs", **kwargs)


def min_p_renorm_probs(probs: torch.Tensor, min_p: RowParam, **kwargs) -> torch.Tensor:
    """``filter_probs(probs, min_p=min_p)``: keep ``p >= min_p * max(p)`` per row and renormalise.

    Shapes, dtypes, errors and keyword arguments as in :func:`filter_probs`.
    """
    return filter_probs(probs, min_p=min_p, _op="min_p_renorm_probs", **kwargs)


def top_k_mask_logits(
    logits: torch.Tensor,
    top_k: RowParam,
    *,
    vocab_size: Optional[int] = None,
    validate: bool = True,
) -> torch.Tensor:
    """Sets every logit outside the row's top-k to -inf (lowest index wins ties).

    Args:
        logits: ``[B, V]`` float32, float16 or bfloat16 on the CPU (not modified).
        top_k: int or ``[B]`` integer tensor; ``<= 0`` or ``>= vocab_size``
            leaves the row unchanged.
        vocab_size: columns at or past it are padding and come back as -inf.
        validate: raise for rows with a NaN (synchronises).

    Returns:
        ``[B, V]`` of the logits' dtype: the top-k entries unchanged, the rest -inf.

    Raises:
        TypeError / ValueError naming the argument; ValueError naming rows with a NaN.

    Source: one streaming pass with a bounded candidate buffer (no sort).
    """
    op = "top_k_mask_logits"
    logits = _check_logits(logits, op)
    vs = _check_vocab_size(vocab_size, logits.size(1), op)
    k_t, k_v = _row_param(top_k, "top_k", op, logits, integer=True, dtype=torch.int64, lo=None, hi=None,
                          validate=validate, allowed="an int (<= 0 disables)")
    if isinstance(k_v, int):
        k_v = max(min(k_v, 2**62), -(2**62))
    out, valid = ops.top_k_mask_logits(logits, k_t, int(k_v), vs)
    if validate and valid.numel() and valid.device.type != "meta" and not _host_bool(valid.all(), op):
        raise ValueError(f"{op}: rows {torch.nonzero(~valid).flatten().tolist()[:16]} have a NaN; "
                         "pass validate=False to get them back unchanged")
    return out


# -------------------------------------------------------------- penalties ----
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
        raise TypeError(f"{op}: {name} must be an integer [B, L] tensor or a list of B lists of ids, "
                        f"got {type(value).__name__}")
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
    if t is None or t.numel() == 0:
        return
    lo = -1 if allow_pad else 0
    bad = (t < lo) | (t >= vocab_size)
    if bool(bad.any()):
        where = torch.nonzero(bad)[0].tolist()
        raise ValueError(f"{op}: {name} must be in [{lo}, vocab_size={vocab_size}) ({'-1 is padding' if allow_pad else ''}); "
                         f"entry {where} is {int(t[tuple(where)])}")


def _token_mask(value, name: str, op: str, B: int, V: int, device) -> Optional[torch.Tensor]:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.bool or tuple(value.shape) != (B, V):
            raise ValueError(f"{op}: {name} as a tensor must be a bool mask [B={B}, V={V}], got "
                             f"{value.dtype} {tuple(value.shape)} (or pass a list of ids, or B lists)")
        return value.to(device).contiguous()
    rows = value if (isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple, torch.Tensor))) \
        else [value] * B
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
            every row, or a list of B such dicts.
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
    logits = _check_logits(logits, op)
    B, V = logits.shape
    vs = _check_vocab_size(vocab_size, V, op)
    common = dict(op=op, logits=logits, validate=validate, integer=False, dtype=torch.float32)
    r_t, r_v = _row_param(repetition_penalty, "repetition_penalty", lo=1e-30, hi=None, allowed="finite and > 0", **common)
    f_t, f_v = _row_param(frequency_penalty, "frequency_penalty", lo=None, hi=None, allowed="finite", **common)
    p_t, p_v = _row_param(presence_penalty, "presence_penalty", lo=None, hi=None, allowed="finite", **common)
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
        if validate and _host_bool((counts < 0).any(), op):
            raise ValueError(f"{op}: token_counts must be >= 0")
    dense = bias_ids = bias_vals = None
    if isinstance(logit_bias, torch.Tensor):
        if tuple(logit_bias.shape) != (B, V) or not logit_bias.dtype.is_floating_point:
            raise ValueError(f"{op}: logit_bias as a tensor must be float [B={B}, V={V}], got "
                             f"{tuple(logit_bias.shape)} {logit_bias.dtype}")
        dense = logit_bias.to(device=logits.device, dtype=torch.float32).contiguous()
        if validate and _host_bool(torch.isnan(dense).any(), op):
            raise ValueError(f"{op}: logit_bias must not contain NaN (use -inf to ban a token)")
    elif logit_bias is not None:
        if not isinstance(logit_bias, (dict, list, tuple)):
            raise TypeError(f"{op}: logit_bias must be a [B, V] tensor, a dict, or a list of B dicts, "
                            f"got {type(logit_bias).__name__}")
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
                if math.isnan(fval):
                    raise ValueError(f"{op}: logit_bias values must be numbers (+-inf allowed), got {val!r:.60} "
                                     f"for token {tok}")
                bias_ids[b, j], bias_vals[b, j] = tok, fval
        bias_ids, bias_vals = bias_ids.to(logits.device), bias_vals.to(logits.device)
    if allowed_token_ids is not None and banned_token_ids is not None:
        raise ValueError(f"{op}: pass allowed_token_ids or banned_token_ids, not both")
    allows = allowed_token_ids is not None
    mask = _token_mask(allowed_token_ids if allows else banned_token_ids,
                       "allowed_token_ids" if allows else "banned_token_ids", op, B, V, logits.device)
    return ops.apply_penalties(logits, r_t, float(r_v), f_t, float(f_v), p_t, float(p_v), ids, counts, dense,
                               bias_ids, bias_vals, mask, allows, vs)


_PENALTY_KEYS = ("repetition_penalty", "frequency_penalty", "presence_penalty", "token_ids", "token_counts",
                 "logit_bias", "allowed_token_ids", "banned_token_ids")


# ------------------------------------------------------------------ linear ----
def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Batch-invariant ``x @ weight.T + bias``: each output row is bit-identical whatever M is.

    The stock CPU GEMM picks its blocking of the inner dimension from the problem size,
    so a row's result changes with the number of rows in the call; batched decoding and
    speculative verification (M = K + 1 rows) then cannot reproduce one-row decoding.
    Here every output element is the same sequence of fused multiply-adds over K
    (16 lanes, lane j takes k = j mod 16 in ascending k, lanes combined in a fixed tree),
    with tiles over M and N only; the result is also the same on every thread count and
    instruction set.

    Args:
        x: ``[..., K]`` float32 on the CPU (leading dimensions are flattened into M).
        weight: ``[N, K]`` float32 (rows contiguous).
        bias: ``[N]`` float32 or None.

    Returns:
        ``[..., N]`` float32 (no autograd graph: the op is not differentiable).

    Raises:
        TypeError: a non-float32 or non-tensor argument.
        ValueError: mismatched K, wrong ranks, or a device other than the CPU (meta
        tensors are accepted for shape inference).

    Source: a plain tiled dot-product kernel (4 x 4 output tiles of 16-lane
    accumulators), written for batch invariance rather than peak FLOPs; at the small M
    of decoding it is memory-bound on the weights like any GEMM.
    """
    op = "linear"
    _check_float32_cpu(op, x=x, weight=weight)
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"{op}: x must be [..., K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.size(-1) != weight.size(1):
        raise ValueError(f"{op}: x has K={x.size(-1)} but weight has K={weight.size(1)} (weight is [N, K])")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype != torch.float32:
            raise TypeError(f"{op}: bias must be a float32 tensor or None")
        if tuple(bias.shape) != (weight.size(0),):
            raise ValueError(f"{op}: bias must be [N={weight.size(0)}], got {tuple(bias.shape)}")
    lead = x.shape[:-1]
    if x.size(-1) == 0:  # empty inner dimension: the products are all zero
        out = torch.zeros(*lead, weight.size(0), dtype=torch.float32, device=x.device)
        return out + bias if bias is not None else out
    x2 = x.reshape(-1, x.size(-1))
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    y = ops.linear(x2.detach(), w.detach(), None if bias is None else bias.detach().contiguous())
    return y.reshape(*lead, weight.size(0))


def _check_float32_cpu(op: str, **tensors) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise TypeError(f"{op}: {name} must be float32, got {t.dtype}")
        if t.device.type not in ("cpu", "meta"):
            raise ValueError(f"{op}: {name} is on {t.device}; this op has kernels for: CPU")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dimension: ``weight * (x * (1 / sqrt(mean(x^2) + eps)))``.

    The sum of squares of a row is accumulated in 16 float32 lanes with fused multiply-adds
    (lane j takes the columns j mod 16 in ascending order) and combined in a fixed tree, so a
    row's result never depends on the other rows, the thread count or the instruction set.

    Args:
        x: ``[..., H]`` float32 (CPU).
        weight: ``[H]`` float32.
        eps: added to the mean square (a finite float >= 0).

    Returns:
        ``[..., H]`` float32 (no autograd graph: the op is not differentiable).

    Raises:
        TypeError / ValueError naming the argument: dtypes, devices, shapes, eps.

    Source: Zhang & Sennrich, 2019, "Root Mean Square Layer Normalization".
    """
    op = "rms_norm"
    _check_float32_cpu(op, x=x, weight=weight)
    if x.dim() < 1 or weight.dim() != 1 or x.size(-1) != weight.size(0):
        raise ValueError(f"{op}: x must be [..., H] and weight [H], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 <= eps <= 3.4028234663852886e38):
        raise ValueError(f"{op}: eps must be a finite float32 number >= 0, got {eps!r:.60}")
    return ops.rms_norm(x.detach(), weight.detach().contiguous(), float(eps))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation of a fused gate/up projection: ``silu(x[..., :I]) * x[..., I:]``.

    ``silu(g) = g * sigmoid(g)``, the sigmoid computed from ``exp(-|g|)`` (no overflow for any
    finite g); element-wise, so rows are independent of each other.

    Args:
        x: ``[..., 2 * I]`` float32 (CPU), gate columns first.

    Returns:
        ``[..., I]`` float32 (no autograd graph: the op is not differentiable).

    Raises:
        TypeError / ValueError naming ``x``: dtype, device, odd last dimension.

    Source: Shazeer, 2020, "GLU Variants Improve Transformer" (SwiGLU); Elfwing et al., 2018 (SiLU).
    """
    op = "silu_and_mul"
    _check_float32_cpu(op, x=x)
    if x.dim() < 1 or x.size(-1) % 2:
        raise ValueError(f"{op}: x must be [..., 2 * I] (gate then up), got {tuple(x.shape)}")
    return ops.silu_and_mul(x.detach())


def apply_rope_(x: torch.Tensor, num_heads: int, cos_table: torch.Tensor, sin_table: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding in place ("rotate half" layout), for the first ``num_heads``
    heads of each token row.

    For token ``n`` at position ``p = positions[n]`` and each head ``x_h = x[n, h*D:(h+1)*D]``:
    ``x_h <- x_h * cos_table[p] + rotate_half(x_h) * sin_table[p]`` with
    ``rotate_half([a, b]) = [-b, a]``, each product rounded to float32 before the sum (exactly
    the bits of that float32 expression in PyTorch). Queries and keys that sit side by side in a
    fused QKV projection are rotated in one call.

    Args:
        x: ``[N, C]`` float32 (CPU), unit column stride, ``C >= num_heads * D``; modified in place.
        num_heads: heads to rotate (int >= 0).
        cos_table, sin_table: ``[P, D]`` float32 (``D`` even), e.g. from
            :func:`decodekit.models.llama.rope_table`.
        positions: int64 ``[N]`` in ``[0, P)``.

    Returns:
        ``x``.

    Raises:
        TypeError / ValueError naming the argument: dtypes, shapes, a position outside the table,
        rows of ``x`` that overlap in memory (an expanded tensor); RuntimeError when ``x``
        requires grad (the kernel is not differentiable).

    Source: Su et al., 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding".
    """
    op = "apply_rope_"
    _check_float32_cpu(op, x=x, cos_table=cos_table, sin_table=sin_table)
    if x.dim() != 2 or (x.size(1) > 1 and x.stride(1) != 1):
        raise ValueError(f"{op}: x must be [N, C] with unit column stride, got shape {tuple(x.shape)}")
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{op}: x requires grad; this in-place kernel is not differentiable (use it under "
                           "torch.no_grad() or on a tensor without grad)")
    if cos_table.dim() != 2 or cos_table.shape != sin_table.shape or cos_table.size(1) % 2:
        raise ValueError(f"{op}: cos_table and sin_table must be [P, D] of one shape with D even, got "
                         f"{tuple(cos_table.shape)} and {tuple(sin_table.shape)}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 0 or \
            num_heads * cos_table.size(1) > x.size(1):
        raise ValueError(f"{op}: num_heads must be an int in [0, C / D = {x.size(1) // max(1, cos_table.size(1))}], "
                         f"got {num_heads!r}")
    if x.size(0) > 1 and num_heads and x.stride(0) < num_heads * cos_table.size(1):
        raise ValueError(f"{op}: the rows of x overlap in memory (row stride {x.stride(0)} < {num_heads} heads x "
                         f"{cos_table.size(1)}); rotating in place needs distinct rows (e.g. x.contiguous())")
    if not isinstance(positions, torch.Tensor) or positions.dtype.is_floating_point or positions.dtype == torch.bool \
            or positions.dim() != 1 or positions.size(0) != x.size(0):
        raise ValueError(f"{op}: positions must be an integer tensor [N={x.size(0)}]")
    positions = positions.to(torch.int64).contiguous()
    if x.device.type == "meta":
        return x
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= cos_table.size(0)):
        raise ValueError(f"{op}: positions must be in [0, {cos_table.size(0)}), got "
                         f"[{int(positions.min())}, {int(positions.max())}]")
    ops.rope_(x, num_heads, cos_table.contiguous(), sin_table.contiguous(), positions)
    return x
