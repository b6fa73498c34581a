"""Speculative decoding on SmolLM2-135M with the n-gram drafter."""

from __future__ import annotations

import pytest
import torch

import decodekit
from decodekit import NgramDrafter, speculative_generate

PROMPTS = [
    "Repeat this list exactly: apple, banana, cherry, apple, banana, cherry, apple, banana.",
    "def add(a, b):\n    return a + b\n\nRewrite the function above with type hints.",
    "Tell me about the sea.",
]


def test_ngram_drafter_by_hand():
    d = NgramDrafter(max_ngram=2)
    assert d.propose([1, 2, 3, 9, 1, 2], 3) == [3, 9, 1]
    assert d.propose([5, 6, 7], 2) == []
    assert d.propose([4, 4, 4], 5) == [4]  # the most recent earlier match of [4, 4]
    with pytest.raises(ValueError):
        NgramDrafter(max_ngram=0)
    assert d.propose([1, 2, 3, 1, 2], 2, key="ignored") == [3, 1]


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_speculative_equals_plain_greedy(lm, prompt):
    plain = decodekit.generate(prompt, model=lm, max_new_tokens=64, temperature=0)
    spec = speculative_generate(prompt, model=lm, num_draft_tokens=4, max_new_tokens=64, temperature=0)
    assert spec.token_ids == plain.token_ids
    assert spec.text == plain.text
    assert spec.target_passes <= len(spec.token_ids)


CODE_PROMPT = """def moving_average(values, window):
    result = []
    for i in range(len(values) - window + 1):
        chunk = values[i:i + window]
        result.append(sum(chunk) / window)
    return result

Rewrite this function exactly, but rename the variable chunk to segment."""


def test_drafts_help_on_an_input_grounded_prompt(lm):
    # Rewriting code from the prompt: the n-gram drafter's proposals are often right, so a
    # target pass emits more than one token on average (1.6 measured), with greedy output unchanged.
    plain = decodekit.generate(CODE_PROMPT, model=lm, max_new_tokens=64, temperature=0)
    spec = speculative_generate(CODE_PROMPT, model=lm, num_draft_tokens=4, max_new_tokens=64, temperature=0)
    assert spec.token_ids == plain.token_ids
    assert spec.drafted > 0 and spec.accepted > 0
    assert spec.tokens_per_pass > 1.0


def test_sampled_speculative_is_reproducible_and_in_range(lm):
    a = speculative_generate(PROMPTS[2], model=lm, max_new_tokens=24, temperature=0.8, top_p=0.9, seed=5)
    b = speculative_generate(PROMPTS[2], model=lm, max_new_tokens=24, temperature=0.8, top_p=0.9, seed=5)
    assert a.token_ids == b.token_ids and a.seed == 5
    assert all(0 <= t < lm.config.vocab_size for t in a.token_ids)


def test_bad_arguments(lm):
    for bad in (0, 257, 10**6):  # (10**6 used to reach the allocator: 46 GB of draft rows)
        with pytest.raises(ValueError, match=r"num_draft_tokens must be an int in \[1, 256\]"):
            speculative_generate("hi", model=lm, num_draft_tokens=bad)
    with pytest.raises(TypeError, match="drafter"):
        speculative_generate("hi", model=lm, drafter=object())
    # the checks shared with generate() name the function that was called
    with pytest.raises(ValueError, match=r"^speculative_generate: top_p must be"):
        speculative_generate("hi", model=lm, top_p=1.5)
    with pytest.raises(ValueError, match=r"^speculative_generate: prompt token ids"):
        speculative_generate([1, 10**9], model=lm)
    with pytest.raises(TypeError, match=r"^speculative_generate: stream must be a callable"):
        speculative_generate("hi", model=lm, stream=3)
    for bad in (1e39, 10**400):
        with pytest.raises(ValueError, match=r"^speculative_generate: temperature must be"):
            speculative_generate("hi", model=lm, temperature=bad)
        with pytest.raises(ValueError, match=r"^generate: temperature must be"):
            decodekit.generate("hi", model=lm, temperature=bad)
    with pytest.raises(ValueError, match=r"^generate: frequency_penalty must be a finite number"):
        decodekit.generate("hi", model=lm, frequency_penalty=10**400)


