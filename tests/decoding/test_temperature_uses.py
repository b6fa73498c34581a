"""What people do with temperature (issue 16): n samples that share a prefill and a majority
vote, a greedy-vs-sampled confidence check, length control (min_new_tokens with several stop
ids, eos_bias, stop strings), logprobs from the loop, and the CLI's JSON output.

Every check uses the default model (SmolLM2-135M-Instruct) with a few new tokens; expected
values come from independent computations: plain generation, hand-made token lists, and a
float64 reference (tests/reference/sampling.py) of the model's logits.
"""

from __future__ import annotations

import inspect
import io
import json
import math
from types import SimpleNamespace

import pytest
import torch

import decodekit
from decodekit import PagedKVCache, generate, speculative_generate, vote
from decodekit.decoding.confidence import edit_distance, levenshtein, token_agreement
from reference import sampling as ref

PROMPT = "Write a short poem about the sea."


# ------------------------------------------------------------------------------- helpers
class OracleDrafter:
    """Proposes the known greedy continuation, so every pass accepts all its drafts."""

    def __init__(self, prompt_ids, continuation):
        self.prompt_len = len(prompt_ids)
        self.continuation = list(continuation)

    def propose(self, context, k):
        done = len(context) - self.prompt_len
        return self.continuation[done : done + k]


class StopProposer:
    """Proposes a stop id at every position (to check the target's mask rejects it)."""

    def __init__(self, token):
        self.token = token

    def propose(self, context, k):
        return [self.token] * k


@pytest.fixture(scope="module")
def greedy_long(lm):
    """A greedy run of PROMPT without stopping: 24 tokens."""
    return generate(PROMPT, model=lm, max_new_tokens=24, temperature=0, stop_on_eos=False)


def _pieces(lm, ids):
    return [lm.tokenizer.decode([t]) for t in ids]


def _spanning_stop(lm, ids, lo):
    """A stop string made of the last 2 characters of token k and the first 2 of token k + 1,
    for the first k >= lo where both are plain (at least 2 characters, ASCII); (k, string)."""
    pieces = _pieces(lm, ids)
    for k in range(lo, len(ids) - 1):
        a, b = pieces[k], pieces[k + 1]
        if len(a) >= 2 and len(b) >= 2 and a.isascii() and b.isascii():
            return k, a[-2:] + b[:2]
    raise AssertionError("no pair of plain tokens")


