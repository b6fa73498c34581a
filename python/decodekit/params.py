"""Per-request sampling parameters, validated once (vLLM's ``SamplingParams`` idea).

A :class:`SamplingParams` holds everything that shapes one request's next-token distribution
and its random numbers: temperature, top-k, top-p, min-p, the penalties, a logit bias and the
Philox seed. It is checked when it is made (so a decode loop never re-checks per step), and
:func:`rows` turns the parameters of the ``B`` active requests into the ``[B]`` tensors the
sampling ops take.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence

import torch

from ._checks import (
    FLT_MAX,
    REPETITION_PENALTY_MIN,
    T_TINY,
    check_float32_number,
    check_number,
    is_float32_number,
    to_int64_bits,
)

__all__ = ["SamplingParams", "rows"]

_TEMPERATURE = "finite and >= 0 (at most 3.4028235e38, float32)"


@dataclass(frozen=True)
class SamplingParams:
    """The sampling parameters of one request.

    Attributes:
        temperature: softmax temperature, ``>= 0`` and at most float32's largest value; 0 is
            greedy (argmax, lowest id on ties); a positive value below 1.18e-38 acts as 1.18e-38.
        top_k: keep the ``k`` most likely tokens; ``<= 0`` disables (default 0).
        top_p: nucleus mass in ``[0, 1]``; 1 disables (default).
        min_p: keep tokens with ``p >= min_p * p_max``, in ``[0, 1]``; 0 disables (default).
        seed: Philox seed, an int in ``[0, 2^64)``, or None (the decode loop then draws one
            when the request samples).
        repetition_penalty: finite in float32 (``|x| <= 3.4028235e38``) and ``>= 1e-30``; 1
            disables. Counts prompt and output tokens.
        frequency_penalty, presence_penalty: finite in float32; 0 disables. Count output tokens.
        logit_bias: ``{token_id: bias}`` added to the logits: finite in float32, or ``-inf`` to
            ban a token; ``+inf`` and NaN are errors (a large finite bias such as 1e9 forces a
            token; the op :func:`decodekit.apply_penalties` also takes ``allowed_token_ids``).

    Raises:
        TypeError / ValueError naming the field (and, from :meth:`checked`, the caller and the
        request: ``generate: temperature[2] must be ...``).

    Example:
        >>> p = SamplingParams(temperature=0.7, top_p=0.9, seed=1)
        >>> p.greedy, p.has_penalties
        (False, False)
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: Optional[int] = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: Optional[Dict[int, float]] = None

    def __post_init__(self) -> None:
        for name, value in _normalised(
            {f.name: getattr(self, f.name) for f in fields(self)}, "SamplingParams", ""
        ).items():
            object.__setattr__(self, name, value)

    @classmethod
    def checked(cls, op: str, where: str = "", **values) -> SamplingParams:
        """A :class:`SamplingParams` from keyword values, with errors that name ``op`` and the
        request (``where``, e.g. ``"[2]"``)."""
        return cls(**_normalised(values, op, where))

    @property
    def greedy(self) -> bool:
        """True when nothing is random: T == 0, top_k == 1 or top_p == 0."""
        return self.temperature == 0 or self.top_k == 1 or self.top_p == 0

    @property
    def has_penalties(self) -> bool:
        """True when a penalty or a logit bias changes the logits."""
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
            or bool(self.logit_bias)
        )

    def with_seed(self, seed: Optional[int]) -> SamplingParams:
        """A copy with another seed."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["seed"] = seed
        return SamplingParams(**values)


def _normalised(v: dict, op: str, where: str) -> dict:
    """Type and range checks; returns the values as Python ints and floats."""
    out = dict(v)
    out["temperature"] = check_number(v.get("temperature", 1.0), f"temperature{where}", op, 0.0, FLT_MAX, _TEMPERATURE)
    for name in ("top_p", "min_p"):
        out[name] = check_number(
            v.get(name, 1.0 if name == "top_p" else 0.0), f"{name}{where}", op, 0.0, 1.0, "in [0, 1]"
        )
    k = v.get("top_k", 0)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{op}: top_k{where} must be an int (0 disables), got {type(k).__name__}")
    out["top_k"] = max(min(int(k), 2**62), -(2**62))
    seed = v.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64):
        raise ValueError(f"{op}: seed{where} must be None or an int in [0, 2^64), got {seed!r}")
    out["seed"] = None if seed is None else int(seed)
    for name, default in (("repetition_penalty", 1.0), ("frequency_penalty", 0.0), ("presence_penalty", 0.0)):
        out[name] = check_float32_number(v.get(name, default), f"{name}{where}", op)
    if not out["repetition_penalty"] >= REPETITION_PENALTY_MIN:
        raise ValueError(
            f"{op}: repetition_penalty{where} must be >= {REPETITION_PENALTY_MIN:g} (the penalties op's "
            f"smallest), got {out['repetition_penalty']}"
        )
    out["logit_bias"] = _logit_bias(v.get("logit_bias"), op, where)
    return out


def _logit_bias(bias, op: str, where: str) -> Optional[Dict[int, float]]:
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise TypeError(f"{op}: logit_bias{where} must be a dict {{token_id: bias}} or None, got {type(bias).__name__}")
    out = {}
    for tok, val in bias.items():
        if isinstance(tok, bool) or not isinstance(tok, numbers.Integral) or tok < 0:
            raise ValueError(f"{op}: logit_bias{where} token ids must be ints >= 0, got {tok!r}")
        ok = is_float32_number(val) or (
            isinstance(val, numbers.Real) and not isinstance(val, bool) and val == -math.inf
        )
        if not ok:
            raise ValueError(
                f"{op}: logit_bias{where} values must be finite numbers of float32 range (|bias| <= "
                f"{FLT_MAX:.7g}) or -inf (bans the token); to force a token, give it a large finite bias "
                f"such as 1e9; got {val!r:.60} for token {tok}"
            )
        out[int(tok)] = float(val)
    return out or None


def rows(
    params: Sequence[SamplingParams], offsets: Sequence[int], sample: Sequence[int] = (), scalars: bool = False
) -> tuple:
    """The sampling-op arguments of ``B`` requests: ``((temperature, top_k, top_p, min_p), rng)``
    with ``[B]`` tensors and ``rng = {"seed": [B] int64, "offset": [B] int64}``.

    ``offsets[b]`` is the offset of row ``b``'s call (DESIGN.md "Randomness": the 0-based
    position, in the generated sequence, of the first token the call draws); ``sample[b]``
    (default 0) goes into bits 48-61 of the offset. With ``scalars`` and one request, the same
    values as Python numbers (the ops take a number for every row; no tensor is built).
    """
    if scalars and len(params) == 1:
        p, s = params[0], (list(sample) or [0])[0]
        return (
            (T_TINY if 0 < p.temperature < T_TINY else p.temperature, p.top_k, p.top_p, p.min_p),
            {"seed": to_int64_bits(p.seed or 0, "seed", "rows"), "offset": offsets[0] | (s << 48)},
        )
    temperature = torch.tensor(
        [T_TINY if 0 < p.temperature < T_TINY else p.temperature for p in params], dtype=torch.float32
    )
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float64)
    min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32)
    seed = torch.tensor([to_int64_bits(p.seed or 0, "seed", "rows") for p in params], dtype=torch.int64)
    samples: List[int] = list(sample) or [0] * len(params)
    offset = torch.tensor([o | (s << 48) for o, s in zip(offsets, samples)], dtype=torch.int64)
    return (temperature, top_k, top_p, min_p), {"seed": seed, "offset": offset}
