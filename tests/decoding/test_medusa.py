"""Medusa drafting on SmolLM2-135M: greedy tree verification reproduces plain greedy decoding
token for token (batch 1 and 4, the shipped heads and untrained heads), seeded sampling is
reproducible and batch-invariant, length rules hold inside a tree accept, and heads files for
another target are refused."""

from __future__ import annotations

import pytest
import torch

import decodekit
from decodekit.decoding import MedusaDrafter, Tree
from decodekit.models.medusa import MedusaHeads, default_medusa_path, load_medusa_heads

PROMPTS = [
    "What is a good way to start learning to play the guitar?",
    "Explain why the sky looks blue during the day.",
    "Write a short poem about autumn leaves.",
    "Give me three ideas for a quick vegetarian dinner.",
]


def zero_heads(lm, num_heads=3, vocab=4096):
    """Untrained heads (W = 0, b = 0): each head is the LM head over the first `vocab` ids."""
    H = lm.config.hidden_size
    ids = torch.arange(vocab, dtype=torch.int64)
    emb = lm.model.lm_head
    rows = emb.rows(ids) if isinstance(emb, decodekit.QuantizedWeight) else emb[ids]
    return MedusaHeads(torch.zeros(num_heads, H, H), torch.zeros(num_heads, H), ids, rows)


@pytest.fixture(scope="module")
def heads(lm):
    if not default_medusa_path().is_file():
        pytest.skip("no shipped Medusa heads file")
    return load_medusa_heads(target=lm)


@pytest.mark.slow
def test_greedy_medusa_equals_plain_greedy_batch1(lm, heads):
    for prompt in PROMPTS[:3]:
        plain = decodekit.generate(prompt, model=lm, max_new_tokens=64, temperature=0)
        d = MedusaDrafter(heads)
        spec = decodekit.speculative_generate(prompt, model=lm, drafter=d, max_new_tokens=64, temperature=0)
        assert spec.token_ids == plain.token_ids
        assert spec.text == plain.text
        assert d.passes > 0


@pytest.mark.slow
def test_greedy_medusa_equals_plain_greedy_batch4(lm, heads):
    plain = decodekit.generate(PROMPTS, model=lm, max_new_tokens=64, temperature=0)
    spec = decodekit.speculative_generate(PROMPTS, model=lm, drafter="medusa", max_new_tokens=64, temperature=0)
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]
    assert sum(s.accepted for s in spec) > 0  # the trained heads get tokens accepted


@pytest.mark.slow
def test_greedy_untrained_heads_and_odd_trees(lm):
    # Untrained heads and trees with several siblings at every level: the output stays exact.
    h = zero_heads(lm)
    plain = decodekit.generate(PROMPTS[1], model=lm, max_new_tokens=40, temperature=0)
    for tree in ([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]], [[0], [0, 0], [0, 0, 0]], [[3]]):
        d = MedusaDrafter(h, tree=tree)
        spec = decodekit.speculative_generate(PROMPTS[1], model=lm, drafter=d, max_new_tokens=40, temperature=0)
        assert spec.token_ids == plain.token_ids, tree


@pytest.mark.slow
@pytest.mark.parametrize("acceptance", ["lossless", "typical"])
def test_seeded_medusa_reproducible_and_batch_invariant(lm, acceptance):
    h = zero_heads(lm)
    kw = dict(model=lm, max_new_tokens=24, temperature=0.8, top_p=0.95)

    def run(prompts, seeds):
        return decodekit.speculative_generate(
            prompts, drafter=MedusaDrafter(h, acceptance=acceptance), seed=seeds, **kw
        )

    alone = run([PROMPTS[2]], [7])[0]
    again = run([PROMPTS[2]], [7])[0]
    mixed = run([PROMPTS[0], PROMPTS[2], PROMPTS[3]], [1, 7, 3])[1]
    assert alone.token_ids == again.token_ids == mixed.token_ids
    assert alone.seed == 7