# ------------------------------------------------------------------------------- fork
def test_fork_of_whole_blocks_copies_nothing_even_with_a_reserved_block():
    """A sequence of exactly two full blocks with a third reserved for its next token (as a decode
    step reserves it before its layers): the fork shares the two, needs no free block, and the
    parent keeps its reservation."""
    cache = PagedKVCache(num_layers=1, num_blocks=3, block_size=2, num_kv_heads=1, head_dim=1)
    a = cache.add_sequence()
    cache.advance([a], 4)
    slots = cache.slot_mapping([a], 1)  # reserves block 2: the pool is now full
    assert cache.num_free_blocks == 0 and cache.block_table(a)[0].tolist() == [0, 1, 2]
    b = cache.fork(a)
    assert cache.block_table(b)[0].tolist() == [0, 1] and cache.seq_lens([a, b]).tolist() == [4, 4]
    assert cache.refcount(0) == cache.refcount(1) == 2 and cache.refcount(2) == 1
    assert torch.equal(cache.slot_mapping([a], 1), slots)  # the parent's step is unchanged


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    cache = PagedKVCache(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=1, head_dim=2)
    a = cache.add_sequence()
    k = torch.arange(6 * 2, dtype=torch.float32).reshape(1, 6, 1, 2) + 1
    for layer in range(2):
        cache.append(layer, [a], k * (layer + 1), -k)
    cache.advance([a], 6)  # block 0 full, block 1 holds 2 of 4
    table_a = cache.block_table(a)[0].tolist()
    assert table_a == [0, 1]
    b = cache.fork(a)
    table_b = cache.block_table(b)[0].tolist()
    assert table_b[0] == 0 and table_b[1] not in (0, 1)
    assert cache.refcount(0) == 2 and cache.refcount(1) == 1 and cache.refcount(table_b[1]) == 1
    assert cache.seq_lens([a, b]).tolist() == [6, 6]
    for layer in range(2):
        assert torch.equal(cache.k[layer][table_b[1]], cache.k[layer][1])
        assert torch.equal(cache.v[layer][table_b[1]], cache.v[layer][1])
        assert torch.equal(cache.k[layer][1, :2, 0], (k[0, 4:6, 0] * (layer + 1)))
    # writing the fork's next token leaves the parent's blocks alone
    before = [cache.k[layer][1].clone() for layer in range(2)]
    new = torch.full((1, 1, 1, 2), 99.0)
    for layer in range(2):
        cache.append(layer, [b], new, new)
    cache.advance([b], 1)
    for layer in range(2):
        assert torch.equal(cache.k[layer][1], before[layer])
        assert cache.k[layer][table_b[1], 2, 0].tolist() == [99.0, 99.0]
    # freeing the parent keeps the shared block (and its contents) for the fork
    free_before = cache.num_free_blocks
    cache.free(a)
    assert cache.refcount(0) == 1 and cache.refcount(1) == 0
    assert cache.num_free_blocks == free_before + 1  # block 1 only
    assert torch.equal(cache.k[0][0, :, 0], k[0, :4, 0])
    assert not cache.k[0][1].any()  # released and zeroed
    # truncating into a shared block copies it first (copy on write)
    c = cache.fork(b)
    assert cache.refcount(0) == 2
    cache.truncate(c, 3)
    table_c = cache.block_table(c)[0].tolist()
    assert table_c[0] != 0 and cache.refcount(0) == 1
    assert torch.equal(cache.k[0][0, :, 0], k[0, :4, 0])  # the shared block is untouched
    assert torch.equal(cache.k[0][table_c[0], :3, 0], k[0, :3, 0]) and not cache.k[0][table_c[0], 3].any()
    cache.free(b)
    cache.free(c)
    assert cache.num_free_blocks == 8 and all(cache.refcount(i) == 0 for i in range(8))
    assert not any(cache.k[layer].any() or cache.v[layer].any() for layer in range(2))
    with pytest.raises(ValueError, match="unknown sequence id"):
        cache.fork(a)


# ------------------------------------------------------------------------------- n samples
def test_n_samples_are_different_streams_and_sample_zero_is_plain(lm):
    kw = dict(model=lm, max_new_tokens=12, temperature=0.9, top_p=1.0, seed=11, stop_on_eos=False)
    samples = generate(PROMPT, n=4, **kw)
    assert isinstance(samples, list) and len(samples) == 4
    assert [s.sample_index for s in samples] == [0, 1, 2, 3]
    assert all(s.seed == 11 for s in samples)
    assert len({tuple(s.token_ids) for s in samples}) == 4  # four different streams
    plain = generate(PROMPT, **kw)
    assert samples[0].token_ids == plain.token_ids and samples[0].text == plain.text
    one = generate(PROMPT, n=1, **kw)
    assert len(one) == 1 and one[0].token_ids == plain.token_ids
    # sample i alone, in a batch of other prompts, gives the same tokens (batch invariance)
    batch = generate(["Hi", PROMPT], n=4, **kw)
    assert len(batch) == 2 and all(len(b) == 4 for b in batch)
    assert [s.token_ids for s in batch[1]] == [s.token_ids for s in samples]
    # speculative decoding draws the same kind of streams: sample 0 is its plain run
    spec = speculative_generate(PROMPT, n=3, **kw)
    assert spec[0].token_ids == speculative_generate(PROMPT, **kw).token_ids
    assert len({tuple(s.token_ids) for s in spec}) == 3


def test_random_seed_is_shared_by_the_samples(lm):
    samples = generate("Hi", model=lm, n=3, max_new_tokens=3, temperature=1.0)
    assert samples[0].seed is not None and len({s.seed for s in samples}) == 1


