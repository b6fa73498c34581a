"""The decode loop, written once for plain and speculative decoding:

    prefill -> [draft] -> sample or verify -> append or roll back -> stop -> stream

1. **Prefill** each prompt alone (a batch of one) into a shared paged KV cache; the other
   samples of a prompt (``n``) fork its sequence (:meth:`PagedKVCache.fork`).
2. **Draft** (with a drafter): up to K tokens per request, from its own context.
3. **Forward** the target once on every active request's ``[last token] + drafts`` (rows padded
   to the longest draft). Without a drafter that is one token per request.
4. **Process** every position like plain sampling does: penalties over the tokens before that
   position (prompt + output + the drafts before it) and the logit bias; then length control:
   ``eos_bias`` added to every stop id's logit, and every stop id at ``-inf`` while the position
   is before ``min_new_tokens``.
5. **Sample or verify**: without drafts, :func:`decodekit.sample_from_logits` (also for a
   request without drafts in a pass where others drafted); with drafts,
   :func:`decodekit.greedy_verify` for greedy requests and lossless
   :func:`decodekit.chain_speculative_sampling_from_logits` for the others.
6. **Append or roll back**: keep the accepted drafts plus the emitted token; the cache rolls back
   over the rejected drafts (:meth:`PagedKVCache.truncate`).
7. **Stop** after a stop token, a stop string or ``max_new_tokens``; a finished request leaves
   the batch and its blocks are freed. **Stream** each complete piece of text, holding back the
   text that could still become a stop string.

Randomness (DESIGN.md): each request has its own seed; the offset of a call is the 0-based
position, in the generated sequence, of the first token the call draws (the first token: 0;
plain decoding: the step; speculative: the position of the pass's first draft). Bits 48-61 carry
the sample index (``Request.sample``: 0 for plain generation, ``i`` for sample ``i`` of ``n``)
and bit 62 marks the draft model's own draws. Every step of the model
and of the sampler is batch-invariant in deterministic mode, so a request produces exactly the
tokens it produces alone; and since the target's logits do not depend on the number of positions
in a pass, greedy speculative decoding reproduces plain greedy decoding token for token.
"""

from __future__ import annotations

import time
import weakref
from typing import Callable, List, Optional

import torch

from .._checks import to_int64_bits
from .._loader import _C
from ..models.gguf_loader import LoadedModel
from ..ops import (
    apply_penalties,
    chain_speculative_sampling_from_logits,
    greedy_tree_verify,
    greedy_verify,
    processed_probs,
    sample_from_logits,
    sample_from_probs,
    tree_speculative_sampling,
    typical_acceptance,
)
from ..params import rows
from ..tokenizer import StreamDecoder
from .drafters import MedusaDrafter
from .request import Request

__all__ = ["run", "PAGE_SIZE", "DRAFT_OFFSET_BIT"]

_sample_from_logits_fast = _C._sample_from_logits_fast

PAGE_SIZE = 16  # positions per block of the paged KV cache
DRAFT_OFFSET_BIT = 1 << 62  # set in the offsets of the draft model's own draws


