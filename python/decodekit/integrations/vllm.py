"""decodekit as vLLM v1's sampler and rejection sampler (a ``vllm.general_plugins`` plugin).

vLLM v1 has no supported hook that replaces its sampler; a ``vllm.general_plugins`` entry point
runs in every vLLM process and can. decodekit registers :func:`register` there (see
pyproject.toml). It does nothing unless the environment variable ``DECODEKIT_VLLM=1`` is set, so
installing decodekit never changes vLLM silently. When enabled it:

- checks ``vllm.__version__`` against :data:`SUPPORTED_VLLM_VERSIONS` and raises
  :class:`UnsupportedVLLMVersionError` naming the supported versions otherwise (the patched
  methods are private vLLM internals, so an unknown version is refused rather than guessed);
- replaces ``vllm.v1.sample.sampler.Sampler.forward`` and
  ``vllm.v1.sample.rejection_sampler.RejectionSampler.forward``, and wraps the model runner's
  ``_sample`` (``GPUModelRunner._sample``, inherited by the CPU runner) only to learn each
  request's output position.

What is routed through decodekit (vLLM's semantics win):

- temperature, min-p, top-k, top-p and the draw, in vLLM's order (temperature -> min-p ->
  top-k -> top-p). Without min-p that is decodekit's fused chain
  (:func:`decodekit.sample_from_logits`, temperature -> top-k -> top-p); with min-p the plugin
  composes :func:`decodekit.processed_probs` (temperature, min-p) and
  :func:`decodekit.sample_from_probs` (top-k, top-p, draw), since decodekit's own chain applies
  min-p last. vLLM's greedy rule (temperature below 1e-5, stored as 0) is decodekit's exact
  ``T = 0``: the argmax of the logits, lowest index on ties.
- logprobs in vLLM's default ``logprobs_mode="raw_logprobs"``: the sampled token's and the top
  ``n`` raw logprobs (decodekit's ``logprobs_mode="raw"``), with the sampled token's rank.
- speculative verification: greedy rows accept drafts equal to the target argmax; sampled rows
  use :func:`decodekit.chain_speculative_sampling` (lossless rejection sampling, Leviathan et
  al. 2023) against the target distribution in the same order as above, the bonus token
  included, n-gram (one-hot) drafts or draft probabilities alike.
- randomness: a request with ``SamplingParams(seed=s)`` draws with decodekit's Philox key ``s``
  (vLLM's per-request generator's ``initial_seed()``) at offset = its output position
  (DESIGN.md "Randomness"; for a speculative pass, the position of its first draft), so its
  tokens do not depend on what else is in the batch. Requests without a seed get a random key
  from torch's global generator (which vLLM seeds).

- vLLM's own logits processing in the sampler: repetition / frequency / presence penalties,
  ``logit_bias``, ``min_tokens``, ``allowed_token_ids``, ``bad_words``, the thinking budget and
  other logits processors that may change the argmax are applied by vLLM's
  ``Sampler.apply_logits_processors``, run by the plugin, before decodekit's draw (per
  request, as in vLLM).

Everything else falls back to vLLM's own sampler or rejection sampler for that batch, with one
logged line per reason: logits processors other than vLLM's min-p that act inside its sampling
step, ``logprob_token_ids``, full-vocabulary logprobs (``logprobs=-1``), other
``logprobs_mode`` values, synthetic rejection sampling, and logprobs during speculative
decoding. In speculative verification (the rejection sampler), a batch that any of vLLM's
logits processing acts on (the options above, the thinking budget, any other logits
processor) also falls back. With ``DECODEKIT_VLLM_FALLBACK=0`` such a batch raises :class:`UnsupportedSamplingError`
instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from typing import Any, Dict, List, Optional

import torch

__all__ = [
    "SUPPORTED_VLLM_VERSIONS",
    "ENV_ENABLE",
    "ENV_FALLBACK",
    "UnsupportedVLLMVersionError",
    "UnsupportedSamplingError",
    "register",
    "install",
    "active",
    "capture",
    "stats",
    "vllm_order_probs",
    "sample_vllm_order",
]

#: vLLM versions whose sampler internals this plugin was written and tested against.
SUPPORTED_VLLM_VERSIONS = ("0.32.0",)
#: ``DECODEKIT_VLLM=1`` enables the plugin (off by default).
ENV_ENABLE = "DECODEKIT_VLLM"
#: ``DECODEKIT_VLLM_FALLBACK=0`` turns the fallback to vLLM's sampler into an error.
ENV_FALLBACK = "DECODEKIT_VLLM_FALLBACK"

_SAMPLING_EPS = 1e-5  # vLLM's greedy threshold on the temperature
_ROUTED = (
    "temperature, top_k, top_p, min_p, seed, logprobs >= 0 with logprobs_mode='raw_logprobs', "
    "after vLLM's own logits processing (penalties, logit bias, min_tokens, allowed/bad tokens)"
)

logger = logging.getLogger(__name__)


class UnsupportedVLLMVersionError(RuntimeError):
    """The plugin is enabled on a vLLM version outside :data:`SUPPORTED_VLLM_VERSIONS`."""


class UnsupportedSamplingError(ValueError):
    """A batch needs an option the plugin does not route, and ``DECODEKIT_VLLM_FALLBACK=0``."""


class _State:
    installed = False
    active = True
    orig_sampler_forward = None
    orig_rejection_forward = None
    orig_runner_sample = None
    logged: set = set()
    capture: Optional[List[Dict[str, Any]]] = None
    counts = {"sampler": 0, "rejection_sampler": 0, "fallback": 0}


_in_fallback = contextvars.ContextVar("decodekit_vllm_in_fallback", default=False)
_input_batch = contextvars.ContextVar("decodekit_vllm_input_batch", default=None)


# ------------------------------------------------------------- plugin entry ----
def register() -> None:
    """The ``vllm.general_plugins`` entry point: :func:`install` when ``DECODEKIT_VLLM=1``.

    Raises:
        UnsupportedVLLMVersionError: enabled on a vLLM version not in
            :data:`SUPPORTED_VLLM_VERSIONS`.
        ValueError: ``DECODEKIT_VLLM`` set to something other than ``0`` or ``1``.
    """
    flag = os.environ.get(ENV_ENABLE, "0").strip()
    if flag not in ("0", "1", ""):
        raise ValueError(f"{ENV_ENABLE} must be 0 or 1, got {flag!r}")
    if flag == "1":
        install()


def install() -> None:
    """Replaces vLLM's ``Sampler.forward`` and ``RejectionSampler.forward`` (idempotent).

    Raises:
        UnsupportedVLLMVersionError: ``vllm.__version__`` not in :data:`SUPPORTED_VLLM_VERSIONS`.
        ModuleNotFoundError: vLLM is not installed.
    """
    try:
        import vllm
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"decodekit's vLLM plugin needs vLLM ({', '.join(SUPPORTED_VLLM_VERSIONS)}), which is not installed: "
            f"install it (README, 'Using decodekit inside vLLM') or unset {ENV_ENABLE}",
            name=exc.name,
        ) from None

    version = getattr(vllm, "__version__", "unknown")
    if version not in SUPPORTED_VLLM_VERSIONS:
        raise UnsupportedVLLMVersionError(
            f"decodekit's vLLM plugin ({ENV_ENABLE}=1) supports vLLM {', '.join(SUPPORTED_VLLM_VERSIONS)}, "
            f"but vLLM {version} is installed; install a supported version or unset {ENV_ENABLE}"
        )
    if _State.installed:
        return
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _State.orig_sampler_forward = Sampler.forward
    _State.orig_rejection_forward = RejectionSampler.forward
    _State.orig_runner_sample = GPUModelRunner._sample
    Sampler.forward = _sampler_forward
    RejectionSampler.forward = _rejection_forward
    GPUModelRunner._sample = _runner_sample
    _State.installed = True
    logger.info("decodekit: routing vLLM %s sampling and rejection sampling through decodekit", version)


@contextlib.contextmanager
def active(flag: bool):
    """Temporarily routes sampling through decodekit (``True``) or vLLM's own code (``False``)
    in an engine where the plugin is installed; for comparisons and benchmarks."""
    old = _State.active
    _State.active = bool(flag)
    try:
        yield
    finally:
        _State.active = old


@contextlib.contextmanager
def capture():
    """Records each routed sampler call: yields a list that fills with dicts of ``logits``
    (float32 copy), ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``seed``, ``offset``,
    ``req_ids`` and the sampled ``token_ids`` (for tests that re-sample captured logits)."""
    records: List[Dict[str, Any]] = []
    old = _State.capture
    _State.capture = records
    try:
        yield records
    finally:
        _State.capture = old


def stats() -> Dict[str, int]:
    """Calls routed through decodekit so far: ``sampler``, ``rejection_sampler``, ``fallback``."""
    return dict(_State.counts)


# ------------------------------------------------------------ the sampling ----
def vllm_order_probs(logits, temperature, top_k=0, top_p=1.0, min_p=None) -> torch.Tensor:
    """The distribution vLLM's sampler draws from, computed with decodekit's ops.

    vLLM's order: temperature -> min-p -> top-k -> top-p. Without min-p this is
    :func:`decodekit.processed_probs` (decodekit's own order, temperature -> top-k -> top-p);
    with min-p it is ``processed_probs(temperature, min_p)`` then
    :func:`decodekit.filter_probs` (top-k, top-p).

    Args:
        logits: ``[N, V]`` float32 / float16 / bfloat16.
        temperature: float32 ``[N]`` (0 = greedy: one-hot at the argmax) or a number.
        top_k: int64 ``[N]`` or an int (``<= 0`` or ``>= V`` disables).
        top_p: float32 ``[N]`` or a number in ``[0, 1]`` (1 disables).
        min_p: float32 ``[N]``, a number in ``[0, 1]``, or None (disabled).

    Returns:
        float32 ``[N, V]`` probabilities.
    """
    import decodekit

    if min_p is None:
        return decodekit.processed_probs(logits, temperature, top_k, top_p)
    probs = decodekit.processed_probs(logits, temperature, min_p=min_p)
    return decodekit.filter_probs(probs, top_k, top_p)


def sample_vllm_order(logits, temperature, top_k, top_p, min_p, seed, offset, num_logprobs=None):
    """Draws one token per row in vLLM's order (see :func:`vllm_order_probs`) with decodekit.

    Args:
        logits: ``[B, V]``; temperature, top_k, top_p, min_p as in :func:`vllm_order_probs`.
        seed, offset: int64 ``[B]`` Philox keys and counters (DESIGN.md "Randomness").
        num_logprobs: None, or ``n >= 0``: also return raw logprobs (``log_softmax`` of the
            logits): the sampled token's ``[B]`` and the top ``n`` ids and values ``[B, n]``.

    Returns:
        ``(token_ids int64 [B], None)`` or ``(token_ids, (logprob [B], top_ids [B, n], top_logprobs [B, n]))``.
    """
    import decodekit

    if min_p is None:
        if num_logprobs is None:
            return decodekit.sample_from_logits(logits, temperature, top_k, top_p, seed=seed, offset=offset), None
        out = decodekit.sample_from_logits(
            logits,
            temperature,
            top_k,
            top_p,
            seed=seed,
            offset=offset,
            return_logprobs=True,
            top_logprobs=num_logprobs,
            logprobs_mode="raw",
        )
        return out.token_ids, (out.logprobs, out.top_ids, out.top_logprobs)
    probs = decodekit.processed_probs(logits, temperature, min_p=min_p)
    ids = decodekit.sample_from_probs(probs, top_k, top_p, seed=seed, offset=offset)
    if num_logprobs is None:
        return ids, None
    # decodekit's raw logprobs belong to the fused chain; here the composed path computes them.
    lp = torch.log_softmax(logits.float(), dim=-1)
    top_lp, top_ids = torch.sort(-lp, dim=-1, stable=True)
    return ids, (lp.gather(1, ids[:, None])[:, 0], top_ids[:, :num_logprobs], -top_lp[:, :num_logprobs])


# ------------------------------------------------------ batch bookkeeping ----
def _unsupported(meta, logprobs_mode: str) -> Optional[str]:
    """The first option in this batch the plugin's sampler does not route, or None.

    vLLM's own logits processing (allowed token ids, bad words, logit bias, min_tokens, other
    logits processors that may change the argmax, penalties, the thinking budget) is run by the
    plugin itself with vLLM's ``Sampler.apply_logits_processors``, so those options stay per
    request and keep decodekit's draw; only what vLLM applies inside its own sampling step, and
    logprob forms decodekit does not produce, are left here."""
    from vllm.v1.sample.logits_processor.builtin import MinPLogitsProcessor

    for proc in meta.logitsprocs.argmax_invariant:
        if not isinstance(proc, MinPLogitsProcessor):
            return f"logits processor {type(proc).__name__}"
    if meta.logprob_token_ids:
        return "logprob_token_ids"
    if meta.max_num_logprobs is not None:
        if meta.max_num_logprobs < 0:
            return "full-vocabulary logprobs (logprobs=-1)"
        if logprobs_mode != "raw_logprobs":
            return f"logprobs_mode={logprobs_mode!r}"
    return None


def _processing_reason(meta) -> Optional[str]:
    """The first option of this batch that vLLM's logits processing (``apply_logits_processors``)
    acts on, or None when it would change no logit."""
    from vllm.v1.sample.logits_processor.builtin import LogitBiasLogitsProcessor, MinTokensLogitsProcessor

    if not meta.no_penalties:
        return "repetition/frequency/presence penalties"
    if meta.allowed_token_ids_mask is not None:
        return "allowed_token_ids"
    if meta.bad_words_token_ids:
        return "bad_words"
    for proc in meta.logitsprocs.non_argmax_invariant:
        if isinstance(proc, LogitBiasLogitsProcessor):
            if proc.biases:
                return "logit_bias"
        elif isinstance(proc, MinTokensLogitsProcessor):
            if proc.min_toks:
                return "min_tokens"
        else:
            return f"logits processor {type(proc).__name__}"
    holder = meta.thinking_budget_state_holder
    if holder is not None and holder.has_tracked_requests():
        return "thinking token budget"
    return None


def _unsupported_in_verification(meta, logprobs_mode: str) -> Optional[str]:
    """The first option the plugin's rejection sampler does not route, or None (it does not run
    vLLM's logits processing on the target's logits, so every such option falls back)."""
    return _processing_reason(meta) or _unsupported(meta, logprobs_mode)


def _fallback(where: str, reason: str) -> None:
    """Logs (once per reason) or raises for a batch that goes to vLLM's own ``where``."""
    if os.environ.get(ENV_FALLBACK, "1").strip() == "0":
        raise UnsupportedSamplingError(
            f"decodekit's vLLM plugin cannot honour {reason} in vLLM's {where} (it routes {_ROUTED}), "
            f"and {ENV_FALLBACK}=0 forbids falling back to vLLM's own {where}; "
            f"set {ENV_FALLBACK}=1 (the default) or drop that option"
        )
    _State.counts["fallback"] += 1
    key = (where, reason)
    if key not in _State.logged:
        _State.logged.add(key)
        logger.warning("decodekit: batches with %s use vLLM's own %s (not routed through decodekit)", reason, where)


