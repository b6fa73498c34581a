"""LlamaModel.forward_paged with one decoder_layer call per block (``model.layer_op = True``, the
default) against the per-op path (``layer_op = False``, the readable reference): the same logits
and the same cache contents bit for bit, on small random models (float32, Q4_1 / Q8_0 weights,
NHD and HND, prefill chunks and batched decode steps of rows of different lengths, a rollback,
a tree pass)
and on the default SmolLM2 model; and OutOfBlocksError before anything is written."""

from __future__ import annotations

import pytest
import torch

from decodekit import OutOfBlocksError, QuantizedWeight
from decodekit._loader import _C
from decodekit.models.llama import LlamaConfig, LlamaLayerWeights, LlamaModel, LlamaWeights
from decodekit.ops.layers import layer_weight
from reference.layers import random_blocks

CFG = LlamaConfig(
    vocab_size=100,
    hidden_size=64,
    intermediate_size=96,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_seq_len=64,
)


def _model(kind: str, seed: int = 0, head_ids=None) -> LlamaModel:
    g = torch.Generator().manual_seed(seed)
    c = CFG

    def w(n, k, block_type):
        if kind == "f32":
            return torch.randn(n, k, generator=g) * 0.15
        return QuantizedWeight(random_blocks(block_type, n, k, g), block_type, (n, k))

    def norm():
        return 1 + 0.1 * torch.randn(c.hidden_size, generator=g)

    q, kv, H, I = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.hidden_size, c.intermediate_size
    layers = [
        LlamaLayerWeights(
            attn_norm=norm(),
            wq=w(q, H, "q4_1"),
            wk=w(kv, H, "q4_1"),
            wv=w(kv, H, "q4_1"),
            wo=w(H, q, "q8_0"),
            ffn_norm=norm(),
            w_gate=w(I, H, "q4_1"),
            w_up=w(I, H, "q4_1"),
            w_down=w(H, I, "q8_0"),
        )
        for _ in range(c.num_layers)
    ]
    embed = torch.randn(c.vocab_size, H, generator=g)
    if head_ids is None:
        return LlamaModel(c, LlamaWeights(embed=embed, layers=layers, norm=norm()))
    # a head over part of the vocabulary (a draft model's): its rows score tokens head_ids
    head = w(len(head_ids), H, "q8_0")
    return LlamaModel(c, LlamaWeights(embed=embed, layers=layers, norm=norm(), lm_head=head,
                                      lm_head_token_ids=torch.tensor(head_ids)))  # fmt: skip


def _session(model, layer_op: bool, layout: str):
    """Prefill chunks, batched steps of three rows of different lengths, a chunk of several
    tokens per row and a rollback; returns every call's logits and the final caches."""
    model.layer_op = layer_op
    cache = model.new_paged_cache(20, block_size=4, kv_layout=layout)
    a, b, c = cache.add_sequence(), cache.add_sequence(), cache.add_sequence()
    out = [
        model.forward_paged(torch.tensor([[1, 2, 3, 4, 5]]), cache, [a], all_logits=True),
        model.forward_paged(torch.tensor([[7, 8]]), cache, [b], all_logits=True),
        model.forward_paged(torch.tensor([[9, 10, 11, 12, 13], [3, 3, 3, 3, 3]]), cache, [c, b], all_logits=True),
    ]
    for s in range(5):
        out.append(model.forward_paged(torch.tensor([[s], [s + 1], [s + 2]]), cache, [a, b, c]))
    cache.truncate(b, 5)  # a rejected draft, say
    out.append(model.forward_paged(torch.tensor([[20, 21, 22], [23, 24, 25]]), cache, [b, a], all_logits=True))
    # a tree pass (Medusa verification): a different tree per row, the mask in every block
    parents = torch.tensor([[-1, 0, 0, 1, 1], [-1, 0, 1, 1, 0]])
    out.append(
        model.forward_paged(torch.tensor([[30, 31, 32, 33, 34], [35, 36, 37, 38, 39]]), cache, [a, c],
                            all_logits=True, tree_parents=parents)
    )  # fmt: skip
    return out, [t.clone() for t in cache.k + cache.v]


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("kind", ["f32", "quantized"])
def test_layer_op_gives_the_per_op_bits(kind, layout):
    model = _model(kind)
    assert model.layer_op  # the default
    fast, fast_cache = _session(model, True, layout)
    slow, slow_cache = _session(model, False, layout)
    assert len(fast) == len(slow)
    for i, (f, s) in enumerate(zip(fast, slow)):
        assert torch.equal(f, s), i
    for f, s in zip(fast_cache, slow_cache):
        assert torch.equal(f, s)


