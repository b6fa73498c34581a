"""One request type and one result type, shared by plain and speculative decoding, and the
argument handling of :func:`decodekit.generate` / :func:`decodekit.speculative_generate`
(prompt batches, per-request lists, prompt ids)."""

from __future__ import annotations

import numbers
import operator
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch

from .._checks import check_float32_number
from ..models.gguf_loader import LoadedModel
from ..params import SamplingParams
from ..tokenizer import StreamDecoder

# The most samples per prompt (n): each is a request with its own cache sequence.
MAX_N = 1024

__all__ = ["GenerationResult", "SpeculativeResult", "Request", "Prompt", "PerRequest"]

Prompt = Union[str, Sequence[int], torch.Tensor]  # text, or token ids
PerRequest = Union[Any, Sequence[Any]]  # one value for every request, or one per request


@dataclass(frozen=True)
class GenerationResult:
    """What :func:`decodekit.generate` and :func:`decodekit.speculative_generate` produce.

    Attributes:
        prompt_token_ids: the ids the model was run on (after the chat template).
        token_ids: the generated ids, in order; ends with the stop token when
            ``finish_reason == "eos"``, and with the token that completed the stop string when
            ``finish_reason == "stop"``.
        text: the generated text without the stop token (or the stop string and what follows
            it); exactly the concatenation of the pieces given to the ``stream`` callback.
        finish_reason: ``"eos"`` (a stop token was generated), ``"stop"`` (a ``stop`` string
            was generated) or ``"length"`` (``max_new_tokens``).
        seed: the Philox seed used (chosen at random when none was given and sampling was
            stochastic), or ``None`` for greedy decoding without a seed.
        prefill_seconds: wall time of this prompt's forward pass (prompts are prefilled one by one).
        decode_seconds: wall time from the end of the prefill (of every prompt of the batch) to
            this request's last token (drafting, sampling or verification, forward passes,
            detokenisation and ``stream`` callbacks, shared with the other requests of the batch).
        decode_steps: target forward passes after the prefill this request took part in (plain
            decoding: ``len(token_ids) - 1`` at most, the first token comes from the prefill
            logits and the last one is not run).
        model_name: display name of the model (its file name).
        drafted: draft tokens proposed (0 without a drafter).
        accepted: draft tokens accepted and emitted (a draft accepted after a stop token is
            not emitted and not counted).
        speculative: whether a drafter was used.
        sample_index: ``i`` for sample ``i`` of ``n`` (its Philox offsets carry ``i`` in bits
            48-61, DESIGN.md "Randomness"); 0 for plain generation.
        logprobs: with ``logprobs=True``, one float per token of ``token_ids``: its natural-log
            probability under the processed distribution it was drawn from (after penalties,
            logit bias, ``eos_bias``, the ``min_new_tokens`` mask, temperature and filters; 0
            for a greedy token); else None.
        top_logprobs: with ``logprobs=True``, one list per token of ``(token_id, logprob)``
            pairs, the ``top_logprobs`` most likely tokens of that distribution in rank order
            (empty lists when ``top_logprobs=0``); else None.
    """

    prompt_token_ids: List[int]
    token_ids: List[int]
    text: str
    finish_reason: str
    seed: Optional[int]
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    model_name: str = field(default="")
    drafted: int = 0
    accepted: int = 0
    speculative: bool = False
    sample_index: int = 0
    logprobs: Optional[List[float]] = None
    top_logprobs: Optional[List[List[Tuple[int, float]]]] = None

    @property
    def prompt_tokens(self) -> int:
        """Number of prompt tokens."""
        return len(self.prompt_token_ids)

    @property
    def new_tokens(self) -> int:
        """Number of generated tokens (including a final stop token)."""
        return len(self.token_ids)

    @property
    def target_passes(self) -> int:
        """Target forward passes after the prefill (``decode_steps``)."""
        return self.decode_steps

    @property
    def prefill_tokens_per_second(self) -> float:
        """Prompt tokens processed per second in the prefill."""
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first (the first comes from the prefill) per second of decoding;
        0.0 when none was decoded."""
        n = self.new_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (0 when nothing was proposed)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Mean tokens emitted per target pass after the prefill (1 is plain decoding)."""
        return (self.new_tokens - 1) / self.decode_steps if self.decode_steps else 0.0

    def summary(self) -> str:
        """One line, the same for plain and speculative decoding: prompt tokens, prefill, new
        tokens, decode tokens/s and seed; then, with a drafter, the acceptance and tokens per
        target pass."""
        seed = "none (greedy)" if self.seed is None else str(self.seed)
        line = (
            f"prompt tokens: {self.prompt_tokens}, prefill: {self.prefill_seconds * 1000:.0f} ms "
            f"({self.prefill_tokens_per_second:.1f} tokens/s), new tokens: {self.new_tokens} "
            f"({self.finish_reason}), decode: {self.decode_tokens_per_second:.1f} tokens/s, seed: {seed}"
        )
        if self.speculative:
            line += (
                f", acceptance: {100 * self.acceptance_rate:.0f}% of {self.drafted} drafted, "
                f"tokens/pass: {self.tokens_per_pass:.2f}"
            )
        return line


