"""Speculative decoding loop: a drafter proposes tokens, the target verifies them in one pass.

Each step runs the target once on ``[last token] + drafts`` (``K + 1`` positions) through the
paged KV cache, verifies the drafts with :func:`decodekit.greedy_verify` (temperature 0) or
:func:`decodekit.chain_speculative_sampling_from_logits` (lossless rejection sampling of the
processed target distribution, drafts one-hot), keeps
the accepted drafts plus one emitted token, and rolls the cache back over the rejected ones with
:meth:`PagedKVCache.truncate`. The target's logits are bit-identical whatever the number of
positions in a pass (batch-invariant linear layers and attention), so greedy speculative
decoding reproduces plain greedy decoding token for token.

Drafters: :class:`NgramDrafter` (prompt lookup). A trained draft model is not included yet.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import torch

from .generate import _prompt_ids
from .models.gguf_loader import LoadedModel, load_model
from .ops import sample_from_logits
from .speculative import chain_speculative_sampling_from_logits, greedy_verify
from .tokenizer import StreamDecoder

__all__ = ["NgramDrafter", "SpeculativeResult", "speculative_generate"]


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


def speculative_generate(prompt: Union[str, Sequence[int]], *, model: Union[None, str, os.PathLike, LoadedModel] = None,
                         drafter: Union[str, NgramDrafter] = "ngram", num_draft_tokens: int = 4,
                         max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                         min_p: float = 0.0, seed: Optional[int] = None, chat_template: bool = True,
                         stop_on_eos: bool = True, stream: Optional[Callable[[str], None]] = None) -> SpeculativeResult:
    """Generate with speculative decoding (one request).

    Args:
        prompt: text (wrapped in the chat template unless ``chat_template=False``) or token ids.
        model: as in :func:`decodekit.generate`.
        drafter: ``"ngram"`` or an object with ``propose(context_ids, k) -> list[int]``.
        num_draft_tokens: K, the most tokens proposed per step (>= 1).
        max_new_tokens, temperature, top_k, top_p, min_p, seed, stop_on_eos, stream: as in
            :func:`decodekit.generate`. With ``temperature == 0`` verification is greedy and
            the output equals plain greedy decoding; otherwise the target distribution
            (softmax at the temperature, then top-k / top-p / min-p) is sampled losslessly.

    Returns:
        :class:`SpeculativeResult`.

    Raises:
        TypeError / ValueError for bad arguments (as :func:`decodekit.generate`), a drafter
        without ``propose``, or ``num_draft_tokens < 1``.

    Source: Leviathan et al., ICML 2023 (verification); prompt lookup decoding for the drafter.
    """
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
        raise ValueError(f"speculative_generate: num_draft_tokens must be an int >= 1, got {num_draft_tokens!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"speculative_generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and 0 <= temperature < math.inf):
        raise ValueError(f"speculative_generate: temperature must be finite and >= 0, got {temperature!r}")
    if drafter == "ngram":
        drafter = NgramDrafter()
    if not callable(getattr(drafter, "propose", None)):
        raise TypeError("speculative_generate: drafter must be 'ngram' or have a propose(context, k) method")
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    net = lm.model
    ids = _prompt_ids(lm, prompt, chat_template)
    greedy = temperature == 0 or top_k == 1 or top_p == 0
    if seed is None and not greedy:
        seed = int.from_bytes(os.urandom(4), "little")
    K = num_draft_tokens
    total = len(ids) + max_new_tokens + K + 1
    if total > net.config.max_seq_len:
        raise ValueError(f"speculative_generate: prompt + max_new_tokens + K exceeds the context length "
                         f"{net.config.max_seq_len}")
    cache = net.new_paged_cache(num_blocks=total // 16 + 2)
    seq = cache.add_sequence()
    stop_ids = lm.tokenizer.stop_ids if stop_on_eos else frozenset()
    detok = StreamDecoder(lm.tokenizer)
    pieces: List[str] = []

    def emit(piece: str) -> None:
        if piece:
            pieces.append(piece)
            if stream is not None:
                stream(piece)

    t0 = time.perf_counter()
    logits = net.forward_paged(torch.tensor([ids]), cache, [seq])  # [1, V]
    t1 = time.perf_counter()
    first = int(sample_from_logits(logits, temperature, top_k, top_p, min_p, seed=seed, offset=0)[0])
    out: List[int] = [first]
    finish, passes, drafted, accepted, offset = "length", 0, 0, 0, 1
    if first in stop_ids:
        finish = "eos"
    else:
        emit(detok.push(first))
    while finish == "length" and len(out) < max_new_tokens:
        room = max_new_tokens - len(out)
        drafts = list(drafter.propose(ids + out, min(K, room)))[: min(K, room)]
        inp = torch.tensor([[out[-1]] + drafts])
        before = int(cache.seq_lens([seq])[0])
        logits = net.forward_paged(inp, cache, [seq], all_logits=True)  # [1, 1 + d, V]
        passes += 1
        d = len(drafts)
        draft_t = torch.tensor([drafts], dtype=torch.int64).reshape(1, d)
        if greedy:
            res = greedy_verify(draft_t, logits)
        else:
            res = chain_speculative_sampling_from_logits(None, draft_t, logits, temperature, top_k, top_p, min_p,
                                                         seed=seed, offset=offset)
        offset += 1
        n = int(res.num_accepted[0])
        drafted += d
        accepted += n
        new = res.output_token_ids[0, : n + 1].tolist()
        cache.truncate(seq, before + 1 + n)  # keep the last token and the accepted drafts
        for tok in new:
            out.append(tok)
            if tok in stop_ids:
                finish = "eos"
                break
            emit(detok.push(tok))
            if len(out) >= max_new_tokens:
                break
    emit(detok.flush())
    t2 = time.perf_counter()
    cache.free(seq)
    return SpeculativeResult(prompt_token_ids=ids, token_ids=out, text="".join(pieces), finish_reason=finish,
                             seed=seed, prefill_seconds=t1 - t0, decode_seconds=t2 - t1, target_passes=passes,
                             drafted=drafted, accepted=accepted, model_name=lm.name)