def _row_params(meta, B: int, V: int):
    """(temperature float32 [B], top_k int64 [B] or 0, top_p float32 [B] or 1.0, min_p float32 [B] or None)."""
    from vllm.v1.sample.logits_processor.builtin import MinPLogitsProcessor

    if meta.all_greedy or meta.temperature is None:
        temperature = torch.zeros(B, dtype=torch.float32)
    else:
        t = meta.temperature[:B].to(device="cpu", dtype=torch.float32)
        temperature = torch.where(t < _SAMPLING_EPS, torch.zeros_like(t), t)
    top_k = 0 if meta.top_k is None else meta.top_k[:B].to(device="cpu", dtype=torch.int64)
    top_p = 1.0 if meta.top_p is None else meta.top_p[:B].to(device="cpu", dtype=torch.float32)
    min_p = None
    for proc in meta.logitsprocs.argmax_invariant:
        if isinstance(proc, MinPLogitsProcessor) and proc.min_p_count:
            min_p = proc.min_p_cpu_tensor[:B].to(torch.float32).clone()
    return temperature, top_k, top_p, min_p


def _to_int64_bits(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= (1 << 63) else x


def _keys(meta, B: int):
    """Per-row Philox (seed, offset): a seeded request's own seed at its output position; a random
    key (torch's global generator) for the rest. Also the request ids when known."""
    seed = torch.randint(-(2**63), 2**63 - 1, (B,), dtype=torch.int64)
    for i, gen in meta.generators.items():
        if i < B:
            seed[i] = _to_int64_bits(int(gen.initial_seed()))
    offset = torch.zeros(B, dtype=torch.int64)
    req_ids = None
    batch = _input_batch.get()
    if batch is not None:
        outs = batch.req_output_token_ids
        for i in range(min(B, len(outs))):
            if outs[i] is not None:
                offset[i] = len(outs[i])
        req_ids = list(batch.req_ids[:B])
    return seed, offset, req_ids


def _record(**kw) -> None:
    if _State.capture is not None:
        _State.capture.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})