@pytest.mark.slow
def test_min_new_tokens_and_stop_inside_a_tree_accept(lm):
    h = zero_heads(lm)
    short = decodekit.generate("Say hi.", model=lm, max_new_tokens=32, temperature=0)
    assert short.finish_reason == "eos"
    n = len(short.token_ids) + 3
    r = decodekit.speculative_generate(
        "Say hi.", model=lm, drafter=MedusaDrafter(h), max_new_tokens=32, temperature=0, min_new_tokens=n
    )
    plain = decodekit.generate("Say hi.", model=lm, max_new_tokens=32, temperature=0, min_new_tokens=n)
    assert r.token_ids == plain.token_ids and len(r.token_ids) >= n
    stop = plain.text.split()[1] if len(plain.text.split()) > 1 else plain.text[:3]
    a = decodekit.generate("Say hi.", model=lm, max_new_tokens=32, temperature=0, min_new_tokens=n, stop=stop)
    b = decodekit.speculative_generate(
        "Say hi.", model=lm, drafter=MedusaDrafter(h), max_new_tokens=32, temperature=0, min_new_tokens=n, stop=stop
    )
    assert (a.text, a.finish_reason, a.token_ids) == (b.text, b.finish_reason, b.token_ids)


def test_heads_for_another_target_are_refused(lm, tmp_path):
    from safetensors.torch import save_file

    H = lm.config.hidden_size
    tensors = {
        "weight": torch.zeros(2, H, H),
        "bias": torch.zeros(2, H),
        "token_ids": torch.arange(8, dtype=torch.int32),
    }
    meta = {
        "format": "decodekit-medusa-v1",
        "num_heads": "2",
        "target_vocab_size": str(lm.config.vocab_size),
        "target_hidden_size": str(H),
        "target_embed_checksum": "1.0,2.0",
    }
    path = tmp_path / "other.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="trained for another target"):
        load_medusa_heads(path, target=lm)
    save_file(tensors, str(path), metadata={**meta, "format": "something-else"})
    with pytest.raises(ValueError, match="not a decodekit-medusa-v1 file"):
        load_medusa_heads(path, target=lm)
    with pytest.raises(FileNotFoundError):
        load_medusa_heads(tmp_path / "missing.safetensors", target=lm)


def test_bad_medusa_arguments(lm):
    h = zero_heads(lm, num_heads=2)
    with pytest.raises(ValueError, match="past the number of heads"):
        MedusaDrafter(h, tree=[[0], [0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="acceptance"):
        MedusaDrafter(h, acceptance="greedy")
    with pytest.raises(ValueError, match="acceptance"):
        decodekit.speculative_generate("hi", model=lm, drafter="medusa", acceptance="nope")
    with pytest.raises(ValueError, match="apply to drafter='medusa'"):
        decodekit.speculative_generate("hi", model=lm, drafter="ngram", tree=[[0]])
    with pytest.raises(TypeError, match="inside the decode loop"):
        MedusaDrafter(h).propose([1, 2], 2)
    assert isinstance(MedusaDrafter(h).tree, Tree)


def test_heads_top_ids_by_hand():
    # Two heads, H = 2, vocabulary of 3 tokens (ids 10, 11, 12), W = 0: u = h + silu(b).
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 0.0], [0.0, 4.0]])
    heads = MedusaHeads(torch.zeros(2, 2, 2), b, torch.tensor([10, 11, 12]), rows)
    h = torch.tensor([[2.0, 1.0]])
    lg = heads.logits(h)
    silu4 = 4.0 / (1.0 + torch.exp(torch.tensor(-4.0)))
    want = torch.tensor([[[2.0, 1.0, 3.0], [2.0, 1.0 + silu4, 3.0 + silu4]]])
    torch.testing.assert_close(lg, want)
    assert heads.top_ids(h, 2).tolist() == [[[12, 10], [12, 11]]]
    # ties: the lower reduced-vocabulary index first
    tie = MedusaHeads(torch.zeros(1, 2, 2), torch.zeros(1, 2), torch.tensor([5, 6]), torch.ones(2, 2))
    assert tie.top_ids(torch.tensor([[1.0, 1.0]]), 2).tolist() == [[[5, 6]]]


