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


# ------------------------------------------------------------- tree masks ----
from decodekit import tree_mask_from_parents  # noqa: E402


def random_parents(g, B, Q):
    """[B, Q] int64 parents of random token trees in flat order: node 0 is a root, every other
    node's parent is an earlier node (or, rarely, -1: a second root)."""
    p = torch.empty(B, Q, dtype=torch.int64)
    for b in range(B):
        for i in range(Q):
            if i == 0 or torch.rand(1, generator=g).item() < 0.1:
                p[b, i] = -1
            else:
                p[b, i] = torch.randint(0, i, (1,), generator=g).item()
    return p


def ancestors_mask(parents):
    """The ancestor-or-self closure by walking up the parent links (plain Python)."""
    B, Q = parents.shape
    m = torch.zeros(B, Q, Q, dtype=torch.bool)
    for b in range(B):
        for i in range(Q):
            j = i
            while j >= 0:
                m[b, i, j] = True
                j = int(parents[b, j])
    return m


def sdpa_with_mask(q, k, v, tables, lens, layout, scale, tree_mask):
    """Gather each sequence and run torch SDPA in float64 with the explicit boolean mask:
    every prefix position, then the tree mask over the Q new tokens."""
    B, Q, Hq, D = q.shape
    out = torch.empty(B, Q, Hq, D, dtype=torch.float64)
    bs = k.size(1) if layout == "NHD" else k.size(2)
    for b in range(B):
        n = int(lens[b])
        blocks = tables[b, : (n + bs - 1) // bs].long()
        kk, vv = k[blocks], v[blocks]
        if layout == "HND":
            kk, vv = kk.permute(0, 2, 1, 3), vv.permute(0, 2, 1, 3)
        kk = kk.reshape(-1, kk.size(2), D)[:n].double()
        vv = vv.reshape(-1, vv.size(2), D)[:n].double()
        rep = Hq // kk.size(1)
        kk, vv = kk.repeat_interleave(rep, 1).transpose(0, 1), vv.repeat_interleave(rep, 1).transpose(0, 1)
        mask = torch.ones(Q, n, dtype=torch.bool)
        mask[:, n - Q :] = tree_mask[b]
        out[b] = torch.nn.functional.scaled_dot_product_attention(
            q[b].double().transpose(0, 1), kk, vv, attn_mask=mask, scale=scale
        ).transpose(0, 1)
    return out


def test_tree_mask_from_parents_hand_case():
    #       0
    #      / \
    #     1   2        node 4 is a second root
    #     |
    #     3
    parents = torch.tensor([[-1, 0, 0, 1, -1]])
    expected = [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [0, 0, 0, 0, 1]]
    assert tree_mask_from_parents(parents)[0].int().tolist() == expected
    assert tree_mask_from_parents(parents.int()).dtype == torch.bool
    assert tree_mask_from_parents(torch.empty(2, 0, dtype=torch.int64)).shape == (2, 0, 0)


def test_tree_mask_from_parents_random_trees():
    g = torch.Generator().manual_seed(40)
    for B, Q in ((1, 1), (3, 7), (2, 40)):
        p = random_parents(g, B, Q)
        assert torch.equal(tree_mask_from_parents(p), ancestors_mask(p))


def test_tree_mask_from_parents_errors():
    with pytest.raises(ValueError, match=r"parents\[0, 2\] = 2"):
        tree_mask_from_parents(torch.tensor([[-1, 0, 2]]))  # a node its own parent
    with pytest.raises(ValueError, match=r"parents\[1, 1\] = 3"):
        tree_mask_from_parents(torch.tensor([[-1, 0, 1, 1], [-1, 3, 0, 0]]))  # a parent after its child
    with pytest.raises(ValueError, match=r"parents\[0, 1\] = -2"):
        tree_mask_from_parents(torch.tensor([[-1, -2]]))
    with pytest.raises(TypeError, match="int32 or int64"):
        tree_mask_from_parents(torch.tensor([[-1.0, 0.0]]))
    with pytest.raises(ValueError, match="2-D"):
        tree_mask_from_parents(torch.tensor([-1, 0]))


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize(
    "B,Q,Hq,Hkv,D,bs,prefix",
    [
        (1, 1, 4, 2, 64, 16, [0]),
        (1, 9, 8, 2, 64, 16, [21]),
        (3, 6, 9, 3, 64, 16, [3, 40, 100]),
        (3, 20, 8, 2, 48, 8, [0, 13, 30]),  # the tree crosses tile boundaries (tiles of 16)
        (2, 5, 6, 1, 80, 32, [70, 2]),
    ],
)
def test_tree_mask_matches_sdpa_with_the_same_mask(layout, B, Q, Hq, Hkv, D, bs, prefix):
    lens = [p + Q for p in prefix]
    q, k, v, tables, sl = make_case(B * 1000 + Q, B, Q, Hq, Hkv, D, bs, lens, layout)
    g = torch.Generator().manual_seed(B * 10 + Q)
    mask = tree_mask_from_parents(random_parents(g, B, Q))
    scale = 1 / math.sqrt(D)
    out = paged_attention(q, k, v, tables, sl, kv_layout=layout, tree_mask=mask)
    ref = sdpa_with_mask(q, k, v, tables, sl, layout, scale, mask)
    assert out.dtype == torch.float32 and out.shape == (B, Q, Hq, D)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    # and the plain-torch reference of tests/reference/ with the same mask
    torch.testing.assert_close(
        out, paged_attention_reference(q, k, v, tables, sl, kv_layout=layout, tree_mask=mask), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize(
    "dtype,D", [(torch.float32, 64), (torch.float32, 40), (torch.float16, 128), (torch.bfloat16, 32)]
)
def test_chain_mask_gives_the_bits_of_the_causal_path(layout, dtype, D):
    # Every new token may read every earlier one (a chain): exactly the causal rule, so the
    # masked kernel must skip nothing and give the unmasked bits.
    B, Q = 3, 18
    q, k, v, tables, sl = make_case(21, B, Q, 8, 2, D, 16, [Q, Q + 7, Q + 50], layout, dtype)
    chain = torch.ones(Q, Q, dtype=torch.bool).tril().expand(B, Q, Q).contiguous()
    plain = paged_attention(q, k, v, tables, sl, kv_layout=layout)
    assert torch.equal(paged_attention(q, k, v, tables, sl, kv_layout=layout, tree_mask=chain), plain)
    chain_parents = (torch.arange(Q) - 1).expand(B, Q)
    assert torch.equal(tree_mask_from_parents(chain_parents), chain)


def test_tree_mask_rows_bit_identical_whatever_b():
    B, Q = 4, 11
    q, k, v, tables, sl = make_case(22, B, Q, 9, 3, 64, 16, [Q + 4, Q + 60, Q, Q + 17])
    mask = tree_mask_from_parents(random_parents(torch.Generator().manual_seed(23), B, Q))
    full = paged_attention(q, k, v, tables, sl, tree_mask=mask)
    for b in range(B):
        alone = paged_attention(q[b : b + 1], k, v, tables[b : b + 1], sl[b : b + 1], tree_mask=mask[b : b + 1])
        assert torch.equal(alone[0], full[b])
    for b in (0, 2):  # in another batch, next to other rows
        idx = torch.tensor([b, 3, 1])
        mixed = paged_attention(q[idx], k, v, tables[idx], sl[idx], tree_mask=mask[idx])
        assert torch.equal(mixed[0], full[b])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(paged_attention(q, k, v, tables, sl, tree_mask=mask), full)
    finally:
        torch.set_num_threads(threads)


def test_masked_out_keys_are_never_read():
    # A NaN key or value at a masked-out node leaves the rows that do not read it finite and
    # unchanged: the kernel skips the position instead of scoring it.
    B, Q, bs = 1, 4, 16
    q, k, v, tables, sl = make_case(24, B, Q, 4, 2, 32, bs, [10 + Q])
    mask = tree_mask_from_parents(torch.tensor([[-1, 0, 0, 1]]))  # node 2 is read only by itself
    before = paged_attention(q, k, v, tables, sl, tree_mask=mask)
    pos = 10 + 2
    blk = int(tables[0, pos // bs])
    k2, v2 = k.clone(), v.clone()
    k2[blk, pos % bs] = float("nan")
    v2[blk, pos % bs] = float("nan")
    after = paged_attention(q, k2, v2, tables, sl, tree_mask=mask)
    for i in (0, 1, 3):
        assert torch.equal(after[0, i], before[0, i])
    assert torch.isnan(after[0, 2]).all()


def test_tree_mask_errors():
    B, Q = 2, 3
    q, k, v, tables, sl = make_case(25, B, Q, 4, 2, 16, 4, [5, 9])
    good = tree_mask_from_parents(torch.tensor([[-1, 0, 0], [-1, 0, 1]]))
    with pytest.raises(ValueError, match=r"tree_mask must be \[B=2, Q=3, Q=3\]"):
        paged_attention(q, k, v, tables, sl, tree_mask=good[:1])
    with pytest.raises(ValueError, match=r"tree_mask must be \[B=2, Q=3, Q=3\]"):
        paged_attention(q, k, v, tables, sl, tree_mask=good[:, :2])
    with pytest.raises(TypeError, match="tree_mask must be bool"):
        paged_attention(q, k, v, tables, sl, tree_mask=good.int())
    with pytest.raises(TypeError, match="tree_mask must be a bool torch.Tensor"):
        paged_attention(q, k, v, tables, sl, tree_mask=[[True]])
    above = good.clone()
    above[1, 0, 2] = True
    with pytest.raises(ValueError, match=r"j > i.*\[\[1, 0, 2\]\]"):
        paged_attention(q, k, v, tables, sl, tree_mask=above)
    no_diag = good.clone()
    no_diag[0, 1, 1] = False
    with pytest.raises(ValueError, match=r"tree_mask\[b, i, i\] must be True.*\[\[0, 1\]\]"):
        paged_attention(q, k, v, tables, sl, tree_mask=no_diag)
    # The raw op checks shape and dtype too (never reads out of bounds).
    op = torch.ops.decodekit.paged_attention
    args = (q, k, v, tables.long(), sl.long(), 0.25, "NHD")
    with pytest.raises(ValueError, match="tree_mask must be"):
        op(*args, good[:, :2].contiguous())
    with pytest.raises(TypeError, match="tree_mask must be bool"):
        op(*args, good.to(torch.uint8))
    with pytest.raises(ValueError, match="contiguous"):
        op(*args, good.transpose(1, 2))


def test_tree_mask_without_validation_ignores_entries_above_the_diagonal():
    # validate=False: entries with j > i are never looked at; a row whose diagonal is False
    # and whose prefix is empty reads nothing and gets zeros.
    B, Q = 1, 3
    q, k, v, tables, sl = make_case(26, B, Q, 4, 2, 16, 4, [Q])
    good = tree_mask_from_parents(torch.tensor([[-1, 0, 0]]))
    ref = paged_attention(q, k, v, tables, sl, tree_mask=good)
    noisy = good | torch.ones(Q, Q, dtype=torch.bool).triu(1)
    assert torch.equal(paged_attention(q, k, v, tables, sl, tree_mask=noisy, validate=False), ref)
    lonely = good.clone()
    lonely[0, 0, 0] = False  # node 0: no prefix, not itself -> nothing to read
    out = paged_attention(q, k, v, tables, sl, tree_mask=lonely, validate=False)
    assert (out[0, 0] == 0).all() and torch.equal(out[0, 1:], ref[0, 1:])


def test_tree_mask_opcheck_and_meta():
    q, k, v, tables, sl = make_case(27, 2, 3, 4, 2, 16, 4, [5, 9])
    mask = tree_mask_from_parents(torch.tensor([[-1, 0, 0], [-1, 0, 1]]))
    torch.library.opcheck(
        torch.ops.decodekit.paged_attention.default, (q, k, v, tables.long(), sl.long(), 0.25, "NHD", mask)
    )
    m = lambda t: t.to("meta")  # noqa: E731
    out = paged_attention(m(q), m(k), m(v), m(tables), m(sl), tree_mask=m(mask))
    assert out.device.type == "meta" and out.shape == q.shape


def test_tree_verification_end_to_end():
    # A sequence appends a token tree, attends with the tree mask, keeps an accepted path
    # (compact + truncate), then decodes on: its attention is bit-identical to that of a cache
    # that only ever had the path appended, and the tree step's rows on the path equal
    # (to float32 rounding) attention over the path alone.
    from decodekit import PagedKVCache

    g = torch.Generator().manual_seed(28)
    H, Hq, D, bs, P = 2, 6, 32, 8, 13
    parents = torch.tensor([[-1, 0, 0, 1, 1, 2, 3, 3, 4, 6]])
    Q = parents.size(1)
    path = [0, 1, 3, 6]  # root -> 1 -> 3 -> 6
    kp, vp = torch.randn(P, H, D, generator=g), torch.randn(P, H, D, generator=g)
    kt, vt = torch.randn(Q, H, D, generator=g), torch.randn(Q, H, D, generator=g)
    qt = torch.randn(1, Q, Hq, D, generator=g)
    k_next, v_next = torch.randn(3, H, D, generator=g), torch.randn(3, H, D, generator=g)
    q_next = torch.randn(1, 3, Hq, D, generator=g)
    for layout in ("NHD", "HND"):
        tree = PagedKVCache(1, 8, bs, H, D, kv_layout=layout)
        only = PagedKVCache(1, 8, bs, H, D, kv_layout=layout)
        s, r = tree.add_sequence(), only.add_sequence()
        for c, seq, keys, vals in (
            (tree, s, torch.cat([kp, kt]), torch.cat([vp, vt])),
            (only, r, torch.cat([kp, kt[path]]), torch.cat([vp, vt[path]])),
        ):
            c.append(0, seq, keys, vals)
            c.advance(seq, keys.size(0))
        mask = tree_mask_from_parents(parents)
        att = paged_attention(
            qt, tree.k[0], tree.v[0], tree.block_table([s]), tree.seq_lens([s]), kv_layout=layout, tree_mask=mask
        )
        path_att = paged_attention(
            qt[:, path], only.k[0], only.v[0], only.block_table([r]), only.seq_lens([r]), kv_layout=layout
        )
        torch.testing.assert_close(att[:, path], path_att, rtol=1e-5, atol=1e-6)
        tree.compact([s], [P], torch.tensor([path]))
        assert tree.seq_lens([s]).tolist() == only.seq_lens([r]).tolist() == [P + len(path)]
        assert tree.num_free_blocks == only.num_free_blocks
        for c, seq in ((tree, s), (only, r)):
            c.append(0, seq, k_next, v_next)
            c.advance(seq, 3)
        a = paged_attention(q_next, tree.k[0], tree.v[0], tree.block_table([s]), tree.seq_lens([s]), kv_layout=layout)
        b = paged_attention(q_next, only.k[0], only.v[0], only.block_table([r]), only.seq_lens([r]), kv_layout=layout)
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_invalid_table_entries_without_validation_are_skipped(layout):
    # validate=False: a block-table entry that is -1 or past num_blocks inside a sequence's
    # length is neither read (the blocks' warm-up read skips it too) nor attended to; the row
    # equals float64 attention over the positions of its valid blocks only.
    torch.manual_seed(3)
    bs, Hq, Hkv, D, nblk = 4, 4, 2, 16, 6
    shape = (nblk, bs, Hkv, D) if layout == "NHD" else (nblk, Hkv, bs, D)
    k, v = torch.randn(shape), torch.randn(shape)
    q = torch.randn(2, 1, Hq, D)
    tables = torch.tensor([[0, 2**40, 3], [5, -1, 1]], dtype=torch.int64)
    sl = torch.tensor([12, 10], dtype=torch.int64)
    out = paged_attention(q, k, v, tables, sl, kv_layout=layout, validate=False)
    for b in range(2):
        keys, vals = [], []
        for i, blk in enumerate(tables[b].tolist()):
            if not 0 <= blk < nblk:
                continue
            for o in range(bs):
                if i * bs + o < int(sl[b]):
                    kk = k[blk, o] if layout == "NHD" else k[blk, :, o]
                    vv = v[blk, o] if layout == "NHD" else v[blk, :, o]
                    keys.append(kk.double())
                    vals.append(vv.double())
        K_, V_ = torch.stack(keys, 1), torch.stack(vals, 1)  # [Hkv, n, D]
        rep = Hq // Hkv
        K_, V_ = K_.repeat_interleave(rep, 0), V_.repeat_interleave(rep, 0)
        ref = torch.softmax(q[b, 0].double()[:, None, :] @ K_.transpose(1, 2) / D**0.5, -1) @ V_  # [Hq, 1, D]
        torch.testing.assert_close(out[b, 0].double(), ref[:, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_rows_bit_identical_whatever_the_block_size(layout):
    # A row's operations depend only on its query and the cached values, in tiles of 16
    # positions from position 0, not on how the cache is paged: the same logical keys and
    # values in blocks of 8 and 24 (tiles spanning blocks: one lookup per position) and of 16,
    # 32 and 64 (a tile inside one block: one pointer and a stride) give the same bits, and
    # match the float64 reference. Lengths below, at and across tile and block edges; Q = 1
    # and Q = 3 (causal among the new tokens).
    g = torch.Generator().manual_seed(11)
    B, Hq, Hkv, D = 3, 6, 2, 64
    lens = [5, 16, 97]
    keys = [torch.randn(n, Hkv, D, generator=g) * 2 for n in lens]
    values = [torch.randn(n, Hkv, D, generator=g) for n in lens]
    for Q in (1, 3):
        q = torch.randn(B, Q, Hq, D, generator=g)
        outs = {}
        for bs in (8, 16, 24, 32, 64):
            max_blocks = max(-(-n // bs) for n in lens)
            num_blocks = B * max_blocks + 2
            shape = (num_blocks, bs, Hkv, D) if layout == "NHD" else (num_blocks, Hkv, bs, D)
            k = torch.full(shape, float("nan"))  # positions past a sequence's end are never read
            v = torch.full(shape, float("nan"))
            tables = torch.full((B, max_blocks), -1, dtype=torch.int32)
            perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(bs))
            used = 0
            for b, n in enumerate(lens):
                for j in range(-(-n // bs)):
                    blk = int(perm[used])
                    used += 1
                    tables[b, j] = blk
                    lo, hi = j * bs, min(n, (j + 1) * bs)
                    if layout == "NHD":
                        k[blk, : hi - lo] = keys[b][lo:hi]
                        v[blk, : hi - lo] = values[b][lo:hi]
                    else:
                        k[blk, :, : hi - lo] = keys[b][lo:hi].transpose(0, 1)
                        v[blk, :, : hi - lo] = values[b][lo:hi].transpose(0, 1)
            lens_t = torch.tensor(lens, dtype=torch.int32)
            outs[bs] = paged_attention(q, k, v, tables, lens_t, kv_layout=layout)
            if bs == 16:
                ref = sdpa_on_gathered(q, k, v, tables, lens_t, layout, 1.0 / math.sqrt(D))
                torch.testing.assert_close(outs[bs].double(), ref, rtol=1e-5, atol=1e-5)
        for bs, out in outs.items():
            assert torch.equal(out, outs[16]), (Q, bs)


# Long rows (hundreds to thousands of positions, many tiles of 16), against float64 SDPA with one
# and two threads, and bit-identical whatever the threads, B and Q.
LONG_LENS = [63, 64, 65, 128, 129, 300, 1000]


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "Q,Hq,Hkv,D,bs,dtype",
    [
        (1, 9, 3, 64, 16, torch.float32),  # tiles inside blocks (one pointer and a stride)
        (4, 8, 2, 80, 7, torch.float32),  # tiles across blocks, D not a multiple of 16
        (2, 4, 1, 64, 32, torch.bfloat16),  # converted per tile
    ],
)
def test_long_rows_match_sdpa(layout, threads, Q, Hq, Hkv, D, bs, dtype):
    import decodekit

    lens = [max(n, Q) for n in LONG_LENS]
    q, k, v, tables, sl = make_case(31 + Q, len(lens), Q, Hq, Hkv, D, bs, lens, layout, dtype)
    saved = decodekit._threads._get_setting()
    try:
        decodekit.set_num_threads(threads)
        out = paged_attention(q, k, v, tables, sl, kv_layout=layout)
    finally:
        decodekit._threads._restore_setting(saved)
    ref = sdpa_on_gathered(q, k.float(), v.float(), tables, sl, layout, 1 / math.sqrt(D))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_long_rows_bit_identical_whatever_threads_b_and_q():
    # A row inside a 5-token verification, inside a batch, inside a 200-row prefill, and alone,
    # with one thread and with two: the same bits.
    import decodekit

    lens = [700, 65, 5, 129, 2000]
    B, Q, Hq, Hkv, D = len(lens), 5, 9, 3, 64
    q, k, v, tables, sl = make_case(41, B, Q, Hq, Hkv, D, 16, lens)
    saved = decodekit._threads._get_setting()
    outs = {}
    try:
        for threads in (1, 2):
            decodekit.set_num_threads(threads)
            outs[threads] = paged_attention(q, k, v, tables, sl)
            for b in range(B):
                for i in range(Q):
                    one = paged_attention(q[b : b + 1, i : i + 1], k, v, tables[b : b + 1], sl[b : b + 1] - (Q - 1 - i))
                    assert torch.equal(one[0, 0], outs[threads][b, i]), (threads, b, i)
            qb = torch.randn(1, 200, Hq, D, generator=torch.Generator().manual_seed(5))
            qb[0, -1] = q[4, -1]
            wide = paged_attention(qb, k, v, tables[4:5], sl[4:5])
            assert torch.equal(wide[0, -1], outs[threads][4, -1]), threads
    finally:
        decodekit._threads._restore_setting(saved)
    assert torch.equal(outs[1], outs[2])
    ref = sdpa_on_gathered(q, k, v, tables, sl, "NHD", 1 / 8)
    torch.testing.assert_close(outs[2].double(), ref, rtol=1e-5, atol=1e-5)


def test_long_rows_with_a_tree_mask_match_sdpa():
    lens_prefix = [61, 130, 250]
    Q = 20  # trees over several tiles after long prefixes
    B, Hq, Hkv, D = 3, 6, 2, 64
    lens = [p + Q for p in lens_prefix]
    q, k, v, tables, sl = make_case(51, B, Q, Hq, Hkv, D, 16, lens)
    mask = tree_mask_from_parents(random_parents(torch.Generator().manual_seed(3), B, Q))
    out = paged_attention(q, k, v, tables, sl, tree_mask=mask)
    ref = sdpa_with_mask(q, k, v, tables, sl, "NHD", 1 / 8, mask)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