def test_vote_counts_sum_to_n_and_a_fixed_seed_gives_the_same_vote(lm):
    kw = dict(model=lm, max_new_tokens=6, temperature=1.0, seed=5)
    samples, v = generate("Name one primary colour. One word.", n=5, vote=True, **kw)
    assert len(samples) == 5 and sum(v.counts.values()) == 5
    assert v.counts[v.winner] == max(v.counts.values())
    assert v.agreement == v.counts[v.winner] / 5
    assert v.winner_indices == [i for i, s in enumerate(samples) if s.text.strip() == v.winner]
    again = generate("Name one primary colour. One word.", n=5, vote=True, **kw)
    assert again.vote == v and [s.token_ids for s in again.samples] == [s.token_ids for s in samples]
    assert decodekit.vote(samples) == v


def test_vote_by_hand():
    rs = [SimpleNamespace(text=t) for t in [" b", "a", "b ", "a", "c"]]
    v = vote(rs)  # "b" and "a" both twice: the first seen ("b") wins
    assert v.winner == "b" and v.counts == {"b": 2, "a": 2, "c": 1}
    assert v.agreement == 0.4 and v.winner_indices == [0, 2]
    v = vote(rs, extract=lambda r: r.text.strip() in ("a", "c"))
    assert v.winner is True and v.counts == {False: 2, True: 3} and v.winner_indices == [1, 3, 4]
    assert vote(rs, extract=lambda r: len(r.text)).winner == 1  # lengths 2, 1, 2, 1, 1
    assert vote([SimpleNamespace(text="x")]).agreement == 1.0
    with pytest.raises(ValueError, match="non-empty"):
        vote([])
    with pytest.raises(TypeError, match="extract"):
        vote(rs, extract=3)
    with pytest.raises(TypeError, match="unhashable"):
        vote(rs, extract=lambda r: [r.text])


def test_sample_arguments_are_checked(lm):
    with pytest.raises(ValueError, match=r"n must be None or an int in \[1, 1024\]"):
        generate("Hi", model=lm, n=0)
    with pytest.raises(ValueError, match=r"n must be None or an int in \[1, 1024\], got 1000000000"):
        generate("Hi", model=lm, n=10**9)  # at once, before any request is built
    with pytest.raises(ValueError, match=r"confidence: n must be an int in \[1, 1024\], got 2000"):
        decodekit.confidence("Hi", model=lm, n=2000)  # before the greedy answer is decoded
    with pytest.raises(ValueError, match="vote=True needs n"):
        generate("Hi", model=lm, vote=True)
    with pytest.raises(ValueError, match="min_new_tokens must be an int >= 0"):
        generate("Hi", model=lm, min_new_tokens=-1)
    with pytest.raises(ValueError, match="eos_bias must be a finite number"):
        generate("Hi", model=lm, eos_bias=math.inf)
    with pytest.raises(ValueError, match="stop strings must not be empty"):
        generate("Hi", model=lm, stop=["a", ""])
    with pytest.raises(TypeError, match="stop must be None, a string or a list of strings"):
        generate("Hi", model=lm, stop=[3])
    with pytest.raises(ValueError, match=r"eos_token_ids \[999999\] outside"):
        generate("Hi", model=lm, eos_token_ids=[1, 999999])
    with pytest.raises(ValueError, match="top_logprobs=2 needs logprobs=True"):
        generate("Hi", model=lm, top_logprobs=2)
    with pytest.raises(ValueError, match="logprobs_mode must be"):
        generate("Hi", model=lm, logprobs=True, logprobs_mode="softmax")