def test_heads_top_ids_ties_against_a_stable_sort():
    # 64-token vocabulary with many exact ties (rows repeat): the fast top-k path must give the
    # order of a full stable sort (logit descending, lower reduced index first).
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 4, generator=g)
    rows = base[torch.randint(0, 8, (64,), generator=g)]
    ids = torch.arange(100, 164)
    heads = MedusaHeads(torch.zeros(2, 4, 4), torch.zeros(2, 4), ids, rows)
    h = torch.randn(5, 4, generator=g)
    lg = heads.logits(h)
    for k in (1, 3, 10):
        want = ids[torch.sort(lg, dim=-1, descending=True, stable=True).indices[..., :k]]
        assert torch.equal(heads.top_ids(h, k), want)


def test_tree_pass_logits_match_each_path_run_alone(lm):
    # forward_paged with tree_parents: every node's logits equal those of running its path
    # after the prompt as a plain sequence (float32 rounding: the tree pass reads the ancestors'
    # keys at other slots, so the attention's summation groups can differ), and a chain tree
    # gives exactly the bits of the plain pass.
    net = lm.model
    prompt = torch.tensor([lm.tokenizer.encode("The tide comes in and", add_bos=False)])
    tree = Tree([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]], num_heads=3)
    cand = torch.tensor([[11, 22, 33, 44, 55, 66, 77]])
    cache = net.new_paged_cache(num_blocks=8)
    s = cache.add_sequence()
    net.forward_paged(prompt, cache, [s])
    tree_logits = net.forward_paged(cand, cache, [s], all_logits=True, tree_parents=tree.parents)[0]
    paths = tree.path_tokens(cand)[0]
    for i in range(tree.num_nodes):
        c2 = net.new_paged_cache(num_blocks=8)
        s2 = c2.add_sequence()
        net.forward_paged(prompt, c2, [s2])
        seq = torch.tensor([[11] + paths[i]])
        alone = net.forward_paged(seq, c2, [s2], all_logits=True)[0, -1]
        torch.testing.assert_close(tree_logits[i], alone, rtol=0, atol=2e-4)
    chain = Tree([[0], [0, 0]], num_heads=2)
    c3 = net.new_paged_cache(num_blocks=8)
    s3 = c3.add_sequence()
    net.forward_paged(prompt, c3, [s3])
    a = net.forward_paged(cand[:, :3], c3, [s3], all_logits=True, tree_parents=chain.parents)
    c4 = net.new_paged_cache(num_blocks=8)
    s4 = c4.add_sequence()
    net.forward_paged(prompt, c4, [s4])
    b = net.forward_paged(cand[:, :3], c4, [s4], all_logits=True)
    assert torch.equal(a, b)


def test_cli_acceptance_needs_medusa(capsys):
    # --acceptance only means something for tree verification: without --speculative medusa it is
    # refused (exit 1, naming the flag) instead of being silently ignored.
    from decodekit.cli import main

    for argv in (["--acceptance", "typical"], ["--acceptance", "typical", "--speculative", "ngram"]):
        assert main(["--prompt", "Hi", "--max-new-tokens", "2", *argv]) == 1
        assert "--acceptance needs --speculative medusa" in capsys.readouterr().err


def test_cli_draft_schedule_reaches_every_drafter(capsys, monkeypatch):
    # --draft-schedule is passed on with --speculative medusa too, and refused without --speculative.
    import decodekit.cli as cli

    seen = []

    def fake(prompt, **kw):
        seen.append((kw["drafter"], kw["draft_schedule"]))
        raise SystemExit(0)  # stop before anything runs

    monkeypatch.setattr("decodekit.decoding.speculative_generate", fake)
    for drafter in ("medusa", "ngram"):
        for flag in ([], ["--draft-schedule", "constant"]):
            with pytest.raises(SystemExit):
                cli.main(["--prompt", "Hi", "--max-new-tokens", "2", "--speculative", drafter, *flag])
    assert seen == [("medusa", "adaptive"), ("medusa", "constant"), ("ngram", "adaptive"), ("ngram", "constant")]
    assert cli.main(["--prompt", "Hi", "--max-new-tokens", "2", "--draft-schedule", "constant"]) == 1
    assert "--draft-schedule needs --speculative" in capsys.readouterr().err


