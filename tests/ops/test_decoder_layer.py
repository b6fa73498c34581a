"""decoder_layer: one Llama block of the paged forward in one call.

* x and both caches bit-identical to the per-op path (the individual ops, called as
  ``LlamaModel.forward_paged`` calls them with ``layer_op = False``), for float32 and Q4_1 / Q8_0
  weights, B = 1 and 3, T = 1 and 5 (prefill), rows with different cached lengths, NHD and HND;
* within float32 rounding of a float64 reference of the block (``reference.decoder_layer``,
  quantized weights dequantized by the reference's own decoder);
* a tree of new tokens (``tree_mask``): bit-identical to the per-op path with the same mask,
  within float32 rounding of the float64 reference with it, and different from the causal rule;
* bad arguments: a ValueError / TypeError naming the argument, and nothing written.
"""

from __future__ import annotations

import math

import pytest
import torch

import decodekit
import reference as ref
from decodekit import QuantizedWeight
from op_db import (
    BS,
    EPS,
    HKV,
    HQ,
    NB,
    SCALE,
    WEIGHT_TYPES,
    D,
    H,
    I,
    P,
    check_against_float64,
    decoder_layer_case,
    dense_weight,
)

ops = torch.ops.decodekit
make_case = decoder_layer_case


def run_op(case, **overrides):
    """decoder_layer on copies of x and the caches; returns them."""
    a = dict(case, **overrides)
    x, kc, vc = a["x"].clone(), a["k_cache"].clone(), a["v_cache"].clone()
    tree = {"tree_mask": a["tree_mask"]} if "tree_mask" in a else {}
    decodekit.decoder_layer(
        x,
        kc,
        vc,
        a["slot_mapping"],
        a["block_tables"],
        a["seq_lens"],
        a["positions"],
        a["cos_table"],
        a["sin_table"],
        *a["weights"],
        num_heads=HQ,
        num_kv_heads=HKV,
        eps=EPS,
        scale=SCALE,
        kv_layout=a["kv_layout"],
        **tree,
    )
    return x, kc, vc


def run_per_op(case, tree_mask=None):
    """The per-op path: the individual ops, called as LlamaModel.forward_paged (layer_op = False)
    calls them."""
    x, kc, vc = case["x"].clone(), case["k_cache"].clone(), case["v_cache"].clone()
    attn_norm, wqkv, wo, ffn_norm, w_gate_up, w_down = case["weights"]
    B, T, _ = x.shape
    layout = case["kv_layout"]
    h = ops.rms_norm(x, attn_norm, EPS)
    qkv = decodekit.linear(h, wqkv)
    ops.rope_(qkv.view(B * T, -1), HQ + HKV, case["cos_table"], case["sin_table"], case["positions"].reshape(-1))
    q, k, v = qkv.split((HQ * D, HKV * D, HKV * D), dim=-1)
    ops.append_paged_kv_cache(
        kc, vc, k.reshape(B * T, HKV, D), v.reshape(B * T, HKV, D), case["slot_mapping"].reshape(-1), layout
    )
    attn = ops.paged_attention(
        q.reshape(B, T, HQ, D).contiguous(), kc, vc, case["block_tables"], case["seq_lens"], SCALE, layout, tree_mask
    )
    x = x + decodekit.linear(attn.reshape(B, T, HQ * D), wo)
    h = ops.rms_norm(x, ffn_norm, EPS)
    x = x + decodekit.linear(ops.silu_and_mul(decodekit.linear(h, w_gate_up)), w_down)
    return x, kc, vc


def run_reference(case, tree_mask=None):
    """The float64 reference block on the case's arguments (quantized weights dequantized)."""
    return ref.decoder_layer(
        case["x"],
        case["k_cache"],
        case["v_cache"],
        case["slot_mapping"],
        case["block_tables"],
        case["seq_lens"],
        case["positions"],
        case["cos_table"],
        case["sin_table"],
        [dense_weight(w) for w in case["weights"]],
        num_heads=HQ,
        num_kv_heads=HKV,
        eps=EPS,
        scale=SCALE,
        kv_layout=case["kv_layout"],
        tree_mask=tree_mask,
    )


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("weights", sorted(WEIGHT_TYPES))
@pytest.mark.parametrize("B, T", [(1, 1), (3, 1), (1, 5), (3, 5)])
def test_bit_identical_to_the_per_op_path(B, T, weights, layout):
    case = make_case(B, T, layout, weights, seed=B * 10 + T)
    got, want = run_op(case), run_per_op(case)
    for name, a, b in zip(("x", "k_cache", "v_cache"), got, want):
        assert torch.equal(a, b), name
    assert not torch.equal(got[0], case["x"])  # the residual stream moved