def run(  # noqa: C901 (the one decode loop; its steps are numbered in the body)
    lm: LoadedModel,
    requests: List[Request],
    *,
    stop_ids,
    emit_to: Optional[Callable[[int, str], None]],
    drafter=None,
    num_draft_tokens: int = 0,
    call_key=None,
    op: str = "generate",
    top_logprobs: Optional[int] = None,
    logprobs_mode: str = "processed",
    deterministic: bool = True,
    adaptive_drafts: bool = False,
) -> None:
    """Decode every request until it stops; fills in tokens, text pieces, finish reasons,
    counts and timings of ``requests`` (see the module docstring).

    ``top_logprobs``: ``None`` records no logprobs; an int ``n >= 0`` records each emitted
    token's logprob and its top ``n`` (``logprobs_mode`` as in :func:`decodekit.sample_from_logits`).
    A request with ``fork_of`` set shares the prefill of the request with that index. ``deterministic`` is the sampler's mode (the
    model's is ``lm.model.deterministic``). ``adaptive_drafts``: each request's draft length
    follows its own acceptance (:func:`_next_draft_len`) instead of staying at ``num_draft_tokens``."""
    net = lm.model
    on_host = net.device.type == "cpu"
    decode_step = getattr(net, "_decode_step", None) if on_host else None

    def forward_paged(*args, **kwargs):
        """The model's forward (on its device, its KV cache there too); the logits (and hidden
        states) come back to the host, where the loop applies penalties, samples and verifies
        with the CPU kernels: the same tokens for the same logits on every device."""
        out = net.forward_paged(*args, **kwargs)
        if on_host:
            return out
        return tuple(t.cpu() for t in out) if isinstance(out, tuple) else out.cpu()

    tree_mode = isinstance(drafter, MedusaDrafter)
    tree = drafter.tree if tree_mode else None
    K = (tree.num_nodes - 1 if tree_mode else num_draft_tokens) if drafter is not None else 0
    hidden = {}  # tree mode: request index -> the final-normed state that chose its last token
    blocks = sum(-(-(len(r.prompt_ids) + r.max_new_tokens + K + 1) // PAGE_SIZE) for r in requests)
    cache = net.new_paged_cache(max(blocks, 1), block_size=PAGE_SIZE)
    t_decode = 0.0
    stop_list = sorted(stop_ids)
    with_logprobs = top_logprobs is not None

    def emit(r: Request, upto: int) -> None:
        """Streams the decoded text up to ``upto`` characters (what is not yet out)."""
        piece = r.text[r.emitted : upto] if upto > r.emitted else ""
        if piece:
            r.pieces.append(piece)
            r.emitted = upto
            if emit_to is not None:
                emit_to(r.key, piece)

    def take(r: Request, token: int, lp) -> bool:
        """Appends a token; False when the request is finished."""
        r.token_ids.append(token)
        if lp is not None:
            r.logprobs.append(lp[0])
            r.top_logprobs.append(lp[1])
        if token in stop_ids:
            r.finish_reason = "eos"
            return False
        before = len(r.text)
        r.text += r.detok.push(token)
        if r.stop:
            if len(r.token_ids) >= r.min_new_tokens:
                cut = _find_stop(r.text, r.stop, before)
                if cut is not None:
                    r.text = r.text[:cut]
                    r.finish_reason = "stop"
                    emit(r, cut)
                    return False
            emit(r, len(r.text) - _held_back(r.text, r.emitted, r.stop))
        else:
            emit(r, len(r.text))
        return len(r.token_ids) < r.max_new_tokens

    def finish(r: Request) -> None:
        r.alive = False
        if r.finish_reason != "stop":
            r.text += r.detok.flush()
            emit(r, len(r.text))
        cache.free(r.seq_id)
        r.decode_seconds = time.perf_counter() - t_decode

    # 1. prefill, each prompt alone; the other samples of a prompt fork its sequence
    first = {}
    by_index = {r.index: r for r in requests}
    for r in requests:
        r.detok = StreamDecoder(lm.tokenizer)
        if r.fork_of is not None:
            parent = by_index[r.fork_of]
            r.seq_id = cache.fork(parent.seq_id)
            first[r.index] = first[parent.index].clone()
            if tree_mode:
                hidden[r.index] = hidden[parent.index]
            r.prefill_seconds = parent.prefill_seconds
            continue
        r.seq_id = cache.add_sequence()
        t0 = time.perf_counter()
        ids = torch.tensor([r.prompt_ids], dtype=torch.long)
        if tree_mode:
            first[r.index], h = forward_paged(ids, cache, [r.seq_id], return_hidden=True)
            hidden[r.index] = h[0]
        else:
            first[r.index] = forward_paged(ids, cache, [r.seq_id])
        r.prefill_seconds = time.perf_counter() - t0
    t_decode = time.perf_counter()
    for r in requests:
        if r.max_new_tokens == 0:
            finish(r)
    active = [r for r in requests if r.alive]
    if not active:
        return
    logits = torch.cat([first[r.index] for r in active])[:, None]  # [B, 1, V]
    drafts: List[List[int]] = [[] for _ in active]
    draft_logits: List[Optional[torch.Tensor]] = [None] * len(active)
    before: Optional[List[int]] = None  # cached lengths before a verification pass
    cand: Optional[torch.Tensor] = None  # tree mode: [B, N] candidates of the pass
    plain_pass = False  # tree mode: the last pass was a plain step (adaptive, all greedy)
    own_tree: List[bool] = []  # tree mode: per request, its candidates were verified in the last pass
    pass_clock = _PassClock()  # greedy adaptive drafting: seconds per plain step, tree and chain pass
    # Greedy chain drafting across calls: a greedy request takes plain steps only (no drafting,
    # no probes) while what this drafter's earlier greedy passes measured says drafting does
    # not pay, except every DRAFT_SCOUT_EVERY-th request, which first takes DRAFT_SCOUT_PLAIN
    # plain steps (so that this call's clock has timed plain steps: a pass is only recorded
    # against them, and a drafter that now pays would otherwise never take one), then probes
    # one draft and drafts as usual, keeping the record current. Greedy tokens are the same
    # either way; sampled requests never look at it.
    memory = _draft_memory(drafter, net) if drafter is not None and adaptive_drafts and not tree_mode else None
    if memory is not None:
        for r in active:
            if r.params.greedy and memory.skips_next():
                r.draft_len, r.draft_wait = 0, DRAFT_NEVER
            elif r.params.greedy and not memory.pays():
                r.draft_len, r.draft_wait = 0, DRAFT_SCOUT_PLAIN
    chain_plain = False  # chain mode: the last pass was a plain step (nobody drafted)
    tree_hidden: Optional[torch.Tensor] = None  # tree mode: [B, N, H] states of the pass
    while True:
        # 4-5. process every position, then sample (the first token, plain decoding, and a
        # request without drafts in any pass, so that its random numbers never depend on what
        # its neighbours drafted) or verify the drafts
        try:  # a row the sampler or the verifier cannot draw from: name its request
            if cand is None:
                logits = _length_control(_processed(logits, active, drafts), active, stop_list)
                emitted, accepted, lps = _sample_or_verify(
                    logits,
                    active,
                    drafts,
                    draft_logits,
                    verify=before is not None,
                    top_logprobs=top_logprobs,
                    logprobs_mode=logprobs_mode,
                    deterministic=deterministic,
                )
            else:
                depths = tree.depths.tolist()
                prefixes = tree.path_tokens(cand)
                logits = _length_control(_processed(logits, active, None, prefixes), active, stop_list, depths)
                t0 = time.perf_counter()
                emitted, accepted, nodes, lps = _verify_tree_rows(
                    logits, active, cand, own_tree, drafter, top_logprobs, logprobs_mode, deterministic
                )
        except ValueError as e:
            bad = _undrawable(logits, active)
            if not bad:
                raise
            raise Undrawable(bad, len(bad[0].token_ids)) from e
        if cand is not None:
            drafter.verify_seconds += time.perf_counter() - t0
            drafter.passes += sum(own_tree)
            drafter.accepted += sum(accepted)
            # the accepted path's keys and values move next to the root; the rest is dropped
            path = torch.full((len(active), tree.depth + 1), -1, dtype=torch.int64)
            path[:, 0] = 0
            for b in range(len(active)):
                path[b, 1 : 1 + accepted[b]] = torch.tensor(nodes[b][: accepted[b]], dtype=torch.int64)
                last = nodes[b][accepted[b] - 1] if accepted[b] else 0
                hidden[active[b].index] = tree_hidden[b, last]
            cache.compact([r.seq_id for r in active], torch.tensor(before, dtype=torch.int64), path)
        # 6-7. append or roll back; stop; stream
        running = []
        for b, r in enumerate(active):
            if before is not None and cand is None:
                cache.truncate(r.seq_id, before[b] + 1 + accepted[b])  # the last token and the accepted drafts
            taken = 0
            for j, token in enumerate(emitted[b]):
                taken += 1
                if not take(r, token, lps[b][j] if with_logprobs else None):
                    r.alive = False
                    break
            r.accepted += min(accepted[b], taken)  # drafts accepted after a stop are not emitted
            if adaptive_drafts and (before is not None or chain_plain) and cand is None:
                wait = r.draft_wait
                r.draft_len = _next_draft_len(r, len(drafts[b]), accepted[b], K)
                if r.params.greedy and drafts[b] and pass_clock.timed("draft"):
                    # A greedy request (its tokens are the same either way) drafts on while its
                    # drafting passes emit more per second than plain steps, and otherwise
                    # takes plain steps, probing one draft after a wait that only grows while
                    # drafting does not pay, whatever single probes accept.
                    g = float(accepted[b])
                    r.draft_gain = (
                        g if r.draft_gain < 0 else (1 - DRAFT_GAIN_WEIGHT) * r.draft_gain + DRAFT_GAIN_WEIGHT * g
                    )
                    if memory is not None and pass_clock.mean["plain"] > 0:
                        memory.add_pass(g, pass_clock.mean["draft"] / pass_clock.mean["plain"])
                    if pass_clock.pays("draft", r.draft_gain):
                        if r.draft_len == 0:
                            r.draft_len, r.draft_wait = 1, DRAFT_PROBE_WAIT
                    else:
                        r.draft_len = 0
                        r.draft_wait = min(DRAFT_PROBE_WAIT_MAX, 2 * max(wait, DRAFT_PROBE_WAIT // 2))
            elif adaptive_drafts and tree_mode and r.params.greedy and (cand is not None or plain_pass):
                # a greedy request in tree mode: length 1 = a tree pass, 0 = a plain step
                mine = cand is not None and own_tree[b]
                if mine:
                    g = float(accepted[b])
                    r.draft_gain = (
                        g if r.draft_gain < 0 else (1 - DRAFT_GAIN_WEIGHT) * r.draft_gain + DRAFT_GAIN_WEIGHT * g
                    )
                r.draft_len = _next_draft_len(r, 1 if mine else 0, min(accepted[b], 1), 1)
                if r.draft_len == 0 and mine and pass_clock.tree_pays(r.draft_gain):
                    # a miss, but on average the tree passes emit more per second than plain
                    # steps would: keep verifying trees (greedy tokens are the same either way)
                    r.draft_len, r.draft_wait = 1, DRAFT_PROBE_WAIT
            elif adaptive_drafts and tree_mode and (cand is not None or plain_pass):
                # a sampled request in tree mode: its own tree verified (length 1), or its token
                # sampled from the root's distribution as in plain decoding (0), from its own
                # passes only, so that a seeded request draws the same whatever its neighbours
                # do (the root's logits are the same bits in a tree pass and a plain step)
                r.draft_len = _next_draft_len(r, 1 if own_tree[b] else 0, min(accepted[b], 1), 1)
            if r.alive:
                running.append(r)
            else:
                finish(r)
        active = running
        if not active:
            return
        seqs = [r.seq_id for r in active]
        if tree_mode and adaptive_drafts and all(r.draft_len == 0 for r in active):
            # Every request's heads keep missing: a plain step (a greedy request's argmax is the
            # token the tree pass would emit; a sampled request at length 0 draws from its root
            # by plain sampling in a tree pass too), which also gives the heads their next state.
            before, cand, plain_pass, own_tree = None, None, True, [False] * len(active)
            pass_clock.start("plain")
            inp = torch.tensor([r.token_ids[-1] for r in active], dtype=torch.long)[:, None]
            logits, h = forward_paged(inp, cache, seqs, return_hidden=True)  # [B, V], [B, H]
            logits = logits[:, None]
            for b, r in enumerate(active):
                hidden[r.index] = h[b]
                r.steps += 1
            continue
        plain_pass = False
        if tree_mode:  # 2-3. the heads' tree, and one target pass over it with the tree mask
            pass_clock.start("tree")
            before = cache.seq_lens(seqs).tolist()
            roots = torch.tensor([r.token_ids[-1] for r in active], dtype=torch.long)
            cand = drafter.candidates(roots, torch.stack([hidden[r.index] for r in active]))
            # a sampled request at length 0 samples its root's token instead of verifying its
            # tree (its candidates still run through the pass, which the batch takes anyway;
            # they are dropped at compaction)
            own_tree = [not adaptive_drafts or r.params.greedy or r.draft_len != 0 for r in active]
            t0 = time.perf_counter()
            # A request whose tree's nodes would not fit in the context left takes its root alone
            # (a plain step's logits and state, the same bits as the root's in a tree pass) and
            # draws from it as a request at length 0 does: what it would do alone; the others
            # verify their trees as they would alone.
            tail = [b for b in range(len(active)) if before[b] + tree.num_nodes > lm.config.max_seq_len]
            for b in tail:
                own_tree[b] = False
            logits, tree_hidden = _tree_pass(forward_paged, cand, cache, seqs, tree, tail)  # [B, N, V], [B, N, H]
            drafter.forward_seconds += time.perf_counter() - t0
            for r, own in zip(active, own_tree):
                r.steps += 1
                r.drafted += tree.num_nodes - 1 if own else 0
            continue
        # 2. draft
        t_pass = time.perf_counter()
        drafts, draft_logits = [], []
        for r in active:
            k = K if not adaptive_drafts or r.draft_len < 0 else r.draft_len
            d, dl = (
                _propose(drafter, r, k, net.config.vocab_size, call_key, op)
                if drafter is not None and k > 0
                else ([], None)
            )
            r.drafted += len(d)
            drafts.append(d)
            draft_logits.append(dl)
        width = max(len(d) for d in drafts)
        # 3. one target pass over [last token] + drafts; a plain step when nobody drafted, as
        # without a drafter (a request without drafts takes its token as a plain step does in
        # any pass: the argmax, or a draw at its own offset from its first position's logits)
        chain_plain = drafter is not None and width == 0
        if drafter is not None and adaptive_drafts:
            pass_clock.start("plain" if width == 0 else "draft", t_pass)
        if drafter is None or chain_plain:
            before = None
            if decode_step is not None:  # forward_paged's step with less Python (the same bits)
                logits = decode_step([r.token_ids[-1] for r in active], cache, seqs, keepdim=True)  # [B, 1, V]
            else:
                inp = torch.tensor([r.token_ids[-1] for r in active], dtype=torch.long)[:, None]
                logits = forward_paged(inp, cache, seqs)[:, None]  # [B, 1, V]
        else:
            before = cache.seq_lens(seqs).tolist()
            inp = torch.tensor(
                [[r.token_ids[-1]] + d + [r.token_ids[-1]] * (width - len(d)) for r, d in zip(active, drafts)],
                dtype=torch.long,
            )
            logits = forward_paged(inp, cache, seqs, all_logits=True)  # [B, 1 + width, V]
        for r in active:
            r.steps += 1


class Undrawable(Exception):
    """Raised by :func:`run` when the processed logits of ``requests`` leave no token to draw
    (a NaN, ``+inf`` with temperature > 0, or no finite logit) after ``position`` new tokens:
    the sampler's error names batch rows, which :func:`decodekit.generate` turns into requests."""

    def __init__(self, requests: List[Request], position: int) -> None:
        super().__init__(f"no token can be drawn for requests {[r.index for r in requests]}")
        self.requests, self.position = requests, position


def _undrawable(logits: torch.Tensor, active: List[Request]) -> List[Request]:
    """The requests of ``active`` with a row of ``logits [B, T, V]`` that the sampler marks invalid
    at the request's temperature (its own rule, through ``return_valid``)."""
    B, V = len(active), logits.shape[-1]
    x = logits.reshape(B, -1, V)
    temperature = torch.tensor([r.params.temperature for r in active], dtype=torch.float32)
    valid = sample_from_logits(
        x.reshape(-1, V), temperature.repeat_interleave(x.shape[1]), seed=0, return_valid=True
    ).valid.view(B, -1)
    return [r for r, ok in zip(active, valid.all(-1).tolist()) if not ok]


def _tree_pass(forward_paged, cand: torch.Tensor, cache, seqs: List[int], tree, tail: List[int]):
    """The tree pass's ``(logits [B, N, V], hidden [B, N, H])``: one target pass over the trees
    (tree mask), except for the rows ``tail``, which run their root (``cand[b, 0]``) alone, as a
    plain step, every node's row then holding the root's."""
    if not tail:
        return forward_paged(cand, cache, seqs, all_logits=True, return_hidden=True, tree_parents=tree.parents)
    B, N = cand.shape
    rest = set(tail)
    fit = [b for b in range(B) if b not in rest]
    root_logits, root_hidden = forward_paged(cand[tail, :1], cache, [seqs[b] for b in tail], return_hidden=True)
    logits = root_logits.new_empty(B, N, root_logits.shape[-1])
    hidden = root_hidden.new_empty(B, N, root_hidden.shape[-1])
    logits[tail] = root_logits[:, None]
    hidden[tail] = root_hidden[:, None]
    if fit:
        lf, hf = forward_paged(
            cand[fit], cache, [seqs[b] for b in fit], all_logits=True, return_hidden=True, tree_parents=tree.parents
        )
        logits[fit], hidden[fit] = lf, hf
    return logits, hidden


def _processed(
    logits: torch.Tensor, active: List[Request], drafts: Optional[List[List[int]]], prefixes=None
) -> torch.Tensor:
    """Penalties and logit bias of each request at every position of ``logits [B, T, V]`` (in
    place): position ``j`` sees the prompt, the output and the drafts before it (``drafts[b][:j]``,
    or in a tree pass ``prefixes[b][j]``: the candidates on the path down to node ``j``).

    Only the rows whose request asks for them go through :func:`decodekit.apply_penalties`, so a
    request without penalties keeps its logits' bits whatever its neighbours ask for. Repetition
    counts every token of the prompt and the output once (HF transformers); frequency and
    presence count the output (OpenAI API, vLLM).
    """
    wants = [
        (b, r)
        for b, r in enumerate(active)
        if r.params.repetition_penalty != 1.0
        or r.params.logit_bias
        or r.params.frequency_penalty != 0.0
        or r.params.presence_penalty != 0.0
    ]
    if not wants:
        return logits  # (no request asks for them: nothing built at this step)
    B, T, V = logits.shape
    rep, freq = [], []  # (flat row, request, output before the position)
    for b, r in wants:
        p = r.params
        for j in range(T):
            out = r.token_ids + (drafts[b][:j] if prefixes is None else prefixes[b][j])
            if p.repetition_penalty != 1.0 or p.logit_bias:
                rep.append((b * T + j, r, out))
            if (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0) and out:
                freq.append((b * T + j, r, out))
    flat = logits.view(B * T, V)
    if rep:
        idx = [i for i, _, _ in rep]
        seen = [sorted(set(r.prompt_ids) | set(out)) for _, r, out in rep]
        penalty = torch.tensor([r.params.repetition_penalty for _, r, _ in rep], dtype=torch.float32)
        bias = [r.params.logit_bias or {} for _, r, _ in rep]
        flat[idx] = apply_penalties(
            flat[idx], repetition_penalty=penalty, token_ids=seen, logit_bias=bias if any(bias) else None
        )
    if freq:
        idx = [i for i, _, _ in freq]
        frequency = torch.tensor([r.params.frequency_penalty for _, r, _ in freq], dtype=torch.float32)
        presence = torch.tensor([r.params.presence_penalty for _, r, _ in freq], dtype=torch.float32)
        flat[idx] = apply_penalties(
            flat[idx], frequency_penalty=frequency, presence_penalty=presence, token_ids=[out for _, _, out in freq]
        )
    return logits


def _find_stop(text: str, stop, before: int) -> Optional[int]:
    """Where ``text`` is cut: the start of the first occurrence of a stop string that ends past
    ``before`` (the text's length before the last token), or None."""
    best = None
    for s in stop:
        i = text.find(s, max(0, before - len(s) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def _held_back(text: str, emitted: int, stop) -> int:
    """How many characters at the end of ``text`` (after the first ``emitted``) could still be
    the beginning of a stop string: the stream holds them back."""
    room = len(text) - emitted
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, room), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


def _length_control(
    logits: torch.Tensor, active: List[Request], stop_list: List[int], depths: Optional[List[int]] = None
) -> torch.Tensor:
    """``eos_bias`` added to every stop id's logit, and the stop ids at ``-inf`` at the positions
    before ``min_new_tokens`` (position ``j`` of ``logits [B, T, V]`` draws token number
    ``len(token_ids) + j``, or ``+ depths[j]`` in a tree pass), in place, only in the rows that
    ask for it."""
    if not stop_list or all(r.eos_bias == 0.0 and len(r.token_ids) >= r.min_new_tokens for r in active):
        return logits  # (no request asks for either: no tensor built at this step)
    B, T, V = logits.shape
    ids = torch.tensor(stop_list, dtype=torch.int64)
    for b, r in enumerate(active):
        if r.eos_bias != 0.0:
            logits[b, :, ids] += r.eos_bias
        before_min = r.min_new_tokens - len(r.token_ids)
        if depths is None:
            if before_min > 0:
                logits[b, : min(T, before_min), ids] = float("-inf")
        else:
            for j in range(T):
                if depths[j] < before_min:
                    logits[b, j, ids] = float("-inf")
    return logits


def _logprob_rows(logits: torch.Tensor, reqs: List[Request], tokens: List[int], n: int, mode: str) -> list:
    """``(logprob, [(id, logprob)] * n)`` of ``tokens[i]`` under the processed distribution of
    row ``i`` of ``logits [N, V]`` (request ``reqs[i]``'s parameters), from the sampling op's
    logprob outputs: the op's top-``n`` list, and the logprob of the given token: the op's value
    where the token is in its top ``max(n, 1)`` (as a plain step reports it), else from
    :func:`decodekit.processed_probs` in float64 (``log_softmax`` of the logits in "raw" mode)."""
    if not tokens:
        return []
    params, rng = rows([r.params for r in reqs], [0] * len(reqs))
    # The op's top list (at least the top 1): a token in it takes the op's value, the bits a
    # plain step reports for it (a greedy token always is); any other token, the float64 value.
    out = sample_from_logits(logits, *params, **rng, top_logprobs=max(n, 1), logprobs_mode=mode)
    tok = torch.tensor(tokens, dtype=torch.int64)[:, None]
    if mode == "raw":
        lp = torch.log_softmax(logits.double(), dim=-1).gather(1, tok)[:, 0]
    else:
        lp = processed_probs(logits, *params).double().log().gather(1, tok)[:, 0]
    res = []
    for i in range(len(tokens)):
        ids, vals = out.top_ids[i].tolist(), out.top_logprobs[i].tolist()
        own = vals[ids.index(tokens[i])] if tokens[i] in ids else float(lp[i])
        res.append((own, list(zip(ids[:n], vals[:n])) if n else []))
    return res


def _sample_or_verify(
    logits: torch.Tensor,
    active: List[Request],
    drafts: List[List[int]],
    draft_logits: List[Optional[torch.Tensor]],
    verify: bool,
    top_logprobs: Optional[int] = None,
    logprobs_mode: str = "processed",
    deterministic: bool = True,
):
    """Per request: the tokens to emit, the number of accepted drafts and (when
    ``top_logprobs`` is not None) each emitted token's ``(logprob, top list)``."""
    B = len(active)
    if not verify:  # plain sampling, offset = the position of the token drawn
        params, rng = rows(
            [r.params for r in active], [len(r.token_ids) for r in active], [r.sample for r in active], scalars=True
        )
        if top_logprobs is None:
            # The common call straight to the C++ entry (ids as a list, no [B, V] view): None
            # for anything unusual, then the full op, which raises the precise error.
            tokens = _sample_from_logits_fast(logits, *params, rng["seed"], rng["offset"], deterministic, True)
            if tokens is None:
                tokens = sample_from_logits(logits[:, 0], *params, **rng, deterministic=deterministic).tolist()
            return [[t] for t in tokens], [0] * B, None
        out = sample_from_logits(
            logits[:, 0],
            *params,
            **rng,
            return_logprobs=True,
            top_logprobs=top_logprobs,
            logprobs_mode=logprobs_mode,
            deterministic=deterministic,
        )
        tokens = out.token_ids.tolist()
        lps = [
            [
                (
                    float(out.logprobs[b]),
                    list(zip(out.top_ids[b].tolist(), out.top_logprobs[b].tolist())) if top_logprobs else [],
                )
            ]
            for b in range(B)
        ]
        return [[t] for t in tokens], [0] * B, lps
    _, T, V = logits.shape
    draft_t = torch.tensor([d + [-1] * (T - 1 - len(d)) for d in drafts], dtype=torch.int64)  # [B, K]
    emitted: List[List[int]] = [[] for _ in range(B)]
    accepted = [0] * B
    greedy = [b for b, r in enumerate(active) if r.params.greedy]
    sampled = [b for b, r in enumerate(active) if not r.params.greedy and drafts[b]]
    # A sampled request without drafts draws its token as a plain step does (its offset, the
    # plain stream), whatever its neighbours drafted: from its first position's logits, which
    # are the same bits in a pass of any width.
    undrafted = [b for b, r in enumerate(active) if not r.params.greedy and not drafts[b]]
    if undrafted:
        tokens, _, _ = _sample_or_verify(
            logits[undrafted, :1], [active[b] for b in undrafted], [[] for _ in undrafted], [None] * len(undrafted),
            verify=False, deterministic=deterministic,
        )  # fmt: skip
        for b, t in zip(undrafted, tokens):
            emitted[b] = t
    groups = []
    if greedy:  # (no copy of the logits when every row is greedy)
        everyone = len(greedy) == B
        groups.append(
            (greedy, greedy_verify(draft_t if everyone else draft_t[greedy], logits if everyone else logits[greedy]))
        )
    if sampled:
        # The offset of a pass is the position of its first draft in the generated sequence.
        params, rng = rows(
            [active[b].params for b in sampled],
            [len(active[b].token_ids) for b in sampled],
            [active[b].sample for b in sampled],
        )
        dlog = None
        if any(draft_logits[b] is not None for b in sampled):
            dlog = torch.zeros(len(sampled), T - 1, V)
            for i, b in enumerate(sampled):
                if draft_logits[b] is not None:
                    dlog[i, : draft_logits[b].shape[0]] = draft_logits[b]
        groups.append(
            (sampled, chain_speculative_sampling_from_logits(dlog, draft_t[sampled], logits[sampled], *params, **rng))
        )
    for members, res in groups:
        for i, b in enumerate(members):
            n = int(res.num_accepted[i])
            accepted[b] = n
            emitted[b] = res.output_token_ids[i, : n + 1].tolist()
    if top_logprobs is None:
        return emitted, accepted, None
    # token j of a pass is chosen at position j (the last token, then the drafts)
    return emitted, accepted, _pass_logprobs(logits, active, emitted, lambda b, j: j, top_logprobs, logprobs_mode)


def _verify_tree_rows(
    logits: torch.Tensor,
    active: List[Request],
    cand: torch.Tensor,
    own_tree: List[bool],
    drafter: MedusaDrafter,
    top_logprobs: Optional[int],
    logprobs_mode: str,
    deterministic: bool,
):
    """:func:`_verify_tree` for the requests whose tree is verified (``own_tree``), and for the
    others one token sampled from the root's processed logits exactly as a plain step samples
    it (:func:`_sample_or_verify`); the same outputs as :func:`_verify_tree`."""
    if all(own_tree):
        return _verify_tree(logits, active, cand, drafter, top_logprobs, logprobs_mode, deterministic)
    B = len(active)
    emitted: List[List[int]] = [[] for _ in range(B)]
    accepted, nodes = [0] * B, [[] for _ in range(B)]
    lps = None if top_logprobs is None else [[] for _ in range(B)]
    mine = [b for b in range(B) if own_tree[b]]
    root = [b for b in range(B) if not own_tree[b]]
    e, a, lp = _sample_or_verify(
        logits[root, :1],
        [active[b] for b in root],
        [[] for _ in root],
        [None] * len(root),
        verify=False,
        top_logprobs=top_logprobs,
        logprobs_mode=logprobs_mode,
        deterministic=deterministic,
    )
    for i, b in enumerate(root):
        emitted[b], accepted[b] = e[i], a[i]
        if lps is not None:
            lps[b] = lp[i]
    if mine:
        e, a, n, lp = _verify_tree(
            logits[mine], [active[b] for b in mine], cand[mine], drafter, top_logprobs, logprobs_mode, deterministic
        )
        for i, b in enumerate(mine):
            emitted[b], accepted[b], nodes[b] = e[i], a[i], n[i]
            if lps is not None:
                lps[b] = lp[i]
    return emitted, accepted, nodes, lps


def _verify_tree(
    logits: torch.Tensor,
    active: List[Request],
    cand: torch.Tensor,
    drafter: MedusaDrafter,
    top_logprobs: Optional[int],
    logprobs_mode: str,
    deterministic: bool,
):
    """Tree verification of one pass: per request the emitted tokens, the number of accepted
    candidates, the accepted nodes (flat indices, in path order) and the logprobs.

    Greedy requests: :func:`decodekit.greedy_tree_verify` on the processed logits. Others: the
    processed distributions of every node (:func:`decodekit.processed_probs`, the filters of
    plain sampling), then :func:`decodekit.tree_speculative_sampling` (lossless) or
    :func:`decodekit.typical_acceptance`, with the request's seed and the offset of the pass
    (the position of its first new token); the node streams are DESIGN.md's."""
    B, N, V = logits.shape
    tree = drafter.tree
    parents = tree.parents[None].expand(B, N).contiguous()
    emitted: List[List[int]] = [[] for _ in range(B)]
    accepted = [0] * B
    nodes: List[List[int]] = [[] for _ in range(B)]
    greedy = [b for b, r in enumerate(active) if r.params.greedy]
    sampled = [b for b, r in enumerate(active) if not r.params.greedy]
    groups = []
    if greedy:
        res = greedy_tree_verify(cand[greedy], parents[greedy], logits[greedy], max_depth=tree.depth, validate=False)
        groups.append((greedy, res))  # (validate=False: the tree is the drafter's, checked when it was built)
    if sampled:
        params, rng = rows(
            [active[b].params for b in sampled],
            [len(active[b].token_ids) for b in sampled],
            [active[b].sample for b in sampled],
        )
        per_node = [p.repeat_interleave(N) for p in params]
        probs = processed_probs(logits[sampled].reshape(-1, V), *per_node).view(len(sampled), N, V)
        if drafter.acceptance == "typical":
            res = typical_acceptance(
                cand[sampled],
                parents[sampled],
                probs,
                **rng,
                epsilon=drafter.typical_epsilon,
                delta=drafter.typical_delta,
                max_depth=tree.depth,
                deterministic=deterministic,
                validate=False,  # the tree is the drafter's and the rows come from processed_probs
            )
        else:
            res = tree_speculative_sampling(
                cand[sampled], parents[sampled], probs, **rng, max_depth=tree.depth, deterministic=deterministic,
                validate=False,
            )  # fmt: skip
        groups.append((sampled, res))
    for members, res in groups:
        for i, b in enumerate(members):
            n = int(res.num_accepted[i])
            accepted[b] = n
            emitted[b] = res.output_token_ids[i, : n + 1].tolist()
            nodes[b] = res.accepted_nodes[i, :n].tolist()
    if top_logprobs is None:
        return emitted, accepted, nodes, None
    # token j of a pass is chosen at the root (j = 0) or at accepted node j - 1
    lps = _pass_logprobs(
        logits, active, emitted, lambda b, j: 0 if j == 0 else nodes[b][j - 1], top_logprobs, logprobs_mode
    )
    return emitted, accepted, nodes, lps


def _pass_logprobs(logits: torch.Tensor, active: List[Request], emitted, position, top_logprobs: int, mode: str):
    """Per request, the ``(logprob, top list)`` of each token it emitted in a pass: token ``j``
    of request ``b`` was chosen from ``logits[b, position(b, j)]``."""
    flat = [(b, j) for b in range(len(emitted)) for j in range(len(emitted[b]))]
    got = _logprob_rows(
        logits[[b for b, _ in flat], [position(b, j) for b, j in flat]] if flat else logits[:0, 0],
        [active[b] for b, _ in flat],
        [emitted[b][j] for b, j in flat],
        top_logprobs,
        mode,
    )
    lps: List[list] = [[] for _ in emitted]
    for (b, _), x in zip(flat, got):
        lps[b].append(x)
    return lps


#: Adaptive drafting: passes without drafts before the first probe, and the most between probes.
DRAFT_PROBE_WAIT = 4
DRAFT_PROBE_WAIT_MAX = 64
#: Greedy adaptive drafting: the weight of a drafting pass (tree or chain) in a request's running
#: mean of accepted tokens, and of a pass in the running mean of its kind's duration.
DRAFT_GAIN_WEIGHT = 0.25
PASS_TIME_WEIGHT = 0.2


#: Greedy chain drafting across calls (_DraftMemory): drafting passes on record before a drafter
#: that does not pay makes greedy requests skip drafting, one request in how many still drafts,
#: and the weight of a pass in the record's running mean of accepted tokens.
DRAFT_MEMORY_MIN_PASSES = 16
DRAFT_SCOUT_EVERY = 16
#: Plain steps a scout takes before its first draft (the clock times a kind of pass from its
#: second one on, and a drafting pass is recorded only against timed plain steps).
DRAFT_SCOUT_PLAIN = 2
DRAFT_MEMORY_WEIGHT = 0.05
DRAFT_NEVER = 1 << 62  # a probe wait that never ends


class _DraftMemory:
    """What a chain drafter's greedy drafting passes measured, kept from one decode call to the
    next (per drafter object): the running mean of tokens accepted per drafting pass, and of a
    drafting pass's time over a plain step's (from each call's :class:`_PassClock`)."""

    def __init__(self, target_id: int) -> None:
        self.target_id = target_id  # id() of the target model the record was measured with
        self.gain = 0.0  # accepted tokens per greedy drafting pass (running mean)
        self.ratio = 0.0  # a drafting pass's time / a plain step's (running mean; 0: unknown)
        self.passes = 0  # greedy drafting passes on record
        self.requests = 0  # greedy requests started with this drafter

    def add_pass(self, accepted: float, ratio: float) -> None:
        """One greedy drafting pass: ``accepted`` tokens, at ``ratio`` plain steps' time."""
        w = DRAFT_MEMORY_WEIGHT if self.passes else 1.0
        self.gain += w * (accepted - self.gain)
        self.ratio += w * (ratio - self.ratio)
        self.passes += 1

    def pays(self) -> bool:
        """False once enough passes are on record and a drafting pass, which emits ``1 + gain``
        tokens on average, takes longer than as many plain steps."""
        return self.passes < DRAFT_MEMORY_MIN_PASSES or 1 + self.gain >= self.ratio

    def skips_next(self) -> bool:
        """Counts a new greedy request; True when it should take plain steps only (the record
        says drafting does not pay and the request is not a scout)."""
        self.requests += 1
        return not self.pays() and self.requests % DRAFT_SCOUT_EVERY != 0


_DRAFT_MEMORIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _draft_memory(drafter, target) -> Optional[_DraftMemory]:
    """The record of ``drafter`` with ``target`` (created on first use, and anew when the drafter
    is used with another target; None for an object that cannot be weakly referenced or hashed,
    which then drafts as if it were new at every call)."""
    try:
        mem = _DRAFT_MEMORIES.get(drafter)
        if mem is None or mem.target_id != id(target):
            mem = _DRAFT_MEMORIES[drafter] = _DraftMemory(id(target))
        return mem
    except TypeError:
        return None


class _PassClock:
    """Running means of the wall time of each kind of pass in greedy adaptive drafting: a plain
    step ("plain"), a tree pass ("tree") and a chain pass with drafts ("draft"), each from the
    moment the pass is chosen to the moment the next one is (drafting or the heads, the tree,
    the target pass, verification and bookkeeping). The first pass of each kind is not counted
    (it may include one-time work)."""

    def __init__(self) -> None:
        self.mean = {"plain": 0.0, "tree": 0.0, "draft": 0.0}
        self.seen = {"plain": 0, "tree": 0, "draft": 0}
        self._kind: Optional[str] = None
        self._t0 = 0.0

    def start(self, kind: str, now: Optional[float] = None) -> None:
        """A pass of ``kind`` begins (at ``now``, default: this moment); the previous one ends."""
        now = time.perf_counter() if now is None else now
        if self._kind is not None:
            k, dt = self._kind, now - self._t0
            self.seen[k] += 1
            if self.seen[k] == 2:
                self.mean[k] = dt
            elif self.seen[k] > 2:
                self.mean[k] += PASS_TIME_WEIGHT * (dt - self.mean[k])
        self._kind, self._t0 = kind, now

    def timed(self, kind: str) -> bool:
        """True when both plain steps and passes of ``kind`` have been timed."""
        return self.mean["plain"] > 0 and self.mean[kind] > 0

    def pays(self, kind: str, gain: float) -> bool:
        """True when both kinds have been timed, the passes of ``kind`` accept something
        (``gain > 0`` tokens per pass on average) and such a pass, which emits ``1 + gain``
        tokens, takes at most as long as ``1 + gain`` plain steps."""
        plain, other = self.mean["plain"], self.mean[kind]
        return self.timed(kind) and gain > 0 and (1 + gain) * plain >= other

    def tree_pays(self, gain: float) -> bool:
        """:meth:`pays` for tree passes."""
        return self.pays("tree", gain)


def _next_draft_len(r: Request, drafted: int, accepted: int, K: int) -> int:
    """The request's draft length for its next pass, from its own last pass only (so a seeded
    request drafts, and draws, the same whatever its neighbours do).

    After a pass with drafts: all accepted -> 2 more (at most ``K``); some accepted -> one more
    than were accepted; none accepted -> half as many (down to 0: plain decoding steps, which
    cost no drafting and no extra verified rows). At 0, one draft is tried again after
    ``draft_wait`` passes; the wait doubles after each probe that fails (up to
    DRAFT_PROBE_WAIT_MAX) and starts again from DRAFT_PROBE_WAIT once one succeeds. The idea is
    that of the "heuristic" schedule of HF transformers' assisted generation (2 more when every
    draft is accepted, 1 fewer otherwise), with the length allowed to reach 0 so that a drafter
    that keeps missing costs almost nothing.
    """
    k = K if r.draft_len < 0 else r.draft_len
    if r.draft_wait == 0:
        r.draft_wait = DRAFT_PROBE_WAIT
    if drafted == 0:
        if k > 0:  # the drafter had nothing to propose (e.g. no n-gram match): keep the length
            return k
        r.draft_idle += 1
        if r.draft_idle >= r.draft_wait:
            r.draft_idle = 0
            return 1
        return 0
    if accepted == drafted:
        nxt = min(K, k + 2)
    elif accepted > 0:
        nxt = min(K, accepted + 1)
    else:
        nxt = k // 2
    if k == 1 and nxt == 0:  # a failed probe (or a last miss): wait longer before the next one
        r.draft_wait = min(DRAFT_PROBE_WAIT_MAX, 2 * r.draft_wait)
    elif accepted > 0:
        r.draft_wait = DRAFT_PROBE_WAIT
    return nxt


def _propose(drafter, r: Request, K: int, V: int, call_key, op: str):
    """Up to ``min(K, room)`` drafts for ``r`` (and the draft's logits when the request samples
    with a drafter that has its own distribution)."""
    room = min(K, r.max_new_tokens - len(r.token_ids))
    context = r.prompt_ids + r.token_ids
    kw = {"key": (call_key, r.index)} if getattr(drafter, "keyed", False) is True else {}
    dl = None
    if not r.params.greedy and callable(getattr(drafter, "propose_with_logits", None)):
        proposal, dl = drafter.propose_with_logits(context, room, _draft_chooser(r), **kw)
        proposal = list(proposal)
        if not isinstance(dl, torch.Tensor) or tuple(dl.shape) != (len(proposal), V):
            raise ValueError(
                f"{op}: the drafter returned logits of shape {tuple(getattr(dl, 'shape', ()))} for "
                f"{len(proposal)} drafts; expected [{len(proposal)}, {V}]"
            )
        # (more than asked for: the first `room` drafts and their logits, as propose()'s are cut)
        proposal, dl = proposal[:room], dl[:room]
    else:
        proposal = drafter.propose(context, room, **kw)
        if proposal is None or isinstance(proposal, (str, bytes)) or not hasattr(proposal, "__iter__"):
            raise TypeError(f"{op}: drafter.propose must return a list of token ids, got {type(proposal).__name__}")
        proposal = list(proposal)[:room]
    if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V for t in proposal):
        raise ValueError(f"{op}: the drafter proposed {proposal!r}; draft tokens must be ints in [0, {V})")
    return proposal, dl


def _draft_chooser(r: Request):
    """Samples draft ``j`` from the draft's processed distribution with the request's seed; the
    offset is the draft's position in the generated sequence with bit 62 set."""
    p = r.params
    seed = to_int64_bits(p.seed or 0, "seed", "speculative_generate")

    def choose(dl: torch.Tensor, j: int) -> int:
        q = processed_probs(dl[None], p.temperature, p.top_k, p.top_p, p.min_p)
        offset = DRAFT_OFFSET_BIT | (r.sample << 48) | (len(r.token_ids) + j)
        return int(sample_from_probs(q, seed=seed, offset=offset)[0])

    return choose
