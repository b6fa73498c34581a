"""Speculative family: verification of drafted tokens: lossless rejection sampling and greedy verification.

A drafter proposes K tokens (a chain) or a tree of candidates; the target model scores every
position in one pass; these ops decide which drafts to keep and which token to emit next.
Chain ops (Leviathan et al., ICML 2023; Chen et al., 2023) return :class:`SpeculativeOutput`;
tree ops (SpecInfer, Miao et al., ASPLOS 2024; Medusa, Cai et al., ICML 2024) return
:class:`TreeOutput`.

Trees. One tree per request, its nodes in a flat array of ``N`` in topological order:
``candidates`` int64 ``[B, N]`` holds node ``n``'s token, ``parents`` int64 ``[B, N]`` its
parent's index. Node 0 is the root (the last accepted token, whose id is not used for
verification) with parent -1; every other real node has a real parent with a smaller index;
``-1`` in ``candidates`` marks a padding node (anywhere after the root; its ``parents`` entry
is ignored, and it may not have real children). ``target_probs[b, n]`` (or the logits) is the
target's distribution for the token after node ``n``. Siblings are tried in ascending node
index. The depth of a node is its number of edges from the root; ``max_depth`` (``D``) bounds
the accepted path, so the outputs have the static width ``D + 1``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from .._checks import (
    check_device,
    check_int,
    check_vocab_size,
    has_data,
    host_bool,
    row_param,
    same_device,
    seed_and_offset,
)
from .sampling import argmax, processed_probs

ops = torch.ops.decodekit

__all__ = [
    "SpeculativeOutput",
    "TreeOutput",
    "chain_speculative_sampling",
    "chain_speculative_sampling_from_logits",
    "greedy_verify",
    "tree_speculative_sampling",
    "typical_acceptance",
    "greedy_tree_verify",
]


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
    s_t, s_v, o_t, o_v = seed_and_offset(
        seed, offset, generator, target_probs, op, needs_rng, validate, why="for the acceptance tests and the draws"
    )
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


# ------------------------------------------------------------------ trees ----
class TreeOutput(NamedTuple):
    """The result of a tree verification; ``D`` = ``max_depth``.

    * ``output_token_ids`` int64 ``[B, D + 1]``: the accepted tokens (root excluded) in path
      order, then the emitted token (recovered or bonus), then -1;
    * ``num_accepted`` int64 ``[B]``: accepted tree nodes (the root is not counted);
    * ``num_emitted`` int64 ``[B]``: ``num_accepted + 1``;
    * ``accepted_nodes`` int64 ``[B, D + 1]``: the flat node indices of the accepted path,
      root excluded, in depth order, then -1: ``accepted_nodes[b, j]`` is the node whose token
      is ``output_token_ids[b, j]`` for ``j < num_accepted[b]``; column ``num_accepted[b]``
      is -1 (the emitted token is no tree node). KV-cache compaction keeps the root and these
      nodes.
    """

    output_token_ids: torch.Tensor
    num_accepted: torch.Tensor
    num_emitted: torch.Tensor
    accepted_nodes: torch.Tensor


def _ids_tensor(op: str, name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be an int64 [B, N] tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{op}: {name} must be an integer (int64) tensor, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be [B, N], got shape {tuple(t.shape)}")
    return t.to(torch.int64).contiguous()


def _pairs(mask: torch.Tensor, values: Optional[torch.Tensor] = None, limit: int = 8) -> str:
    """'(request, node)' pairs of a [B, N] mask, with the values there."""
    where = torch.nonzero(mask)[:limit].tolist()
    text = str([tuple(w) for w in where])
    if values is not None:
        text += f" have {[int(values[b, n]) for b, n in where]}"
    return text


def _tree_depths(candidates: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
    """Depth of each node ([B, N] int64, 0 for the root and for padding) by pointer jumping
    (ceil(log2 N) rounds of tensor ops); exact for trees that pass :func:`_check_tree`."""
    B, N = candidates.shape
    real = candidates >= 0
    real[:, 0] = False  # the root is at depth 0
    idx = torch.arange(N, device=candidates.device)
    ok = real & (parents >= 0) & (parents < idx)  # anything else is ignored by the kernels
    anc = torch.where(ok, parents, 0)
    depth = ok.to(torch.int64)
    for _ in range(max(1, (N - 1).bit_length())):
        depth = depth + depth.gather(1, anc)
        anc = anc.gather(1, anc)
    return depth


def _check_tree(op: str, candidates, parents, vs: int, max_depth, validate: bool):
    """Validates a batch of trees; returns (candidates, parents, max_depth) for the kernel."""
    cand = _ids_tensor(op, "candidates", candidates)
    par = _ids_tensor(op, "parents", parents)
    if cand.shape != par.shape:
        raise ValueError(
            f"{op}: candidates and parents must have the same shape [B, N], got {tuple(cand.shape)} and "
            f"{tuple(par.shape)}"
        )
    if cand.device != par.device:
        raise ValueError(f"{op}: parents are on {par.device} but candidates on {cand.device}")
    B, N = cand.shape
    if not 1 <= N <= 2**16:
        raise ValueError(f"{op}: a tree has N in [1, 65536] nodes (node 0 is the root), got N={N}")
    if max_depth is not None:
        max_depth = check_int(max_depth, "max_depth", op, lo=0)
        if max_depth > N - 1:
            raise ValueError(f"{op}: max_depth must be in [0, N - 1 = {N - 1}], got {max_depth}")
    readable = has_data(cand)
    if validate and readable:
        idx = torch.arange(N, device=cand.device)
        bad = (cand < -1) | (cand >= vs)
        if host_bool(bad.any(), op):
            raise ValueError(
                f"{op}: candidates must be in [-1, vocab_size={vs}) (-1 marks padding nodes); "
                f"(request, node) {_pairs(bad, cand)}"
            )
        if host_bool((cand[:, 0] < 0).any(), op):
            rows = torch.nonzero(cand[:, 0] < 0).flatten().tolist()[:8]
            raise ValueError(f"{op}: node 0 is the root and must hold a real token; requests {rows} have -1")
        if host_bool((par[:, 0] != -1).any(), op):
            rows = torch.nonzero(par[:, 0] != -1).flatten().tolist()[:8]
            raise ValueError(
                f"{op}: the root is node 0, with parent -1; requests {rows} have parents[:, 0] = "
                f"{[int(par[r, 0]) for r in rows]}"
            )
        real = (cand >= 0) & (idx > 0)
        second_root = real & (par == -1)
        if host_bool(second_root.any(), op):
            raise ValueError(
                f"{op}: only node 0 may be the root (parent -1); real nodes (request, node) "
                f"{_pairs(second_root)} have parent -1"
            )
        out_of_range = real & ((par < -1) | (par >= N))
        if host_bool(out_of_range.any(), op):
            raise ValueError(
                f"{op}: parents must be node indices in [0, N={N}); (request, node) {_pairs(out_of_range, par)}"
            )
        not_before = real & (par >= idx)
        if host_bool(not_before.any(), op):
            raise ValueError(
                f"{op}: a node's parent must have a smaller index (topological order); (request, node) "
                f"{_pairs(not_before, par)}"
            )
        padded_parent = real & (cand.gather(1, par.clamp(0, N - 1)) < 0)
        if host_bool(padded_parent.any(), op):
            raise ValueError(
                f"{op}: padding nodes (candidates -1) cannot have real children; (request, node) "
                f"{_pairs(padded_parent)} have a padding parent, at nodes {[int(par[b, n]) for b, n in torch.nonzero(padded_parent)[:8].tolist()]}"
            )
    if readable:
        depth_max = int(_tree_depths(cand, par).max()) if max_depth is None or validate else None
        if max_depth is None:
            max_depth = min(depth_max, N - 1)
        elif validate and depth_max > max_depth:
            raise ValueError(f"{op}: max_depth={max_depth} but a tree is {depth_max} levels deep")
    elif max_depth is None:
        if torch.compiler.is_compiling() or cand.device.type == "meta":
            raise ValueError(f"{op}: pass max_depth (the output width D + 1 cannot be read from the tree here)")
        max_depth = 0  # B == 0
    return cand, par, max_depth


def _check_tree_probs(op: str, target_probs, cand: torch.Tensor, vocab_size, validate: bool) -> int:
    B, N = cand.shape
    if not isinstance(target_probs, torch.Tensor):
        raise TypeError(f"{op}: target_probs must be a float32 [B, N, V] tensor, got {type(target_probs).__name__}")
    if target_probs.dtype != torch.float32:
        raise TypeError(f"{op}: target_probs must be float32, got {target_probs.dtype}")
    if target_probs.dim() != 3 or tuple(target_probs.shape[:2]) != (B, N):
        raise ValueError(
            f"{op}: target_probs must be [B={B}, N={N}, V] (one row per tree node), got {tuple(target_probs.shape)}"
        )
    if target_probs.size(2) < 1:
        raise ValueError(f"{op}: target_probs must have V >= 1 columns")
    same_device(op, "target_probs", target_probs, candidates=cand)
    check_device(op, op, "target_probs", target_probs)
    return check_vocab_size(vocab_size, target_probs.size(2), op)


def _validate_tree_probs(op: str, target_probs: torch.Tensor, cand: torch.Tensor, vs: int) -> None:
    """Rows of real nodes: finite, >= 0, with mass in [0, vocab_size) (synchronises). One C++
    pass over every row; only when it finds a problem, the rows are located (padding nodes'
    rows are never read and may hold anything)."""
    if not has_data(target_probs):
        return
    tp = target_probs.detach().contiguous()
    if ops.check_probability_rows(tp, vs, True) == 0:
        return
    real = cand >= 0
    bad_entry = ~((tp >= 0) & (tp < float("inf"))).all(-1) & real
    if host_bool(bad_entry.any(), op):
        raise ValueError(
            f"{op}: target_probs must be finite and >= 0; rows (request, node) {_pairs(bad_entry)} are not"
        )
    no_mass = ~(tp[..., :vs] > 0).any(-1) & real
    if host_bool(no_mass.any(), op):
        raise ValueError(
            f"{op}: every real node's target_probs row needs positive mass in [0, vocab_size={vs}); "
            f"rows (request, node) {_pairs(no_mass)} have none"
        )


def tree_speculative_sampling(
    candidates: torch.Tensor,
    parents: torch.Tensor,
    target_probs: torch.Tensor,
    *,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Union[int, torch.Tensor] = 0,
    generator: Optional[torch.Generator] = None,
    max_depth: Optional[int] = None,
    vocab_size: Optional[int] = None,
    deterministic: bool = True,
    validate: bool = True,
) -> TreeOutput:
    """Lossless verification of a tree of deterministic candidates (Medusa's top-k heads,
    n-gram trees: every candidate a one-hot draft).

    The walk starts at the root. At the current node ``c`` the residual ``r`` starts as the
    target's distribution ``target_probs[b, c]``; the children of ``c`` are tried in ascending
    node index: child ``n`` with token ``x`` is accepted when ``u_n * sum(r) < r(x)`` (float64,
    strict, so a token with ``r(x) = 0`` is never accepted; ``u_n`` is the float64 uniform
    of node ``n``'s own Philox stream ``2^16 + n``, elements 0-1), and the walk moves on to it;
    a rejected child sets ``r(x) = 0`` (a sibling with the same token is then rejected too).
    When every child of ``c`` is rejected, the emitted token is drawn from ``r`` (inverse CDF
    in index order, as every decodekit draw) with the uniform of stream ``2^16 + c``, elements
    2-3. When ``c`` has no children (an accepted leaf, or a root without children), the bonus
    token is drawn from ``target_probs[b, c]`` with stream ``2^17``. Each emitted position then
    has exactly the target's distribution: with a one-hot draft, rejection sampling accepts
    ``x`` with probability ``r(x) / sum(r)`` and leaves the residual ``r`` without ``x``.

    Args:
        candidates: int64 ``[B, N]`` node tokens (module docstring: "Trees"); -1 padding.
        parents: int64 ``[B, N]`` parent indices, -1 for the root (node 0).
        target_probs: float32 ``[B, N, V]``: the target's processed distribution after each node
            (e.g. :func:`decodekit.processed_probs` with the request's temperature and filters,
            exactly as :func:`decodekit.sample_from_logits` would draw). Rows need not be
            normalised: probabilities are renormalised over ``[0, vocab_size)``.
        seed, offset, generator: the per-request Philox key and counter (DESIGN.md), as in
            :func:`chain_speculative_sampling`; one of seed / generator is required.
        max_depth: ``D``, the output width is ``D + 1``; at most ``N - 1``. None derives it from
            ``parents`` on the host (the deepest real node of the batch; synchronises). Pass it
            under ``torch.compile`` / CUDA graphs. With ``validate=False`` nodes deeper than it
            are ignored (still lossless: the tree is pruned).
        vocab_size: columns at or past it are padding, never emitted.
        deterministic: accepted for symmetry; the kernel is deterministic in both modes.
        validate: check the data (synchronises): the tree's structure, candidate ids in
            ``[-1, vocab_size)``, target rows of real nodes finite, ``>= 0`` and with mass.
            With ``validate=False`` malformed nodes are ignored, and a row read with NaN / inf /
            negative entries or no mass ends the walk there with the emitted token -1
            (``num_emitted == num_accepted``).

    Returns:
        :class:`TreeOutput`.

    Raises:
        TypeError / ValueError naming the argument: dtypes and shapes, a root that is not node
        0 with parent -1, a second root, a parent out of range, not smaller than its node or a
        padding node, ids outside ``[-1, vocab_size)``, bad probability rows, ``max_depth`` out
        of range or below the tree's depth, a missing seed.

    Source: recursive rejection sampling of deterministic candidates (Miao et al., "SpecInfer",
    ASPLOS 2024; Leviathan et al., ICML 2023, for the one-hot residual).

    Example:
        >>> cand = torch.tensor([[7, 3, 5, 2]])      # root 7; children 3 and 5; 2 under 3
        >>> par = torch.tensor([[-1, 0, 0, 1]])
        >>> probs = torch.softmax(torch.randn(1, 4, 16), -1)
        >>> out = decodekit.tree_speculative_sampling(cand, par, probs, seed=1, offset=40)
        >>> out.output_token_ids.shape                # [1, D + 1], D = 2
        torch.Size([1, 3])
    """
    op = "tree_speculative_sampling"
    cand = _ids_tensor(op, "candidates", candidates)
    vs = _check_tree_probs(op, target_probs, cand, vocab_size, validate)
    cand, par, D = _check_tree(op, cand, parents, vs, max_depth, validate)
    if validate:
        _validate_tree_probs(op, target_probs, cand, vs)
    needs_rng = cand.size(0) > 0 and target_probs.device.type != "meta"
    s_t, s_v, o_t, o_v = seed_and_offset(
        seed, offset, generator, target_probs, op, needs_rng, validate, why="for the acceptance tests and the draws"
    )
    return TreeOutput(
        *ops.tree_speculative_sampling(
            cand, par, target_probs.detach().contiguous(), s_t, int(s_v), o_t, int(o_v), vs, D
        )
    )


def typical_acceptance(
    candidates: torch.Tensor,
    parents: torch.Tensor,
    target_probs: torch.Tensor,
    epsilon=0.09,
    delta=0.3,
    *,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Union[int, torch.Tensor] = 0,
    generator: Optional[torch.Generator] = None,
    max_depth: Optional[int] = None,
    vocab_size: Optional[int] = None,
    deterministic: bool = True,
    validate: bool = True,
) -> TreeOutput:
    """Medusa's typical acceptance of a tree of candidates. **Lossy**: the emitted tokens do
    not follow the target's distribution (it keeps any candidate the target finds plausible
    enough); use :func:`tree_speculative_sampling` for exact sampling.

    Node ``n`` with token ``x`` and parent ``p`` is accepted when ``p`` is the root or
    accepted and ``q(x) > min(epsilon, delta * exp(-H))``, with ``q`` the parent's
    distribution ``target_probs[b, p]`` normalised over ``[0, vocab_size)`` and ``H = -sum q
    ln q`` its entropy in nats (computed in float64 from float32 terms; the second test is
    made as ``ln q(x) > ln delta - H``). A token with ``q(x) = 0`` is never accepted. The
    accepted path is the longest path from the root whose nodes are all accepted; among
    equally long ones, the one whose last node has the lowest index. The emitted token is
    drawn from ``target_probs[b, end]`` at the path's end (the root when nothing is accepted)
    with Philox stream ``2^17``. Greedy decoding needs no special case: its processed rows
    (``temperature=0``) are one-hot, the draw returns their token and the test accepts
    exactly the argmax (``q = 1 > min(epsilon, delta)``), as :func:`greedy_tree_verify` does.

    Args:
        candidates, parents, target_probs: as in :func:`tree_speculative_sampling`.
        epsilon: hard threshold, a number in ``[0, 1]`` or a float ``[B]`` tensor (default 0.09).
        delta: entropy-scaled threshold ``>= 0``, a number or a ``[B]`` tensor (default 0.3);
            ``0`` accepts every token with positive probability.
        seed, offset, generator: as in :func:`tree_speculative_sampling`. Not needed when every
            real node's row is one-hot (checked on the host, so ``validate=True`` only).
        max_depth, vocab_size, deterministic, validate: as in :func:`tree_speculative_sampling`
            (a node whose row is invalid accepts no children; ending there emits -1).

    Returns:
        :class:`TreeOutput`.

    Raises:
        TypeError / ValueError as :func:`tree_speculative_sampling`; ``epsilon`` outside
        ``[0, 1]`` or ``delta < 0`` (NaN included).

    Source: Cai et al., "Medusa: Simple LLM Inference Acceleration Framework with Multiple
    Decoding Heads", ICML 2024, section 2.3.1 (typical acceptance).
    """
    op = "typical_acceptance"
    cand = _ids_tensor(op, "candidates", candidates)
    vs = _check_tree_probs(op, target_probs, cand, vocab_size, validate)
    cand, par, D = _check_tree(op, cand, parents, vs, max_depth, validate)
    e_t, e_v = row_param(
        epsilon,
        "epsilon",
        op,
        target_probs,
        integer=False,
        dtype=torch.float64,
        lo=0.0,
        hi=1.0,
        validate=validate,
        allowed="in [0, 1]",
    )
    d_t, d_v = row_param(
        delta,
        "delta",
        op,
        target_probs,
        integer=False,
        dtype=torch.float64,
        lo=0.0,
        hi=None,
        validate=validate,
        allowed="a finite number >= 0",
    )
    if validate:
        _validate_tree_probs(op, target_probs, cand, vs)
    needs_rng = cand.size(0) > 0 and target_probs.device.type != "meta"
    if needs_rng and seed is None and generator is None and validate:
        # Every real node's row one-hot (greedy processing): the draw cannot depend on the seed.
        positive = (target_probs[..., :vs] > 0).sum(-1)
        needs_rng = host_bool(((positive != 1) & (cand >= 0)).any(), op)
    s_t, s_v, o_t, o_v = seed_and_offset(
        seed, offset, generator, target_probs, op, needs_rng, validate, why="when a node's row is not one-hot"
    )
    return TreeOutput(
        *ops.typical_acceptance(
            cand,
            par,
            target_probs.detach().contiguous(),
            e_t,
            float(e_v),
            d_t,
            float(d_v),
            s_t,
            int(s_v),
            o_t,
            int(o_v),
            vs,
            D,
        )
    )


def greedy_tree_verify(
    candidates: torch.Tensor,
    parents: torch.Tensor,
    target_logits: torch.Tensor,
    *,
    max_depth: Optional[int] = None,
    vocab_size: Optional[int] = None,
    validate: bool = True,
) -> TreeOutput:
    """Greedy (temperature 0) verification of a tree of candidates.

    Node ``n`` with parent ``p`` is accepted when ``p`` is the root or accepted and its token
    equals ``argmax(target_logits[b, p])`` (lowest index on ties, :func:`decodekit.argmax`).
    The accepted path is the longest path of accepted nodes; among equally long ones, the one
    whose last node has the lowest index. The emitted (bonus) token is the argmax at the path's
    end. Reproduces plain greedy decoding token for token when the target logits do.

    Args:
        candidates, parents: as in :func:`tree_speculative_sampling`.
        target_logits: ``[B, N, V]`` float32 / float16 / bfloat16, the target's logits after
            each node.
        max_depth, vocab_size: as in :func:`tree_speculative_sampling`.
        validate: check the tree and that real nodes' logit rows have no NaN and a finite
            value (synchronises). With ``validate=False`` an invalid row accepts no children and
            emits -1 when the path ends there.

    Returns:
        :class:`TreeOutput`.

    Raises:
        TypeError / ValueError naming the argument: as :func:`tree_speculative_sampling`; a real
        node's logits row with a NaN or no finite logit.
    """
    op = "greedy_tree_verify"
    cand = _ids_tensor(op, "candidates", candidates)
    B, N = cand.shape
    if not isinstance(target_logits, torch.Tensor):
        raise TypeError(f"{op}: target_logits must be a [B, N, V] tensor, got {type(target_logits).__name__}")
    if target_logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: target_logits must be float32, float16 or bfloat16, got {target_logits.dtype}")
    if target_logits.dim() != 3 or tuple(target_logits.shape[:2]) != (B, N):
        raise ValueError(
            f"{op}: target_logits must be [B={B}, N={N}, V] (one row per tree node), got {tuple(target_logits.shape)}"
        )
    V = target_logits.size(2)
    if V < 1:
        raise ValueError(f"{op}: target_logits must have V >= 1 columns")
    same_device(op, "target_logits", target_logits, candidates=cand)
    check_device(op, op, "target_logits", target_logits)
    vs = check_vocab_size(vocab_size, V, op)
    cand, par, D = _check_tree(op, cand, parents, vs, max_depth, validate)
    target = target_logits
    if validate and has_data(target_logits):
        flat = target_logits.reshape(B * N, V)
        top, valid = ops.argmax(flat if flat.stride(1) == 1 or V == 1 else flat.contiguous(), vs)
        bad = ~valid.reshape(B, N) & (cand >= 0)
        if host_bool(bad.any(), op):
            raise ValueError(f"{op}: target_logits rows (request, node) {_pairs(bad)} have a NaN or no finite logit")
        target = top.reshape(B, N)
    return TreeOutput(*ops.greedy_tree_verify(cand, par, target, vs, D))