def test_adaptive_medusa_falls_back_to_plain_steps(lm):
    # Heads that are never right (untrained heads, a tree of the 4th candidate only), 40 new
    # tokens greedy = 39 passes. Adaptive: a tree pass, then plain steps with a one-pass probe
    # after 8, then after 16 more: tree passes 1, 10 and 27 (3 in all). Constant: 39 tree passes.
    # The tokens are plain greedy's either way.
    plain = decodekit.generate(PROMPTS[0], model=lm, max_new_tokens=40, temperature=0, stop_on_eos=False)
    passes = {}
    for schedule in ("adaptive", "constant"):
        d = MedusaDrafter(zero_heads(lm), tree=[[3]])
        r = decodekit.speculative_generate(
            PROMPTS[0], model=lm, drafter=d, max_new_tokens=40, temperature=0, stop_on_eos=False,
            draft_schedule=schedule,
        )  # fmt: skip
        assert r.token_ids == plain.token_ids
        assert r.accepted == 0  # the premise: the heads' candidates are never the target's
        assert r.target_passes == 39
        passes[schedule] = d.passes
    assert passes == {"adaptive": 3, "constant": 39}


def test_adaptive_medusa_keeps_trees_that_pay(lm, monkeypatch):
    # The same never-right heads, with the loop's clock saying that tree passes pay: a greedy
    # request keeps verifying trees after its misses (39 tree passes, as "constant"), and the
    # tokens are still plain greedy's.
    from decodekit.decoding import loop

    monkeypatch.setattr(loop._PassClock, "tree_pays", lambda self, gain: True)
    plain = decodekit.generate(PROMPTS[0], model=lm, max_new_tokens=40, temperature=0, stop_on_eos=False)
    d = MedusaDrafter(zero_heads(lm), tree=[[3]])
    r = decodekit.speculative_generate(
        PROMPTS[0], model=lm, drafter=d, max_new_tokens=40, temperature=0, stop_on_eos=False
    )
    assert r.token_ids == plain.token_ids and r.accepted == 0
    assert d.passes == 39


@pytest.mark.parametrize("acceptance", ["lossless", "typical"])
def test_adaptive_medusa_sampled_requests_fall_back_to_plain_sampling(lm, monkeypatch, acceptance):
    # Sampled requests follow the length schedule too (from their own passes only): with heads
    # that rarely propose the sampled token, a seeded request verifies its own tree on only a
    # few of its 39 passes (constant: on every pass); at length 0 its token is sampled from the
    # root's logits as a plain step samples it. Its tokens are the same alone (plain steps when
    # it is at 0) and beside a greedy request kept on tree passes by the clock (its root's token
    # sampled inside their tree passes).
    from decodekit.decoding import loop

    kw = dict(model=lm, max_new_tokens=40, temperature=0.8, top_p=0.95, stop_on_eos=False)

    def run(prompts, seeds, schedule="adaptive", temps=None):
        d = MedusaDrafter(zero_heads(lm), tree=[[3], [3, 3]], acceptance=acceptance)
        args = dict(kw, temperature=temps) if temps else kw
        out = decodekit.speculative_generate(prompts, drafter=d, seed=seeds, draft_schedule=schedule, **args)
        return out, d

    (alone,), d_alone = run([PROMPTS[2]], [11])
    assert alone.target_passes == 39
    (const,), d_const = run([PROMPTS[2]], [11], "constant")
    assert d_const.passes == const.target_passes >= 30  # every pass verifies the tree
    assert d_alone.passes <= 8, (d_alone.passes, alone.accepted)
    monkeypatch.setattr(loop._PassClock, "tree_pays", lambda self, gain: True)
    mixed, d_mixed = run([PROMPTS[0], PROMPTS[2]], [None, 11], temps=[0.0, 0.8])
    assert mixed[1].token_ids == alone.token_ids
    assert d_mixed.passes >= 39  # the greedy neighbour verified its tree on every pass


def test_pass_clock_rule_by_hand():
    from decodekit.decoding.loop import _PassClock

    c = _PassClock()
    assert not c.tree_pays(1.0)  # nothing timed yet
    c.mean = {"plain": 4.0, "tree": 6.0}
    assert c.tree_pays(0.5)  # 1.5 tokens in 6 ms = 1.5 plain steps of 4 ms: break-even
    assert not c.tree_pays(0.49)
    assert not c.tree_pays(0.0)  # a tree that accepts nothing never pays
    c.mean = {"plain": 4.0, "tree": 3.9}
    assert not c.tree_pays(0.0) and c.tree_pays(0.01)


