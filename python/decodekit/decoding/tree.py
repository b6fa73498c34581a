"""Token trees for Medusa-style speculative decoding: which candidates the target verifies in one
pass.

A tree is given as a list of **paths** (the choice-list format of Medusa, Cai et al., 2024):
``(0,)`` is the top-1 candidate of head 0 (one token past the target's own next token),
``(0, 1)`` is the top-2 candidate of head 1 placed after it, and so on: entry ``j`` of a path is
the rank among head ``j``'s candidates. Every prefix of a path must be a path too (its parent).

The flat order of the nodes is: node 0 the root (the last emitted token, not yet in the KV
cache), then the paths by length and, within a length, in lexicographic order. A parent then
always comes before its children, and siblings are in rank order, which is the order in which
lossless verification tries them (:func:`decodekit.tree_speculative_sampling`).

:class:`Tree` holds what a verification pass needs: ``parents`` and ``depths`` of the nodes, the
ancestor mask of the tree attention, and for each non-root node the head and rank its token comes
from. :meth:`Tree.candidates` turns the heads' top-k ids into the ``[B, N]`` candidate tokens.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["Tree", "DEFAULT_TREE", "chain_tree"]

# The default tree for SmolLM2-135M with the shipped heads on a 2-core CPU, chosen with
# bench/medusa.py: on this CPU a target pass of N new tokens costs 1.10x one token for N = 2,
# 1.25x for 3 and 1.46x for 4 (the products become compute-bound), and the heads' held-out
# acceptance (greedy, teacher forced) adds 0.39 accepted tokens for the first node, 0.14 for
# the second ((0, 0)) and 0.12 for the third ((1,)); the predicted speed-up is largest with the
# one node (1.27x; 1.22x with two; bench/RESULTS.md, "Medusa"). Larger trees ([[0], [0, 0],
# [1], [0, 0, 0], [2], [0, 1], ...], that order) pay off where a pass of a few more tokens is
# nearly free, as on a GPU.
DEFAULT_TREE: Tuple[Tuple[int, ...], ...] = ((0,),)


def chain_tree(depth: int) -> Tuple[Tuple[int, ...], ...]:
    """The chain of top-1 candidates of the first ``depth`` heads: ``(0,), (0, 0), ...``."""
    return tuple((0,) * d for d in range(1, depth + 1))


class Tree:
    """A candidate tree built from Medusa choice paths.

    Args:
        paths: a non-empty sequence of paths; each path a non-empty sequence of ranks (ints
            ``>= 0``). Paths are distinct and every proper prefix of a path is itself a path.
        num_heads: the number of heads available (a path may be at most this long).
        max_nodes: the most nodes (root included) a pass may hold, or ``None``.

    Attributes:
        paths: the paths in flat node order (node ``i + 1`` is ``paths[i]``).
        num_nodes: ``N = len(paths) + 1`` (the root is node 0).
        depth: the longest path's length (``D``; a pass emits at most ``D + 1`` tokens).
        parents: int64 ``[N]``, ``-1`` for the root.
        depths: int64 ``[N]``, 0 for the root.
        heads: int64 ``[N]``: the head that proposes node ``i``'s token (``depths - 1``; -1 for
            the root).
        ranks: int64 ``[N]``: the rank of node ``i``'s token among its head's candidates (-1 for
            the root).
        mask: bool ``[N, N]``: ``mask[i, j]`` iff node ``j`` is node ``i`` or one of its
            ancestors (the tree attention mask).
        top_k: the number of candidates needed per head (``1 + the largest rank``).

    Raises:
        TypeError / ValueError naming the problem: an empty tree or path, a rank that is not an
        int ``>= 0``, a duplicate path, a path whose parent is missing, a path longer than
        ``num_heads``, or more nodes than ``max_nodes``.
    """

    def __init__(self, paths: Sequence[Sequence[int]], num_heads: int, max_nodes: Optional[int] = None) -> None:
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"Tree: num_heads must be an int >= 1, got {num_heads!r}")
        if isinstance(paths, (str, bytes)) or not hasattr(paths, "__iter__"):
            raise TypeError(f"Tree: paths must be a list of paths such as [[0], [0, 0], [1]], got {paths!r}")
        norm: List[Tuple[int, ...]] = []
        for p in paths:
            if isinstance(p, (str, bytes)) or not hasattr(p, "__iter__"):
                raise TypeError(f"Tree: each path must be a list of ranks such as [0, 1], got {p!r}")
            t = tuple(p)
            if not t:
                raise ValueError("Tree: a path must hold at least one rank (the root is implicit)")
            if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in t):
                raise ValueError(f"Tree: ranks must be ints >= 0, got path {list(t)}")
            norm.append(t)
        if not norm:
            raise ValueError("Tree: paths must not be empty")
        seen = set()
        for t in norm:
            if t in seen:
                raise ValueError(f"Tree: duplicate path {list(t)}")
            seen.add(t)
        for t in norm:
            if len(t) > num_heads:
                raise ValueError(f"Tree: path {list(t)} has depth {len(t)}, past the number of heads ({num_heads})")
            if len(t) > 1 and t[:-1] not in seen:
                raise ValueError(f"Tree: path {list(t)} has no parent: path {list(t[:-1])} is missing")
        ordered = sorted(norm, key=lambda t: (len(t), t))
        n = len(ordered) + 1
        if max_nodes is not None and n > max_nodes:
            raise ValueError(f"Tree: {n} nodes (root included) are more than max_nodes = {max_nodes}")
        index = {t: i + 1 for i, t in enumerate(ordered)}
        parents = [-1] + [index[t[:-1]] if len(t) > 1 else 0 for t in ordered]
        self.paths: Tuple[Tuple[int, ...], ...] = tuple(ordered)
        self.num_nodes = n
        self.depth = max(len(t) for t in ordered)
        self.parents = torch.tensor(parents, dtype=torch.int64)
        self.depths = torch.tensor([0] + [len(t) for t in ordered], dtype=torch.int64)
        self.heads = self.depths - 1
        self.ranks = torch.tensor([-1] + [t[-1] for t in ordered], dtype=torch.int64)
        mask = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            j = i
            while j >= 0:
                mask[i, j] = True
                j = parents[j]
        self.mask = mask
        self.top_k = 1 + max(t[-1] for t in ordered)

    def __repr__(self) -> str:
        return f"Tree({self.num_nodes} nodes, depth {self.depth}, paths={[list(p) for p in self.paths]})"

    def candidates(self, root_ids: torch.Tensor, head_top_ids: torch.Tensor) -> torch.Tensor:
        """The candidate tokens of every node, for ``B`` sequences.

        Args:
            root_ids: int64 ``[B]``: each sequence's last emitted token (node 0).
            head_top_ids: int64 ``[B, num_heads, k]`` with ``k >= self.top_k``: the token ids of
                each head's candidates, best first.

        Returns:
            int64 ``[B, N]``: node ``i``'s token is ``head_top_ids[:, heads[i], ranks[i]]``.

        Raises:
            ValueError: shapes that do not fit the tree.
        """
        if root_ids.dim() != 1 or head_top_ids.dim() != 3 or head_top_ids.shape[0] != root_ids.shape[0]:
            raise ValueError(
                f"Tree.candidates: root_ids must be [B] and head_top_ids [B, heads, k], got "
                f"{tuple(root_ids.shape)} and {tuple(head_top_ids.shape)}"
            )
        if head_top_ids.shape[1] < self.depth or head_top_ids.shape[2] < self.top_k:
            raise ValueError(
                f"Tree.candidates: the tree needs {self.depth} heads with {self.top_k} candidates each, "
                f"got head_top_ids of shape {tuple(head_top_ids.shape)}"
            )
        B = root_ids.shape[0]
        out = torch.empty(B, self.num_nodes, dtype=torch.int64)
        out[:, 0] = root_ids
        out[:, 1:] = head_top_ids[:, self.heads[1:], self.ranks[1:]]
        return out

    def path_tokens(self, candidates: torch.Tensor) -> List[List[List[int]]]:
        """For each sequence ``b`` and node ``i``, the tokens of the path from the root's child
        down to node ``i`` (empty for the root): what the target has seen after the last emitted
        token when it scores the position after node ``i``."""
        rows = candidates.tolist()
        parents = self.parents.tolist()
        out = []
        for row in rows:
            per = [[]]
            for i in range(1, self.num_nodes):
                per.append(per[parents[i]] + [row[i]])
            out.append(per)
        return out