def test_weights_replaced_after_a_call_are_used():
    model = _model("f32")
    cache = model.new_paged_cache(4, block_size=4)
    seq = cache.add_sequence()
    model.forward_paged(torch.tensor([[1, 2]]), cache, [seq])
    block = model.blocks[1]
    block.wo = block.wo * 2  # the op's cached arguments follow the block's weights
    fast = model.forward_paged(torch.tensor([[3]]), cache, [seq])
    cache.truncate(seq, 2)
    model.layer_op = False
    slow = model.forward_paged(torch.tensor([[3]]), cache, [seq])
    assert torch.equal(fast, slow)


def test_out_of_blocks_writes_nothing():
    model = _model("quantized")
    cache = model.new_paged_cache(3, block_size=4)
    a, b = cache.add_sequence(), cache.add_sequence()
    model.forward_paged(torch.tensor([[1, 2, 3, 4, 5]]), cache, [a])  # 2 blocks
    before = [t.clone() for t in cache.k + cache.v]
    tables = cache.block_table([a, b]).clone()
    with pytest.raises(OutOfBlocksError):
        model.forward_paged(torch.tensor([[1] * 4, [2] * 4]), cache, [a, b])  # needs 1 + 1 > 1 free
    assert cache.num_free_blocks == 1
    assert torch.equal(cache.block_table([a, b]), tables)
    assert cache.seq_lens([a, b]).tolist() == [5, 0]
    assert all(torch.equal(x, y) for x, y in zip(before, cache.k + cache.v))


def test_fallback_to_the_op_under_a_torch_function_mode():
    """Under a torch function mode the one-call loop steps aside and the op runs per block (the
    mode sees it); the bits are the same."""
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    model = _model("quantized")
    outs = []
    for mode in (None, Spy()):
        cache = model.new_paged_cache(8, block_size=4)
        seq = cache.add_sequence()
        if mode is None:
            outs.append(model.forward_paged(torch.tensor([[1, 2, 3]]), cache, [seq]))
        else:
            with mode:
                outs.append(model.forward_paged(torch.tensor([[1, 2, 3]]), cache, [seq]))
    assert torch.equal(outs[0], outs[1])
    assert sum("decoder_layer" in name for name in seen) == CFG.num_layers


