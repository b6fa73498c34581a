"""Speculative family: verification of drafted tokens: lossless rejection sampling and greedy verification.

A drafter proposes K tokens; the target model scores all K + 1 positions in one pass; these
ops decide which drafts to keep and which token to emit next, so that the emitted tokens
have exactly the target's distribution (Leviathan et al., ICML 2023; Chen et al., 2023).
Both return :class:`SpeculativeOutput`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from .._checks import check_device, check_vocab_size, has_data, host_bool, same_device, seed_and_offset
from .sampling import argmax, processed_probs

ops = torch.ops.decodekit

__all__ = ["SpeculativeOutput", "chain_speculative_sampling", "chain_speculative_sampling_from_logits", "greedy_verify"]


class SpeculativeOutput(NamedTuple):
    """``output_token_ids`` int64 ``[B, K + 1]`` (the emitted tokens, then -1),
    ``num_accepted`` int64 ``[B]`` (drafts kept), ``num_emitted`` int64 ``[B]``
    (``num_accepted + 1``: the kept drafts plus the recovered or bonus token)."""

    output_token_ids: torch.Tensor
    num_accepted: torch.Tensor
    num_emitted: torch.Tensor


def _check_drafts(op: str, draft_token_ids, B_expected: Optional[int] = None) -> torch.Tensor:
    if not isinstance(draft_token_ids, torch.Tensor):
        raise TypeError(f"{op}: draft_token_ids must be an int64 [B, K] tensor, got {type(draft_token_ids).__name__}")
    if draft_token_ids.dim() != 2:
        raise ValueError(f"{op}: draft_token_ids must be [B, K], got shape {tuple(draft_token_ids.shape)}")
    if draft_token_ids.dtype.is_floating_point or draft_token_ids.dtype == torch.bool:
        raise TypeError(f"{op}: draft_token_ids must be an integer tensor, got {draft_token_ids.dtype}")
    return draft_token_ids.to(torch.int64).contiguous()


def chain_speculative_sampling(
    draft_probs: Optional[torch.Tensor],
    draft_token_ids: torch.Tensor,
    target_probs: torch.Tensor,
    *,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Union[int, torch.Tensor] = 0,
    generator: Optional[torch.Generator] = None,
    vocab_size: Optional[int] = None,
    deterministic: bool = True,
    validate: bool = True,
) -> SpeculativeOutput:
    """Lossless verification of a chain of drafted tokens.

    Draft ``x`` at position ``j`` is accepted while ``u_j * q(x) < p(x)`` (float64, strict,
    so a token the target gives probability 0 is never accepted; ``u_j`` is Philox stream 1,
    number ``j``). At the first rejection the emitted token is drawn from
    ``max(0, p - q)`` normalised by its sum (or from ``p`` when that residual has no mass)
    with stream ``2 + j``; if every real draft passes, a bonus token is drawn from the
    target's next distribution ``target_probs[:, n]`` with stream ``2 + n`` (``n`` real drafts).

    Args:
        draft_probs: float32 ``[B, K, V]`` draft distributions the drafts were sampled from, or
            None for one-hot drafts (n-gram / prompt lookup, greedy drafters).
        draft_token_ids: int64 ``[B, K]``; ``-1`` pads shorter drafts (everything after the
            first -1 is ignored).
        target_probs: float32 ``[B, K + 1, V]`` target distributions at the K draft positions and
            the bonus position (after any temperature / filters the caller applies).
        seed, offset, generator: the per-request Philox key and counter (DESIGN.md), as in
            :func:`decodekit.sample_from_logits`; one of seed / generator is required.
        vocab_size: columns at or past it are padding: never emitted, and the probabilities are
            renormalised over ``[0, vocab_size)`` (rows need not sum to 1). A draft id at or past
            it is an error with ``validate=True`` and ends the chain with ``validate=False``.
        deterministic: accepted for symmetry; the kernel is deterministic in both modes.
        validate: check shapes' data (non-negative, finite probabilities; draft ids in
            ``[-1, vocab_size)``); synchronises.

    Returns:
        :class:`SpeculativeOutput`.

    Raises:
        TypeError / ValueError naming the argument: shapes, dtypes, devices, negative or NaN
        probabilities, draft ids out of range, missing seed.

    Source: Leviathan, Kalman & Matias, ICML 2023; Chen et al., arXiv:2302.01318.
    """
    op = "chain_speculative_sampling"
    ids = _check_drafts(op, draft_token_ids)
    B, K = ids.shape
    if not isinstance(target_probs, torch.Tensor) or target_probs.dim() != 3:
        raise ValueError(f"{op}: target_probs must be a float32 [B, K + 1, V] tensor")
    if target_probs.dtype != torch.float32:
        raise TypeError(f"{op}: target_probs must be float32, got {target_probs.dtype}")
    if tuple(target_probs.shape[:2]) != (B, K + 1):
        raise ValueError(f"{op}: target_probs must be [B={B}, K+1={K + 1}, V], got {tuple(target_probs.shape)}")
    V = target_probs.size(2)
    if V < 1:
        raise ValueError(f"{op}: target_probs must have V >= 1 columns")
    if draft_probs is not None:
        if not isinstance(draft_probs, torch.Tensor) or draft_probs.dtype != torch.float32:
            raise TypeError(f"{op}: draft_probs must be a float32 [B, K, V] tensor or None")
        if tuple(draft_probs.shape) != (B, K, V):
            raise ValueError(f"{op}: draft_probs must be [B={B}, K={K}, V={V}], got {tuple(draft_probs.shape)}")
    same_device(op, "target_probs", target_probs, draft_token_ids=ids, draft_probs=draft_probs)
    check_device(op, op, "target_probs", target_probs)
    vs = check_vocab_size(vocab_size, V, op)
    if validate and has_data(target_probs):
        if ids.numel() and host_bool(((ids < -1) | (ids >= vs)).any(), op):
            raise ValueError(f"{op}: draft_token_ids must be in [-1, vocab_size={vs}) (-1 pads shorter drafts)")
        # One parallel pass per tensor (C++): entries finite and >= 0; target rows with mass.
        for name, t in (("target_probs", target_probs), ("draft_probs", draft_probs)):
            if t is None or not t.numel():
                continue
            status = ops.check_probability_rows(t.detach().contiguous(), vs, name == "target_probs")
            if status == 1:
                raise ValueError(f"{op}: {name} must be finite and >= 0")
            if status == 2:
                raise ValueError(f"{op}: every target_probs row needs positive mass in [0, vocab_size)")
    needs_rng = B > 0 and target_probs.device.type != "meta"  # shape-only calls draw nothing
    s_t, s_v, o_t, o_v = seed_and_offset(seed, offset, generator, target_probs, op, needs_rng, validate)
    out, acc, emit = ops.chain_speculative_sampling(
        None if draft_probs is None else draft_probs.detach().contiguous(),
        ids,
        target_probs.detach().contiguous(),
        s_t,
        int(s_v),
        o_t,
        int(o_v),
        vs,
    )
    return SpeculativeOutput(out, acc, emit)


def greedy_verify(
    draft_token_ids: torch.Tensor, target_logits: torch.Tensor, *, vocab_size: Optional[int] = None
) -> SpeculativeOutput:
    """Greedy verification: keep drafts while they equal the target's argmax.

    Accepts draft ``j`` while it equals ``argmax(target_logits[:, j])`` (lowest index on
    ties, :func:`decodekit.argmax`); emits the target's token at the first mismatch, or the
    bonus token ``argmax(target_logits[:, n])`` after ``n`` real drafts. Reproduces plain
    greedy decoding token for token when the target logits do.

    Args:
        draft_token_ids: int64 ``[B, K]``, ``-1`` padding after the last real draft.
        target_logits: ``[B, K + 1, V]`` float32 / float16 / bfloat16.
        vocab_size: columns at or past it are padding.

    Returns:
        :class:`SpeculativeOutput`.

    Raises:
        TypeError / ValueError naming the argument; ValueError for target rows with a NaN
        or no finite logit.
    """
    op = "greedy_verify"
    ids = _check_drafts(op, draft_token_ids)
    B, K = ids.shape
    if (
        not isinstance(target_logits, torch.Tensor)
        or target_logits.dim() != 3
        or tuple(target_logits.shape[:2]) != (B, K + 1)
    ):
        raise ValueError(f"{op}: target_logits must be [B={B}, K+1={K + 1}, V]")
    V = target_logits.size(2)
    if ids.device != target_logits.device:
        raise ValueError(f"{op}: draft_token_ids are on {ids.device} but target_logits on {target_logits.device}")
    if V < 1:
        raise ValueError(f"{op}: target_logits must have V >= 1 columns")
    vs = check_vocab_size(vocab_size, V, op)
    if has_data(ids) and host_bool(((ids < -1) | (ids >= vs)).any(), op):
        bad = torch.nonzero((ids < -1) | (ids >= vs)).tolist()[:8]
        raise ValueError(
            f"{op}: draft_token_ids must be in [-1, vocab_size={vs}) (-1 pads shorter drafts); "
            f"(request, position) {[tuple(b) for b in bad]} have {[int(ids[r, j]) for r, j in bad]}"
        )
    top, valid = argmax(target_logits.reshape(B * (K + 1), V), vocab_size=vocab_size, return_valid=True)
    if has_data(valid) and not host_bool(valid.all(), op):
        bad = [divmod(int(i), K + 1) for i in torch.nonzero(~valid).flatten()[:8]]
        raise ValueError(f"{op}: target_logits rows (request, position) {bad} have a NaN or no finite logit")
    top = top.reshape(B, K + 1)
    real = torch.cumprod((ids >= 0).to(torch.int64), dim=1)
    match = torch.cumprod(((ids == top[:, :K]) & (real > 0)).to(torch.int64), dim=1)
    num_accepted = match.sum(1)
    out = torch.full((B, K + 1), -1, dtype=torch.int64, device=ids.device)
    pos = torch.arange(K + 1, device=ids.device)[None, :]
    out[:, :K] = torch.where(pos[:, :K] < num_accepted[:, None], ids, -1)
    out.scatter_(1, num_accepted[:, None], top.gather(1, num_accepted[:, None]))
    return SpeculativeOutput(out, num_accepted, num_accepted + 1)


def _expand(param, B: int, per: int):
    """A scalar stays; a [B] tensor is repeated for each of the ``per`` positions of its row."""
    if isinstance(param, torch.Tensor) and param.dim() == 1:
        if param.size(0) != B:
            raise ValueError(f"chain_speculative_sampling_from_logits: per-row parameters must have length B={B}")
        return param.repeat_interleave(per)
    return param


def chain_speculative_sampling_from_logits(
    draft_logits: Optional[torch.Tensor],
    draft_token_ids: torch.Tensor,
    target_logits: torch.Tensor,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    *,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Union[int, torch.Tensor] = 0,
    generator: Optional[torch.Generator] = None,
    vocab_size: Optional[int] = None,
    validate: bool = True,
) -> SpeculativeOutput:
    """:func:`chain_speculative_sampling` on logits, with the sampler's processing applied to both.

    Temperature, top-k, top-p and min-p (scalars or ``[B]`` tensors, one value per request)
    are applied exactly as in :func:`decodekit.processed_probs` to the draft distributions and to the
    target distributions at every position, the bonus position included, so the emitted tokens
    follow the processed target distribution.

    Args:
        draft_logits: ``[B, K, V]`` or None (one-hot drafts).
        draft_token_ids: int64 ``[B, K]`` (-1 padding).
        target_logits: ``[B, K + 1, V]``.
        temperature, top_k, top_p, min_p: the sampling parameters.
        seed, offset, generator, vocab_size, validate: as in :func:`chain_speculative_sampling`
            (``vocab_size`` in ``[1, V]``; the columns past it are dropped before processing).

    Returns:
        :class:`SpeculativeOutput`.

    Raises:
        TypeError / ValueError naming the argument, as :func:`chain_speculative_sampling` and
        :func:`decodekit.processed_probs`; ``vocab_size`` outside ``[1, V]``.

    Example:
        >>> out = decodekit.chain_speculative_sampling_from_logits(
        ...     None, torch.tensor([[5, 7]]), torch.randn(1, 3, 32), temperature=0.8, seed=1, offset=10)
        >>> out.num_emitted
    """
    op = "chain_speculative_sampling_from_logits"
    if not isinstance(target_logits, torch.Tensor) or target_logits.dim() != 3:
        raise ValueError(f"{op}: target_logits must be [B, K + 1, V]")
    B, K1, V = target_logits.shape
    vs = check_vocab_size(vocab_size, V, op)
    if seed is None and generator is None:
        # Greedy processing leaves one token per position: nothing is random, no seed needed.
        greedy = [
            (p == 0) if not isinstance(p, torch.Tensor) else bool((p == 0).all()) for p in (temperature, top_p)
        ] + [(top_k == 1) if not isinstance(top_k, torch.Tensor) else bool((top_k == 1).all())]
        if any(greedy):
            seed = 0
    params = [_expand(p, B, K1) for p in (temperature, top_k, top_p, min_p)]
    if vs < V:
        target_logits = target_logits[..., :vs]
    target = processed_probs(target_logits.reshape(B * K1, -1), *params, validate=validate).reshape(B, K1, -1)
    draft = None
    if draft_logits is not None:
        if not isinstance(draft_logits, torch.Tensor) or tuple(draft_logits.shape) != (B, K1 - 1, V):
            raise ValueError(f"{op}: draft_logits must be [B={B}, K={K1 - 1}, V={V}] or None")
        if vs < V:
            draft_logits = draft_logits[..., :vs]
    if draft_logits is not None and K1 == 1:
        draft = torch.zeros(B, 0, target.size(2))
    elif draft_logits is not None:
        dparams = [_expand(p, B, K1 - 1) for p in (temperature, top_k, top_p, min_p)]
        draft = processed_probs(draft_logits.reshape(B * (K1 - 1), -1), *dparams, validate=validate)
        draft = draft.reshape(B, K1 - 1, -1)
    return chain_speculative_sampling(
        draft, draft_token_ids, target.contiguous(), seed=seed, offset=offset, generator=generator, validate=validate
    )