def test_cli_speculative(lm):
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "decodekit",
            "generate",
            "--prompt",
            PROMPTS[0],
            "--temperature",
            "0",
            "--max-new-tokens",
            "16",
            "--speculative",
            "ngram",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "tokens/pass" in r.stderr and r.stdout.strip()


@pytest.mark.slow
def test_batched_speculative_equals_each_request_alone(lm):
    # Greedy and seeded sampling: each request's tokens are the same alone or in a batch.
    greedy_batch = speculative_generate(PROMPTS + [CODE_PROMPT], model=lm, max_new_tokens=40, temperature=0)
    for p, r in zip(PROMPTS + [CODE_PROMPT], greedy_batch):
        assert r.token_ids == decodekit.generate(p, model=lm, max_new_tokens=40, temperature=0).token_ids
    sampled = speculative_generate(PROMPTS, model=lm, max_new_tokens=24, temperature=0.8, seed=[3, 4, 5])
    for p, s, r in zip(PROMPTS, [3, 4, 5], sampled):
        alone = speculative_generate(p, model=lm, max_new_tokens=24, temperature=0.8, seed=s)
        assert r.token_ids == alone.token_ids
    with pytest.raises(ValueError, match="seed"):
        speculative_generate(PROMPTS, model=lm, temperature=0.8, seed=[1, 2])