def test_one_call_loop_checks_every_block_before_writing():
    """A bad argument in the last block: the one-call loop declines before writing anything (the
    model then calls the op per block, which raises naming the argument); good blocks run."""
    from decodekit._loader import _C

    model = _model("f32")
    cache = model.new_paged_cache(8, block_size=4)
    seq = cache.add_sequence()
    slots = cache.slot_mapping([seq], 2).view(1, 2)
    tables = cache.block_table([seq]).long()
    cos, sin = model._rope_tables()
    layers = [b.op_args() for b in model.blocks]
    bad = list(layers[-1])
    bad[8] = bad[8][:, :-1].contiguous()  # w_down [H, I - 1]
    layers[-1] = tuple(bad)
    x = torch.randn(1, 2, CFG.hidden_size)
    x0, before = x.clone(), [t.clone() for t in cache.k + cache.v]
    c = CFG
    args = (torch.tensor([2]), torch.tensor([[0, 1]]), cos, sin, layers)
    rest = (c.num_heads, c.num_kv_heads, c.intermediate_size, c.rms_norm_eps, 0.25, "NHD")
    assert _C._decoder_layers_fast(x, cache.k, cache.v, slots, tables, *args, *rest) is False
    assert torch.equal(x, x0) and all(torch.equal(a, b) for a, b in zip(before, cache.k + cache.v))
    assert _C._decoder_layers_fast(x, cache.k, cache.v, slots, tables, *args[:4], layers[:-1] + [layers[0]], *rest)
    assert not torch.equal(x, x0)
    with pytest.raises(ValueError, match="w_down must be"):
        torch.ops.decodekit.decoder_layer(x, cache.k[2], cache.v[2], slots, tables, *args[:4], *bad, *rest)


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_one_call_loop_runs_the_head_on_the_last_positions(kind):
    """With ``head``, the one-call loop also runs the final norm and the LM head on each row's last
    new token: logits [B, V] within float32 rounding of a float64 reference of the last hidden
    state; a head it cannot take (a norm of the wrong size, N that does not match the weight, a
    non-contiguous weight, a bad type) makes it decline before writing anything."""
    model = _model("f32")
    c = CFG
    g = torch.Generator().manual_seed(5)
    if kind == "f32":
        head_w = torch.randn(c.vocab_size, c.hidden_size, generator=g) * 0.2
        head_args, dense = (head_w, "f32"), head_w.double()
    else:
        qw = QuantizedWeight(
            random_blocks("q8_0", c.vocab_size, c.hidden_size, g), "q8_0", (c.vocab_size, c.hidden_size)
        )
        head_args, dense = (qw.blocks, "q8_0"), qw.dequantize().double()
    norm = 1 + 0.1 * torch.randn(c.hidden_size, generator=g)
    cache = model.new_paged_cache(8, block_size=4)
    a, b = cache.add_sequence(), cache.add_sequence()
    slots = cache.slot_mapping([a, b], 3).view(2, 3)
    tables = cache.block_table([a, b]).long()
    cos, sin = model._rope_tables()
    layers = [blk.op_args() for blk in model.blocks]
    args = (torch.tensor([3, 3]), torch.tensor([[0, 1, 2], [0, 1, 2]]), cos, sin, layers)
    rest = (c.num_heads, c.num_kv_heads, c.intermediate_size, c.rms_norm_eps, 0.25, "NHD")
    x = torch.randn(2, 3, c.hidden_size, generator=g)
    x0, before = x.clone(), [t.clone() for t in cache.k + cache.v]
    bad_heads = [
        (norm[:-1], *head_args, c.vocab_size),  # norm [H - 1]
        (norm, *head_args, c.vocab_size + 1),  # N does not match the weight
        (norm, head_args[0], "q4_0", c.vocab_size),  # not a type the kernels take
        (norm, *head_args, 0),
    ]
    if kind == "f32":
        bad_heads.append((norm, head_w.t().contiguous().t(), "f32", c.vocab_size))  # columns contiguous
    for bad in bad_heads:
        assert _C._decoder_layers_fast(x, cache.k, cache.v, slots, tables, *args, *rest, None, None, bad) is False
        assert torch.equal(x, x0) and all(torch.equal(t, u) for t, u in zip(before, cache.k + cache.v))
    logits = _C._decoder_layers_fast(
        x, cache.k, cache.v, slots, tables, *args, *rest, None, None, (norm, *head_args, c.vocab_size)
    )
    assert isinstance(logits, torch.Tensor) and logits.dtype == torch.float32 and logits.shape == (2, c.vocab_size)
    last = x[:, -1].double()  # the hidden state the layers left
    h = last * torch.rsqrt(last.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps) * norm.double()
    ref = h @ dense.T
    assert torch.allclose(logits.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_one_call_loop_declines_no_new_tokens_and_unencodable_types():
    """The one-call loop declines (False, nothing written, no pending Python error) a head with no
    new token to take it from (T = 0) and a type string without UTF-8 text, in the head or in a
    block."""
    model = _model("f32")
    c = CFG
    cache = model.new_paged_cache(8, block_size=4)
    seq = cache.add_sequence()
    cos, sin = model._rope_tables()
    layers = [blk.op_args() for blk in model.blocks]
    rest = (c.num_heads, c.num_kv_heads, c.intermediate_size, c.rms_norm_eps, 0.25, "NHD")
    head = (model.norm, model.lm_head, "f32", c.vocab_size)
    before = [t.clone() for t in cache.k + cache.v]
    # T = 0: no last position
    x = torch.randn(1, 0, c.hidden_size)
    none = torch.zeros(1, 0, dtype=torch.int64)
    tables = cache.block_table([seq]).long()
    args = (torch.tensor([0]), none, cos, sin, layers)
    assert _C._decoder_layers_fast(x, cache.k, cache.v, none, tables, *args, *rest, None, None, head) is False
    # a lone surrogate as the head's type, then as a block's weight type
    slots = cache.slot_mapping([seq], 2).view(1, 2)
    tables = cache.block_table([seq]).long()
    args = (torch.tensor([2]), torch.tensor([[0, 1]]), cos, sin)
    x = torch.randn(1, 2, c.hidden_size)
    x0 = x.clone()
    bad_head = (model.norm, model.lm_head, "\ud800", c.vocab_size)
    assert (
        _C._decoder_layers_fast(x, cache.k, cache.v, slots, tables, *args, layers, *rest, None, None, bad_head) is False
    )
    block0 = list(layers[0])
    block0[2] = "\ud800"
    bad_layers = [tuple(block0)] + layers[1:]
    assert _C._decoder_layers_fast(x, cache.k, cache.v, slots, tables, *args, bad_layers, *rest) is False
    assert len([1, 2]) == 2  # no exception left pending
    assert torch.equal(x, x0) and all(torch.equal(t, u) for t, u in zip(before, cache.k + cache.v))


def test_float_head_the_loop_cannot_take_falls_back_with_the_same_bits():
    """A non-contiguous float32 LM head: the one-call loop declines and the model's op path gives the
    per-op path's bits."""
    head = (torch.randn(CFG.hidden_size, CFG.vocab_size, generator=torch.Generator().manual_seed(6)) * 0.2).t()
    assert not head.is_contiguous()
    outs = []
    for layer_op in (True, False):
        model = _model("f32")
        model.lm_head = head
        model.layer_op = layer_op
        cache = model.new_paged_cache(8, block_size=4)
        seq = cache.add_sequence()
        outs.append([model.forward_paged(torch.tensor([[1, 2, 3]]), cache, [seq])] + _steps(model, cache, seq, [4, 5]))
    assert all(torch.equal(f, s) for f, s in zip(*outs))


# ----------------------------------------------------------------------------- the default model
def test_default_model_layer_op_gives_the_per_op_bits(lm):
    net = lm.model
    tok = lm.tokenizer
    prompts = [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": "Write a haiku about the sea."}])),
        tok.encode("The capital of France is"),
    ]

    def run(layer_op):
        net.layer_op = layer_op
        try:
            cache = net.new_paged_cache(16, block_size=16)
            seqs = [cache.add_sequence() for _ in prompts]
            logits = [net.forward_paged(torch.tensor([p]), cache, [s]) for p, s in zip(prompts, seqs)]
            out = list(logits)
            nxt = torch.cat(logits).argmax(-1)
            for _ in range(6):  # greedy, both rows in one batch
                step = net.forward_paged(nxt[:, None], cache, seqs)
                out.append(step)
                nxt = step.argmax(-1)
            return out, [t.clone() for t in cache.k[:3] + cache.v[-3:]]
        finally:
            net.layer_op = True

    fast, fast_cache = run(True)
    slow, slow_cache = run(False)
    for i, (f, s) in enumerate(zip(fast, slow)):
        assert torch.equal(f, s), i
    for f, s in zip(fast_cache, slow_cache):
        assert torch.equal(f, s)


def test_phase_timers_count_only_while_on():
    from decodekit._loader import _C

    model = _model("f32")
    cache = model.new_paged_cache(8, block_size=4)
    seq = cache.add_sequence()
    _C._layer_profile(True)
    try:
        model.forward_paged(torch.tensor([[1, 2]]), cache, [seq])
        on = _C._layer_profile_read()
    finally:
        _C._layer_profile(False)
    model.forward_paged(torch.tensor([[3]]), cache, [seq])
    off = _C._layer_profile_read()
    assert on["calls"] == CFG.num_layers and all(v >= 0 for v in on.values()) and on["project_qkv"] > 0
    assert set(on) == {"calls", "norm", "project_qkv", "project_o", "project_gate_up", "project_down", "rope"} | {
        "kv_append",
        "attention",
        "activation",
        "residual",
        "head_norm",
        "project_head",
    }
    assert on["project_head"] > 0  # the last position's logits: the head runs in the same call
    assert all(v == 0 for v in off.values())


# ------------------------------------------------------------------------- the one-call loop's plan
def _steps(model, cache, seq, tokens):
    return [model.forward_paged(torch.tensor([[t]]), cache, [seq]) for t in tokens]


def _prefill_and_steps(model, num_blocks, tokens):
    """A new cache of ``num_blocks`` blocks of 4, a prefill of [1, 2, 3], then one step per token:
    (cache, seq, every call's logits)."""
    cache = model.new_paged_cache(num_blocks, block_size=4)
    seq = cache.add_sequence()
    return (
        cache,
        seq,
        [model.forward_paged(torch.tensor([[1, 2, 3]]), cache, [seq])] + _steps(model, cache, seq, tokens),
    )


def test_plan_kept_on_the_cache_gives_the_per_op_bits():
    """The cache keeps what the one-call loop checked about the blocks; later steps reuse it.
    The logits and the cache are the per-op path's bits step after step."""
    out = {}
    for layer_op in (True, False):
        model = _model("quantized")
        model.layer_op = layer_op
        cache, seq, out[layer_op] = _prefill_and_steps(model, 8, [4, 5, 6, 7])
        out[layer_op].append([t.clone() for t in cache.k + cache.v])
        if layer_op:
            assert isinstance(cache.__dict__["_layers_plan"], _C._DecoderLayersPlan)
    for a, b in zip(out[True][:-1], out[False][:-1]):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(out[True][-1], out[False][-1]))