# ------------------------------------------------------------ the patches ----
def _runner_sample(self, logits, spec_decode_metadata):
    token = _input_batch.set(getattr(self, "input_batch", None))
    try:
        return _State.orig_runner_sample(self, logits, spec_decode_metadata)
    finally:
        _input_batch.reset(token)


def _sampler_forward(self, logits, sampling_metadata, predict_bonus_token=False, logprobs_mode_override=None):
    orig = _State.orig_sampler_forward
    if not _State.active or _in_fallback.get():
        return orig(self, logits, sampling_metadata, predict_bonus_token, logprobs_mode_override)
    mode = logprobs_mode_override or self.logprobs_mode
    reason = _unsupported(sampling_metadata, mode)
    if reason is not None:
        _fallback("sampler", reason)
        return orig(self, logits, sampling_metadata, predict_bonus_token, logprobs_mode_override)
    from vllm.v1.outputs import LogprobsTensors, SamplerOutput

    _State.counts["sampler"] += 1
    B, V = logits.shape
    device = logits.device
    raw = logits.detach().contiguous()
    # vLLM's own logits processing first (penalties, logit bias, min_tokens, allowed ids, bad
    # words, ...), exactly as its Sampler.forward does, on a float32 copy: raw logprobs stay
    # those of the unprocessed logits, as in vLLM.
    processed = _processing_reason(sampling_metadata) is not None
    if processed:
        x = self.apply_logits_processors(raw.to(torch.float32, copy=True), sampling_metadata, predict_bonus_token)
        x = x.contiguous()
    else:
        x = raw
    temperature, top_k, top_p, min_p = _row_params(sampling_metadata, B, V)
    seed, offset, req_ids = _keys(sampling_metadata, B)
    if device.type != "cpu":
        temperature, seed, offset = temperature.to(device), seed.to(device), offset.to(device)
        top_k = top_k.to(device) if isinstance(top_k, torch.Tensor) else top_k
        top_p = top_p.to(device) if isinstance(top_p, torch.Tensor) else top_p
        min_p = min_p.to(device) if min_p is not None else None
    n = sampling_metadata.max_num_logprobs
    ids, lp = sample_vllm_order(x, temperature, top_k, top_p, min_p, seed, offset, None if processed else n)
    if processed and n is not None:  # raw logprobs of the unprocessed logits
        lraw = torch.log_softmax(raw.float(), dim=-1)
        neg, order = torch.sort(-lraw, dim=-1, stable=True)
        lp = (lraw.gather(1, ids[:, None])[:, 0], order[:, :n], -neg[:, :n])
    logprobs_tensors = None
    if lp is not None:
        token_lp, top_ids, top_lp = lp
        xf = raw.float()
        ranks = (xf >= xf.gather(1, ids[:, None])).sum(-1)
        if n == 0 or top_ids is None:
            top_ids = ids.new_zeros(B, 0)
            top_lp = token_lp.new_zeros(B, 0)
        logprobs_tensors = LogprobsTensors(
            torch.cat((ids[:, None], top_ids), dim=1).to(torch.int32),
            torch.cat((token_lp[:, None], top_lp.float()), dim=1),
            ranks,
        )
    _record(
        logits=x.float(),
        raw_logits=raw.float(),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        seed=seed,
        offset=offset,
        req_ids=req_ids,
        token_ids=ids,
    )
    return SamplerOutput(sampled_token_ids=ids.to(torch.int32).unsqueeze(-1), logprobs_tensors=logprobs_tensors)


