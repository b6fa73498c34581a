"""Speculative decoding loop: a drafter proposes tokens, the target verifies them in one pass.

Each step runs the target once on ``[last token] + drafts`` (``K + 1`` positions) through the
paged KV cache, verifies the drafts with :func:`decodekit.greedy_verify` (temperature 0) or
:func:`decodekit.chain_speculative_sampling_from_logits` (lossless rejection sampling of the
processed target distribution, drafts one-hot), keeps
the accepted drafts plus one emitted token, and rolls the cache back over the rejected ones with
:meth:`PagedKVCache.truncate`. The target's logits are bit-identical whatever the number of
positions in a pass (batch-invariant linear layers and attention), so greedy speculative
decoding reproduces plain greedy decoding token for token.

Drafters: :class:`NgramDrafter` (prompt lookup, one-hot drafts) and :class:`DraftModelDrafter`
(a small trained draft model, :mod:`decodekit.models.draft`; with temperature > 0 it samples its
drafts and hands its processed distribution q to the lossless verification).
"""

from __future__ import annotations

import itertools
import math
import operator
import os
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import torch

from .generate import _check_common, _check_request, _prompt_ids
from .models.gguf_loader import LoadedModel, load_model
from .kv_cache import OutOfBlocksError
from .models.llama import LlamaModel
from .ops import _to_int64_bits, argmax, sample_from_logits, sample_from_probs
from .speculative import chain_speculative_sampling_from_logits, greedy_verify, processed_probs
from .tokenizer import StreamDecoder

__all__ = ["NgramDrafter", "DraftModelDrafter", "SpeculativeResult", "speculative_generate"]

# Offsets of the draft model's own draws (Philox stream 0, the request's seed): this base plus
# K * (target passes so far) + draft position, far from the small offsets of the target's draws.
DRAFT_OFFSET_BASE = 1 << 62


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

    def propose(self, context: Sequence[int], k: int) -> List[int]:
        """Up to ``k`` draft tokens continuing ``context`` (a list of token ids)."""
        n_ctx = len(context)
        for n in range(min(self.max_ngram, n_ctx - 1), self.min_ngram - 1, -1):
            suffix = list(context[n_ctx - n:])
            for start in range(n_ctx - n - 1, -1, -1):  # most recent match first
                if list(context[start:start + n]) == suffix:
                    follow = list(context[start + n:start + n + k])
                    if follow:
                        return follow
        return []