@pytest.mark.parametrize("weights", sorted(WEIGHT_TYPES))
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_matches_float64_reference(weights, layout):
    case = make_case(3, 5, layout, weights, seed=7)
    check_against_float64(run_op(case), run_reference(case))


# node i's parent; row 1 of a batch of 3 is a chain, rows 0 and 2 branch
TREE_PARENTS = torch.tensor([[-1, 0, 0, 1, 2], [-1, 0, 1, 2, 3], [-1, 0, 0, 0, 3]])


def _tree_case(weights, layout, seed):
    """decoder_layer arguments for 5 new tokens per row that form the trees of TREE_PARENTS:
    node i takes position cached + depth(i)."""
    case = make_case(3, 5, layout, weights, seed=seed)
    mask = decodekit.tree_mask_from_parents(TREE_PARENTS)
    depth = mask.sum(-1) - 1  # ancestors of each node
    case["positions"] = (case["seq_lens"] - 5)[:, None] + depth
    return case, mask


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("weights", sorted(WEIGHT_TYPES))
def test_tree_mask_bit_identical_to_the_per_op_path(weights, layout):
    case, mask = _tree_case(weights, layout, seed=21)
    got, want = run_op(case, tree_mask=mask), run_per_op(case, mask)
    for name, a, b in zip(("x", "k_cache", "v_cache"), got, want):
        assert torch.equal(a, b), name
    strided = mask.transpose(1, 2).contiguous().transpose(1, 2)  # the same mask, not contiguous
    assert not strided.is_contiguous() and torch.equal(run_op(case, tree_mask=strided)[0], got[0])
    causal = run_op(case)[0]
    assert torch.equal(causal[1], got[0][1])  # a chain's mask is the causal rule
    assert not torch.equal(causal[0, 2:], got[0][0, 2:])  # branches read other tokens


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_tree_mask_matches_float64_reference(layout):
    case, mask = _tree_case("gguf", layout, seed=22)
    check_against_float64(run_op(case, tree_mask=mask), run_reference(case, mask))


def test_rows_do_not_depend_on_the_batch():
    case = make_case(3, 5, "NHD", "gguf", seed=3)
    x, kc, vc = run_op(case)
    for b in range(3):
        alone = dict(
            case,
            x=case["x"][b : b + 1],
            slot_mapping=case["slot_mapping"][b : b + 1],
            block_tables=case["block_tables"][b : b + 1],
            seq_lens=case["seq_lens"][b : b + 1],
            positions=case["positions"][b : b + 1],
        )
        xb, kb, _ = run_op(alone)
        assert torch.equal(xb[0], x[b])
        blocks = case["block_tables"][b][case["block_tables"][b] >= 0]
        assert torch.equal(kb[blocks], kc[blocks])


def test_flat_slots_and_int32_indices_are_accepted():
    case = make_case(3, 2, "HND", "f32", seed=5)
    want = run_op(case)
    got = run_op(
        case,
        slot_mapping=case["slot_mapping"].reshape(-1).int(),
        positions=case["positions"].reshape(-1),
        block_tables=case["block_tables"].int(),
        seq_lens=case["seq_lens"].int(),
    )
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_negative_slots_are_not_written():
    case = make_case(1, 3, "NHD", "f32", seed=6)
    slots = case["slot_mapping"].clone()
    skipped = int(slots[0, 1])
    slots[0, 1] = -1
    _, kc, _ = run_op(case, slot_mapping=slots)
    blk, off = divmod(skipped, BS)
    assert torch.equal(kc[blk, off], case["k_cache"][blk, off])
    blk, off = divmod(int(slots[0, 2]), BS)
    assert not torch.equal(kc[blk, off], case["k_cache"][blk, off])


def test_meta_kernel_through_the_wrapper():
    case = make_case(3, 2, "NHD", "gguf", seed=8)
    x, kc, vc = (case[n].to("meta") for n in ("x", "k_cache", "v_cache"))
    meta = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    meta["weights"] = tuple(
        QuantizedWeight(w.blocks.to("meta"), w.block_type, w.shape) if isinstance(w, QuantizedWeight) else w.to("meta")
        for w in case["weights"]
    )
    decodekit.decoder_layer(
        x,
        kc,
        vc,
        meta["slot_mapping"],
        meta["block_tables"],
        meta["seq_lens"],
        meta["positions"],
        meta["cos_table"],
        meta["sin_table"],
        *meta["weights"],
        num_heads=HQ,
        num_kv_heads=HKV,
        eps=EPS,
        kv_layout="NHD",
    )
    assert x.is_meta and x.shape == case["x"].shape