#: The result type of :func:`decodekit.speculative_generate` (the same class).
SpeculativeResult = GenerationResult


@dataclass
class Request:
    """One request of a decode call: its parameters and its decoding state."""

    index: int
    max_new_tokens: int
    params: SamplingParams
    prompt_ids: List[int] = field(default_factory=list)
    seq_id: int = -1
    detok: Optional[StreamDecoder] = None
    token_ids: List[int] = field(default_factory=list)
    pieces: List[str] = field(default_factory=list)
    finish_reason: str = "length"
    alive: bool = True
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    sample: int = 0  # sample index of n (bits 48-61 of the offsets)
    fork_of: Optional[int] = None  # index of the request whose prefill this one shares
    key: Any = None  # what the stream callback is given to name the request
    min_new_tokens: int = 0
    eos_bias: float = 0.0
    stop: Tuple[str, ...] = ()
    text: str = ""  # decoded so far (the stream may hold the end back)
    emitted: int = 0  # characters of text streamed
    want_logprobs: bool = False
    logprobs: List[float] = field(default_factory=list)
    top_logprobs: List[list] = field(default_factory=list)
    draft_len: int = -1  # speculative: drafts asked for in the next pass (-1: not started)
    draft_wait: int = 0  # adaptive drafting: passes without drafts before the next probe
    draft_idle: int = 0  # passes without drafts since the last probe
    draft_gain: float = -1.0  # greedy adaptive drafting: mean tokens accepted per drafting pass (-1: none yet)

    @property
    def seed(self) -> Optional[int]:
        return self.params.seed

    def result(self, model_name: str, speculative: bool) -> GenerationResult:
        return GenerationResult(
            prompt_token_ids=self.prompt_ids,
            token_ids=self.token_ids,
            text="".join(self.pieces),
            finish_reason=self.finish_reason,
            seed=self.seed,
            prefill_seconds=self.prefill_seconds,
            decode_seconds=self.decode_seconds,
            decode_steps=self.steps,
            model_name=model_name,
            drafted=self.drafted,
            accepted=self.accepted,
            speculative=speculative,
            sample_index=self.sample,
            logprobs=list(self.logprobs) if self.want_logprobs else None,
            top_logprobs=[list(t) for t in self.top_logprobs] if self.want_logprobs else None,
        )


# -------------------------------------------------------------- arguments ----
def is_prompt_batch(prompt) -> bool:
    """A list or tuple whose items are all prompts (text, id sequences or tensors); empty is
    not; a flat sequence of ints is one prompt."""
    return (
        isinstance(prompt, (list, tuple))
        and len(prompt) > 0
        and all(isinstance(p, (str, list, tuple, torch.Tensor)) for p in prompt)
    )


