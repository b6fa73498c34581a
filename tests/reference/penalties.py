"""float64 reference of decodekit.apply_penalties (one row)."""

from __future__ import annotations

import torch


def apply_penalties(
    logits, repetition=1.0, frequency=0.0, presence=0.0, token_ids=(), bias=None, allowed=None, banned=None
):
    """One row: bias, then repetition / frequency / presence on counted tokens, then the mask (float64)."""
    x = logits.double().clone()
    if bias:
        for tok, val in bias.items():
            x[tok] += val
    counts = {}
    for t in token_ids:
        if t >= 0:
            counts[t] = counts.get(t, 0) + 1
    for t, c in counts.items():
        if repetition != 1.0:
            x[t] = x[t] / repetition if x[t] > 0 else x[t] * repetition
        x[t] -= frequency * c + presence
    if allowed is not None:
        keep = torch.zeros_like(x, dtype=torch.bool)
        keep[list(allowed)] = True
        x[~keep] = float("-inf")
    if banned is not None:
        x[list(banned)] = float("-inf")
    return x