# ------------------------------------------------------------------------------- confidence
def test_token_agreement_and_edit_distance_by_hand():
    assert token_agreement([1, 2, 3], [1, 5, 3, 4]) == 2 / 3
    assert token_agreement([], []) == 1.0 and token_agreement([1], []) == 0.0
    assert levenshtein([1, 2, 3], [1, 3, 4]) == 2  # delete 2, insert 4
    assert levenshtein(list(b"kitten"), list(b"sitting")) == 3
    assert levenshtein([], [7, 8]) == 2 and levenshtein([5, 6], [5, 6]) == 0
    assert edit_distance([1, 2, 3], [1, 3, 4]) == 2 / 3
    assert edit_distance(list(b"kitten"), list(b"sitting")) == 3 / 7
    assert edit_distance([], []) == 0.0


def test_confidence_compares_greedy_with_samples_at_t1(lm):
    c = decodekit.confidence("What is the capital of France?", n=2, model=lm, max_new_tokens=8, seed=3)
    greedy = generate("What is the capital of France?", model=lm, max_new_tokens=8, temperature=0)
    samples = generate(
        "What is the capital of France?", model=lm, max_new_tokens=8, n=2, temperature=1.0, top_p=1.0, seed=3
    )
    assert c.greedy_text == greedy.text and c.sampled_texts == [s.text for s in samples]
    g = greedy.token_ids
    agreement = [sum(a == b for a, b in zip(g, s.token_ids)) / min(len(g), len(s.token_ids)) for s in samples]
    assert c.token_agreement == pytest.approx(sum(agreement) / 2)
    assert 0.0 <= c.edit_distance <= 1.0 and len(c.sampled_mean_logprobs) == 2
    # the greedy mean logprob is the T = 1 log-probability of the greedy tokens (float64 reference)
    ids = torch.tensor([greedy.prompt_token_ids + g])
    cache = lm.model.new_paged_cache(num_blocks=64, block_size=16)
    logits = lm.model.forward_paged(ids, cache, [cache.add_sequence()], all_logits=True)[0]
    P = len(greedy.prompt_token_ids)
    want = [float(torch.log_softmax(logits[P - 1 + j].double(), 0)[t]) for j, t in enumerate(g)]
    assert c.greedy_mean_logprob == pytest.approx(sum(want) / len(want), abs=1e-4)
    with pytest.raises(ValueError, match="temperature cannot be set here"):
        decodekit.confidence("Hi", model=lm, temperature=0.5)
    with pytest.raises(ValueError, match=r"n must be an int in \[1, 1024\]"):
        decodekit.confidence("Hi", n=0, model=lm)


# ------------------------------------------------------------------------------- length control
def test_min_new_tokens_masks_every_stop_id_exactly(lm):
    """With a large eos_bias on three stop ids, the model would stop at once; min_new_tokens=5
    masks all three until the 6th token, which is then a stop token."""
    stop_set = sorted(lm.tokenizer.stop_ids)
    comma = lm.tokenizer.encode(",")[-1]
    ids = stop_set + [comma]
    assert len(ids) >= 3
    kw = dict(model=lm, max_new_tokens=16, eos_token_ids=ids, eos_bias=60.0)
    early = generate(PROMPT, temperature=0, **kw)
    assert early.token_ids[0] in ids and early.finish_reason == "eos" and len(early.token_ids) == 1
    for temperature, seed in ((0.0, None), (1.0, 4)):
        r = generate(PROMPT, temperature=temperature, seed=seed, min_new_tokens=5, **kw)
        assert len(r.token_ids) == 6 and r.finish_reason == "eos", r.token_ids
        assert not set(r.token_ids[:5]) & set(ids) and r.token_ids[5] in ids
        # speculative: n-gram drafts, and a drafter that proposes a stop id at every position
        for drafter in ("ngram", StopProposer(ids[0])):
            s = speculative_generate(
                PROMPT, temperature=temperature, seed=seed, min_new_tokens=5, drafter=drafter, **kw
            )
            assert len(s.token_ids) == 6 and not set(s.token_ids[:5]) & set(ids) and s.token_ids[5] in ids
            if temperature == 0:
                assert s.token_ids == r.token_ids
    # a token that is not a stop id ends nothing; the default stop set is the model's
    r = generate(PROMPT, model=lm, temperature=0, max_new_tokens=3, eos_bias=60.0)
    assert r.token_ids[0] in lm.tokenizer.stop_ids and r.finish_reason == "eos"
    # min_new_tokens past max_new_tokens: never a stop id
    r = generate(PROMPT, temperature=0, min_new_tokens=50, **kw)
    assert len(r.token_ids) == 16 and r.finish_reason == "length" and not set(r.token_ids) & set(ids)