def test_plan_follows_a_replaced_cache_tensor():
    """A layer's cache tensor replaced in cache.k after a step: the next step writes and reads
    the new tensor (the plan is rebuilt), with the per-op path's bits."""
    res = []
    for layer_op in (True, False):
        model = _model("f32")
        model.layer_op = layer_op
        cache = model.new_paged_cache(8, block_size=4)
        seq = cache.add_sequence()
        model.forward_paged(torch.tensor([[1, 2, 3]]), cache, [seq])
        _steps(model, cache, seq, [4])
        old = cache.k[1]
        cache.k[1] = old.clone()
        snapshot = old.clone()
        res.append(_steps(model, cache, seq, [5, 6]))
        assert torch.equal(old, snapshot)  # the replaced tensor is not written any more
        assert not torch.equal(cache.k[1], snapshot)
    assert all(torch.equal(a, b) for a, b in zip(*res))


def test_plan_refuses_a_cache_resized_in_place():
    """A cache tensor resized in place after a step (its storage reallocated): the plan is not
    reused, and the op raises naming the argument instead of writing through a stale pointer."""
    model = _model("f32")
    cache = model.new_paged_cache(8, block_size=4)
    seq = cache.add_sequence()
    model.forward_paged(torch.tensor([[1, 2, 3]]), cache, [seq])
    _steps(model, cache, seq, [4])
    shape = cache.v[2].shape
    cache.v[2].resize_(shape[0] * 4, *shape[1:])  # a bigger storage: new data pointer
    with pytest.raises(ValueError, match="v_cache"):
        _steps(model, cache, seq, [5])


