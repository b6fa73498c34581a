"""The default GGUF model on its own Q4_1 / Q8_0 blocks (QuantizedWeight) against the same file
dequantized to float32: the same greedy tokens (and logits bit for bit, since every linear layer
gives the float32 path's bits on the dequantized weights)."""

from __future__ import annotations

import pytest
import torch

import decodekit
from decodekit import QuantizedWeight
from reference.layers import dequantize_blocks

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    "]


@pytest.fixture(scope="module")
def models():
    pytest.importorskip("gguf")
    from decodekit.models.gguf_loader import default_model_path, load_gguf

    try:
        path = default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return load_gguf(path), load_gguf(path, dequantize=True)


def _greedy(model, prompt_ids, n):
    cache = model.new_paged_cache(num_blocks=(len(prompt_ids) + n) // 16 + 2)
    seq = cache.add_sequence()
    logits = model.forward_paged(torch.tensor([prompt_ids]), cache, [seq])
    out, all_logits = [], [logits]
    for _ in range(n):
        nxt = int(logits.argmax(-1))
        out.append(nxt)
        logits = model.forward_paged(torch.tensor([[nxt]]), cache, [seq])
        all_logits.append(logits)
    return out, torch.cat(all_logits)


def test_weights_stay_quantized(models):
    q, f = models
    block = q.model.blocks[0]
    assert isinstance(block.wqkv, QuantizedWeight) and block.wqkv.block_type == "q4_1"
    assert isinstance(block.w_gate_up, QuantizedWeight) and isinstance(block.w_down, QuantizedWeight)
    assert isinstance(q.model.embed, QuantizedWeight) and q.model.embed.block_type == "q8_0"
    assert q.model.lm_head is q.model.embed  # tied head on the Q8_0 embedding blocks
    # The fused, row-reordered Q/K/V blocks hold exactly the float32 model's weights
    # (dequantized by the independent reference).
    N, K = block.wqkv.shape
    assert torch.equal(dequantize_blocks(block.wqkv.blocks, "q4_1", N, K), f.model.blocks[0].wqkv)
    V, H = q.model.embed.shape
    rows = torch.tensor([0, 1, 500, V - 1])
    emb = dequantize_blocks(q.model.embed.blocks[rows], "q8_0", len(rows), H)
    assert torch.equal(emb, f.model.embed[rows])


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_equal_the_float32_model(models, prompt):
    q, f = models
    ids = q.tokenizer.encode(prompt)
    tq, lq = _greedy(q.model, ids, 32)
    tf, lf = _greedy(f.model, ids, 32)
    assert tq == tf
    assert torch.equal(lq, lf)


def test_quantized_model_is_smaller(models):
    q, f = models
    qbytes = sum(
        w.nbytes if isinstance(w, QuantizedWeight) else w.numel() * 4
        for b in q.model.blocks
        for w in (b.wqkv, b.wo, b.w_gate_up, b.w_down)
    )
    fbytes = sum(w.numel() * 4 for b in f.model.blocks for w in (b.wqkv, b.wo, b.w_gate_up, b.w_down))
    assert qbytes * 6 < fbytes  # Q4_1: 5 bytes per 8 weights against 32


def test_moving_a_quantized_model_off_the_cpu_is_refused(models):
    q, _ = models
    with pytest.raises(ValueError, match="dequantize=True"):
        q.model.to("cuda")  # refused before anything moves (no GPU needed)
    assert decodekit.QuantizedWeight is QuantizedWeight