def test_heads_computed_for_a_shallow_tree_are_the_same_bits(lm):
    from decodekit.models.medusa import load_medusa_heads

    heads = load_medusa_heads(target=lm)
    h = torch.randn(3, heads.hidden_size, generator=torch.Generator().manual_seed(4))
    full = heads.logits(h)
    for n in (1, 2):
        assert torch.equal(heads.logits(h, n), full[:, :n])
        assert torch.equal(heads.top_ids(h, 4, n), heads.top_ids(h, 4)[:, :n])
    with pytest.raises(ValueError, match="num_heads must be in"):
        heads.logits(h, heads.num_heads + 1)


def test_heads_and_drafter_argument_errors(lm):
    from decodekit.models.medusa import load_medusa_heads

    heads = load_medusa_heads(target=lm)
    h = torch.randn(2, heads.hidden_size)
    n = heads.token_ids.numel()
    for k in (0, -1, n + 1, 2.0, True):
        with pytest.raises(ValueError, match="k must be an int in"):
            heads.top_ids(h, k)
    for bad in (2.0, "2", True):
        with pytest.raises(TypeError, match="num_heads must be an int"):
            heads.logits(h, bad)
    with pytest.raises(ValueError, match=r"h must be a float32 \[B, H="):
        heads.logits(h[0])
    assert heads.logits(h[:0], 2).shape == (0, 2, n)
    with pytest.raises(ValueError, match=f"candidate rank {n} but the heads rank only {n} tokens"):
        MedusaDrafter(heads, tree=[[n]])
    assert MedusaDrafter(heads, tree=[[n - 1]]).tree.top_k == n


@pytest.mark.parametrize("acceptance", ["lossless", "typical"])
def test_requests_near_the_context_end_take_their_root_alone(lm, monkeypatch, acceptance):
    # A request that ends exactly at the context length: where its tree's nodes would not fit in
    # the context left, it runs its root alone (a plain step) and draws as a plain step does,
    # while its neighbours verify their trees as they would alone. Greedy output is plain
    # greedy's; seeded sampled requests give their tokens alone, whatever the batch.
    import dataclasses

    lm.model._rope_tables()  # built at full length before the context is shortened (they are kept)
    long = list(range(200, 230))
    n_new = 40
    monkeypatch.setattr(lm.model, "config", dataclasses.replace(lm.model.config, max_seq_len=len(long) + n_new))
    tree = [[0], [0, 0], [0, 0, 0], [1]]
    kw = dict(model=lm, stop_on_eos=False, draft_schedule="constant")

    def medusa(prompts, **more):
        d = MedusaDrafter(zero_heads(lm), tree=tree, acceptance=acceptance)
        return decodekit.speculative_generate(prompts, drafter=d, **kw, **more), d

    plain = decodekit.generate(long, model=lm, max_new_tokens=n_new, temperature=0, stop_on_eos=False)
    spec, d = medusa(long, max_new_tokens=n_new, temperature=0)
    assert spec.token_ids == plain.token_ids and len(spec.token_ids) == n_new and d.passes > 0
    # A seeded sampled request beside one that reaches the context end: its tokens as alone.
    tree = [[0], [0, 0], [1], [2]]
    L = 80  # (at 70 the sampled request's tokens happened to agree even with a batch-wide plain step)
    monkeypatch.setattr(lm.model, "config", dataclasses.replace(lm.model.config, max_seq_len=L))
    near_end = list(range(200, 200 + L - 12))
    sampled = dict(temperature=0.8, top_p=0.95)
    prompts, seeds, lengths = [PROMPTS[2], near_end], [7, 1], [30, 12]
    both, _ = medusa(prompts, seed=seeds, max_new_tokens=lengths, **sampled)
    alone = [medusa(p, seed=s, max_new_tokens=m, **sampled)[0] for p, s, m in zip(prompts, seeds, lengths)]
    assert [r.token_ids for r in both] == [r.token_ids for r in alone]
    assert [len(r.token_ids) for r in both] == lengths and both[0].drafted > 0
