"""Paged decode attention: against SDPA on the gathered cache, bit-identical rows whatever
B and Q, clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from decodekit import paged_attention
from reference import paged_attention as paged_attention_reference


def make_case(seed, B, Q, Hq, Hkv, D, block_size, lens, layout="NHD", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max((n + block_size - 1) // block_size for n in lens) + 1
    num_blocks = B * max_blocks + 3
    shape = (num_blocks, block_size, Hkv, D) if layout == "NHD" else (num_blocks, Hkv, block_size, D)
    k = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.full((B, max_blocks), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(lens):
        nb = (n + block_size - 1) // block_size
        tables[b, :nb] = perm[used : used + nb].int()
        used += nb
    q = torch.randn(B, Q, Hq, D, generator=g)
    return q, k, v, tables, torch.tensor(lens, dtype=torch.int32)


def sdpa_on_gathered(q, k, v, tables, lens, layout, scale):
    """Gather each sequence's cache into a contiguous [H, n, D] tensor and run torch SDPA (float64)."""
    B, Q, Hq, D = q.shape
    out = torch.empty(B, Q, Hq, D, dtype=torch.float64)
    for b in range(B):
        n = int(lens[b])
        bs = k.size(1) if layout == "NHD" else k.size(2)
        blocks = tables[b, : (n + bs - 1) // bs].long()
        kk, vv = k[blocks], v[blocks]
        if layout == "HND":
            kk, vv = kk.permute(0, 2, 1, 3), vv.permute(0, 2, 1, 3)
        kk = kk.reshape(-1, kk.size(2), D)[:n].double()
        vv = vv.reshape(-1, vv.size(2), D)[:n].double()
        rep = Hq // kk.size(1)
        kk, vv = kk.repeat_interleave(rep, 1).transpose(0, 1), vv.repeat_interleave(rep, 1).transpose(0, 1)
        mask = torch.arange(n)[None, :] <= torch.arange(n - Q, n)[:, None]
        out[b] = torch.nn.functional.scaled_dot_product_attention(
            q[b].double().transpose(0, 1), kk, vv, attn_mask=mask, scale=scale
        ).transpose(0, 1)
    return out


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize(
    "B,Q,Hq,Hkv,D,bs,lens",
    [
        (1, 1, 9, 3, 64, 16, [1]),
        (3, 1, 9, 3, 64, 16, [37, 100, 5]),
        (2, 4, 8, 2, 32, 8, [9, 23]),
        (4, 5, 4, 4, 48, 7, [5, 6, 50, 13]),
        (2, 3, 6, 1, 80, 32, [70, 3]),
    ],
)
def test_matches_sdpa_on_gathered_cache(layout, B, Q, Hq, Hkv, D, bs, lens):
    q, k, v, tables, sl = make_case(B * 100 + Q, B, Q, Hq, Hkv, D, bs, lens, layout)
    scale = 1 / math.sqrt(D)
    out = paged_attention(q, k, v, tables, sl, kv_layout=layout)
    ref = sdpa_on_gathered(q, k, v, tables, sl, layout, scale)
    assert out.dtype == torch.float32 and out.shape == (B, Q, Hq, D)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_caches(dtype):
    q, k, v, tables, sl = make_case(7, 2, 2, 8, 2, 64, 16, [33, 18], dtype=dtype)
    out = paged_attention(q, k, v, tables, sl)
    ref = sdpa_on_gathered(q, k.float(), v.float(), tables, sl, "NHD", 1 / 8)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_rows_bit_identical_whatever_b_and_q():
    q, k, v, tables, sl = make_case(11, 4, 5, 9, 3, 64, 16, [40, 77, 5, 130])
    full = paged_attention(q, k, v, tables, sl)
    for b in range(4):
        alone = paged_attention(q[b : b + 1], k, v, tables[b : b + 1], sl[b : b + 1])
        assert torch.equal(alone[0], full[b])
        for i in range(5):
            # Query i alone (Q = 1) sees the same positions when seq_lens stops at its position.
            single = paged_attention(q[b : b + 1, i : i + 1], k, v, tables[b : b + 1], sl[b : b + 1] - (4 - i))
            assert torch.equal(single[0, 0], full[b, i])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(paged_attention(q, k, v, tables, sl), full)
    finally:
        torch.set_num_threads(threads)


def test_matches_the_plain_torch_reference():
    q, k, v, tables, sl = make_case(12, 3, 2, 6, 2, 16, 4, [9, 2, 31])
    torch.testing.assert_close(
        paged_attention(q, k, v, tables, sl), paged_attention_reference(q, k, v, tables, sl), rtol=1e-5, atol=1e-6
    )


def test_errors():
    q, k, v, tables, sl = make_case(13, 2, 2, 8, 2, 16, 4, [5, 9])
    with pytest.raises(ValueError, match="seq_lens"):
        paged_attention(q, k, v, tables, torch.tensor([1, 9]))
    with pytest.raises(ValueError, match="block ids"):
        bad = tables.clone()
        bad[0, 0] = 10**6
        paged_attention(q, k, v, bad, sl)
    with pytest.raises(ValueError, match="multiple"):
        paged_attention(q[:, :, :3], k, v, tables, sl)
    with pytest.raises(ValueError, match="head_dim"):
        paged_attention(q[..., :8].contiguous(), k, v, tables, sl)
    with pytest.raises(ValueError, match="kv_layout"):
        paged_attention(q, k, v, tables, sl, kv_layout="NDH")
    with pytest.raises(TypeError, match="block_tables"):
        paged_attention(q, k, v, tables.float(), sl)


def test_bogus_lengths_without_validation_stay_fast_and_bounded():
    # validate=False skips the data checks; a huge seq_len must not make the kernel walk
    # 2^40 positions or read past the block table: positions past it contribute nothing.
    q, k, v, tables, sl = make_case(15, 2, 1, 4, 2, 16, 4, [5, 9])
    ref = paged_attention(q, k, v, tables, sl)
    out = paged_attention(q, k, v, tables, torch.tensor([2**40, 9]), validate=False)
    assert torch.isfinite(out).all() and torch.equal(out[1], ref[1])
    with pytest.raises(ValueError, match="scale"):
        paged_attention(q, k, v, tables, sl, scale=float("nan"))


def test_opcheck():
    q, k, v, tables, sl = make_case(14, 2, 2, 4, 2, 16, 4, [5, 9])
    torch.library.opcheck(torch.ops.decodekit.paged_attention.default, (q, k, v, tables.long(), sl.long(), 0.25, "NHD"))


def test_nan_query_or_key_gives_nan_output():
    # NaN (or inf) in the query or a key the query reads makes that output row NaN, as in the
    # reference, instead of dropping the position.
    from decodekit import paged_attention

    k = torch.randn(2, 4, 1, 8)
    v = torch.randn(2, 4, 1, 8)
    q = torch.randn(2, 1, 2, 8)
    tables = torch.tensor([[0, 1], [1, 0]])
    lens = torch.tensor([6, 3])
    q[0, 0, 1] = float("nan")
    out = paged_attention(q, k, v, tables, lens, scale=0.3)
    assert torch.isnan(out[0, 0, 1]).all() and torch.isfinite(out[0, 0, 0]).all() and torch.isfinite(out[1]).all()
    k2 = k.clone()
    k2[1, 2, 0, 3] = float("nan")  # position 2 of sequence 1 (block 1, slot 2), unread by sequence 0
    out = paged_attention(torch.randn(2, 1, 2, 8), k2, v, tables, lens, scale=0.3)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()


def test_meta_tensors():
    # Found by a trial: the wrapper refused meta tensors although the op has a Meta kernel.
    q = torch.empty(2, 3, 4, 16, device="meta")
    k = torch.empty(6, 8, 2, 16, device="meta")
    out = paged_attention(
        q, k, k, torch.zeros(2, 3, dtype=torch.int32, device="meta"), torch.zeros(2, dtype=torch.int64, device="meta")
    )
    assert out.device.type == "meta" and out.shape == (2, 3, 4, 16) and out.dtype == torch.float32
