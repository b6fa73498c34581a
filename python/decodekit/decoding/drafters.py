"""Drafters for speculative decoding: the :class:`Drafter` protocol and two implementations,
:class:`NgramDrafter` (prompt lookup, one-hot drafts) and :class:`DraftModelDrafter` (a small
trained draft model, :mod:`decodekit.models.draft`).

A drafter proposes up to ``k`` tokens continuing a request's context (prompt + output). A
drafter with its own distribution also implements ``propose_with_logits``: the decode loop then
chooses (samples) each draft from the processed draft distribution ``q``, which lossless
verification needs. A drafter whose ``keyed`` attribute is True is given a per-request ``key``
so it can keep per-request state (a draft model's KV cache).
"""

from __future__ import annotations

import operator
import time
from typing import Callable, Hashable, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch

from ..cache import OutOfBlocksError
from ..models.gguf_loader import LoadedModel
from ..models.llama import LlamaModel
from ..ops import argmax

__all__ = [
    "Drafter",
    "SamplingDrafter",
    "NgramDrafter",
    "DraftModelDrafter",
    "MedusaDrafter",
    "shipped_draft_drafter",
    "shipped_medusa_heads",
]


@runtime_checkable
class Drafter(Protocol):
    """What the decode loop asks of a drafter.

    ``propose(context, k)`` returns up to ``k`` token ids (ints in ``[0, V)``) continuing
    ``context`` (the request's prompt and output ids); an empty list proposes nothing. A drafter
    may also have ``keyed = True`` (then ``propose`` is called with ``key=``, a hashable unique
    to the request within one decode call) and ``propose_with_logits`` (see
    :class:`SamplingDrafter`).
    """

    def propose(self, context: Sequence[int], k: int) -> List[int]: ...


@runtime_checkable
class SamplingDrafter(Drafter, Protocol):
    """A drafter with its own distribution: ``propose_with_logits(context, k, choose)`` picks
    draft ``j`` as ``choose(logits [V], j)`` and returns ``(ids, logits [len(ids), V])``."""

    def propose_with_logits(
        self, context: Sequence[int], k: int, choose: Callable[[torch.Tensor, int], int]
    ) -> Tuple[List[int], torch.Tensor]: ...