def test_negative_eos_bias_delays_the_end(lm):
    base = generate("Say hi.", model=lm, temperature=0, max_new_tokens=30)
    assert base.finish_reason == "eos" and len(base.token_ids) < 30
    later = generate("Say hi.", model=lm, temperature=0, max_new_tokens=30, eos_bias=-1e4)
    assert later.finish_reason == "length" and not set(later.token_ids) & lm.tokenizer.stop_ids


def test_stop_string_across_tokens_cuts_and_is_never_streamed(lm, greedy_long):
    ids, full = greedy_long.token_ids, greedy_long.text
    k, stop = _spanning_stop(lm, ids, 2)
    cut = full.find(stop)
    assert cut >= 0
    # the first occurrence ends in token k + 1 (or earlier: then the cut is there)
    end_token = next(j for j in range(len(ids)) if len(lm.tokenizer.decode(ids[: j + 1])) >= cut + len(stop))
    pieces = []
    r = generate(
        PROMPT,
        model=lm,
        max_new_tokens=24,
        temperature=0,
        stop_on_eos=False,
        stop=["never-there", stop],
        stream=pieces.append,
    )
    assert r.finish_reason == "stop" and r.text == full[:cut]
    assert r.token_ids == ids[: end_token + 1]
    assert "".join(pieces) == r.text  # nothing of the stop string ever reached the stream
    # batched and with n: the same cut
    b = generate(["Hi", PROMPT], model=lm, max_new_tokens=24, temperature=0, stop_on_eos=False, stop=stop)
    assert b[1].text == r.text and b[1].token_ids == r.token_ids


def test_stop_string_inside_a_speculative_accept(lm, greedy_long):
    """An oracle drafter makes each pass accept 4 drafts + a bonus (tokens 1-5, 6-10, ...); the
    stop string completes at a token in the middle of a pass, and the tokens after it are
    dropped."""
    ids, full = greedy_long.token_ids, greedy_long.text
    oracle = OracleDrafter(greedy_long.prompt_token_ids, ids)
    full_spec = speculative_generate(
        PROMPT, model=lm, max_new_tokens=24, temperature=0, stop_on_eos=False, drafter=oracle
    )
    assert full_spec.token_ids == ids and full_spec.tokens_per_pass > 4

    def completing(stop):
        cut = full.find(stop)
        return cut, next(j for j in range(len(ids)) if len(lm.tokenizer.decode(ids[: j + 1])) >= cut + len(stop))

    k, stop = _spanning_stop(lm, ids, 1)
    cut, end_token = completing(stop)
    while end_token % 5 not in (2, 3, 4):  # not in the middle of a pass: try the next pair
        k, stop = _spanning_stop(lm, ids, k + 1)
        cut, end_token = completing(stop)
    pieces = []
    r = speculative_generate(
        PROMPT,
        model=lm,
        max_new_tokens=24,
        temperature=0,
        stop_on_eos=False,
        drafter=OracleDrafter(greedy_long.prompt_token_ids, ids),
        stop=stop,
        stream=pieces.append,
    )
    assert r.finish_reason == "stop" and r.text == full[:cut] and "".join(pieces) == r.text
    assert r.token_ids == ids[: end_token + 1]
    full_passes, rest = divmod(end_token, 5)  # tokens 1..end_token come from passes of 5
    assert r.drafted == 4 * (full_passes + 1) and r.decode_steps == full_passes + 1
    assert r.accepted == 4 * full_passes + rest  # the drafts after the stop were not emitted