def _resize_wo(model, cache):
    model.blocks[1].wo.resize_(32, CFG.num_heads * CFG.head_dim)  # fewer rows, same data pointer


def _resize_k(model, cache):
    cache.k[1].resize_(4, *cache.k[1].shape[1:])  # half the blocks, same data pointer


def _restride_k(model, cache):
    k = cache.k[1]
    st = list(k.stride())
    st[2], st[3] = 1, k.shape[2]  # not contiguous any more, same data pointer
    k.as_strided_(k.shape, st)


@pytest.mark.parametrize("change", [_resize_wo, _resize_k, _restride_k])
def test_plan_refuses_a_tensor_changed_in_place_with_the_same_data_pointer(change):
    """A block >= 1 weight or cache tensor whose shape or strides change in place without a new
    data pointer (resize_ to fewer elements, as_strided_): with a fresh plan the step raises
    naming the argument; a plan kept from the previous step must do the same (not run the
    stale shapes)."""
    for warm in (False, True):
        model = _model("f32")
        cache = model.new_paged_cache(8, block_size=4)
        seq = cache.add_sequence()
        model.forward_paged(torch.tensor([[1, 2, 3]]), cache, [seq])
        if not warm:
            del cache.__dict__["_layers_plan"]
        change(model, cache)
        with pytest.raises(ValueError, match="decoder_layer"):
            _steps(model, cache, seq, [4])


# ----------------------------------------------------------------------- streamed weights (a hint)
def test_streamed_weights_give_the_same_bits_and_the_switch_is_restored(monkeypatch):
    """A model whose weights exceed the last-level cache prefetches them non-temporally in its
    quantized products (_C._weight_stream around the forward): the same bits either way, and the
    switch is back to its previous state afterwards, also when the forward raises."""
    out = {}
    for stream in (False, True):
        model = _model("quantized")
        model._stream_weights = stream
        cache, seq, out[stream] = _prefill_and_steps(model, 3, [4, 5])
        assert _C._weight_stream(False) is False  # restored (and left off)
        with pytest.raises(OutOfBlocksError):
            model.forward_paged(torch.tensor([[1] * 9]), cache, [seq])
        assert _C._weight_stream(False) is False
    assert all(torch.equal(a, b) for a, b in zip(out[False], out[True]))
    assert _C._weight_stream(True) is False and _C._weight_stream(False) is True  # the switch itself


def test_streams_weights_when_they_exceed_the_last_level_cache(monkeypatch):
    from decodekit.models import llama

    model = _model("quantized")
    # the weight bytes, counted from _model's choices: Q4_1 (20 bytes per 32 weights) for q, k,
    # v, gate and up, Q8_0 (34 bytes) for o and down, float32 norms, and the tied float32 head
    c = CFG
    q, kv, H, I = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.hidden_size, c.intermediate_size
    per_block = 20 * (q + 2 * kv + 2 * I) * H // 32 + 34 * (H * q + H * I) // 32 + 2 * 4 * H
    total = c.num_layers * per_block + 4 * c.vocab_size * H
    for llc, want in ((total - 1, True), (total, False)):
        monkeypatch.setattr(llama._C, "_last_level_cache_bytes", lambda llc=llc: llc)
        model._stream_weights = None
        assert model._streams_weights() is want
    assert _C._last_level_cache_bytes() > 0


@pytest.mark.parametrize("kind", ["f32", "quantized"])
def test_token_ids_outside_the_vocabulary_are_named(kind):
    """forward_paged with an id outside [0, V) (float or quantized embedding): a ValueError naming
    input_ids, and the cache keeps its lengths."""
    model = _model(kind)
    if kind == "quantized":
        g = torch.Generator().manual_seed(9)
        model.embed = QuantizedWeight(random_blocks("q8_0", CFG.vocab_size, CFG.hidden_size, g), "q8_0",
                                      (CFG.vocab_size, CFG.hidden_size))  # fmt: skip
    cache = model.new_paged_cache(8, block_size=4)
    seq = cache.add_sequence()
    for bad in (CFG.vocab_size, -1):
        with pytest.raises(ValueError, match=rf"input_ids must be token ids in \[0, vocab_size={CFG.vocab_size}\)"):
            model.forward_paged(torch.tensor([[1, bad]]), cache, [seq])
        assert cache.seq_lens([seq]).tolist() == [0]