def _rejection_forward(self, metadata, draft_probs, logits, sampling_metadata):
    orig = _State.orig_rejection_forward
    if not _State.active or _in_fallback.get():
        return orig(self, metadata, draft_probs, logits, sampling_metadata)
    reason = _unsupported_in_verification(sampling_metadata, self.sampler.logprobs_mode)
    if reason is None and getattr(self, "synthetic_mode", False):
        reason = "synthetic rejection sampling"
    if reason is None and sampling_metadata.max_num_logprobs is not None:
        reason = "logprobs during speculative decoding"
    if reason is not None:
        _fallback("rejection sampler", reason)
        token = _in_fallback.set(True)
        try:
            return orig(self, metadata, draft_probs, logits, sampling_metadata)
        finally:
            _in_fallback.reset(token)
    from vllm.v1.outputs import SamplerOutput

    import decodekit

    _State.counts["rejection_sampler"] += 1
    device = logits.device
    n = torch.as_tensor(metadata.num_draft_tokens, dtype=torch.int64)
    B, K, V = n.numel(), int(metadata.max_spec_len), logits.size(1)
    bonus = metadata.bonus_logits_indices.to("cpu", torch.int64)
    j = torch.arange(K + 1, dtype=torch.int64)
    real = j[None, :] < n[:, None]  # [B, K + 1]
    if K > 0:
        start = metadata.cu_num_draft_tokens.to("cpu", torch.int64) - n
        pos = (start[:, None] + j[None, :]).clamp(0, metadata.draft_token_ids.numel() - 1)
        target = metadata.target_logits_indices.to("cpu", torch.int64)[pos]
        rows = torch.where(real, target, bonus[:, None])
        drafts = torch.where(real[:, :K], metadata.draft_token_ids.to("cpu", torch.int64)[pos[:, :K]], -1)
    else:
        pos = None
        rows = bonus[:, None]
        drafts = torch.empty(B, 0, dtype=torch.int64)
    target_logits = logits.detach()[rows.reshape(-1).to(device)].reshape(B, K + 1, V)
    temperature, top_k, top_p, min_p = _row_params(sampling_metadata, B, V)
    seed, offset, _ = _keys(sampling_metadata, B)
    if bool((temperature == 0).all()):
        out = decodekit.greedy_verify(drafts.to(device), target_logits)
    else:
        per = K + 1

        def rep(v):
            return v.repeat_interleave(per) if isinstance(v, torch.Tensor) else v

        probs = vllm_order_probs(
            target_logits.reshape(B * per, V),
            rep(temperature).to(device),
            rep(top_k).to(device) if isinstance(top_k, torch.Tensor) else top_k,
            rep(top_p).to(device) if isinstance(top_p, torch.Tensor) else top_p,
            None if min_p is None else rep(min_p).to(device),
        ).reshape(B, per, V)
        q = None
        if draft_probs is not None and K > 0:
            q = draft_probs.detach().float()[pos.reshape(-1).to(device)].reshape(B, K, V)
            q = q * real[:, :K, None].to(device)
        out = decodekit.chain_speculative_sampling(
            q, drafts.to(device), probs, seed=seed.to(device), offset=offset.to(device)
        )
    return SamplerOutput(sampled_token_ids=out.output_token_ids.to(torch.int32), logprobs_tensors=None)
