"""Sampling family: softmax, argmax, sampling from logits or probabilities, the filters
(top-k, top-p, min-p) and :class:`SamplingOutput`.

Every wrapper checks shapes, dtypes, devices and parameter ranges and raises
``TypeError``/``ValueError`` naming the argument, what was given and what is allowed. The
checks that look at tensor *data* (parameter tensors out of range, NaN rows) synchronise with
the device; ``validate=False`` skips them (for CUDA graphs and ``torch.compile``), in which case
invalid rows (bad data, a parameter out of range, a negative offset) come back marked (-1 and
``valid == False``; NaN rows for softmax and filters) instead of raising. The ops are not
differentiable: their outputs carry no autograd graph. Conventions (tie-breaks, RNG keying,
chain order) are those of the project's DESIGN.md.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from .._checks import (
    T_TINY,
    WHY_LOGITS,
    WHY_PROBS,
    RowParam,
    all_greedy,
    check_bool,
    check_logits,
    check_probs,
    check_vocab_size,
    clamp_top_k,
    filter_args,
    has_data,
    host_bool,
    logprob_args,
    negative_offset,
    raise_invalid_rows,
    row_param,
    seed_and_offset,
)
from .._loader import _C
from .penalties import PENALTY_KEYS, apply_penalties

ops = torch.ops.decodekit

__all__ = [
    "SamplingOutput",
    "softmax",
    "argmax",
    "sample_from_logits",
    "sample_from_probs",
    "filter_probs",
    "top_k_renorm_probs",
    "top_p_renorm_probs",
    "min_p_renorm_probs",
    "top_k_mask_logits",
    "processed_probs",
]

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
    if vocab_size is None and validate is True and not torch.compiler.is_compiling():
        probs = _softmax_fast(logits, temperature, deterministic)  # as in sample_from_logits
        if probs is not None:
            return probs
    op = "softmax"
    logits = check_logits(logits, op)
    vs = check_vocab_size(vocab_size, logits.size(1), op)
    t_tensor, t_val = row_param(
        temperature,
        "temperature",
        op,
        logits,
        integer=False,
        dtype=torch.float32,
        lo=0.0,
        hi=None,
        validate=validate,
        allowed="finite and >= 0",
        tiny_positive=T_TINY,
    )
    probs = ops.softmax(logits, t_tensor, float(t_val), vs, check_bool(deterministic, "deterministic", op))
    if validate and has_data(probs):
        bad = torch.isnan(probs[:, 0])
        if host_bool(bad.any(), op):
            raise_invalid_rows(op, ~bad, hint=False)
    return probs


def argmax(
    logits: torch.Tensor, *, vocab_size: Optional[int] = None, return_valid: bool = False, validate: bool = True
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
    logits = check_logits(logits, op)
    vs = check_vocab_size(vocab_size, logits.size(1), op)
    ids, valid = ops.argmax(logits, vs)
    if return_valid:
        return ids, valid
    if validate and has_data(valid) and not host_bool(valid.all(), op):
        raise_invalid_rows(op, valid)
    return ids


def _sampling_result(op, out, rng, return_valid, return_logprobs, n_top, validate, why):
    ids, valid, lp, top_ids, top_lp = out
    if not validate:
        # A negative offset (only possible with validate=False) marks the row invalid: tensor
        # ops only, so this also runs under torch.compile and CUDA graphs.
        neg = negative_offset(rng[2], rng[3])
        if neg is True:
            neg = torch.ones_like(valid)
        if isinstance(neg, torch.Tensor):
            valid = valid & ~neg
            ids = ids.masked_fill(neg, -1)
            if return_logprobs:
                lp = lp.masked_fill(neg, float("nan"))
    if validate and has_data(ids) and not return_valid and not host_bool(valid.all(), op):
        raise_invalid_rows(op, valid, why)
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
        seed: int in ``[-2^63, 2^64)`` (every row the same Philox key; its low 64
            bits, so ``-1`` and ``2^64 - 1`` are one key) or ``[B]`` int64 tensor.
            The random numbers of a row depend only on (seed, offset), never on
            the batch. Required (or ``generator``) unless every row is greedy.
        offset: int in ``[0, 2^64)`` or ``[B]`` int64 tensor (``>= 0``): the
            Philox counter, e.g. the decoding step.
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
    if (
        not penalties
        and generator is None
        and vocab_size is None
        and validate is True
        and not return_valid
        and not return_logprobs
        and top_logprobs == 0
        and (type(seed) is int or type(seed) is torch.Tensor)
        and not torch.compiler.is_compiling()
    ):
        # The common call: plain arguments checked and the CPU op called directly, without
        # the torch.ops dispatch that costs tens of microseconds on cold caches (a model
        # forward runs between two calls). None for anything else: the full path below
        # then runs and raises the precise error.
        ids = _sample_from_logits_fast(logits, temperature, top_k, top_p, min_p, seed, offset, deterministic)
        if ids is not None:
            return ids
    op = "sample_from_logits"
    logits = check_logits(logits, op)
    B, V = logits.shape
    vs = check_vocab_size(vocab_size, V, op)
    unknown = set(penalties) - set(PENALTY_KEYS)
    if unknown:
        raise TypeError(f"{op}: unexpected keyword arguments {sorted(unknown)}; penalties are {list(PENALTY_KEYS)}")
    raw_logits = logits
    if any(v is not None for v in penalties.values()):
        logits = apply_penalties(logits, vocab_size=vocab_size, validate=validate, **penalties)
    t_t, t_v = _temperature_arg(temperature, op, logits, validate)
    k_t, k_v, p_t, p_v, m_t, m_v = filter_args(op, logits, top_k, top_p, min_p, validate)
    needs_rng = B > 0 and logits.device.type != "meta"  # shape-only calls draw nothing
    if seed is None and generator is None and needs_rng:
        needs_rng = not all_greedy(op, t_t, t_v, k_t, k_v, p_t, p_v)
    n_top, raw = logprob_args(op, top_logprobs, logprobs_mode, vs)
    rng = seed_and_offset(seed, offset, generator, logits, op, needs_rng, validate)
    s_t, s_v, o_t, o_v = rng
    ids, valid, lp, top_ids, top_lp = ops.sample_from_logits(
        logits,
        t_t,
        float(t_v),
        k_t,
        int(k_v),
        p_t,
        float(p_v),
        m_t,
        float(m_v),
        s_t,
        int(s_v),
        o_t,
        int(o_v),
        vs,
        check_bool(deterministic, "deterministic", op),
        check_bool(return_logprobs, "return_logprobs", op),
        n_top,
        raw,
    )
    if raw and logits is not raw_logits and B > 0 and (return_logprobs or n_top):
        # Raw logprobs are of the logits passed in, before the penalties.
        raw_lp = torch.log_softmax(raw_logits[:, :vs].double(), dim=-1)
        safe = ids.clamp(min=0)
        lp = raw_lp.gather(1, safe[:, None])[:, 0].float().masked_fill(~valid, float("nan")) if return_logprobs else lp
        if n_top:
            top_lp, top_ids = _top_n_rank(raw_lp, n_top)
    out = (ids, valid, lp, top_ids, top_lp)
    return _sampling_result(op, out, rng, return_valid, return_logprobs, n_top, validate, WHY_LOGITS)


# ------------------------------------------------------- probability ops ----
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
    probs = check_probs(probs, op)
    B, V = probs.shape
    vs = check_vocab_size(vocab_size, V, op)
    k_t, k_v, p_t, p_v, m_t, m_v = filter_args(op, probs, top_k, top_p, min_p, validate)
    needs_rng = B > 0 and probs.device.type != "meta"  # shape-only calls draw nothing
    if seed is None and generator is None and needs_rng:
        needs_rng = not all_greedy(op, None, 1.0, k_t, k_v, p_t, p_v)
    rng = seed_and_offset(
        seed, offset, generator, probs, op, needs_rng, validate, why="when any row samples (top_k != 1 and top_p > 0)"
    )
    s_t, s_v, o_t, o_v = rng
    n_top, raw = logprob_args(op, top_logprobs, logprobs_mode, vs)
    out = ops.sample_from_probs(
        probs,
        k_t,
        k_v,
        p_t,
        p_v,
        m_t,
        m_v,
        s_t,
        int(s_v),
        o_t,
        int(o_v),
        vs,
        check_bool(deterministic, "deterministic", op),
        check_bool(return_logprobs, "return_logprobs", op),
        n_top,
        raw,
    )
    return _sampling_result(op, out, rng, return_valid, return_logprobs, n_top, validate, WHY_PROBS)


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
        vocab_size: columns at or past it are padding and come back as 0; the row
            is its first ``vocab_size`` entries (padding mass is not part of it).
        validate: raise for invalid rows and out-of-range parameter tensors
            (synchronises); with ``False`` invalid rows come back as NaN.

    Returns:
        ``[B, V]`` float32: kept entries divided by their float64 sum, the rest
        0. A row from which the filters remove no positive entry of
        ``[0, vocab_size)`` is returned bit for bit unchanged there (no
        renormalisation: it sums to what those entries summed to, e.g.
        ``[0.3, 0.3, 0.4]`` with ``vocab_size=2`` gives ``[0.3, 0.3, 0]``).

    Raises:
        TypeError / ValueError naming the argument; ValueError naming the rows
        with a NaN, a negative or infinite entry, or no positive entry.

    Source: the chain order of HF transformers' logits warpers; nucleus
    sampling (Holtzman et al., 2020); min-p (Nguyen et al., 2024). No sort of
    the vocabulary: exact top-k candidates from one pass, top-p by a
    quickselect over the tokens that can be in the nucleus.
    """
    op = _op
    probs = check_probs(probs, op, "filter_probs")
    vs = check_vocab_size(vocab_size, probs.size(1), op)
    k_t, k_v, p_t, p_v, m_t, m_v = filter_args(op, probs, top_k, top_p, min_p, validate)
    out, valid = ops.filter_probs(probs, k_t, k_v, p_t, p_v, m_t, m_v, vs)
    if validate and has_data(valid) and not host_bool(valid.all(), op):
        raise_invalid_rows(op, valid, WHY_PROBS, hint=False)
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
    logits: torch.Tensor, top_k: RowParam, *, vocab_size: Optional[int] = None, validate: bool = True
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
    logits = check_logits(logits, op)
    vs = check_vocab_size(vocab_size, logits.size(1), op)
    k_t, k_v = row_param(
        top_k,
        "top_k",
        op,
        logits,
        integer=True,
        dtype=torch.int64,
        lo=None,
        hi=None,
        validate=validate,
        allowed="an int (<= 0 disables)",
    )
    out, valid = ops.top_k_mask_logits(logits, k_t, clamp_top_k(k_v), vs)
    if validate and has_data(valid) and not host_bool(valid.all(), op):
        raise ValueError(
            f"{op}: rows {torch.nonzero(~valid).flatten().tolist()[:16]} have a NaN; "
            "pass validate=False to get them back unchanged"
        )
    return out


