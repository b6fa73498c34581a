"""decodekit as vLLM's sampler and rejection sampler, on a real vLLM engine (issue 18).

Runs only where vLLM is importable and ``DECODEKIT_VLLM_MODEL`` names a transformers directory
(``make test-vllm`` sets both up: scripts/test_vllm.sh); the main suite skips it. The engine is
vLLM's offline ``LLM`` in-process on the CPU (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), with the
plugin loaded through its ``vllm.general_plugins`` entry point (``DECODEKIT_VLLM=1``).
``decodekit.integrations.vllm.active(False)`` switches the same engine back to vLLM's own
sampler for the comparisons.
"""

from __future__ import annotations

import os
import types

import pytest
import torch

MODEL = os.environ.get("DECODEKIT_VLLM_MODEL")
if not MODEL:
    pytest.skip("DECODEKIT_VLLM_MODEL not set (make test-vllm sets it)", allow_module_level=True)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["DECODEKIT_VLLM"] = "1"
vllm = pytest.importorskip("vllm")
scipy_stats = pytest.importorskip("scipy.stats")

from vllm import LLM, SamplingParams  # noqa: E402

import decodekit  # noqa: E402
import decodekit.integrations.vllm as dkv  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Explain why the sky is blue in one sentence.",
    "List three fruits:",
    "Once upon a time, in a small village,",
    "The quick brown fox",
    "In mathematics, a prime number is",
]
CHI2_ALPHA = 1e-3  # chi-square tests fail below this p-value


def _ids(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def llm():
    engine = LLM(model=MODEL, enforce_eager=True, dtype="float32", max_model_len=512, max_num_seqs=32, seed=0)
    assert dkv._State.installed, "the vllm.general_plugins entry point did not install the plugin"
    return engine


def _gen(llm, prompts, params):
    return llm.generate(prompts, params, use_tqdm=False)


# ------------------------------------------------------------------ engine ----
def test_plugin_sampler_is_called(llm):
    before = dkv.stats()["sampler"]
    _gen(llm, PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=8))
    # One sampler call per engine step; 2 requests of 8 tokens take at least 8 steps.
    assert dkv.stats()["sampler"] - before >= 8


def test_greedy_equals_vllm_greedy(llm):
    params = SamplingParams(temperature=0.0, max_tokens=32)
    with dkv.active(False):
        ref = _ids(_gen(llm, PROMPTS, params))
    before = dkv.stats()["sampler"]
    got = _ids(_gen(llm, PROMPTS, params))
    assert dkv.stats()["sampler"] > before
    assert got == ref


def test_seeded_request_reproduces_whatever_the_batch(llm):
    target = SamplingParams(temperature=0.8, seed=1234, max_tokens=32)
    alone1 = _ids(_gen(llm, [PROMPTS[0]], target))[0]
    alone2 = _ids(_gen(llm, [PROMPTS[0]], target))[0]
    others = [SamplingParams(temperature=0.8, seed=s, max_tokens=32) for s in (7, 8, 9)]
    others += [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=40) for _ in range(4)]  # unseeded
    batch = _gen(llm, PROMPTS, [target] + others)
    assert alone1 == alone2
    assert _ids(batch)[0] == alone1


def test_offsets_are_output_positions_and_captured_logits_resample(llm):
    params = [SamplingParams(temperature=0.9, top_k=40, seed=s, max_tokens=12) for s in (11, 12)]
    with dkv.capture() as records:
        outs = _gen(llm, PROMPTS[1:3], params)
    assert records
    seen = {}
    for r in records:
        assert r["req_ids"] is not None
        for i, rid in enumerate(r["req_ids"]):
            seen.setdefault(rid, []).append(int(r["offset"][i]))
        # The plugin's ids equal decodekit.sample_from_logits on the same logits, seeds and offsets.
        again = decodekit.sample_from_logits(
            r["logits"], r["temperature"], r["top_k"], r["top_p"], seed=r["seed"], offset=r["offset"]
        )
        assert torch.equal(again, r["token_ids"])
    assert len(seen) == 2
    for offs in seen.values():
        assert offs == list(range(len(offs))) and len(offs) == 12
    # Request seeds are the SamplingParams seeds.
    assert sorted({int(s) for r in records for s in r["seed"]}) == [11, 12]
    assert all(len(o.outputs[0].token_ids) == 12 for o in outs)