class NgramDrafter:
    """Prompt lookup (n-gram) drafting: find the most recent earlier occurrence of the last
    ``n`` tokens of the context (``n`` from ``max_ngram`` down to ``min_ngram``) and propose the
    tokens that followed it. Proposes nothing when no suffix recurs.

    Args:
        max_ngram: longest suffix tried (>= 1, default 3).
        min_ngram: shortest suffix tried (>= 1, default 2: a single-token match proposes too
            often to pay for the longer target pass).
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"NgramDrafter: need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, context: Sequence[int], k: int, *, key: Hashable = None) -> List[int]:
        """Up to ``k`` draft tokens continuing ``context`` (a list of token ids); ``key`` is
        ignored (the proposal depends on the context only)."""
        n_ctx = len(context)
        for n in range(min(self.max_ngram, n_ctx - 1), self.min_ngram - 1, -1):
            suffix = list(context[n_ctx - n :])
            for start in range(n_ctx - n - 1, -1, -1):  # most recent match first
                if list(context[start : start + n]) == suffix:
                    follow = list(context[start + n : start + n + k])
                    if follow:
                        return follow
        return []


class DraftModelDrafter:
    """Drafting with a small draft model that shares the target's tokenizer.

    The draft keeps its own paged KV cache, one sequence per request (``key``, which
    :func:`decodekit.speculative_generate` passes) or, without a key, per context (up to
    ``max_sequences``, least recently used evicted). At each call it rolls that sequence back to
    the prefix it shares with the context (:meth:`PagedKVCache.truncate`: the rejected drafts),
    runs the remaining context tokens in one pass, then runs ``k`` single-token steps. A request's drafts therefore depend only on its own context (the
    draft model is batch-invariant in deterministic mode like the target).

    Args:
        draft: a :class:`~decodekit.models.draft.DraftModel` or its ``LlamaModel``; ``None``
            loads the shipped SmolLM2-135M-Instruct draft for ``target``.
        target: the target (``LoadedModel``), used only when ``draft`` is ``None``.
        max_sequences: contexts kept at once (>= 1, default 16).
        block_size: positions per block of the draft's cache (default 16).
        cache_tokens: positions the draft's cache holds over all contexts (default 16384; about
            100 MB for SmolLM2's draft); when full, the other contexts are evicted.

    Methods:
        ``propose(context, k)``: greedy drafts (the draft's argmax, lowest id on ties).
        ``propose_with_logits(context, k, choose)``: drafts chosen by ``choose(logits [V], j)``
        (the loop samples there), returned with the draft's logits ``[k, V]``.

    Raises:
        TypeError / ValueError: a draft that is not a DraftModel / LlamaModel, bad
        ``max_sequences`` / ``block_size`` / ``cache_tokens``; context ids that are not ints in
        ``[0, V)``.

    Source: draft-model speculative decoding (Leviathan et al., ICML 2023; Chen et al., 2023).
    """

    def __init__(
        self,
        draft=None,
        *,
        target: Optional[LoadedModel] = None,
        max_sequences: int = 16,
        block_size: int = 16,
        cache_tokens: int = 16384,
    ) -> None:
        if draft is None:
            from ..models.draft import load_draft_model

            draft = load_draft_model(target=target)
        net = getattr(draft, "model", draft)
        if not isinstance(net, LlamaModel):
            raise TypeError(f"DraftModelDrafter: draft must be a DraftModel or LlamaModel, got {type(draft).__name__}")
        if isinstance(max_sequences, bool) or not isinstance(max_sequences, int) or max_sequences < 1:
            raise ValueError(f"DraftModelDrafter: max_sequences must be an int >= 1, got {max_sequences!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"DraftModelDrafter: block_size must be an int >= 1, got {block_size!r}")
        if isinstance(cache_tokens, bool) or not isinstance(cache_tokens, int) or cache_tokens < 1:
            raise ValueError(f"DraftModelDrafter: cache_tokens must be an int >= 1, got {cache_tokens!r}")
        self.draft = draft
        self.net = net
        self.max_sequences = max_sequences
        # The pool holds cache_tokens positions in all (evicting other contexts when full), not
        # max_sequences x the context length: 2048 positions of SmolLM2's 2 draft blocks = 12 MB.
        self.cache = net.new_paged_cache(
            num_blocks=(cache_tokens + block_size - 1) // block_size + max_sequences, block_size=block_size
        )
        self._slots: List[list] = []  # [seq id, token list, key], most recently used last
        self.keyed = True  # the decode loop passes a per-request key
        self.forward_passes = 0
        self.forward_seconds = 0.0

    def _slot_for(self, context: List[int], key) -> list:
        """The cached sequence for ``context``: the one of request ``key`` when given (a new one
        at its first call), else the one sharing the longest prefix (a new one while there is
        room and none shares anything); rolled back to the shared prefix."""

        def shared(toks):
            n, limit = 0, min(len(toks), len(context) - 1)  # leave at least one token to run
            while n < limit and toks[n] == context[n]:
                n += 1
            return n

        best = None
        if key is not None:
            best = next((slot for slot in self._slots if slot[2] == key), None)
        else:
            scored = [(shared(slot[1]), slot) for slot in self._slots]
            if scored:
                n, slot = max(scored, key=lambda t: t[0])
                if n > 0 or len(self._slots) >= self.max_sequences:
                    best = slot
        if best is None:
            if len(self._slots) >= self.max_sequences:
                old = self._slots.pop(0)  # least recently used
                self.cache.free(old[0])
            best = [self.cache.add_sequence(), [], key]
        else:
            self._slots.remove(best)
        self._slots.append(best)
        n = shared(best[1])
        if n < len(best[1]):
            self.cache.truncate(best[0], n)
            del best[1][n:]
        return best

    def _forward(self, slot: list, tokens: List[int]) -> torch.Tensor:
        """The draft's logits ``[1, V]`` after ``tokens``: one token through the model's decode
        step (forward_paged's bits with less Python: most of a small draft's step), more through
        forward_paged."""
        if len(tokens) == 1 and hasattr(self.net, "_decode_step"):
            return self.net._decode_step([tokens[0]], self.cache, [slot[0]])
        return self.net.forward_paged(torch.tensor([tokens]), self.cache, [slot[0]])

    def _run(self, slot: list, tokens: List[int]) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            logits = self._forward(slot, tokens)
        except OutOfBlocksError:  # evict every other context and retry once
            for other in self._slots[:-1]:
                self.cache.free(other[0])
            self._slots = self._slots[-1:]
            logits = self._forward(slot, tokens)
        slot[1].extend(tokens)
        self.forward_passes += 1
        self.forward_seconds += time.perf_counter() - t0
        return logits[0]

    def propose_with_logits(self, context: Sequence[int], k: int, choose: Callable, *, key=None) -> tuple:
        """``k`` drafts continuing ``context``, each ``choose(logits, j)`` of the draft's logits
        ``[V]`` at draft position ``j``; returns ``(tokens, logits [k, V])``. ``key`` (any
        hashable, e.g. a request id) keeps one cached sequence per request."""
        V = self.net.config.vocab_size
        if any(
            isinstance(t, bool) or not isinstance(t, (int, torch.Tensor)) and not hasattr(t, "__index__")
            for t in context
        ):
            raise TypeError("DraftModelDrafter: context must be a sequence of int token ids")
        context = [operator.index(t) if not isinstance(t, torch.Tensor) else int(t) for t in context]
        if any(not 0 <= t < V for t in context):
            raise ValueError(f"DraftModelDrafter: context token ids must be in [0, {V})")
        if k <= 0 or not context:
            return [], torch.empty(0, V)
        if len(context) + k > self.net.config.max_seq_len:
            k = max(0, self.net.config.max_seq_len - len(context))
            if k == 0:
                return [], torch.empty(0, self.net.config.vocab_size)
        slot = self._slot_for(context, key)
        logits = self._run(slot, context[len(slot[1]) :])
        tokens, rows = [], []
        for j in range(k):
            tok = int(choose(logits, j))
            tokens.append(tok)
            rows.append(logits)
            if j + 1 < k:
                logits = self._run(slot, [tok])
        return tokens, torch.stack(rows)

    def propose(self, context: Sequence[int], k: int, *, key=None) -> List[int]:
        """Up to ``k`` greedy draft tokens continuing ``context`` (``key`` as in
        :meth:`propose_with_logits`)."""
        return self.propose_with_logits(context, k, lambda logits, j: int(argmax(logits[None])[0]), key=key)[0]


_SHIPPED_DRAFTER: dict = {}
_SHIPPED_MEDUSA: dict = {}


def shipped_medusa_heads(lm: LoadedModel):
    """The shipped Medusa heads for ``lm`` (loaded once, reused by later calls)."""
    from ..models.medusa import load_medusa_heads

    key = id(lm)
    if key not in _SHIPPED_MEDUSA or _SHIPPED_MEDUSA[key][0] is not lm:
        _SHIPPED_MEDUSA.clear()
        _SHIPPED_MEDUSA[key] = (lm, load_medusa_heads(target=lm))
    return _SHIPPED_MEDUSA[key][1]


def shipped_draft_drafter(lm: LoadedModel) -> DraftModelDrafter:
    """The shipped draft's drafter for ``lm``, loaded once and reused by later calls (its cache
    keeps the contexts it has seen; proposals depend only on the context)."""
    key = id(lm)
    if key not in _SHIPPED_DRAFTER or _SHIPPED_DRAFTER[key][0] is not lm:
        _SHIPPED_DRAFTER.clear()
        _SHIPPED_DRAFTER[key] = (lm, DraftModelDrafter(target=lm))
    return _SHIPPED_DRAFTER[key][1]


class MedusaDrafter:
    """Medusa drafting (Cai et al., 2024): heads on the target's own last hidden state propose a
    tree of candidates, which the target verifies in one pass with a tree attention mask.

    The decode loop drives it (``speculative_generate(drafter="medusa")``): after each target
    pass it keeps the final-normed hidden state at the last accepted position of every request,
    runs all heads on them in one call (:meth:`MedusaHeads.top_ids`), and builds each request's
    ``[N]`` candidates from the :class:`~decodekit.decoding.tree.Tree` (node 0 is the last
    emitted token). Verification is one of:

    - ``"lossless"``: :func:`decodekit.tree_speculative_sampling` (the output distribution is
      exactly the target's; greedy requests use :func:`decodekit.greedy_tree_verify`, which
      reproduces plain greedy decoding token for token);
    - ``"typical"``: :func:`decodekit.typical_acceptance`, Medusa's typical acceptance (lossy:
      it accepts every candidate the target finds plausible enough, so the output distribution
      is *not* the target's; faster at high temperature).

    Args:
        heads: :class:`~decodekit.models.medusa.MedusaHeads`, or ``None`` for the shipped heads
            of SmolLM2-135M-Instruct (``target`` is then needed).
        tree: a list of choice paths (see :mod:`decodekit.decoding.tree`), a
            :class:`~decodekit.decoding.tree.Tree`, or ``None`` for ``DEFAULT_TREE`` (its paths no
            longer than the number of heads).
        acceptance: ``"lossless"`` (default) or ``"typical"``.
        typical_epsilon, typical_delta: the typical-acceptance threshold
            ``min(epsilon, delta * exp(-H))`` (defaults 0.09 and 0.3).
        target: the target (a ``LoadedModel``), used to load the shipped heads.

    Attributes (timings accumulated over the drafter's life, seconds): ``heads_seconds``,
    ``tree_seconds`` (building candidates), ``forward_seconds`` (the target's tree passes),
    ``verify_seconds``; ``passes`` and ``accepted`` (tokens accepted from the tree, not counting
    the emitted one) for the mean accepted length per pass.

    Raises:
        ValueError / TypeError: an unknown acceptance, a bad tree (see :class:`Tree`).
    """

    def __init__(
        self,
        heads=None,
        *,
        tree=None,
        acceptance: str = "lossless",
        typical_epsilon: float = 0.09,
        typical_delta: float = 0.3,
        target: Optional[LoadedModel] = None,
    ) -> None:
        from ..models.medusa import MedusaHeads, load_medusa_heads
        from .tree import DEFAULT_TREE, Tree

        if heads is None:
            heads = load_medusa_heads(target=target)
        if not isinstance(heads, MedusaHeads):
            raise TypeError(f"MedusaDrafter: heads must be MedusaHeads or None, got {type(heads).__name__}")
        if acceptance not in ("lossless", "typical"):
            raise ValueError(f"MedusaDrafter: acceptance must be 'lossless' or 'typical', got {acceptance!r}")
        for name, v in (("typical_epsilon", typical_epsilon), ("typical_delta", typical_delta)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"MedusaDrafter: {name} must be a number >= 0, got {v!r}")
        if isinstance(tree, Tree):
            if tree.depth > heads.num_heads:
                raise ValueError(
                    f"MedusaDrafter: the tree has depth {tree.depth} but there are {heads.num_heads} heads"
                )
        else:
            if tree is None:  # the default tree, cut to the heads at hand
                tree = [p for p in DEFAULT_TREE if len(p) <= heads.num_heads]
            tree = Tree(tree, heads.num_heads)
        vocab = heads.token_ids.numel()
        if tree.top_k > vocab:
            raise ValueError(
                f"MedusaDrafter: the tree asks for candidate rank {tree.top_k - 1} but the heads rank only "
                f"{vocab} tokens (ranks 0..{vocab - 1})"
            )
        self.heads = heads
        self.tree = tree
        self.acceptance = acceptance
        self.typical_epsilon = float(typical_epsilon)
        self.typical_delta = float(typical_delta)
        self.heads_seconds = self.tree_seconds = self.forward_seconds = self.verify_seconds = 0.0
        self.passes = 0
        self.accepted = 0

    def __repr__(self) -> str:
        return f"MedusaDrafter({self.heads!r}, {self.tree!r}, acceptance={self.acceptance!r})"

    def propose(self, context: Sequence[int], k: int) -> List[int]:
        raise TypeError(
            "MedusaDrafter drafts from the target's hidden states inside the decode loop; use "
            "speculative_generate(drafter=MedusaDrafter(...)) rather than propose()"
        )

    def candidates(self, root_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """int64 ``[B, N]`` tree candidates: ``root_ids [B]`` the last emitted tokens, ``hidden
        [B, H]`` the final-normed states that chose them."""
        t0 = time.perf_counter()
        top = self.heads.top_ids(hidden, self.tree.top_k, self.tree.depth)  # the heads the tree reads
        t1 = time.perf_counter()
        cand = self.tree.candidates(root_ids, top)
        self.heads_seconds += t1 - t0
        self.tree_seconds += time.perf_counter() - t1
        return cand

    @property
    def mean_accepted(self) -> float:
        """Mean tokens accepted from the tree per pass (the emitted token not counted)."""
        return self.accepted / self.passes if self.passes else 0.0