def _decode_session(model, layout, use_step, keepdim=False):
    """Three prompts (5, 3 and 4 tokens: blocks of 4, so the rows open new blocks at different
    steps), then six one-token steps over changing row sets and orders, by
    LlamaModel._decode_step or by forward_paged; the logits, the caches, lengths and tables."""
    cache = model.new_paged_cache(16, block_size=4, kv_layout=layout)
    a, b, c = cache.add_sequence(), cache.add_sequence(), cache.add_sequence()
    model.forward_paged(torch.tensor([[1, 2, 3, 4, 5]]), cache, [a])
    model.forward_paged(torch.tensor([[7, 8, 9]]), cache, [b])
    model.forward_paged(torch.tensor([[9, 10, 11, 12]]), cache, [c])
    out = []
    for s in range(6):
        ids = [a, b, c] if s % 2 == 0 else [c, a]
        tokens = [(7 * s + 3 * i) % CFG.vocab_size for i in range(len(ids))]
        if use_step:
            out.append(model._decode_step(tokens, cache, ids, keepdim=keepdim))
        else:
            out.append(model.forward_paged(torch.tensor(tokens).view(-1, 1), cache, ids))
    state = ([t.clone() for t in cache.k + cache.v], cache.seq_lens([a, b, c]).tolist(), cache.block_table([a, b, c]))
    return out, state


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("kind", ["f32", "quantized", "quantized_embed", "reduced_head"])
def test_decode_step_gives_forward_pageds_bits_without_calling_it(kind, layout, monkeypatch):
    """The decode loop's step (tokens and sequence ids as Python lists, the step's numbers built
    in C++) against forward_paged of the same tokens: the same logits and the same cache
    contents, lengths and block tables bit for bit, with forward_paged never called by the
    steps (a float32 or Q8_0 embedding; float32 or quantized layers)."""
    head_ids = [97, 3, 50, 0, 12, 64, 31, 88] if kind == "reduced_head" else None  # any order
    model = _model("f32" if kind == "f32" else "quantized", head_ids=head_ids)
    if kind == "quantized_embed":
        g = torch.Generator().manual_seed(9)
        model.embed = QuantizedWeight(random_blocks("q8_0", CFG.vocab_size, CFG.hidden_size, g), "q8_0",
                                      (CFG.vocab_size, CFG.hidden_size))  # fmt: skip
    want, want_state = _decode_session(model, layout, False)
    calls = []
    original = LlamaModel.forward_paged

    def counted(self, input_ids, *args, **kwargs):
        calls.append(tuple(input_ids.shape))
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(LlamaModel, "forward_paged", counted)
    got, got_state = _decode_session(model, layout, True)
    assert calls == [(1, 5), (1, 3), (1, 4)]  # the prompts only
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.equal(g, w)
    for g, w in zip(got_state[0], want_state[0]):
        assert torch.equal(g, w)
    assert got_state[1] == want_state[1] and torch.equal(got_state[2], want_state[2])
    kept, _ = _decode_session(model, layout, True, keepdim=True)
    assert all(k.shape == (w.shape[0], 1, CFG.vocab_size) and torch.equal(k[:, 0], w) for k, w in zip(kept, want))