def _vllm_reference_probs(logits, temperature, top_k, top_p, min_p):
    """vLLM's chain in plain float64 torch: temperature -> min-p -> top-k -> top-p (vLLM's own
    top-k / top-p code, vllm.v1.sample.ops.topk_topp_sampler.apply_top_k_top_p_pytorch)."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    x = logits.double() / temperature
    if min_p:
        p = torch.softmax(x, -1)
        x = x.masked_fill(p < min_p * p.amax(-1, keepdim=True), float("-inf"))
    k = torch.tensor([top_k]) if top_k else None
    pp = torch.tensor([top_p], dtype=torch.float64) if top_p < 1 else None
    x = apply_top_k_top_p_pytorch(x.clone(), k, pp)
    return torch.softmax(x, -1)


@pytest.mark.parametrize(
    "temperature,top_k,top_p,min_p",
    [(0.8, 20, 1.0, 0.0), (1.0, 0, 0.9, 0.0), (0.7, 0, 1.0, 0.1), (1.0, 50, 0.8, 0.05), (1.3, 0, 0.95, 0.02)],
)
def test_first_token_distribution_matches_vllm(llm, temperature, top_k, top_p, min_p):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=5, max_tokens=1)
    with dkv.capture() as records:
        _gen(llm, ["My favourite colour is"], params)
    rec = records[0]
    logits = rec["logits"][:1]
    ref = _vllm_reference_probs(logits, temperature, top_k, top_p, min_p)[0]
    got = dkv.vllm_order_probs(
        logits,
        rec["temperature"][:1],
        rec["top_k"][:1] if isinstance(rec["top_k"], torch.Tensor) else rec["top_k"],
        rec["top_p"][:1] if isinstance(rec["top_p"], torch.Tensor) else rec["top_p"],
        None if rec["min_p"] is None else rec["min_p"][:1],
    )[0].double()
    # The same kept set and the same probabilities (float32 arithmetic vs float64 reference).
    assert torch.equal(got > 0, ref > 0)
    assert torch.allclose(got, ref, atol=2e-6, rtol=1e-4)
    # Chi-square test of the plugin's draws against vLLM's distribution: N = 4000 draws with
    # distinct seeds, cells with expected count < 5 merged, rejected below p = 1e-3.
    N, chunk = 4000, 250
    counts = torch.zeros(logits.size(1), dtype=torch.float64)
    for c in range(N // chunk):
        rows = logits.expand(chunk, -1).contiguous()
        seeds = torch.arange(c * chunk, (c + 1) * chunk, dtype=torch.int64) + 10_000
        ids, _ = dkv.sample_vllm_order(
            rows,
            float(temperature),
            top_k,
            top_p,
            None if not min_p else torch.full((chunk,), min_p),
            seeds,
            torch.zeros(chunk, dtype=torch.int64),
        )
        counts += torch.bincount(ids, minlength=logits.size(1)).double()
    assert counts[ref == 0].sum() == 0
    _chi2(counts, ref * N)


def _chi2(counts, expected):
    keep = expected >= 5
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    if exp[-1] < 5:  # merge the tail into the smallest kept cell
        obs, exp = obs[:-1], exp[:-1]
        obs[-1] += counts[~keep].sum()
        exp[-1] += expected[~keep].sum()
    p = scipy_stats.chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue
    assert p > CHI2_ALPHA, f"chi-square p = {p:.2e}"


def test_penalties_run_vllms_processing_then_decodekits_draw(llm):
    """Penalties are applied by vLLM's own code inside the plugin, per request, and the draw stays
    decodekit's: greedy equals vLLM's greedy, and a seeded request with a penalty gives the same
    tokens alone and among requests without one (no whole-batch fallback)."""
    params = SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=16)
    with dkv.active(False):
        ref = _ids(_gen(llm, PROMPTS[:2], params))
    before = dkv.stats()
    got = _ids(_gen(llm, PROMPTS[:2], params))
    after = dkv.stats()
    assert got == ref
    assert after["sampler"] > before["sampler"] and after["fallback"] == before["fallback"]
    seeded = SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.3, seed=11, max_tokens=12)
    other = SamplingParams(temperature=0.8, top_k=20, seed=5, max_tokens=12)
    alone = _ids(_gen(llm, PROMPTS[:1], seeded))[0]
    mixed = _ids(_gen(llm, PROMPTS[:4], [seeded, other, other, other]))[0]
    assert alone == mixed


def test_unrouted_option_falls_back_to_vllm(llm):
    """Full-vocabulary logprobs (logprobs=-1, which the engine caps but the sampler accepts) are
    not routed: vLLM's real Sampler runs its own path, with one fallback counted."""
    from vllm.v1.sample.sampler import Sampler

    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    with dkv.active(False):
        ref = Sampler().forward(logits.clone(), _metadata(2, 0.0, max_num_logprobs=-1))
    before = dkv.stats()
    got = Sampler().forward(logits.clone(), _metadata(2, 0.0, max_num_logprobs=-1))
    after = dkv.stats()
    assert torch.equal(got.sampled_token_ids, ref.sampled_token_ids)
    assert torch.equal(got.logprobs_tensors.logprobs, ref.logprobs_tensors.logprobs)
    assert after["fallback"] > before["fallback"] and after["sampler"] == before["sampler"]