# ------------------------------------------------- new-user trial (2026-12) ----
def test_accepted_counts_only_the_emitted_drafts(lm):
    # Found by a trial: drafts the verifier accepted after an end-of-sequence token were counted
    # although never emitted (12 "accepted" where 9 drafts were emitted). A drafter that
    # proposes the target's own greedy continuation has every draft accepted, so with K = 4 a
    # pass emits 4 drafts and a bonus token, except the last, cut at the stop token.
    prompt = "What is 2 + 2?"
    cont = decodekit.generate(prompt, model=lm, max_new_tokens=40, temperature=0, stop_on_eos=False)
    plain = decodekit.generate(prompt, model=lm, max_new_tokens=40, temperature=0)
    assert plain.finish_reason == "eos"
    start = len(cont.prompt_token_ids)

    class Oracle:
        def propose(self, context, k):
            return cont.token_ids[len(context) - start : len(context) - start + k]

    spec = speculative_generate(
        prompt, model=lm, drafter=Oracle(), num_draft_tokens=4, max_new_tokens=40, temperature=0
    )
    assert spec.token_ids == plain.token_ids and spec.finish_reason == "eos"
    n = len(spec.token_ids) - 1  # tokens after the first (which comes from the prefill)
    assert spec.accepted == 4 * (n // 5) + n % 5  # every emitted token but the bonus tokens is a draft
    assert spec.accepted <= n < spec.drafted


def test_plain_and_speculative_summaries_share_one_format(lm):
    plain = decodekit.generate("Hi", model=lm, max_new_tokens=4, temperature=0)
    spec = speculative_generate("Hi", model=lm, max_new_tokens=4, temperature=0)
    fields = ("prompt tokens: ", ", prefill: ", " ms (", " tokens/s), new tokens: ", ", decode: ", " tokens/s, seed: ")
    for line in (plain.summary(), spec.summary()):
        at = [line.index(f) for f in fields]
        assert at == sorted(at), line
    assert spec.summary().startswith(plain.summary().split(", decode: ")[0].split(", prefill")[0])
    assert "acceptance: " in spec.summary() and "tokens/pass: " in spec.summary()
    assert "acceptance" not in plain.summary()
    assert type(plain) is type(spec) is decodekit.GenerationResult


def test_max_new_tokens_zero_is_the_same_in_every_mode(lm):
    for run in (
        lambda **kw: decodekit.generate("Hi", model=lm, **kw),
        lambda **kw: speculative_generate("Hi", model=lm, **kw),
        lambda **kw: speculative_generate("Hi", model=lm, drafter=NgramDrafter(), temperature=0.7, **kw),
    ):
        r = run(max_new_tokens=0)
        assert (r.token_ids, r.text, r.finish_reason, r.decode_steps, r.seed) == ([], "", "length", 0, None)
        assert r.new_tokens == 0 and r.decode_tokens_per_second == 0.0
    batch = speculative_generate(["Hi", "Yo"], model=lm, max_new_tokens=[0, 3], temperature=0)
    assert batch[0].token_ids == [] and len(batch[1].token_ids) == 3
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate("Hi", model=lm, max_new_tokens=-1)


@pytest.mark.slow
def test_penalties_bias_and_per_request_lists_in_speculative_decoding(lm):
    # Verification processes every drafted position as plain sampling does (penalties over the
    # tokens before it, the logit bias), so greedy speculative output is plain greedy output,
    # per request, with per-request lists, alone or batched.
    prompts = [PROMPTS[0], CODE_PROMPT, PROMPTS[2]]
    kw = dict(
        max_new_tokens=24,
        temperature=0,
        repetition_penalty=[1.3, 1.0, 1.1],
        frequency_penalty=[0.0, 0.4, 0.0],
        presence_penalty=[0.0, 0.0, 0.3],
        logit_bias=[None, {11: -5.0}, None],
    )
    plain = decodekit.generate(prompts, model=lm, **kw)
    spec = speculative_generate(prompts, model=lm, num_draft_tokens=4, **kw)
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert sum(r.drafted for r in spec) > 0
    # penalties change the output (the test is not vacuous)
    assert plain[0].token_ids != decodekit.generate(prompts[0], model=lm, max_new_tokens=24, temperature=0).token_ids
    # seeded sampling with penalties: reproducible alone and batched
    skw = dict(max_new_tokens=16, temperature=[0.8, 0.9], top_p=0.95, repetition_penalty=1.2, seed=[4, 5])
    batch = speculative_generate(prompts[:2], model=lm, **skw)
    alone = speculative_generate(
        prompts[1], model=lm, max_new_tokens=16, temperature=0.9, top_p=0.95, repetition_penalty=1.2, seed=5
    )
    assert batch[1].token_ids == alone.token_ids and batch[1].seed == 5


def test_drafters_follow_the_protocol():
    from decodekit.decoding.drafters import SamplingDrafter

    assert isinstance(NgramDrafter(), decodekit.Drafter)
    assert not isinstance(NgramDrafter(), SamplingDrafter)
    assert isinstance(decodekit.DraftModelDrafter, type) and hasattr(decodekit.DraftModelDrafter, "propose_with_logits")


class _AlwaysWrong:
    """Proposes k copies of the last vocabulary id (never the target's greedy choice here)."""

    def __init__(self, V):
        self.V, self.asked = V, []

    def propose(self, context, k):
        self.asked.append(k)
        return [self.V - 1] * k


def test_adaptive_draft_schedule_by_hand(lm):
    # A drafter that is never right, K = 4, 40 new tokens greedy (39 verification passes, one
    # token each). Adaptive: 4 -> 2 -> 1 -> 0 (a failed probe: wait 8), 8 plain steps, a probe of
    # 1 (wait 16), 16 plain steps, a probe of 1 (wait 32), then plain steps to the end: drafts
    # asked 4, 2, 1, 1, 1 = 9 tokens. Constant: 4 per pass while 4 tokens still fit (36 passes),
    # then 3, 2, 1 = 150. The tokens are plain greedy's either way.
    plain = decodekit.generate(PROMPTS[0], model=lm, max_new_tokens=40, temperature=0, stop_on_eos=False)
    runs = {}
    for schedule in ("adaptive", "constant"):
        d = _AlwaysWrong(lm.config.vocab_size)
        r = speculative_generate(
            PROMPTS[0], model=lm, drafter=d, num_draft_tokens=4, max_new_tokens=40, temperature=0,
            stop_on_eos=False, draft_schedule=schedule,
        )  # fmt: skip
        assert r.token_ids == plain.token_ids
        assert r.accepted == 0  # the premise: nothing proposed is ever right
        assert r.target_passes == 39
        runs[schedule] = (r.drafted, [k for k in d.asked])
    assert runs["adaptive"] == (9, [4, 2, 1, 1, 1])
    assert runs["constant"][0] == 150


def test_adaptive_greedy_steps_without_drafts_are_plain(lm, monkeypatch):
    # The never-right drafter again: of the 39 passes only the 5 with drafts verify; the 34
    # passes where the greedy request drafts nothing are plain steps (one new token, no
    # verification op), and the tokens are still plain greedy's.
    from decodekit.decoding import loop

    widths = []
    forward, step = type(lm.model).forward_paged, type(lm.model)._decode_step
    inside_step = []

    def spy(self, input_ids, *args, **kw):
        if not inside_step:
            widths.append((input_ids.shape[1], kw.get("all_logits", False)))
        return forward(self, input_ids, *args, **kw)

    def step_spy(self, tokens, *args, **kw):  # the loop's plain step (forward_paged's, less Python)
        widths.append((1, False))
        inside_step.append(1)
        try:
            return step(self, tokens, *args, **kw)
        finally:
            inside_step.pop()

    monkeypatch.setattr(type(lm.model), "forward_paged", spy)
    monkeypatch.setattr(type(lm.model), "_decode_step", step_spy)
    verified = []
    sample_or_verify = loop._sample_or_verify
    monkeypatch.setattr(
        loop, "_sample_or_verify", lambda *a, **kw: verified.append(kw["verify"]) or sample_or_verify(*a, **kw)
    )
    plain = decodekit.generate(PROMPTS[0], model=lm, max_new_tokens=40, temperature=0, stop_on_eos=False)
    widths.clear(), verified.clear()
    r = speculative_generate(
        PROMPTS[0], model=lm, drafter=_AlwaysWrong(lm.config.vocab_size), num_draft_tokens=4, max_new_tokens=40,
        temperature=0, stop_on_eos=False,
    )  # fmt: skip
    assert r.token_ids == plain.token_ids
    steps = widths[1:]  # after the prefill
    assert len(steps) == 39
    assert sorted(w for w, _ in steps if w > 1) == [2, 2, 2, 3, 5]  # the passes with 4, 2, 1, 1, 1 drafts
    assert all(not all_logits for w, all_logits in steps if w == 1)
    assert verified.count(True) == 5 and verified.count(False) == 35  # the first token, 34 plain steps


def test_adaptive_schedule_grows_back_after_accepts(lm, monkeypatch):
    # On the input-grounded prompt the n-gram drafter is often right: the adaptive schedule
    # reaches K again after full accepts, so it drafts and accepts about as much as constant K
    # (at least 80 % of its accepted drafts), with the same greedy tokens. (The loop's clock is
    # kept out: this is the length schedule alone, whatever the machine's speed.)
    from decodekit.decoding import loop

    monkeypatch.setattr(loop._PassClock, "timed", lambda self, kind: False)
    out = {}
    for schedule in ("adaptive", "constant"):
        out[schedule] = speculative_generate(
            CODE_PROMPT, model=lm, num_draft_tokens=4, max_new_tokens=64, temperature=0, draft_schedule=schedule
        )
    assert out["adaptive"].token_ids == out["constant"].token_ids
    assert out["adaptive"].accepted >= 0.8 * out["constant"].accepted > 0
    with pytest.raises(ValueError, match="draft_schedule must be 'adaptive' or 'constant'"):
        speculative_generate("x", model=lm, draft_schedule="fast")


def test_greedy_chain_drafting_stops_when_the_clock_says_it_does_not_pay(lm, monkeypatch):
    # The n-gram drafter is often right on the code prompt (the test above), but with the loop's
    # clock saying that drafting passes never pay, a greedy request takes plain steps after its
    # first drafting pass and probes one draft after 4, 8, 16, 32 plain steps, whatever the probes
    # accept: 64 tokens in 1 + 4 passes with drafts. The tokens are plain greedy's.
    from decodekit.decoding import loop

    monkeypatch.setattr(loop._PassClock, "timed", lambda self, kind: True)
    monkeypatch.setattr(loop._PassClock, "pays", lambda self, kind, gain: False)
    passes = []
    verify = loop._sample_or_verify
    monkeypatch.setattr(loop, "_sample_or_verify", lambda *a, **kw: passes.append(kw["verify"]) or verify(*a, **kw))
    plain = decodekit.generate(CODE_PROMPT, model=lm, max_new_tokens=64, temperature=0, stop_on_eos=False)
    passes.clear()
    r = speculative_generate(
        CODE_PROMPT, model=lm, drafter=NgramDrafter(), num_draft_tokens=4, max_new_tokens=64, temperature=0,
        stop_on_eos=False,
    )  # fmt: skip
    assert r.token_ids == plain.token_ids
    # passes[0] samples the first token; then a pass with K = 4 drafts, and probes of one draft
    # after at least 4, 8, 16 plain steps (a probe waits while the drafter finds no match)
    verifying = [i for i, v in enumerate(passes) if v]
    gaps = [b - a - 1 for a, b in zip(verifying, verifying[1:])]
    assert verifying[0] == 1 and len(gaps) >= 2, passes
    assert all(g >= w for g, w in zip(gaps, (4, 8, 16, 32))), gaps
    assert r.drafted == 4 + len(gaps), r.drafted

    # The same with the clock saying that they always pay: the request keeps drafting (a miss
    # leaves it at one draft instead of plain steps), so it drafts far more.
    monkeypatch.setattr(loop._PassClock, "pays", lambda self, kind, gain: True)
    r2 = speculative_generate(
        CODE_PROMPT, model=lm, drafter=NgramDrafter(), num_draft_tokens=4, max_new_tokens=64, temperature=0,
        stop_on_eos=False,
    )  # fmt: skip
    assert r2.token_ids == plain.token_ids
    assert r2.drafted >= 3 * r.drafted, (r2.drafted, r.drafted)


def test_draft_memory_by_hand():
    # The record's running means, by hand: the first pass sets them, later ones move them by
    # DRAFT_MEMORY_WEIGHT (0.05). Unknown until 16 passes; then a drafting pass that emits
    # 1 + gain tokens in more than that many plain steps' time does not pay, and every greedy
    # request skips drafting except one in 16 (the scouts: requests 16, 32, ...).
    from decodekit.decoding import loop

    m = loop._DraftMemory(0)
    m.add_pass(1.0, 2.0)
    assert (m.gain, m.ratio, m.passes) == (1.0, 2.0, 1)
    m.add_pass(0.0, 1.0)
    assert m.gain == pytest.approx(0.95) and m.ratio == pytest.approx(1.95)
    assert m.pays()  # 2 passes: not enough on record
    for _ in range(14):
        m.add_pass(0.0, 1.5)
    # gain 0.95 * 0.95^14 = 0.463, ratio 1.5 + 0.45 * 0.95^14 = 1.719: 1.463 < 1.719, it does not pay
    assert m.passes == 16
    assert m.gain == pytest.approx(0.95 * 0.95**14) and m.ratio == pytest.approx(1.5 + 0.45 * 0.95**14)
    assert not m.pays()
    assert [m.skips_next() for _ in range(32)] == [True] * 15 + [False] + [True] * 15 + [False]
    m.add_pass(8.0, 1.5)  # gain 0.463 + 0.05 * 7.537 = 0.840, ratio 1.708: 1.840 >= 1.708, it pays again
    assert m.gain == pytest.approx(0.95**16 + 0.4) and m.ratio == pytest.approx(1.5 + 0.45 * 0.95**15)
    assert m.pays() and not m.skips_next()
    # One record per drafter object and target: another target starts a new record; a drafter
    # that cannot be hashed (or weakly referenced) gets none.
    d, t1, t2 = _AlwaysWrong(10), object(), object()
    rec = loop._draft_memory(d, t1)
    rec.add_pass(1.0, 1.0)
    assert loop._draft_memory(d, t1) is rec
    fresh = loop._draft_memory(d, t2)
    assert fresh is not rec and fresh.passes == 0

    class Unhashable(_AlwaysWrong):
        __hash__ = None

    assert loop._draft_memory(Unhashable(10), t1) is None


def test_greedy_requests_skip_a_drafter_on_record_as_not_paying(lm):
    # A never-right drafter whose record says it does not pay: greedy requests of later calls
    # propose nothing and take plain steps (same tokens), except the 16th (a scout, which probes
    # one draft first); sampled requests draft as usual (their schedule depends on their own
    # passes only).
    from decodekit.decoding import loop

    d = _AlwaysWrong(lm.config.vocab_size)
    mem = loop._draft_memory(d, lm.model)
    for _ in range(loop.DRAFT_MEMORY_MIN_PASSES):
        mem.add_pass(0.0, 1.3)
    plain = decodekit.generate(PROMPTS[0], model=lm, max_new_tokens=12, temperature=0, stop_on_eos=False)
    asked = []
    for _ in range(16):
        d.asked.clear()
        r = speculative_generate(
            PROMPTS[0], model=lm, drafter=d, num_draft_tokens=4, max_new_tokens=12, temperature=0, stop_on_eos=False
        )
        assert r.token_ids == plain.token_ids
        asked.append((r.drafted, list(d.asked)))
    assert asked[:15] == [(0, [])] * 15
    assert asked[15][0] > 0 and asked[15][1][0] == 1  # the scout probes one draft first
    d.asked.clear()
    r = speculative_generate(
        PROMPTS[0], model=lm, drafter=d, num_draft_tokens=4, max_new_tokens=12, temperature=0.7, seed=3,
        stop_on_eos=False,
    )  # fmt: skip
    assert r.drafted > 0 and d.asked[0] == 4
    # A fresh drafter object has no record: it drafts from the first pass.
    fresh = _AlwaysWrong(lm.config.vocab_size)
    r = speculative_generate(
        PROMPTS[0], model=lm, drafter=fresh, num_draft_tokens=4, max_new_tokens=12, temperature=0, stop_on_eos=False
    )
    assert r.token_ids == plain.token_ids and fresh.asked[0] == 4


def test_a_scout_puts_a_drafter_that_now_pays_back_on_record(lm):
    # A drafter on record as not paying (16 passes that accepted nothing, at 1.3 plain steps
    # each) that now proposes exactly the greedy continuation. The scout (the 16th greedy
    # request) must get its drafting passes on record, so that greedy requests draft again:
    # each of its passes accepts all 4 drafts, so after n of them the record's gain is
    # 4 * (1 - 0.95^n) (1.35 at n = 8) and its ratio 1.3 + (1 - 0.95^n) * (measured - 1.3);
    # a pass of 5 positions would have to cost over 4 plain steps for drafting not to pay.
    # (Before the fix the scout never took a plain step, so its call never timed one and not
    # one of its passes was recorded: the record stayed at 16 passes, not paying, for good.)
    from decodekit.decoding import loop

    plain = decodekit.generate(PROMPTS[0], model=lm, max_new_tokens=48, temperature=0, stop_on_eos=False)
    seq = plain.prompt_token_ids + plain.token_ids

    class Oracle:
        def __init__(self):
            self.asked = []

        def propose(self, context, k):
            self.asked.append(k)
            assert list(context) == seq[: len(context)]
            return seq[len(context) : len(context) + k]

    d = Oracle()
    mem = loop._draft_memory(d, lm.model)
    for _ in range(loop.DRAFT_MEMORY_MIN_PASSES):
        mem.add_pass(0.0, 1.3)
    mem.requests = loop.DRAFT_SCOUT_EVERY - 1  # the next greedy request is a scout
    kw = dict(model=lm, drafter=d, num_draft_tokens=4, max_new_tokens=48, temperature=0, stop_on_eos=False)
    scout = speculative_generate(PROMPTS[0], **kw)
    assert scout.token_ids == plain.token_ids
    assert d.asked[0] == 1 and scout.accepted == scout.drafted > 0  # it probes one draft first
    assert mem.passes >= loop.DRAFT_MEMORY_MIN_PASSES + 5, mem.passes
    assert mem.pays(), (mem.gain, mem.ratio)
    d.asked.clear()
    after = speculative_generate(PROMPTS[0], **kw)
    assert after.token_ids == plain.token_ids and d.asked[0] == 4  # drafts K from its first pass


class _Never:
    """Proposes nothing."""

    def propose(self, context, k):
        return []


class _WrongOnEvenLengths:
    """Proposes k copies of the last vocabulary id when the context's length is even, else nothing."""

    def __init__(self, V):
        self.V = V

    def propose(self, context, k):
        return [self.V - 1] * k if len(context) % 2 == 0 else []


def test_sampled_requests_without_drafts_sample_as_plain_decoding(lm):
    # A request that drafts nothing takes its token as a plain step does (the plain stream at
    # its offset): with a drafter that never proposes, seeded sampled runs give exactly plain
    # generation's tokens, alone and in a batch.
    kw = dict(model=lm, max_new_tokens=24, temperature=0.8, top_p=0.9, stop_on_eos=False)
    plain = decodekit.generate([PROMPTS[0], PROMPTS[1]], seed=[4, 9], **kw)
    spec = speculative_generate([PROMPTS[0], PROMPTS[1]], drafter=_Never(), num_draft_tokens=3, seed=[4, 9], **kw)
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert all(r.drafted == 0 for r in spec)


def test_sampled_request_without_drafts_beside_drafting_neighbours(lm):
    # The drafter proposes (wrong drafts) only on even context lengths, so within one pass some
    # requests verify drafts and others draw plainly; a seeded request's tokens are the same
    # alone and in batches with greedy and sampled neighbours, in both schedules.
    for schedule in ("adaptive", "constant"):
        kw = dict(
            model=lm, max_new_tokens=20, stop_on_eos=False, num_draft_tokens=2, draft_schedule=schedule,
            drafter=_WrongOnEvenLengths(lm.config.vocab_size),
        )  # fmt: skip
        alone = speculative_generate(PROMPTS[2], temperature=0.8, seed=21, **kw)
        mixed = speculative_generate(
            [PROMPTS[0], PROMPTS[2], PROMPTS[1]], temperature=[0.0, 0.8, 0.8], seed=[None, 21, 5], **kw
        )
        assert mixed[1].token_ids == alone.token_ids, schedule
        assert alone.drafted > 0


class _LogitsDrafter:
    """A drafter with its own distribution (flat logits over the first 64 ids, drafts chosen with
    the loop's `choose`) that returns `extra` more drafts than asked for."""

    def __init__(self, V, extra):
        self.V, self.extra = V, extra

    def propose(self, context, k):
        return []

    def propose_with_logits(self, context, k, choose, key=None):
        logits = torch.full((k + self.extra, self.V), float("-inf"))
        logits[:, :64] = 0.0
        drafts = [choose(logits[j], j) for j in range(k)] + [7] * self.extra
        return drafts, logits


def test_drafts_with_logits_beyond_k_are_cut_to_k(lm):
    # propose_with_logits returning more than k drafts: the first k and their logits are used,
    # exactly as from a drafter that returned k (propose()'s drafts are cut the same way).
    V = lm.config.vocab_size
    kw = dict(model=lm, max_new_tokens=20, temperature=0.9, seed=5, num_draft_tokens=3, stop_on_eos=False)
    kw["draft_schedule"] = "constant"
    exact = speculative_generate(PROMPTS[0], drafter=_LogitsDrafter(V, 0), **kw)
    for extra in (3, 40):  # (40: more than the cache's free blocks would take)
        more = speculative_generate(PROMPTS[0], drafter=_LogitsDrafter(V, extra), **kw)
        assert more.token_ids == exact.token_ids and len(more.token_ids) == 20
        assert more.drafted == exact.drafted and more.drafted > 0