def per_request(name: str, value, n: int, op: str) -> list:
    """One value per request: a list/tuple (or 1-D tensor) of length ``n`` as is, else ``value``
    repeated ``n`` times."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(
                f"{op}: {name} has {len(value)} values but there "
                f"{'is 1 prompt' if n == 1 else f'are {n} prompts'}; give one value per "
                "prompt, or a single value for all"
            )
        return list(value)
    return [value] * n


def check_common(model, stream, op: str) -> None:
    if model is not None and not isinstance(model, (str, os.PathLike, LoadedModel)):
        raise TypeError(
            f"{op}: model must be None, a path to a .gguf file or a LoadedModel, got {type(model).__name__}"
        )
    if stream is not None and not callable(stream):
        raise TypeError(
            f"{op}: stream must be a callable (stream(piece), or stream(index, piece) for a "
            f"batch), got {type(stream).__name__}"
        )


def make_requests(n: int, batched: bool, columns: dict, op: str) -> List[Request]:
    """Checked requests from per-request columns (``max_new_tokens`` and the fields of
    :class:`SamplingParams`), before the model is loaded so that mistakes fail fast."""
    requests = []
    for i in range(n):
        where = f"[{i}]" if batched else ""
        values = {name: column[i] for name, column in columns.items()}
        m = values.pop("max_new_tokens")
        if isinstance(m, bool) or not isinstance(m, numbers.Integral):
            raise TypeError(f"{op}: max_new_tokens{where} must be an int, got {type(m).__name__}")
        if m < 0:
            raise ValueError(f"{op}: max_new_tokens{where} must be >= 0, got {m}")
        requests.append(
            Request(index=i, max_new_tokens=operator.index(m), params=SamplingParams.checked(op, where, **values))
        )
    return requests


def prompt_ids(lm: LoadedModel, prompt, chat_template: bool, where: str, op: str) -> List[int]:
    """Token ids of a text or id prompt (validated); ``where`` names the prompt of a batch."""
    tokenizer = lm.tokenizer
    name = f"prompt{where}"
    if isinstance(prompt, str):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:  # e.g. a lone surrogate, which the tokenizer cannot take
            raise ValueError(
                f"{op}: {name} must be text that UTF-8 can encode; character {exc.start} is "
                f"{prompt[exc.start]!r} ({exc.reason})"
            ) from None
        text = prompt
        if chat_template:
            if tokenizer.chat_template:
                text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            else:
                warnings.warn(f"{lm.name} has no chat template; using the prompt text as is", stacklevel=4)
        ids = tokenizer.encode(text)
    elif isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1 or prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
            raise TypeError(
                f"{op}: a tensor {name} must be 1-D integer ids, got shape "
                f"{tuple(prompt.shape)} and dtype {prompt.dtype}"
            )
        ids = [int(i) for i in prompt.tolist()]
    elif isinstance(prompt, (bytes, bytearray)):
        raise TypeError(
            f"{op}: {name} must be a str or a sequence of int token ids, got bytes (decode it to str first)"
        )
    elif isinstance(prompt, Sequence) and all(
        isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in prompt
    ):
        ids = [operator.index(i) for i in prompt]
    else:
        raise TypeError(f"{op}: {name} must be a str or a sequence of int token ids, got {type(prompt).__name__}")
    if not ids:
        raise ValueError(f"{op}: the {name} has no tokens")
    bad = [i for i in ids if not 0 <= i < lm.config.vocab_size]
    if bad:
        raise ValueError(f"{op}: {name} token ids {bad[:5]} outside [0, {lm.config.vocab_size})")
    return ids


def check_length_options(
    op: str,
    num_prompts: int,
    batched: bool,
    *,
    n=None,
    vote=False,
    min_new_tokens=0,
    eos_token_ids=None,
    stop=None,
    eos_bias=0.0,
    logprobs=False,
    top_logprobs=0,
    logprobs_mode="processed",
) -> dict:
    """Checks the sample, length-control and logprob arguments of :func:`decodekit.generate`
    (before the model is loaded); returns them normalised, ``min_new_tokens`` and ``eos_bias``
    as per-prompt lists."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= MAX_N):
        raise ValueError(f"{op}: n must be None or an int in [1, {MAX_N}], got {n!r}")
    if not isinstance(vote, bool):
        raise TypeError(f"{op}: vote must be True or False, got {type(vote).__name__}")
    if vote and n is None:
        raise ValueError(f"{op}: vote=True needs n (the number of samples to vote over), got n=None")
    mins = per_request("min_new_tokens", min_new_tokens, num_prompts, op)
    for i, m in enumerate(mins):
        where = f"[{i}]" if batched else ""
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 0:
            raise ValueError(f"{op}: min_new_tokens{where} must be an int >= 0, got {m!r}")
    biases = per_request("eos_bias", eos_bias, num_prompts, op)
    for i, b in enumerate(biases):
        where = f"[{i}]" if batched else ""
        check_float32_number(b, f"eos_bias{where}", op)
    ids = None
    if eos_token_ids is not None:
        raw = [eos_token_ids] if isinstance(eos_token_ids, numbers.Integral) else eos_token_ids
        if isinstance(raw, torch.Tensor):
            raw = raw.tolist()
        if isinstance(raw, (str, bytes)) or not isinstance(raw, (list, tuple, set, frozenset)):
            raise TypeError(f"{op}: eos_token_ids must be None, an int or a list of ints, got {type(raw).__name__}")
        if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0 for t in raw):
            raise ValueError(f"{op}: eos_token_ids must be token ids (ints >= 0), got {list(raw)!r:.80}")
        ids = sorted({int(t) for t in raw})
    stops: Tuple[str, ...] = ()
    if stop is not None:
        raw = [stop] if isinstance(stop, str) else stop
        if not isinstance(raw, (list, tuple)) or not all(isinstance(s, str) for s in raw):
            raise TypeError(f"{op}: stop must be None, a string or a list of strings, got {stop!r:.80}")
        if any(s == "" for s in raw):
            raise ValueError(f"{op}: stop strings must not be empty, got {list(raw)!r:.80}")
        stops = tuple(dict.fromkeys(raw))
    if not isinstance(logprobs, bool):
        raise TypeError(f"{op}: logprobs must be True or False, got {type(logprobs).__name__}")
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, numbers.Integral) or top_logprobs < 0:
        raise ValueError(f"{op}: top_logprobs must be an int >= 0, got {top_logprobs!r}")
    if top_logprobs and not logprobs:
        raise ValueError(f"{op}: top_logprobs={top_logprobs} needs logprobs=True")
    if logprobs_mode not in ("processed", "raw"):
        raise ValueError(f"{op}: logprobs_mode must be 'processed' or 'raw', got {logprobs_mode!r}")
    return dict(
        n=None if n is None else int(n),
        vote=vote,
        min_new_tokens=[int(m) for m in mins],
        eos_bias=[float(b) for b in biases],
        eos_token_ids=ids,
        stop=stops,
        logprobs=logprobs,
        top_logprobs=int(top_logprobs),
        logprobs_mode=logprobs_mode,
    )


def sample_requests(requests: List[Request], opts: dict, batched: bool) -> List[Request]:
    """The requests of a call with the length options set, and with ``n`` each prompt's
    request repeated as samples ``0 .. n - 1`` (sample ``s > 0`` forks the prefill of sample 0;
    every sample has the prompt's seed). The stream key is the prompt index, or with ``n`` the
    sample index (one prompt) or ``(prompt index, sample index)`` (a batch)."""
    N = opts["n"]
    out = []
    for r in requests:
        i = r.index
        for s in range(N or 1):
            key = i if N is None else ((i, s) if batched else s)
            out.append(
                Request(
                    index=len(out),
                    max_new_tokens=r.max_new_tokens,
                    params=r.params,
                    prompt_ids=r.prompt_ids,
                    sample=s,
                    fork_of=None if s == 0 else len(out) - s,
                    key=key,
                    min_new_tokens=opts["min_new_tokens"][i],
                    eos_bias=opts["eos_bias"][i],
                    stop=opts["stop"],
                    want_logprobs=opts["logprobs"],
                )
            )
    return out