# ------------------------------------------------------------------------------------- errors
def _raw_args(case, **over):
    a = dict(case)
    w = [decodekit.ops.layers.layer_weight(t) for t in case["weights"]]
    args = dict(
        x=a["x"].clone(),
        k_cache=a["k_cache"].clone(),
        v_cache=a["v_cache"].clone(),
        slot_mapping=a["slot_mapping"],
        block_tables=a["block_tables"],
        seq_lens=a["seq_lens"],
        positions=a["positions"],
        cos_table=a["cos_table"],
        sin_table=a["sin_table"],
        attn_norm=case["weights"][0],
        wqkv=w[1][0],
        wqkv_type=w[1][1],
        wo=w[2][0],
        wo_type=w[2][1],
        ffn_norm=case["weights"][3],
        w_gate_up=w[4][0],
        gate_up_type=w[4][1],
        w_down=w[5][0],
        down_type=w[5][1],
        num_heads=HQ,
        num_kv_heads=HKV,
        intermediate_size=I,
        eps=EPS,
        scale=SCALE,
        kv_layout=a["kv_layout"],
    )
    args.update(over)
    return args


BAD = [
    # (override, error type, message fragment)
    (lambda c: {"x": c["x"].double()}, TypeError, "x must be float32"),
    (lambda c: {"x": c["x"][0]}, ValueError, r"x must be \[B, T, H\]"),
    (lambda c: {"x": c["x"].transpose(0, 1).contiguous().transpose(0, 1)}, ValueError, "x must be contiguous"),
    (lambda c: {"k_cache": c["k_cache"].half()}, TypeError, "k_cache must be float32"),
    (lambda c: {"v_cache": c["v_cache"][:-1].clone()}, ValueError, "v_cache must have the shape of k_cache"),
    (lambda c: {"num_kv_heads": 1}, ValueError, "num_kv_heads"),
    (lambda c: {"num_heads": 3}, ValueError, "num_heads"),
    (lambda c: {"kv_layout": "NDH"}, ValueError, "kv_layout"),
    (lambda c: {"slot_mapping": c["slot_mapping"][:, :1]}, ValueError, "slot_mapping must be"),
    (lambda c: {"positions": c["positions"].float()}, TypeError, "positions must be int64"),
    (lambda c: {"block_tables": c["block_tables"][:1]}, ValueError, "block_tables must be"),
    (lambda c: {"seq_lens": c["seq_lens"][None]}, ValueError, "seq_lens must be"),
    (lambda c: {"cos_table": c["cos_table"][:, :8]}, ValueError, "cos_table must be"),
    (lambda c: {"sin_table": c["sin_table"][:10]}, ValueError, "sin_table must have the shape of cos_table"),
    (lambda c: {"attn_norm": c["weights"][0][:-1]}, ValueError, "attn_norm must be"),
    (lambda c: {"ffn_norm": c["weights"][3].double()}, TypeError, "ffn_norm must be float32"),
    (lambda c: {"wqkv_type": "q5_0"}, ValueError, "wqkv_type must be 'f32', 'q4_1' or 'q8_0'"),
    (lambda c: {"wqkv_type": "f32"}, TypeError, "wqkv must be float32"),
    (lambda c: {"down_type": "q4_1"}, ValueError, "w_down must hold"),
    (lambda c: {"w_gate_up": c["weights"][4].blocks[:-1]}, ValueError, "w_gate_up must hold"),
    (lambda c: {"intermediate_size": 64}, ValueError, "w_gate_up must hold"),
    (lambda c: {"wo": torch.randn(H, HQ * D).t(), "wo_type": "f32"}, ValueError, "wo must be contiguous"),
    (lambda c: {"eps": -1.0}, ValueError, "eps"),
    (lambda c: {"scale": math.inf}, ValueError, "scale"),
    (lambda c: {"positions": c["positions"] + P - 1}, ValueError, "outside the RoPE tables"),
    (lambda c: {"positions": c["positions"] - 100}, ValueError, "outside the RoPE tables"),
    (lambda c: {"slot_mapping": c["slot_mapping"] + NB * BS}, ValueError, "past the pool"),
    (lambda c: {"seq_lens": c["seq_lens"] * 0 + 1}, ValueError, "seq_lens"),
    (lambda c: {"seq_lens": c["seq_lens"] + 1000}, ValueError, "seq_lens"),
    (lambda c: {"block_tables": c["block_tables"].to("meta")}, RuntimeError, "meta"),
    (lambda c: {"tree_mask": torch.ones(3, 2, 2).tril()}, TypeError, "tree_mask must be bool"),
    (lambda c: {"tree_mask": torch.ones(3, 2, 3, dtype=torch.bool)}, ValueError, r"tree_mask must be \[B=3, T=2"),
    (lambda c: {"tree_mask": torch.eye(2, dtype=torch.bool).expand(3, 2, 2)}, ValueError, "must be contiguous"),
    (lambda c: {"tree_mask": torch.zeros(3, 2, 2, dtype=torch.bool)}, ValueError, r"tree_mask\[0, 0, 0\] must be True"),
    (lambda c: {"tree_mask": torch.ones(3, 2, 2, dtype=torch.bool)}, ValueError, r"tree_mask\[0, 0, 1\] must be False"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_arguments_raise_and_write_nothing(i):
    over, err, match = BAD[i]
    case = make_case(3, 2, "NHD", "gguf", seed=9)
    args = _raw_args(case, **over(case))
    x0, k0, v0 = args["x"].clone(), args["k_cache"].clone(), args["v_cache"].clone()
    with pytest.raises(err, match=match):
        ops.decoder_layer(**args)
    if args["x"].shape == x0.shape and args["x"].dtype == x0.dtype:
        assert torch.equal(args["x"], x0)
    if args["k_cache"].dtype == k0.dtype:
        assert torch.equal(args["k_cache"], k0) and torch.equal(args["v_cache"], v0)


def test_wrapper_errors():
    case = make_case(2, 2, "NHD", "f32", seed=10)
    slots = case["slot_mapping"].clone()
    slots[1, 1] = slots[0, 0]
    with pytest.raises(ValueError, match="repeats a slot"):
        run_op(case, slot_mapping=slots)
    with pytest.raises(TypeError, match="slot_mapping must be an integer tensor"):
        run_op(case, slot_mapping=case["slot_mapping"].float())
    with pytest.raises(TypeError, match="QuantizedWeight"):
        run_op(case, weights=case["weights"][:5] + ([1.0],))
    x = case["x"].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="grad"):
        run_op(case, x=x)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_wrapper_rejects_block_ids_outside_the_pool_among_the_blocks_read(layout):
    """validate (the default): a block the sequences read (positions [0, seq_lens)) that is -1 or
    past the pool raises naming block_tables, as paged_attention does, and writes nothing; ids
    past the blocks read are not looked at."""
    case = make_case(2, 2, layout, "f32", seed=11)
    tables, lens = case["block_tables"], case["seq_lens"]
    num_blocks = case["k_cache"].size(0)
    block_size = case["k_cache"].size(2 if layout == "HND" else 1)
    read = (int(lens[0]) + block_size - 1) // block_size  # blocks row 0 reads (row 1 reads more)
    assert read < tables.size(1)
    for bad_id in (-1, num_blocks, num_blocks + 7):
        bad = tables.clone()
        bad[1, 0] = bad_id
        x, kc = case["x"].clone(), case["k_cache"].clone()
        with pytest.raises(ValueError, match=r"block_tables holds block ids outside \[0, num_blocks="):
            run_op(dict(case, x=x, k_cache=kc), block_tables=bad)
    spare = tables.clone()  # an unread column may hold anything
    spare[0, read:] = num_blocks + 3
    assert all(torch.equal(a, b) for a, b in zip(run_op(case, block_tables=spare), run_op(case)))


def test_tree_mask_meta_kernel_checks_the_shape():
    case, mask = _tree_case("f32", "NHD", seed=23)
    meta = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    meta["weights"] = tuple(w.to("meta") for w in case["weights"])
    run_op(meta, tree_mask=mask.to("meta"))  # shapes agree: no error, nothing computed
    with pytest.raises(ValueError, match=r"tree_mask must be \[B=3, T=5, T=5\]"):
        run_op(meta, tree_mask=mask[:, :4, :4].contiguous().to("meta"))
    with pytest.raises(TypeError, match="tree_mask must be None or a bool torch.Tensor"):
        run_op(case, tree_mask=[[True]])
