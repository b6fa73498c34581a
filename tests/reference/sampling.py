"""Slow, obviously-right float64 references for the sampling family (softmax, argmax, the
filters, the draw, sampling from logits). Plain Python / torch, written from DESIGN.md, sharing
no code with the kernels."""

from __future__ import annotations

import math

import torch

from .philox import uniform_double  # noqa: F401  (used by sample)


def softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """float64 softmax(x / T) of one row; T == 0 gives one-hot at the first max."""
    x = logits.double()
    if temperature == 0:
        out = torch.zeros_like(x)
        out[argmax(x)] = 1.0
        return out
    return torch.softmax((x - x.max()) / temperature, dim=0)


def argmax(x: torch.Tensor) -> int:
    """Lowest index of the maximum (x has no NaN)."""
    m = x.max()
    return int(torch.nonzero(x == m)[0, 0])


def rank_order(x: torch.Tensor) -> torch.Tensor:
    """Indices by value descending, index ascending on ties."""
    return torch.sort(-x.double(), stable=True).indices


def nucleus(keep: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, p: float) -> torch.Tensor:
    """The shortest prefix of the kept tokens in rank order whose float64 running sum of
    weights reaches p times their total (the float64 product; the total correctly rounded).
    Weights are unnormalised, so ties at the top weigh exactly 1 and 9 of 10 tied tokens
    reach p = 0.9, as 0.3 + 0.5 of [0.3, 0.1, 0.1, 0.5] reaches 0.8."""
    kept = [i for i in order.tolist() if keep[i]]
    vals = [float(weights[i]) for i in kept]
    target = p * math.fsum(vals)
    cum = 0.0
    new_keep = torch.zeros_like(keep)
    for i, v in zip(kept, vals):
        new_keep[i] = True
        cum += v
        if cum >= target:
            break
    return new_keep


def filtered_probs(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """The distribution sample_from_logits draws from, for one row, in float64.

    Chain: temperature -> top-k -> top-p -> min-p, renormalising after each filter.
    Top-k and top-p rank the raw logits (desc, index asc); padding columns get 0.
    """
    V = logits.numel()
    vs = V if vocab_size is None else vocab_size
    x = logits[:vs].double()
    out = torch.zeros(V, dtype=torch.float64)
    if temperature == 0 or top_k == 1 or top_p == 0:
        out[argmax(x)] = 1.0
        return out
    weights = torch.exp((x - x.max()) / temperature)  # unnormalised: the top weight is exactly 1
    order = rank_order(x)
    keep = torch.ones(vs, dtype=torch.bool)
    if 0 < top_k < vs:
        keep[:] = False
        keep[order[:top_k]] = True
    if top_p < 1.0:
        keep = nucleus(keep, weights, order, top_p)
    probs = torch.where(keep, weights, 0.0)
    probs = probs / probs.sum()
    if min_p > 0.0:
        probs = torch.where(probs >= min_p * probs.max(), probs, 0.0)
        probs = probs / probs.sum()
    out[:vs] = probs
    return out


def draw(probs: torch.Tensor, u: float) -> int:
    """Inverse CDF in ascending index order: the first index whose cumulative sum exceeds u * total."""
    cum = torch.cumsum(probs.double(), 0)
    target = u * float(cum[-1])
    idx = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64), right=True)[0])
    return min(idx, probs.numel() - 1)


def sample(logits: torch.Tensor, seed: int, offset: int = 0, **params) -> int:
    """One reference draw with the same Philox uniform as the kernels (stream 0, number 0)."""
    return draw(filtered_probs(logits, **params), uniform_double(seed, offset, 0, 0))


def filter_probs(
    probs: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, vocab_size: int | None = None
) -> torch.Tensor:
    """float64 top-k -> top-p -> min-p over one probability row, ranked by probability (index asc on ties).

    Renormalises after each filter; min-p compares in float32 against the input values
    (p >= min_p * max p); a row from which no positive entry is removed comes back unchanged.
    """
    V = probs.numel()
    vs = V if vocab_size is None else vocab_size
    p = probs[:vs].double()
    order = rank_order(p)
    keep = torch.ones(vs, dtype=torch.bool)
    if top_k == 1 or top_p == 0:
        keep[:] = False
        keep[order[0]] = True
    else:
        if 0 < top_k < vs:
            keep[:] = False
            keep[order[:top_k]] = True
        if top_p < 1.0:
            keep = nucleus(keep, p, order, top_p)
        if min_p > 0.0:
            f32 = probs[:vs].float()
            keep &= f32 >= torch.tensor(min_p, dtype=torch.float32) * f32.max()
    out = torch.zeros(V, dtype=torch.float64)
    if bool(((p > 0) & ~keep).any()):
        out[:vs] = torch.where(keep, p, 0.0) / float(p[keep].sum())
    else:
        out[:vs] = p
    return out


sample_from_logits = sample  # the reference of decodekit.sample_from_logits, by the op's name