def test_raw_logprobs_match_vllm(llm):
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3)
    with dkv.active(False):
        ref = _gen(llm, PROMPTS[:2], params)
    got = _gen(llm, PROMPTS[:2], params)
    for a, b in zip(ref, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert set(la) == set(lb)
            for t in la:
                assert abs(la[t].logprob - lb[t].logprob) < 1e-4
                assert la[t].rank == lb[t].rank


# ------------------------------------------------------------ error cases ----
def _metadata(B, temperature, generators=None, no_penalties=True, top_k=None, top_p=None, max_num_logprobs=None):
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata

    return SamplingMetadata(
        temperature=torch.full((B,), float(temperature)),
        all_greedy=temperature == 0,
        all_random=temperature > 0,
        top_p=top_p,
        top_k=top_k,
        generators=generators or {},
        max_num_logprobs=max_num_logprobs,
        no_penalties=no_penalties,
        prompt_token_ids=torch.zeros(B, 1, dtype=torch.int64),
        frequency_penalties=torch.zeros(B),
        presence_penalties=torch.zeros(B),
        repetition_penalties=torch.full((B,), 1.2),
        output_token_ids=[[] for _ in range(B)],
        allowed_token_ids_mask=None,
        bad_words_token_ids={},
        logitsprocs=LogitsProcessors(),
    )


def test_unsupported_version_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(vllm, "__version__", "0.31.0")
    monkeypatch.setenv("DECODEKIT_VLLM", "1")
    with pytest.raises(dkv.UnsupportedVLLMVersionError, match=r"supports vLLM 0\.32\.0.*vLLM 0\.31\.0"):
        dkv.register()


def test_bad_enable_flag(monkeypatch):
    monkeypatch.setenv("DECODEKIT_VLLM", "yes")
    with pytest.raises(ValueError, match="DECODEKIT_VLLM must be 0 or 1"):
        dkv.register()


def test_fallback_disabled_is_a_clear_error(llm, monkeypatch):
    from vllm.v1.sample.sampler import Sampler

    monkeypatch.setenv("DECODEKIT_VLLM_FALLBACK", "0")
    meta = _metadata(2, 0.8, max_num_logprobs=-1)
    with pytest.raises(dkv.UnsupportedSamplingError, match="logprobs=-1.*DECODEKIT_VLLM_FALLBACK=0"):
        Sampler().forward(torch.randn(2, 64), meta)


# ---------------------------------------------------- speculative decoding ----
def test_rejection_sampler_first_token_marginal_t1(llm):
    """The first emitted token of a verification pass is distributed as the target at T = 1:
    N = 6000 requests (seeds 0..N-1) each verifying the n-gram drafts [3, 5] against the same
    target logits (V = 12); chi-square against softmax(logits), rejected below p = 1e-3."""
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    V, N = 12, 6000
    torch.manual_seed(0)
    row = torch.randn(3, V) * 1.5  # positions: draft 0, draft 1, bonus
    logits = row.repeat(N, 1)
    meta = SpecDecodeMetadata.make_dummy([[3, 5]] * N, device=torch.device("cpu"))
    gens = {i: torch.Generator().manual_seed(i) for i in range(N)}
    rs = types.SimpleNamespace(sampler=types.SimpleNamespace(logprobs_mode="raw_logprobs"), synthetic_mode=False)
    out = RejectionSampler.forward(rs, meta, None, logits, _metadata(N, 1.0, generators=gens))
    first = out.sampled_token_ids[:, 0].long()
    counts = torch.bincount(first, minlength=V).double()
    _chi2(counts, torch.softmax(row[0].double(), -1) * N)
    # Accepted drafts are the drafts; emitted counts are contiguous.
    ids = out.sampled_token_ids
    acc0 = ids[:, 0] == 3
    assert torch.equal(ids[acc0, 1] != -1, torch.ones(int(acc0.sum()), dtype=torch.bool))


@pytest.fixture(scope="module")
def spec_llm(llm):
    try:
        return LLM(
            model=MODEL,
            enforce_eager=True,
            dtype="float32",
            max_model_len=512,
            max_num_seqs=8,
            seed=0,
            speculative_config={
                "method": "ngram",
                "num_speculative_tokens": 3,
                "prompt_lookup_max": 3,
                "prompt_lookup_min": 2,
            },
        )
    except Exception as exc:  # evidence for the README if the CPU build refuses n-gram speculation
        pytest.skip(f"vllm-cpu does not run n-gram speculative decoding: {type(exc).__name__}: {exc}")


SPEC_PROMPTS = [
    "Repeat after me: one two three four, one two three four, one two three four,",
    "a b c d e f a b c d e f a b c d e f a b c",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n\ndef",
]


def test_ngram_speculative_greedy_equals_plain_greedy(llm, spec_llm):
    params = SamplingParams(temperature=0.0, max_tokens=32)
    plain = _ids(_gen(llm, SPEC_PROMPTS, params))
    before = dkv.stats()["rejection_sampler"]
    spec = _ids(_gen(spec_llm, SPEC_PROMPTS, params))
    assert dkv.stats()["rejection_sampler"] > before, "the plugin's rejection sampler was not called"
    assert spec == plain


def test_ngram_speculative_seeded_sampling_runs(spec_llm):
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=24)
    a = _ids(_gen(spec_llm, SPEC_PROMPTS[:1], params))
    b = _ids(_gen(spec_llm, SPEC_PROMPTS[:1], params))
    assert a == b and len(a[0]) == 24