def test_decode_step_errors_are_forward_pageds_and_write_nothing():
    """What forward_paged rejects, _decode_step rejects with the same error, before anything is
    reserved or written: an id outside the vocabulary, an unknown or repeated sequence id, a row
    at the context length, a pool without a free block."""
    model = _model("quantized")
    cache = model.new_paged_cache(3, block_size=4)
    a, b = cache.add_sequence(), cache.add_sequence()
    model.forward_paged(torch.tensor([[1, 2, 3, 4]]), cache, [a])  # one whole block
    model.forward_paged(torch.tensor([[5, 6, 7, 8]]), cache, [b])

    def state():
        return [t.clone() for t in cache.k + cache.v], cache.seq_lens([a, b]).tolist(), cache.block_table([a, b])

    def same(x, y):
        return all(torch.equal(p, q) for p, q in zip(x[0], y[0])) and x[1] == y[1] and torch.equal(x[2], y[2])

    before = state()
    for tokens, ids, err, match in (
        ([CFG.vocab_size], [a], ValueError, "input_ids must be token ids"),
        ([-1, 2], [a, b], ValueError, "input_ids must be token ids"),
        ([3], [99], ValueError, "unknown sequence id"),
        ([3, 4], [a, a], ValueError, "must not repeat"),
        ([3, 4], [a, b], OutOfBlocksError, None),  # two new blocks, one free
    ):
        with pytest.raises(err, match=match):
            model._decode_step(tokens, cache, ids)
        assert same(state(), before), (tokens, ids)
    full = model.new_paged_cache(CFG.max_seq_len // 4 + 1, block_size=4)
    s = full.add_sequence()
    model.forward_paged(torch.ones(1, CFG.max_seq_len, dtype=torch.long), full, [s])
    with pytest.raises(ValueError, match="context length"):
        model._decode_step([1], full, [s])
    assert full.seq_lens([s]).tolist() == [CFG.max_seq_len]


def test_decode_step_follows_the_models_changes():
    """The arguments _decode_step keeps on the cache are rebuilt after a block's weight or a
    model attribute is set: a replaced weight is used, and with the layer op off the step is
    forward_paged's per-op path (the same bits either way)."""
    model = _model("f32")
    cache = model.new_paged_cache(8, block_size=4)
    seq = cache.add_sequence()
    model.forward_paged(torch.tensor([[1, 2]]), cache, [seq])
    model._decode_step([3], cache, [seq])
    block = model.blocks[2]
    block.w_down = block.w_down * 2
    fast = model._decode_step([4], cache, [seq])
    cache.truncate(seq, 3)
    model.layer_op = False
    slow = model._decode_step([4], cache, [seq])
    assert torch.equal(fast, slow)
    cache.truncate(seq, 3)
    model.layer_op = True
    model.lm_head = model.lm_head * 0.5  # the head's weight: rebuilt too
    halved = model._decode_step([4], cache, [seq])
    cache.truncate(seq, 3)
    model.layer_op = False
    assert torch.equal(halved, model._decode_step([4], cache, [seq]))
    assert not torch.equal(halved, fast)


def test_decode_step_entry_declines_what_it_cannot_check():
    """_C._decode_step_fast returns False, writing nothing, for a position whose block the
    cache has not reserved, a block id outside the pool, a bool or float token, no head, or
    lists of the wrong length; the cache is unchanged."""
    model = _model("f32")
    cache = model.new_paged_cache(4, block_size=4)
    seq = cache.add_sequence()
    model.forward_paged(torch.tensor([[1, 2, 3, 4]]), cache, [seq])  # the next position needs a new block
    embed, cos, sin, shapes, plan, lm_head, nk, stream, _ = model._step_args(cache)
    embed = (*layer_weight(embed), *nk)
    head = (model.norm, *layer_weight(lm_head), CFG.vocab_size)
    layers = [blk.op_args() for blk in model.blocks]
    before = [t.clone() for t in cache.k + cache.v]

    def call(tokens=(5,), starts=(4,), tables=None, head=head):
        tokens, starts = list(tokens), list(starts)
        tables = [list(cache._tables[seq])] if tables is None else tables
        return _C._decode_step_fast(tokens, starts, tables, 4, embed, cache.k, cache.v, cos, sin, layers, *shapes,
                                    cache.kv_layout, plan, head, stream)  # fmt: skip

    assert call() is False  # position 4's block is not in the table
    assert call(starts=(3,), tables=[[cache.num_blocks + 5]]) is False  # a block outside the pool
    assert call(tokens=(True,), starts=(3,)) is False
    assert call(tokens=(5.0,), starts=(3,)) is False
    assert call(tokens=(5, 6), starts=(3,)) is False
    assert call(starts=(3,), head=None) is False
    assert all(torch.equal(x, y) for x, y in zip(before, cache.k + cache.v))
    logits = call(starts=(3,))  # rewrites position 3's slot with the same token's key and value
    assert logits is not False and logits.shape == (1, CFG.vocab_size)


def test_decode_step_reads_a_replaced_embedding_or_head_block_tensor():
    """A QuantizedWeight's blocks replaced in place (no attribute of the model set): the step
    reads the new blocks, as forward_paged does."""
    g = torch.Generator().manual_seed(5)
    model = _model("quantized")
    V, H = CFG.vocab_size, CFG.hidden_size
    model.embed = QuantizedWeight(random_blocks("q8_0", V, H, g), "q8_0", (V, H))
    model.lm_head = QuantizedWeight(random_blocks("q4_1", V, H, g), "q4_1", (V, H))
    cache = model.new_paged_cache(8, block_size=4)
    seq = cache.add_sequence()
    model.forward_paged(torch.tensor([[1, 2]]), cache, [seq])
    model._decode_step([3], cache, [seq])
    for weight, block_type in ((model.embed, "q8_0"), (model.lm_head, "q4_1")):
        cache.truncate(seq, 2)
        weight.blocks = random_blocks(block_type, V, H, g)
        fast = model._decode_step([3], cache, [seq])
        cache.truncate(seq, 2)
        assert torch.equal(fast, model.forward_paged(torch.tensor([[3]]), cache, [seq]))


def test_decode_step_gives_back_its_blocks_when_the_entry_declines():
    """Under a torch function mode the C++ entry declines after the step reserved the new
    token's block: the block goes back, and forward_paged (which the mode sees) then takes the
    same block; the tables, free list and bits are forward_paged's alone."""
    from torch.overrides import TorchFunctionMode

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    model = _model("f32")
    results = []
    for use_step in (True, False):
        cache = model.new_paged_cache(6, block_size=4)
        seq = cache.add_sequence()
        model.forward_paged(torch.tensor([[1, 2, 3, 4]]), cache, [seq])  # the next token opens a block
        with Mode():
            if use_step:
                out = model._decode_step([5], cache, [seq])
            else:
                out = model.forward_paged(torch.tensor([[5]]), cache, [seq])
        results.append((out, cache.block_table([seq]), list(cache._free), cache.seq_lens([seq]).tolist()))
    (a, ta, fa, la), (b, tb, fb, lb) = results
    assert torch.equal(a, b) and torch.equal(ta, tb) and fa == fb and la == lb == [5]


def test_decode_step_rejects_other_caches_as_forward_paged_does():
    """A cache that is not a PagedKVCache: forward_paged's TypeError, and nothing set on it."""
    model = _model("f32")

    class NotACache:
        pass

    other = NotACache()
    for cache in (None, other):
        with pytest.raises(TypeError, match="cache must be a PagedKVCache"):
            model._decode_step([1], cache, [0])
    assert vars(other) == {}


def test_decode_step_logits_are_inference_tensors_like_forward_pageds():
    model = _model("f32")
    cache = model.new_paged_cache(8, block_size=4)
    seq = cache.add_sequence()
    model.forward_paged(torch.tensor([[1, 2]]), cache, [seq])
    fast = model._decode_step([3], cache, [seq])
    cache.truncate(seq, 2)
    slow = model.forward_paged(torch.tensor([[3]]), cache, [seq])
    assert fast.is_inference() and slow.is_inference() and torch.equal(fast, slow)


def test_decode_step_entry_declines_bad_reduced_heads():
    """A head over part of the vocabulary: the entry declines token ids that repeat, lie outside
    [0, V), or do not match the head's rows, writing nothing."""
    model = _model("quantized", head_ids=[5, 9, 2, 40])
    cache = model.new_paged_cache(4, block_size=4)
    seq = cache.add_sequence()
    model.forward_paged(torch.tensor([[1, 2, 3]]), cache, [seq])
    embed, cos, sin, shapes, plan, lm_head, nk, stream, reduced = model._step_args(cache)
    assert reduced[1] == CFG.vocab_size and torch.equal(reduced[0], model.head_token_ids)
    layers = [blk.op_args() for blk in model.blocks]
    before = [t.clone() for t in cache.k + cache.v]

    def call(ids, V=CFG.vocab_size):
        head = (model.norm, *layer_weight(lm_head), 4, torch.tensor(ids, dtype=torch.int64), V)
        return _C._decode_step_fast([7], [3], [list(cache._tables[seq])], 4, (*layer_weight(embed), *nk), cache.k,
                                    cache.v, cos, sin, layers, *shapes, cache.kv_layout, plan, head, stream)  # fmt: skip

    for ids, V in (([5, 9, 5, 40], CFG.vocab_size), ([5, 9, 2, CFG.vocab_size], CFG.vocab_size), ([5, 9, 2], 100),
                   ([5, 9, 2, -1], CFG.vocab_size), ([5, 9, 2, 40], 3)):  # fmt: skip
        assert call(ids, V) is False, (ids, V)
    assert all(torch.equal(x, y) for x, y in zip(before, cache.k + cache.v))
    out = call([5, 9, 2, 40])
    assert out.shape == (1, CFG.vocab_size) and torch.isinf(out[0, [0, 1, 99]]).all()
    assert torch.isfinite(out[0, [5, 9, 2, 40]]).all()


def test_shipped_draft_models_step_gives_forward_pageds_bits(lm):
    """The shipped draft model (2 layers, a head over 8192 tokens): _decode_step's logits equal
    forward_paged's over a few steps."""
    from decodekit.models.draft import load_draft_model

    net = load_draft_model(target=lm).model
    outs = []
    for use_step in (True, False):
        cache = net.new_paged_cache(8, block_size=16)
        seq = cache.add_sequence()
        net.forward_paged(torch.tensor([[1, 2, 3, 4, 5]]), cache, [seq])
        res = []
        for t in (10, 200, 3000, 45000):
            if use_step:
                res.append(net._decode_step([t], cache, [seq]))
            else:
                res.append(net.forward_paged(torch.tensor([[t]]), cache, [seq]))
        outs.append(torch.stack(res))
    assert torch.equal(outs[0], outs[1])
    assert torch.isinf(outs[0]).any(dim=-1).all()  # tokens off the head: -inf