def test_stop_strings_wait_for_min_new_tokens(lm, greedy_long):
    ids, full = greedy_long.token_ids, greedy_long.text
    k, stop = _spanning_stop(lm, ids, 1)
    cut = full.find(stop)
    end_token = next(j for j in range(len(ids)) if len(lm.tokenizer.decode(ids[: j + 1])) >= cut + len(stop))
    r = generate(
        PROMPT, model=lm, max_new_tokens=24, temperature=0, stop_on_eos=False, stop=stop, min_new_tokens=end_token + 2
    )
    later = full.find(stop, cut + 1)
    if later < 0:
        assert r.finish_reason == "length" and r.token_ids == ids and r.text == full
    else:
        assert r.finish_reason == "stop" and r.text == full[:later]


# ------------------------------------------------------------------------------- logprobs
@pytest.mark.parametrize("speculative", [False, True])
def test_logprobs_match_a_float64_reference(lm, speculative):
    params = dict(temperature=0.8, top_k=0, top_p=0.9, min_p=0.0)
    run = speculative_generate if speculative else generate
    r = run(PROMPT, model=lm, max_new_tokens=8, seed=21, logprobs=True, top_logprobs=3, stop_on_eos=False, **params)
    assert len(r.logprobs) == len(r.token_ids) == len(r.top_logprobs) == 8
    ids = torch.tensor([r.prompt_token_ids + r.token_ids])
    cache = lm.model.new_paged_cache(num_blocks=64, block_size=16)
    logits = lm.model.forward_paged(ids, cache, [cache.add_sequence()], all_logits=True)[0]
    P = r.prompt_tokens
    for j, t in enumerate(r.token_ids):
        row = logits[P - 1 + j]
        probs = ref.filtered_probs(row, **params)
        assert r.logprobs[j] == pytest.approx(math.log(float(probs[t])), abs=1e-4)
        top_ids = ref.rank_order(row)[:3].tolist()
        assert [i for i, _ in r.top_logprobs[j]] == top_ids
        for (_i, lp), want in zip(r.top_logprobs[j], probs[top_ids].tolist()):
            assert (lp == -math.inf and want == 0.0) or lp == pytest.approx(math.log(want), abs=1e-4)
    plain = run(PROMPT, model=lm, max_new_tokens=8, seed=21, stop_on_eos=False, **params)
    assert plain.token_ids == r.token_ids and plain.logprobs is None and plain.top_logprobs is None


def test_greedy_logprobs_are_zero_and_raw_mode_is_log_softmax(lm):
    r = generate("Hi", model=lm, max_new_tokens=3, temperature=0, logprobs=True, stop_on_eos=False)
    assert r.logprobs == [0.0, 0.0, 0.0] and r.top_logprobs == [[], [], []]
    raw = generate(
        "Hi",
        model=lm,
        max_new_tokens=3,
        temperature=0,
        logprobs=True,
        logprobs_mode="raw",
        top_logprobs=1,
        stop_on_eos=False,
    )
    assert all(lp < 0 for lp in raw.logprobs)
    assert [t[0][0] for t in raw.top_logprobs] == raw.token_ids  # greedy picks the top token
    assert [t[0][1] for t in raw.top_logprobs] == pytest.approx(raw.logprobs, abs=1e-5)


# ------------------------------------------------------------------------------- CLI
def test_cli_and_api_share_the_defaults():
    from decodekit.cli import build_parser

    gen = build_parser().parse_args(["generate"])
    for fn in (generate, speculative_generate):
        sig = inspect.signature(fn).parameters
        assert sig["temperature"].default == gen.temperature == 0.7
        assert sig["top_p"].default == gen.top_p == 0.9


