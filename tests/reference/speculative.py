"""Tree verification references: plain Python over float64, one tree (one request) at a time.

A tree is given by two lists, ``cand`` (tokens, -1 padding) and ``par`` (parent indices, -1 for
the root, node 0), and ``probs``, a ``[N, V]`` tensor of the target's distribution after each
node. Children are tried in ascending node index (the ops' documented order).
"""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch

from .philox import uniform_double
from .sampling import draw

TREE_NODE = 2**16  # stream 2^16 + n: node n (uniform 0: acceptance; uniform 1: residual draw)
TREE_BONUS = 2**17


def children(cand: List[int], par: List[int]) -> Dict[int, List[int]]:
    """node -> its real children in ascending index order."""
    kids: Dict[int, List[int]] = {n: [] for n in range(len(cand))}
    for n in range(1, len(cand)):
        if cand[n] >= 0:
            kids[par[n]].append(n)
    return kids


def depth(par: List[int], n: int) -> int:
    d = 0
    while n != 0:
        n, d = par[n], d + 1
    return d


def path_to(par: List[int], n: int) -> List[int]:
    """The nodes root -> n, root excluded."""
    out = []
    while n != 0:
        out.append(n)
        n = par[n]
    return out[::-1]


def _row(probs: torch.Tensor, n: int) -> torch.Tensor:
    return probs[n].double().clamp_min(0)


def tree_speculative_sampling(cand, par, probs, seed: int, offset: int) -> Tuple[List[int], List[int]]:
    """The lossless walk replayed with the ops' Philox numbers: returns (emitted tokens, accepted
    nodes). Child n with token x is accepted when u_n * sum(r) < r(x); rejection zeroes r(x)."""
    kids = children(cand, par)
    c, nodes = 0, []
    while True:
        r = _row(probs, c)
        if not kids[c]:
            tok = draw(r, uniform_double(seed, offset, TREE_BONUS, 0))
            return [cand[n] for n in nodes] + [tok], nodes
        accepted = None
        for n in kids[c]:
            x = cand[n]
            if uniform_double(seed, offset, TREE_NODE + n, 0) * float(r.sum()) < float(r[x]):
                accepted = n
                break
            r[x] = 0.0
        if accepted is None:
            tok = draw(r, uniform_double(seed, offset, TREE_NODE + c, 1))
            return [cand[n] for n in nodes] + [tok], nodes
        nodes.append(accepted)
        c = accepted


def tree_output_distribution(cand, par, probs) -> Dict[Tuple[int, ...], float]:
    """Exact probability of every output (the emitted token sequence) of the lossless walk, by
    enumerating its branches: accept child x with probability r(x) / sum(r), else zero r(x)."""
    kids = children(cand, par)
    out: Dict[Tuple[int, ...], float] = {}

    def emit(prefix, P, r):
        total = float(r.sum())
        for y in range(r.numel()):
            if r[y] > 0:
                key = prefix + (y,)
                out[key] = out.get(key, 0.0) + P * float(r[y]) / total

    def walk(c, prefix, P):
        r = _row(probs, c)
        if not kids[c]:
            emit(prefix, P, r)
            return
        for n in kids[c]:
            x = cand[n]
            a = float(r[x]) / float(r.sum()) if r[x] > 0 else 0.0
            if a > 0:
                walk(n, prefix + (x,), P * a)
            P *= 1.0 - a
            r[x] = 0.0
        if P > 0:
            emit(prefix, P, r)

    walk(0, (), 1.0)
    return out


def entropy(p: torch.Tensor) -> float:
    q = p.double().clamp_min(0)
    q = q / q.sum()
    nz = q[q > 0]
    return float(-(nz * nz.log()).sum())


def typical_accepts(p: torch.Tensor, x: int, epsilon: float, delta: float) -> bool:
    """Medusa's test q(x) > min(epsilon, delta * exp(-H(q))), q = p normalised."""
    q = p.double().clamp_min(0)
    q = q / q.sum()
    return float(q[x]) > min(epsilon, delta * math.exp(-entropy(p)))


def longest_accepted_path(cand, par, accepts) -> int:
    """The end node of the longest root path whose nodes all pass ``accepts(n)`` (lowest index of
    the deepest ones); 0 when none does."""
    ok = {0: True}
    best, best_depth = 0, 0
    for n in range(1, len(cand)):
        ok[n] = cand[n] >= 0 and ok.get(par[n], False) and accepts(n)
        if ok[n] and depth(par, n) > best_depth:
            best, best_depth = n, depth(par, n)
    return best


def typical_acceptance(cand, par, probs, epsilon, delta, seed: int, offset: int) -> Tuple[List[int], List[int]]:
    end = longest_accepted_path(cand, par, lambda n: typical_accepts(probs[par[n]], cand[n], epsilon, delta))
    nodes = path_to(par, end)
    tok = draw(_row(probs, end), uniform_double(seed, offset, TREE_BONUS, 0))
    return [cand[n] for n in nodes] + [tok], nodes


def greedy_tree_verify(cand, par, logits: torch.Tensor) -> Tuple[List[int], List[int]]:
    """Accept a node when its token is the argmax (lowest index on ties) after its parent."""
    top = [int(torch.nonzero(row == row.max())[0]) for row in logits.float()]
    end = longest_accepted_path(cand, par, lambda n: cand[n] == top[par[n]])
    nodes = path_to(par, end)
    return [cand[n] for n in nodes] + [top[end]], nodes