class DraftModelDrafter:
    """Drafting with a small draft model that shares the target's tokenizer.

    The draft keeps its own paged KV cache, one sequence per request (``key``, which
    :func:`speculative_generate` passes) or, without a key, per context (up to
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

    def __init__(self, draft=None, *, target: Optional[LoadedModel] = None, max_sequences: int = 16,
                 block_size: int = 16, cache_tokens: int = 16384) -> None:
        if draft is None:
            from .models.draft import load_draft_model

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
        self.cache = net.new_paged_cache(num_blocks=(cache_tokens + block_size - 1) // block_size + max_sequences,
                                         block_size=block_size)
        self._slots: List[list] = []     # [seq id, token list, key], most recently used last
        self.keyed = True                 # speculative_generate passes a per-request key
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
                old = self._slots.pop(0)   # least recently used
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

    def _run(self, slot: list, tokens: List[int]) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            logits = self.net.forward_paged(torch.tensor([tokens]), self.cache, [slot[0]])
        except OutOfBlocksError:          # evict every other context and retry once
            for other in self._slots[:-1]:
                self.cache.free(other[0])
            self._slots = self._slots[-1:]
            logits = self.net.forward_paged(torch.tensor([tokens]), self.cache, [slot[0]])
        slot[1].extend(tokens)
        self.forward_passes += 1
        self.forward_seconds += time.perf_counter() - t0
        return logits[0]

    def propose_with_logits(self, context: Sequence[int], k: int, choose: Callable, *, key=None) -> tuple:
        """``k`` drafts continuing ``context``, each ``choose(logits, j)`` of the draft's logits
        ``[V]`` at draft position ``j``; returns ``(tokens, logits [k, V])``. ``key`` (any
        hashable, e.g. a request id) keeps one cached sequence per request."""
        V = self.net.config.vocab_size
        if any(isinstance(t, bool) or not isinstance(t, (int, torch.Tensor)) and not hasattr(t, "__index__")
               for t in context):
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
        logits = self._run(slot, context[len(slot[1]):])
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
_CALLS = itertools.count()


def _shipped_draft_drafter(lm: LoadedModel) -> "DraftModelDrafter":
    """The shipped draft's drafter for ``lm``, loaded once and reused by later calls (its cache
    keeps the contexts it has seen; proposals depend only on the context)."""
    key = id(lm)
    if key not in _SHIPPED_DRAFTER or _SHIPPED_DRAFTER[key][0] is not lm:
        _SHIPPED_DRAFTER.clear()
        _SHIPPED_DRAFTER[key] = (lm, DraftModelDrafter(target=lm))
    return _SHIPPED_DRAFTER[key][1]


@dataclass
class SpeculativeResult:
    """What :func:`speculative_generate` produced, with the drafting statistics.

    ``token_ids`` / ``text`` / ``finish_reason`` / ``seed`` as in
    :class:`decodekit.GenerationResult`; ``target_passes`` counts target forward passes after the
    prefill; ``drafted`` and ``accepted`` count proposed and accepted draft tokens.
    """

    prompt_token_ids: List[int]
    token_ids: List[int]
    text: str
    finish_reason: str
    seed: Optional[int]
    prefill_seconds: float
    decode_seconds: float
    target_passes: int
    drafted: int
    accepted: int
    model_name: str = field(default="")

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (0 when nothing was proposed)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Mean tokens emitted per target pass (1 is plain decoding)."""
        return (len(self.token_ids) - 1) / self.target_passes if self.target_passes else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first, per second of decoding."""
        return (len(self.token_ids) - 1) / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def summary(self) -> str:
        return (f"new tokens: {len(self.token_ids)} ({self.finish_reason}), decode: "
                f"{self.decode_tokens_per_second:.1f} tokens/s, target passes: {self.target_passes}, "
                f"tokens/pass: {self.tokens_per_pass:.2f}, acceptance: {100 * self.acceptance_rate:.0f}% "
                f"of {self.drafted} drafted, seed: {self.seed}")


def speculative_generate(prompt, *, model: Union[None, str, os.PathLike, LoadedModel] = None,
                         drafter: Union[str, NgramDrafter, "DraftModelDrafter", object] = "ngram",
                         num_draft_tokens: int = 4,
                         max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                         min_p: float = 0.0, seed=None, chat_template: bool = True,
                         stop_on_eos: bool = True, stream: Optional[Callable] = None):
    """Generate with speculative decoding, for one prompt or a batch of prompts.

    Each step drafts up to K tokens per request, runs the target once on every active
    request's ``[last token] + drafts`` (rows padded to the longest draft; padding positions
    are rolled back), verifies, keeps the accepted drafts plus one emitted token, and rolls
    each sequence back with :meth:`PagedKVCache.truncate`. A request's tokens do not depend
    on the other requests in the batch (its drafts come from its own context and its random
    numbers from its own seed, with the target pass count as the offset).

    Args:
        prompt: text (wrapped in the chat template unless ``chat_template=False``) or token ids,
            or a list of prompts (then a list of results is returned).
        model: as in :func:`decodekit.generate`.
        drafter: ``"ngram"`` (:class:`NgramDrafter`), ``"draft"`` (:class:`DraftModelDrafter` with
            the shipped draft model for SmolLM2-135M-Instruct) or an object with
            ``propose(context_ids, k) -> list[int]`` (one-hot drafts) and optionally
            ``propose_with_logits(context_ids, k, choose) -> (ids, logits [k, V])``, used when
            sampling so that the drafts follow the draft's own distribution.
        num_draft_tokens: K, the most tokens proposed per step (>= 1).
        max_new_tokens, temperature, top_k, top_p, min_p, stop_on_eos: as in
            :func:`decodekit.generate` (one value for every request). With ``temperature == 0``
            verification is greedy and the output equals plain greedy decoding; otherwise the
            processed target distribution is sampled losslessly.
        seed: an int (every request), a list of ints (one per request) or None (random,
            reported; greedy requests report None).
        stream: ``stream(piece)`` for one prompt, ``stream(index, piece)`` for a batch.

    Returns:
        :class:`SpeculativeResult`, or a list of them for a list of prompts.

    Raises:
        TypeError / ValueError for bad arguments (as :func:`decodekit.generate`), a drafter
        without ``propose``, ``num_draft_tokens < 1``, or a seed list of the wrong length.

    Source: Leviathan et al., ICML 2023 and Chen et al., 2023 (verification); prompt lookup
    decoding for the n-gram drafter.
    """
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
        raise ValueError(f"speculative_generate: num_draft_tokens must be an int >= 1, got {num_draft_tokens!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"speculative_generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
            and 0 <= temperature <= 3.4028234663852886e38):
        raise ValueError("speculative_generate: temperature must be finite and >= 0 (at most 3.4028235e38, "
                         f"float32), got {temperature!r:.60}")
    if isinstance(drafter, str) and drafter not in ("ngram", "draft"):
        raise ValueError(f"speculative_generate: drafter must be 'ngram', 'draft' or a drafter object, got {drafter!r}")
    if not isinstance(drafter, str) and not callable(getattr(drafter, "propose", None)):
        raise TypeError("speculative_generate: drafter must be 'ngram', 'draft' or have a propose(context, k) method")
    batched = isinstance(prompt, list) and len(prompt) > 0 and not all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    prompts = prompt if batched else [prompt]
    n_req = len(prompts)
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * n_req
    if len(seeds) != n_req:
        raise ValueError(f"speculative_generate: seed has {len(seeds)} values for {n_req} prompts")
    # The same checks as generate, before the model is loaded (messages name generate's arguments).
    _check_common(model, stream, op="speculative_generate")
    checked = []
    for s in seeds:
        v = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                 seed=s, repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0)
        _check_request(v, "", op="speculative_generate")
        checked.append(v)
    temperature, top_k, top_p, min_p = (checked[0][n] for n in ("temperature", "top_k", "top_p", "min_p"))
    seeds = [v["seed"] for v in checked]
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    net = lm.model
    if drafter == "ngram":
        drafter = NgramDrafter()
    elif drafter == "draft":
        drafter = _shipped_draft_drafter(lm)
    greedy = temperature == 0 or top_k == 1 or top_p == 0
    seeds = [None if greedy else (int.from_bytes(os.urandom(4), "little") if s is None else s) for s in seeds]
    all_ids = [_prompt_ids(lm, p, chat_template, op="speculative_generate") for p in prompts]
    K = num_draft_tokens
    for ids in all_ids:
        if len(ids) + max_new_tokens + K + 1 > net.config.max_seq_len:
            raise ValueError(f"speculative_generate: prompt + max_new_tokens + K exceeds the context length "
                             f"{net.config.max_seq_len}")
    blocks = sum((len(ids) + max_new_tokens + K + 1) // 16 + 2 for ids in all_ids)
    cache = net.new_paged_cache(num_blocks=blocks)
    stop_ids = lm.tokenizer.stop_ids if stop_on_eos else frozenset()

    class _Req:
        pass

    reqs = []
    for i, ids in enumerate(all_ids):
        r = _Req()
        r.i, r.ids, r.seq, r.seed = i, ids, cache.add_sequence(), seeds[i]
        r.out, r.pieces, r.detok = [], [], StreamDecoder(lm.tokenizer)
        r.finish, r.passes, r.drafted, r.accepted, r.offset = "length", 0, 0, 0, 1
        reqs.append(r)

    def emit(r, piece: str) -> None:
        if piece:
            r.pieces.append(piece)
            if stream is not None:
                stream(r.i, piece) if batched else stream(piece)

    def take(r, tok: int) -> bool:
        """Appends a token; returns False when the request is finished."""
        r.out.append(tok)
        if tok in stop_ids:
            r.finish = "eos"
            return False
        emit(r, r.detok.push(tok))
        return len(r.out) < max_new_tokens

    # A drafter with its own distribution (a draft model) samples its drafts from the processed
    # draft distribution q, which verification then uses; others (n-gram) give one-hot drafts.
    sample_drafts = not greedy and callable(getattr(drafter, "propose_with_logits", None))
    keyed = getattr(drafter, "keyed", False) is True   # drafters that keep per-request state
    call_id = next(_CALLS)

    def _draft_chooser(r):
        def choose(dl: torch.Tensor, j: int) -> int:
            q = processed_probs(dl[None], temperature, top_k, top_p, min_p)
            off = DRAFT_OFFSET_BASE + K * r.passes + j
            return int(sample_from_probs(q, seed=r.seed, offset=off)[0])
        return choose

    t0 = time.perf_counter()
    for r in reqs:  # prefill each prompt alone
        logits = net.forward_paged(torch.tensor([r.ids]), cache, [r.seq])
        first = int(sample_from_logits(logits, temperature, top_k, top_p, min_p, seed=r.seed, offset=0)[0])
        r.alive = take(r, first)
    t1 = time.perf_counter()
    while True:
        active = [r for r in reqs if r.alive]
        if not active:
            break
        drafts, draft_logits = [], []
        for r in active:
            room = max_new_tokens - len(r.out)
            if sample_drafts:
                proposal, dl = drafter.propose_with_logits(r.ids + r.out, min(K, room), _draft_chooser(r),
                                                           **({"key": (call_id, r.i)} if keyed else {}))
                proposal = list(proposal)
                if not isinstance(dl, torch.Tensor) or tuple(dl.shape) != (len(proposal), net.config.vocab_size):
                    raise ValueError(f"speculative_generate: the drafter returned logits of shape "
                                     f"{tuple(getattr(dl, 'shape', ()))} for {len(proposal)} drafts; expected "
                                     f"[{len(proposal)}, {net.config.vocab_size}]")
                draft_logits.append(dl)
            else:
                proposal = drafter.propose(r.ids + r.out, min(K, room),
                                           **({"key": (call_id, r.i)} if keyed else {}))
                if proposal is None or isinstance(proposal, (str, bytes)) or not hasattr(proposal, "__iter__"):
                    raise TypeError(f"speculative_generate: drafter.propose must return a list of token ids, got "
                                    f"{type(proposal).__name__}")
                proposal = list(proposal)[: min(K, room)]
            if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < net.config.vocab_size
                   for t in proposal):
                raise ValueError(f"speculative_generate: the drafter proposed {proposal!r}; draft tokens must be "
                                 f"ints in [0, {net.config.vocab_size})")
            drafts.append(proposal)
        width = max(len(d) for d in drafts)
        inp = torch.tensor([[r.out[-1]] + d + [r.out[-1]] * (width - len(d)) for r, d in zip(active, drafts)])
        draft_t = torch.tensor([d + [-1] * (width - len(d)) for d in drafts], dtype=torch.int64).reshape(
            len(active), width)
        before = cache.seq_lens([r.seq for r in active]).tolist()
        logits = net.forward_paged(inp, cache, [r.seq for r in active], all_logits=True)  # [B, 1 + width, V]
        if greedy:
            res = greedy_verify(draft_t, logits)
        else:
            dlog = None
            if sample_drafts:
                dlog = torch.zeros(len(active), width, net.config.vocab_size)
                for b, dl in enumerate(draft_logits):
                    dlog[b, : dl.shape[0]] = dl
            res = chain_speculative_sampling_from_logits(
                dlog, draft_t, logits, temperature, top_k, top_p, min_p,
                seed=torch.tensor([_to_int64_bits(r.seed, "seed", "speculative_generate") for r in active],
                                  dtype=torch.int64),
                offset=torch.tensor([r.offset for r in active], dtype=torch.int64))
        for b, r in enumerate(active):
            n = int(res.num_accepted[b])
            r.passes += 1
            r.offset += 1
            r.drafted += len(drafts[b])
            r.accepted += n
            cache.truncate(r.seq, before[b] + 1 + n)  # keep the last token and the accepted drafts
            for tok in res.output_token_ids[b, : n + 1].tolist():
                r.alive = take(r, tok)
                if not r.alive:
                    break
            if not r.alive:
                cache.free(r.seq)
    t2 = time.perf_counter()
    results = []
    for r in reqs:
        emit(r, r.detok.flush())
        results.append(SpeculativeResult(prompt_token_ids=r.ids, token_ids=r.out, text="".join(r.pieces),
                                         finish_reason=r.finish, seed=r.seed, prefill_seconds=t1 - t0,
                                         decode_seconds=t2 - t1, target_passes=r.passes, drafted=r.drafted,
                                         accepted=r.accepted, model_name=lm.name))
    return results if batched else results[0]