def _temperature_arg(temperature, op: str, logits: torch.Tensor, validate: bool):
    """``temperature`` as the ops take it: a float32 [B] tensor or a number (>= 0, finite;
    positive values below float32's smallest normal act as it)."""
    return row_param(
        temperature,
        "temperature",
        op,
        logits,
        integer=False,
        dtype=torch.float32,
        lo=0.0,
        hi=None,
        validate=validate,
        allowed="finite and >= 0",
        tiny_positive=T_TINY,
    )


def processed_probs(
    logits: torch.Tensor,
    temperature: RowParam = 1.0,
    top_k: RowParam = 0,
    top_p: RowParam = 1.0,
    min_p: RowParam = 0.0,
    *,
    vocab_size: Optional[int] = None,
    deterministic: bool = True,
    validate: bool = True,
) -> torch.Tensor:
    """The distribution :func:`sample_from_logits` draws from, as float32 probabilities.

    One fused op: the sampler's own chain (temperature -> top-k -> top-p with the float64
    rule -> min-p), so the kept set is exactly the set of tokens :func:`sample_from_logits`
    can draw; each kept weight ``exp((x - max) / T)`` is divided by the kept set's total.
    Speculative verification (:func:`chain_speculative_sampling_from_logits`) and the
    transformers adapter use it, so lossless speculative decoding targets this distribution.

    Args:
        logits: ``[N, V]`` float32 / float16 / bfloat16 (CPU or CUDA).
        temperature, top_k, top_p, min_p: numbers or ``[N]`` tensors, as in
            :func:`sample_from_logits`.
        vocab_size: columns at or past it are padding (probability 0).
        deterministic: as in :func:`sample_from_logits`.
        validate: check parameter values and raise for rows with a NaN (synchronises).

    Returns:
        float32 ``[N, V]``: rows summing to 1 (within float32 rounding); a ``T == 0`` row is
        one-hot at the argmax; with ``validate=False`` an invalid row is NaN.

    Raises:
        TypeError / ValueError naming the argument; ValueError naming the rows with a NaN.

    Source: top-k (Fan et al., 2018), nucleus sampling (Holtzman et al., 2020), min-p
    (Nguyen et al., 2024), in HF transformers' order.

    Example:
        >>> decodekit.processed_probs(torch.tensor([[1.0, 2.0, 3.0]]), 1.0, top_k=2)
        tensor([[0.0000, 0.2689, 0.7311]])
    """
    op = "processed_probs"
    logits = check_logits(logits, op)
    vs = check_vocab_size(vocab_size, logits.size(1), op)
    t_t, t_v = _temperature_arg(temperature, op, logits, validate)
    k_t, k_v, p_t, p_v, m_t, m_v = filter_args(op, logits, top_k, top_p, min_p, validate)
    probs, valid = ops.processed_probs(logits, t_t, t_v, k_t, k_v, p_t, p_v, m_t, m_v, vs, deterministic)
    if validate and has_data(valid) and not host_bool(valid.all(), op):
        raise ValueError(
            f"{op}: rows {torch.nonzero(~valid).flatten().tolist()[:16]} {WHY_LOGITS}; "
            "pass validate=False to get them back as NaN"
        )
    return probs