def test_cli_json_with_a_prompt_from_stdin(lm, capsys, monkeypatch):
    from decodekit.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("Hi"))
    argv = ["--prompt", "-", "--json", "--max-new-tokens", "4", "--temperature", "0"]
    argv += ["--logprobs", "--top-logprobs", "2"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    want = generate("Hi", model=lm, max_new_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    assert obj["prompt"] == "Hi" and obj["text"] == want.text and obj["token_ids"] == want.token_ids
    assert obj["finish_reason"] == want.finish_reason and obj["seed"] is None
    assert obj["logprobs"] == want.logprobs and len(obj["top_logprobs"][0]) == 2
    assert set(obj["timings"]) == {"prefill_seconds", "decode_seconds", "decode_tokens_per_second"}


def test_cli_samples_vote_stop_and_prompt_file(lm, capsys, tmp_path):
    from decodekit.cli import main

    f = tmp_path / "prompts.txt"
    f.write_text("Name a colour.\n\nName a fruit.\n")
    argv = ["--prompt-file", str(f), "--json", "--n", "3", "--vote", "--seed", "9", "--max-new-tokens", "5"]
    assert main(argv + ["--stop", "e", "--min-new-tokens", "1", "--eos-bias", "-1", "--eos-token-id", "2"]) == 0
    objs = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [o["prompt"] for o in objs] == ["Name a colour.", "Name a fruit."]
    want = generate(
        ["Name a colour.", "Name a fruit."],
        model=lm,
        n=3,
        vote=True,
        seed=9,
        max_new_tokens=5,
        stop="e",
        min_new_tokens=1,
        eos_bias=-1.0,
        eos_token_ids=[2],
    )
    for o, (samples, v) in zip(objs, want):
        assert [s["token_ids"] for s in o["samples"]] == [s.token_ids for s in samples]
        assert all("e" not in s["text"] for s in o["samples"])
        assert o["vote"]["winner"] == v.winner and o["vote"]["agreement"] == v.agreement
        assert sum(c for _, c in o["vote"]["counts"]) == 3
    assert main(["--prompt", "Hi", "--vote"]) == 1
    assert "--vote needs --n" in capsys.readouterr().err
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    assert main(["--prompt-file", str(blank)]) == 1  # not the default prompt
    assert "--prompt-file: no prompt in" in capsys.readouterr().err
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    assert main(["--prompt-file", str(tmp_path / "latin1.txt")]) == 1
    assert "--prompt-file:" in capsys.readouterr().err
    assert main(["--prompt", "Hi", "--n", "2", "--seed", "1", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "=== [0] sample 0: Hi ===" in out and "=== [0] sample 1: Hi ===" in out


def test_cli_confidence(lm, capsys):
    from decodekit.cli import main

    argv = ["--prompt", "Hi", "--confidence", "--n", "2", "--seed", "3", "--max-new-tokens", "4", "--json"]
    assert main(argv) == 0
    obj = json.loads(capsys.readouterr().out)
    want = decodekit.confidence("Hi", n=2, model=lm, seed=3, max_new_tokens=4)
    assert obj["confidence"]["greedy_text"] == want.greedy_text
    assert obj["confidence"]["token_agreement"] == want.token_agreement


@pytest.mark.parametrize("top", [0, 3])
def test_speculative_logprobs_are_plain_decodings_bits(lm, top):
    # Found by a trial: a speculative pass reported a token's logprob from float64 arithmetic,
    # 1e-7 away from the op's value that a plain step reports (and from the token's own entry
    # in its top list). A token in the op's top list (a greedy token always is) now takes the
    # op's value: greedy speculative decoding reports plain decoding's raw logprobs bit for bit
    # (processed ones are 0 for a greedy token either way).
    kw = dict(model=lm, max_new_tokens=24, temperature=0, logprobs=True, logprobs_mode="raw", stop_on_eos=False)
    plain = generate(PROMPT, top_logprobs=top, **kw)
    spec = speculative_generate(PROMPT, drafter="ngram", top_logprobs=top, draft_schedule="constant", **kw)
    assert spec.token_ids == plain.token_ids and spec.accepted > 0
    assert spec.logprobs == plain.logprobs and spec.top_logprobs == plain.top_logprobs
    if top:
        assert [t[0][1] for t in spec.top_logprobs] == spec.logprobs
