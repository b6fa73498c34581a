"""Tests of the KV-cache writes (append_kv_cache, append_paged_kv_cache), the compactions after
tree verification (compact_kv_cache, compact_paged_kv_cache) and the cache managers
(ContiguousKVCache, PagedKVCache). Expected caches are built with plain torch indexing;
comparisons are on the raw bits (NaN payloads included)."""

from __future__ import annotations

import pytest
import torch

import decodekit
from decodekit import ContiguousKVCache, OutOfBlocksError, PagedKVCache, append_kv_cache, append_paged_kv_cache

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("NHD", "HND")


# ---------------------------------------------------------------- helpers ----
def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def random_bits(shape, dtype, g) -> torch.Tensor:
    """Any bit pattern (NaNs with payloads, infinities, subnormals): the ops copy bits."""
    if dtype == torch.float32:
        return torch.randint(-(2**31), 2**31, shape, generator=g, dtype=torch.int64).to(torch.int32).view(dtype)
    return torch.randint(-(2**15), 2**15, shape, generator=g, dtype=torch.int64).to(torch.int16).view(dtype)


def nhd_view(cache: torch.Tensor, layout: str) -> torch.Tensor:
    """The cache seen as [N0, N1 (positions), H, D] whatever its layout (a view)."""
    return cache if layout == "NHD" else cache.transpose(1, 2)


def ref_append(cache, key, seq_lens, layout):
    out = cache.clone()
    B, T = key.shape[:2]
    rows = torch.arange(B)[:, None].expand(B, T)
    pos = seq_lens[:, None] + torch.arange(T)[None, :]
    nhd_view(out, layout)[rows, pos] = key
    return out


def ref_paged(cache, key, slots, layout):
    out = cache.clone()
    bs = nhd_view(cache, layout).shape[1]
    keep = slots >= 0
    s = slots[keep]
    nhd_view(out, layout)[s // bs, s % bs] = key[: len(slots)][keep]
    return out


def caches(shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)


# ------------------------------------------------------- hand-made cases ----
@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_hand_case_padding_slot_skipped(layout):
    # 2 blocks x 4 slots, H=1, D=2 (with H=1 both layouts hold slot s at flat rows 2s, 2s+1).
    shape = (2, 4, 1, 2) if layout == "NHD" else (2, 1, 4, 2)
    k, v = caches(shape)
    key = torch.stack([torch.full((1, 2), 1.0), torch.full((1, 2), 2.0), torch.full((1, 2), 3.0)])
    value = -10 * key
    append_paged_kv_cache(k, v, key, value, torch.tensor([0, 5, -1]), kv_layout=layout)
    k_expected = torch.zeros(8, 2)
    k_expected[0], k_expected[5] = 1.0, 2.0
    assert torch.equal(k.reshape(8, 2), k_expected)
    assert torch.equal(v.reshape(8, 2), -10 * k_expected)
    assert (k.reshape(8, 2)[7] == 0).all() and (v.reshape(8, 2)[7] == 0).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_slot_mapping_shorter_than_key(layout):
    # key [8, H, D]; slot_mapping of length 5: exactly those 5 slots, rows 5-7 ignored.
    nb, bs, H, D = 4, 4, 2, 3
    shape = (nb, bs, H, D) if layout == "NHD" else (nb, H, bs, D)
    k, v = caches(shape)
    key = torch.arange(1, 8 * H * D + 1, dtype=torch.float32).reshape(8, H, D)
    value = key + 1000
    slots = [3, 4, 9, 10, 11]
    append_paged_kv_cache(k, v, key, value, torch.tensor(slots), kv_layout=layout)
    kk, vv = nhd_view(k, layout).reshape(nb * bs, H, D), nhd_view(v, layout).reshape(nb * bs, H, D)
    for i, s in enumerate(slots):
        assert torch.equal(kk[s], key[i]) and torch.equal(vv[s], value[i])
    others = [s for s in range(nb * bs) if s not in slots]
    assert (kk[others] == 0).all() and (vv[others] == 0).all()
    for row in key[5:]:  # the ignored rows are nowhere in the cache
        assert not (kk == row).all(dim=(1, 2)).any()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_contiguous_hand_case(layout):
    # B=2, S_max=5, H=1, D=1: row 0 has 1 cached token, row 1 has 3; append 2 tokens.
    shape = (2, 5, 1, 1) if layout == "NHD" else (2, 1, 5, 1)
    k, v = caches(shape)
    key = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(2, 2, 1, 1)
    append_kv_cache(k, v, key, key * 10, torch.tensor([1, 3]), kv_layout=layout)
    assert k.flatten().tolist() == [0, 1, 2, 0, 0, 0, 0, 0, 3, 4]
    assert v.flatten().tolist() == [0, 10, 20, 0, 0, 0, 0, 0, 30, 40]


def test_seq_lens_forms_and_empty_appends():
    k, v = caches((2, 4, 1, 2))
    key = torch.ones(2, 1, 1, 2)
    append_kv_cache(k, v, key, key, 2)  # one int for every row
    append_kv_cache(k, v, key * 2, key * 2, [0, 1])  # a list
    append_kv_cache(k, v, key * 3, key * 3, torch.tensor([3, 3], dtype=torch.int32))  # int32
    assert k[:, :, 0, 0].tolist() == [[2, 0, 1, 3], [0, 2, 1, 3]]
    before = k.clone()
    append_kv_cache(k, v, torch.ones(2, 0, 1, 2), torch.ones(2, 0, 1, 2), [4, 4])  # T = 0 at S_max: fine
    append_paged_kv_cache(k, v, torch.ones(0, 1, 2), torch.ones(0, 1, 2), torch.empty(0, dtype=torch.int64))
    append_paged_kv_cache(k, v, torch.ones(3, 1, 2), torch.ones(3, 1, 2), [-1, -1])
    assert torch.equal(k, before)


# ------------------------------------------- random shapes vs plain torch ----
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_contiguous_random_against_indexing(dtype, layout):
    g = torch.Generator().manual_seed(1 + DTYPES.index(dtype) + 10 * LAYOUTS.index(layout))
    for _ in range(12):
        B, S, H, D = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 6), (1, 40), (1, 5), (1, 70)))
        T = int(torch.randint(0, S + 1, (1,), generator=g))
        shape = (B, S, H, D) if layout == "NHD" else (B, H, S, D)
        k, v = random_bits(shape, dtype, g), random_bits(shape, dtype, g)
        lens = torch.randint(0, S - T + 1, (B,), generator=g)
        key, value = random_bits((B, T, H, D), dtype, g), random_bits((B, T, H, D), dtype, g)
        ek, ev = ref_append(k, key, lens, layout), ref_append(v, value, lens, layout)
        append_kv_cache(k, v, key, value, lens, kv_layout=layout)
        assert same_bits(k, ek) and same_bits(v, ev)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_random_against_indexing(dtype, layout):
    g = torch.Generator().manual_seed(100 + DTYPES.index(dtype) + 10 * LAYOUTS.index(layout))
    for _ in range(12):
        nb, bs, H, D = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 9), (1, 17), (1, 5), (1, 70)))
        total = nb * bs
        N = int(torch.randint(0, total + 3, (1,), generator=g))
        M = int(torch.randint(0, min(N, total) + 1, (1,), generator=g))
        shape = (nb, bs, H, D) if layout == "NHD" else (nb, H, bs, D)
        k, v = random_bits(shape, dtype, g), random_bits(shape, dtype, g)
        slots = torch.randperm(total, generator=g)[:M]
        slots[torch.rand(M, generator=g) < 0.2] = -1  # padding
        key, value = random_bits((N, H, D), dtype, g), random_bits((N, H, D), dtype, g)
        ek, ev = ref_paged(k, key, slots, layout), ref_paged(v, value, slots, layout)
        append_paged_kv_cache(k, v, key, value, slots, kv_layout=layout)
        assert same_bits(k, ek) and same_bits(v, ev)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_key_and_value(layout):
    # Keys sliced out of a fused QKV projection ([..., 3, H, D]) or with a transposed last
    # dimension (copied by the wrapper) give the same cache as contiguous keys.
    g = torch.Generator().manual_seed(7)
    B, T, S, H, D = 3, 4, 9, 2, 8
    qkv = torch.randn(B, T, 3, H, D, generator=g)
    key, value = qkv[:, :, 1], qkv[:, :, 2]
    assert not key.is_contiguous()
    shape = (B, S, H, D) if layout == "NHD" else (B, H, S, D)
    lens = torch.tensor([0, 2, 5])
    k, v = caches(shape)
    append_kv_cache(k, v, key, value, lens, kv_layout=layout)
    assert torch.equal(k, ref_append(torch.zeros(shape), key.contiguous(), lens, layout))
    assert torch.equal(v, ref_append(torch.zeros(shape), value.contiguous(), lens, layout))
    k2, v2 = caches(shape)
    append_kv_cache(k2, v2, key.transpose(-1, -2).contiguous().transpose(-1, -2), value, lens, kv_layout=layout)
    assert torch.equal(k2, k) and torch.equal(v2, v)
    # paged, from the same strided rows
    pk, pv = caches((4, 4, H, D) if layout == "NHD" else (4, H, 4, D))
    slots = torch.arange(B * T).flip(0)
    append_paged_kv_cache(pk, pv, key.flatten(0, 1), value.flatten(0, 1), slots, kv_layout=layout)
    assert torch.equal(pk, ref_paged(torch.zeros_like(pk), key.reshape(B * T, H, D), slots, layout))
    assert torch.equal(pv, ref_paged(torch.zeros_like(pv), value.reshape(B * T, H, D), slots, layout))


def test_thread_count_does_not_matter():
    g = torch.Generator().manual_seed(8)
    key, value = torch.randn(8, 64, 8, 128, generator=g), torch.randn(8, 64, 8, 128, generator=g)
    lens = torch.randint(0, 64, (8,), generator=g)
    results = []
    old = torch.get_num_threads()
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            k, v = caches((8, 128, 8, 128))
            append_kv_cache(k, v, key, value, lens)
            results.append((k, v))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(k, results[0][0]) and torch.equal(v, results[0][1]) for k, v in results)


# --------------------------------------------- errors leave caches unchanged ----
def check_raises(exc, match, fn, *tensors):
    before = [t.clone() for t in tensors]
    with pytest.raises(exc, match=match):
        fn()
    for t, b in zip(tensors, before):
        assert same_bits(t, b)


def test_contiguous_errors_leave_cache_unchanged():
    k, v = caches((2, 6, 2, 4))
    key = torch.ones(2, 3, 2, 4)
    run = lambda **kw: (
        lambda: append_kv_cache(
            **{**dict(k_cache=k, v_cache=v, key=key, value=key, seq_lens=torch.tensor([0, 0])), **kw}
        )
    )
    check_raises(ValueError, r"S_max=6 in rows \[1\]", run(seq_lens=torch.tensor([3, 4])), k, v)
    check_raises(ValueError, "seq_lens must be >= 0", run(seq_lens=torch.tensor([-1, 0])), k, v)
    check_raises(TypeError, "key must have the cache's dtype", run(key=key.half()), k, v)
    check_raises(TypeError, "value must have the cache's dtype", run(value=key.double()), k, v)
    check_raises(ValueError, "key is on meta", run(key=key.to("meta")), k, v)
    check_raises(ValueError, "seq_lens is on meta", run(seq_lens=torch.zeros(2, dtype=torch.long, device="meta")), k, v)
    check_raises(ValueError, "key has 3 heads but the cache has H=2", run(key=torch.ones(2, 3, 3, 4)), k, v)
    check_raises(ValueError, "key has head_dim 5 but the cache has D=4", run(key=torch.ones(2, 3, 2, 5)), k, v)
    check_raises(ValueError, "value must have the shape of key", run(value=torch.ones(2, 2, 2, 4)), k, v)
    check_raises(
        ValueError,
        "key has 1 rows but the cache has B=2",
        run(key=torch.ones(1, 3, 2, 4), value=torch.ones(1, 3, 2, 4)),
        k,
        v,
    )
    check_raises(ValueError, "key must be 4-D", run(key=torch.ones(2, 2, 4)), k, v)
    check_raises(ValueError, "kv_layout must be", run(kv_layout="NDH"), k, v)
    check_raises(ValueError, "seq_lens must have length B=2", run(seq_lens=torch.tensor([0, 0, 0])), k, v)
    check_raises(TypeError, "seq_lens must be an integer tensor", run(seq_lens=torch.tensor([0.0, 0.0])), k, v)
    check_raises(ValueError, "v_cache must have the shape of k_cache", run(v_cache=torch.zeros(2, 7, 2, 4)), k, v)
    check_raises(TypeError, "v_cache must have the dtype of k_cache", run(v_cache=v.half()), k, v)
    check_raises(
        TypeError,
        "k_cache must be float32, float16 or bfloat16",
        run(k_cache=k.double(), v_cache=v.double(), key=key.double(), value=key.double()),
        k,
        v,
    )
    check_raises(
        ValueError,
        "k_cache must be contiguous",
        run(
            k_cache=k.transpose(1, 2),
            v_cache=v.transpose(1, 2),
            key=torch.ones(2, 3, 6, 2),
            value=torch.ones(2, 3, 6, 2),
        ),
        k,
        v,
    )
    check_raises(TypeError, "key must be a torch.Tensor", run(key=[[1.0]]), k, v)


def test_paged_errors_leave_cache_unchanged():
    k, v = caches((2, 4, 1, 2))
    key = torch.ones(3, 1, 2)
    run = lambda **kw: (
        lambda: append_paged_kv_cache(
            **{**dict(k_cache=k, v_cache=v, key=key, value=key, slot_mapping=torch.tensor([0, 1, 2])), **kw}
        )
    )
    check_raises(
        ValueError,
        r"slots past the cache \(num_blocks \* block_size = 8\) at positions \[2\]",
        run(slot_mapping=torch.tensor([0, 1, 8])),
        k,
        v,
    )
    check_raises(ValueError, "repeats slots", run(slot_mapping=torch.tensor([3, -1, 3])), k, v)
    check_raises(
        ValueError,
        "slot_mapping has 4 entries but key has only 3 rows",
        run(slot_mapping=torch.tensor([0, 1, 2, 3])),
        k,
        v,
    )
    check_raises(TypeError, "key must have the cache's dtype", run(key=key.bfloat16()), k, v)
    check_raises(ValueError, "key is on meta", run(key=key.to("meta")), k, v)
    check_raises(ValueError, "value has 2 heads but the cache has H=1", run(value=torch.ones(3, 2, 2)), k, v)
    check_raises(ValueError, "key must be 3-D", run(key=torch.ones(3, 1, 1, 2)), k, v)
    check_raises(TypeError, "slot_mapping must be an integer tensor", run(slot_mapping=torch.zeros(3)), k, v)
    check_raises(ValueError, "slot_mapping must be 1-D", run(slot_mapping=torch.zeros(3, 1, dtype=torch.long)), k, v)
    check_raises(ValueError, "kv_layout must be", run(kv_layout="nhd"), k, v)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernels_skip_out_of_range_without_validation(layout):
    # validate=False and the raw ops: nothing raises on data, nothing is written out of bounds.
    big = torch.zeros((3, 6, 1, 2) if layout == "NHD" else (3, 1, 6, 2))
    k, v = big[1:2], torch.zeros_like(big[1:2])  # k_cache is the middle third of a bigger buffer
    kp = nhd_view(k, layout)[0, :, 0]  # [6 positions, 2]
    key = torch.arange(1.0, 9.0).reshape(1, 4, 1, 2)
    append_kv_cache(k, v, key, key, torch.tensor([4]), kv_layout=layout, validate=False)  # 4, 5 fit; 6, 7 skipped
    assert kp[4:].tolist() == [[1, 2], [3, 4]] and (kp[:4] == 0).all()
    assert (big[0] == 0).all() and (big[2] == 0).all()
    torch.ops.decodekit.append_kv_cache(k, v, key, key, torch.tensor([-3]), layout)  # negative length: skipped
    torch.ops.decodekit.append_kv_cache(k, v, key, key, torch.tensor([2**62]), layout)
    torch.ops.decodekit.append_kv_cache(k, v, key, key, torch.tensor([6]), layout)
    assert (big[0] == 0).all() and (big[2] == 0).all() and kp[4:].tolist() == [[1, 2], [3, 4]]
    assert (kp[:4] == 0).all()
    flat = big.view(18, 2)
    pk = big.view(9, 2, 1, 2)[3:6] if layout == "NHD" else big.view(9, 1, 2, 2)[3:6]  # 3 blocks x 2 slots
    pv = torch.zeros_like(pk)
    rows = torch.full((4, 1, 2), 7.0)
    append_paged_kv_cache(pk, pv, rows, rows, torch.tensor([6, 2**40, -5, 1]), kv_layout=layout, validate=False)
    assert pk.reshape(6, 2)[1].tolist() == [7, 7] and (pv.reshape(6, 2)[[0, 2, 3, 4, 5]] == 0).all()
    assert (flat[:6] == 0).all() and (flat[12:] == 0).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_contiguous_partial_rows_without_validation_random(layout):
    # Lengths anywhere (negative, near or past S_max): the kernel writes exactly the positions
    # in [0, S_max) of rows with a non-negative length.
    g = torch.Generator().manual_seed(9)
    for _ in range(20):
        B, S, H, D = 4, 7, 2, 3
        T = int(torch.randint(1, 10, (1,), generator=g))
        lens = torch.randint(-3, S + 3, (B,), generator=g)
        shape = (B, S, H, D) if layout == "NHD" else (B, H, S, D)
        k, v = caches(shape)
        key = torch.randn(B, T, H, D, generator=g)
        expected = torch.zeros(B, S, H, D)
        for b in range(B):
            for t in range(T):
                if lens[b] >= 0 and lens[b] + t < S:
                    expected[b, lens[b] + t] = key[b, t]
        append_kv_cache(k, v, key, -key, lens, kv_layout=layout, validate=False)
        assert torch.equal(nhd_view(k, layout), expected) and torch.equal(nhd_view(v, layout), -expected)


def test_cpp_checks_shapes():
    k, v = caches((2, 4, 1, 2))
    with pytest.raises(RuntimeError, match="slot_mapping has 4 entries but key has only 3 rows"):
        torch.ops.decodekit.append_paged_kv_cache(
            k, v, torch.ones(3, 1, 2), torch.ones(3, 1, 2), torch.zeros(4, dtype=torch.long), "NHD"
        )
    with pytest.raises(RuntimeError, match="key must have the cache's dtype"):
        torch.ops.decodekit.append_paged_kv_cache(
            k, v, torch.ones(3, 1, 2).half(), torch.ones(3, 1, 2), torch.zeros(3, dtype=torch.long), "NHD"
        )
    with pytest.raises(RuntimeError, match="seq_lens must have length B=2"):
        torch.ops.decodekit.append_kv_cache(
            k, v, torch.ones(2, 1, 1, 2), torch.ones(2, 1, 1, 2), torch.zeros(3, dtype=torch.long), "NHD"
        )
    with pytest.raises(RuntimeError, match="seq_lens must be a contiguous 1-D int64"):
        torch.ops.decodekit.append_kv_cache(
            k, v, torch.ones(2, 1, 1, 2), torch.ones(2, 1, 1, 2), torch.zeros(2, dtype=torch.int32), "NHD"
        )
    with pytest.raises(RuntimeError, match="kv_layout must be"):
        torch.ops.decodekit.append_kv_cache(
            k, v, torch.ones(2, 1, 1, 2), torch.ones(2, 1, 1, 2), torch.zeros(2, dtype=torch.long), "XYZ"
        )
    with pytest.raises(RuntimeError, match="all tensor arguments must be on one device"):
        torch.ops.decodekit.append_kv_cache(
            k, v, torch.ones(2, 1, 1, 2, device="meta"), torch.ones(2, 1, 1, 2), torch.zeros(2, dtype=torch.long), "NHD"
        )
    assert (k == 0).all() and (v == 0).all()


def test_meta_and_opcheck():
    for layout in LAYOUTS:
        k, v = caches((2, 6, 3, 4) if layout == "NHD" else (2, 3, 6, 4), torch.float16)
        key = torch.randn(2, 2, 3, 4).half()
        torch.library.opcheck(
            torch.ops.decodekit.append_kv_cache.default, (k, v, key, key * 2, torch.tensor([1, 4]), layout)
        )
        pk, pv = caches((3, 4, 3, 4) if layout == "NHD" else (3, 3, 4, 4), torch.bfloat16)
        rows = torch.randn(5, 3, 4).bfloat16()
        torch.library.opcheck(
            torch.ops.decodekit.append_paged_kv_cache.default,
            (pk, pv, rows, rows * 2, torch.tensor([11, -1, 0, 5]), layout),
        )
    mk, mv = torch.empty(2, 6, 3, 4, device="meta"), torch.empty(2, 6, 3, 4, device="meta")
    append_kv_cache(
        mk,
        mv,
        torch.empty(2, 9, 3, 4, device="meta"),
        torch.empty(2, 9, 3, 4, device="meta"),
        torch.zeros(2, dtype=torch.long, device="meta"),
    )  # shapes only on meta
    append_paged_kv_cache(
        mk,
        mv,
        torch.empty(2, 3, 4, device="meta"),
        torch.empty(2, 3, 4, device="meta"),
        torch.zeros(2, dtype=torch.long, device="meta"),
    )


# ------------------------------------------------------ ContiguousKVCache ----
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_contiguous_cache_truncate_then_reappend_is_bit_exact(dtype, layout):
    g = torch.Generator().manual_seed(20)
    L, B, S, H, D = 2, 3, 12, 2, 4
    cache = ContiguousKVCache(L, B, S, H, D, dtype=dtype, kv_layout=layout)
    accepted = [[[] for _ in range(B)] for _ in range(L)]  # per layer, per row: (k, v) rows kept

    def step(T, keep):
        kv = [(random_bits((B, T, H, D), dtype, g), random_bits((B, T, H, D), dtype, g)) for _ in range(L)]
        start = cache.seq_lens.clone()
        for layer, (key, value) in enumerate(kv):
            cache.append(layer, key, value)
        cache.advance(T)
        for b in range(B):
            if keep[b] < T:
                cache.truncate(b, int(start[b]) + keep[b])
            for layer, (key, value) in enumerate(kv):
                accepted[layer][b] += [(key[b, t], value[b, t]) for t in range(keep[b])]

    step(4, [4, 4, 4])  # prompt
    step(3, [1, 3, 0])  # draft tokens, some rejected
    step(2, [2, 1, 2])
    step(1, [1, 1, 1])
    assert cache.seq_lens.tolist() == [len(accepted[0][b]) for b in range(B)] == [8, 9, 7]
    for layer in range(L):
        ek = torch.zeros(B, S, H, D, dtype=dtype)
        ev = torch.zeros(B, S, H, D, dtype=dtype)
        for b in range(B):
            for t, (kr, vr) in enumerate(accepted[layer][b]):
                ek[b, t], ev[b, t] = kr, vr
        if layout == "HND":
            ek, ev = ek.transpose(1, 2).contiguous(), ev.transpose(1, 2).contiguous()
        assert same_bits(cache.k[layer], ek) and same_bits(cache.v[layer], ev)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_contiguous_cache_truncate_zeroes_what_advance_did_not_count(layout):
    """A step appends 2 tokens to both rows but row 1 advances by none: its 2 written positions
    lie past its length; truncate (and compact, which truncates) zeroes them, so the cache holds
    what it would hold had they never been written."""
    cache = ContiguousKVCache(2, 2, 6, 1, 1, kv_layout=layout)
    k = torch.arange(1.0, 5.0).reshape(2, 2, 1, 1)
    for layer in range(2):
        cache.append(layer, k, -k)
    cache.advance([2, 0])
    row1 = cache.k[0][1].flatten().tolist()
    assert row1[:2] == [3.0, 4.0]  # written, past row 1's length 0
    cache.truncate(1, 0)
    for layer in range(2):
        for c in (cache.k[layer], cache.v[layer]):
            assert not c[1].any() and c[0].flatten().abs().tolist()[:2] == [1.0, 2.0]
    # compact: row 0 keeps node 1 of the 2 it cached; row 1 appended 2 more it never counted
    for layer in range(2):
        cache.append(layer, k, -k)
    cache.advance([0, 0])
    cache.compact([0, 0], [[1], []])
    assert cache.seq_lens.tolist() == [1, 0]
    for layer in range(2):
        assert cache.k[layer][0].flatten().tolist() == [2.0, 0, 0, 0, 0, 0]
        assert not cache.k[layer][1].any() and not cache.v[layer][1].any()


def test_contiguous_cache_errors():
    cache = ContiguousKVCache(2, 2, 4, 1, 2)
    key = torch.ones(2, 3, 1, 2)
    cache.append(0, key, key)
    cache.advance(3)
    before = [t.clone() for t in cache.k + cache.v]
    with pytest.raises(ValueError, match="would pass S_max=4"):
        cache.append(1, key, key)
    with pytest.raises(ValueError, match="would pass max_seq_len=4"):
        cache.advance(2)
    with pytest.raises(ValueError, match="new_len must be an int in"):
        cache.truncate(0, 4)
    with pytest.raises(ValueError, match="seq must be a row"):
        cache.truncate(2, 0)
    with pytest.raises(ValueError, match="layer must be an int"):
        cache.append(2, key[:, :1], key[:, :1])
    with pytest.raises(TypeError, match="key must have the cache's dtype"):
        cache.append(0, key[:, :1].half(), key[:, :1].half())
    assert all(torch.equal(a, b) for a, b in zip(cache.k + cache.v, before))
    assert cache.seq_lens.tolist() == [3, 3]
    with pytest.raises(TypeError, match="dtype must be"):
        ContiguousKVCache(1, 1, 4, 1, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="max_seq_len must be a positive int"):
        ContiguousKVCache(1, 1, 0, 1, 2)
    with pytest.raises(ValueError, match="kv_layout must be"):
        ContiguousKVCache(1, 1, 4, 1, 2, kv_layout="BHSD")
    cache.advance([1, 0])  # per-row counts
    assert cache.seq_lens.tolist() == [4, 3]


# ----------------------------------------------------------- PagedKVCache ----
def gather(cache: PagedKVCache, layer: int, seq: int):
    """One sequence's keys and values [len, H, D], read through its block table."""
    n = int(cache.seq_lens([seq])[0])
    table = cache.block_table([seq])[0].long()
    pos = torch.arange(n)
    blk, off = table[pos // cache.block_size], pos % cache.block_size
    return (nhd_view(cache.k[layer], cache.kv_layout)[blk, off], nhd_view(cache.v[layer], cache.kv_layout)[blk, off])


def used_mask(cache: PagedKVCache, seqs) -> torch.Tensor:
    """[num_blocks, block_size] True at the positions held by the sequences' lengths."""
    m = torch.zeros(cache.num_blocks, cache.block_size, dtype=torch.bool)
    for s in seqs:
        n = int(cache.seq_lens([s])[0])
        table = cache.block_table([s])[0].long()
        pos = torch.arange(n)
        m[table[pos // cache.block_size], pos % cache.block_size] = True
    return m


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_cache_truncate_then_reappend_is_bit_exact(dtype, layout):
    L, NB, bs, H, D = 2, 8, 4, 2, 3

    def run(with_rejections: bool):
        cache = PagedKVCache(L, NB, bs, H, D, dtype=dtype, kv_layout=layout)
        a, b = cache.add_sequence(), cache.add_sequence()
        gen = torch.Generator().manual_seed(31)
        kv = lambda *shape: [(random_bits(shape, dtype, gen), random_bits(shape, dtype, gen)) for _ in range(L)]
        # prompts of 6 and 3 tokens, packed [N, H, D]
        step = kv(9, H, D)
        for layer, (key, value) in enumerate(step):
            cache.append(layer, [a, b], key, value, num_tokens=[6, 3])
        cache.advance([a, b], [6, 3])
        # 3 draft tokens each: a keeps 1, b keeps 1
        step = kv(2, 3, H, D)
        if with_rejections:
            for layer, (key, value) in enumerate(step):
                cache.append(layer, [a, b], key, value)
            cache.advance([a, b], 3)
            cache.truncate(a, 7)
            cache.truncate(b, 4)
        else:
            for layer, (key, value) in enumerate(step):
                cache.append(layer, [a, b], key[:, :1].flatten(0, 1), value[:, :1].flatten(0, 1), num_tokens=[1, 1])
            cache.advance([a, b], 1)
        step = kv(2, 1, H, D)
        for layer, (key, value) in enumerate(step):
            cache.append(layer, [a, b], key, value)
        cache.advance([a, b], 1)
        return cache, (a, b)

    real, seqs = run(True)
    ref, _ = run(False)
    assert real.seq_lens(seqs).tolist() == ref.seq_lens(seqs).tolist() == [8, 5]
    assert real.num_free_blocks == ref.num_free_blocks
    for layer in range(L):
        for s in seqs:
            (rk, rv), (ek, ev) = gather(real, layer, s), gather(ref, layer, s)
            assert same_bits(rk, ek) and same_bits(rv, ev)
        for cache in (real, ref):  # every position not held by a sequence is zero
            free = ~used_mask(cache, seqs)
            for c in (cache.k[layer], cache.v[layer]):
                assert (bits(nhd_view(c, layout))[free] == 0).all()
    # With a single sequence the allocation history matches too: the pools are identical.
    caches_ = []
    for reject in (True, False):
        c = PagedKVCache(1, 4, 2, H, D, dtype=dtype, kv_layout=layout)
        s = c.add_sequence()
        gen = torch.Generator().manual_seed(32)
        k5, v5 = random_bits((5, H, D), dtype, gen), random_bits((5, H, D), dtype, gen)
        n = 5 if reject else 3
        c.append(0, s, k5[:n], v5[:n])
        c.advance(s, n)
        c.truncate(s, 3)
        k2, v2 = random_bits((2, H, D), dtype, gen), random_bits((2, H, D), dtype, gen)
        c.append(0, s, k2, v2)
        c.advance(s, 2)
        caches_.append(c)
    assert same_bits(caches_[0].k[0], caches_[1].k[0]) and same_bits(caches_[0].v[0], caches_[1].v[0])
    assert torch.equal(caches_[0].block_table([0]), caches_[1].block_table([0]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_cache_contents_tables_and_allocator(layout):
    g = torch.Generator().manual_seed(33)
    H, D = 2, 4
    cache = PagedKVCache(2, 5, 4, H, D, kv_layout=layout)
    assert cache.num_free_blocks == 5
    a, b, c = cache.add_sequence(), cache.add_sequence(), cache.add_sequence()
    written = {s: [] for s in (a, b, c)}
    for T in (5, 1, 1):
        key = torch.randn(2, T, H, D, generator=g)
        for layer in range(2):
            cache.append(layer, [a, c], key + layer, -key - layer)
        cache.advance([a, c], T)
        for i, s in enumerate((a, c)):
            written[s].append(key[i])
    assert cache.seq_lens([a, b, c]).tolist() == [7, 0, 7]
    table = cache.block_table([a, b, c])
    assert table.dtype == torch.int32
    assert table.tolist() == [[0, 1], [-1, -1], [2, 3]]
    assert torch.equal(cache.block_table([a, b, c], torch.int64), table.long())
    with pytest.raises(TypeError, match="int32 or torch.int64"):
        cache.block_table([a], torch.float32)
    for s in (a, c):
        ks = torch.cat(written[s])
        for layer in range(2):
            gk, gv = gather(cache, layer, s)
            assert torch.equal(gk, ks + layer) and torch.equal(gv, -ks - layer)
    # Out of blocks: one block is free, b needs two -> error, nothing allocated or written.
    before = [t.clone() for t in cache.k + cache.v]
    with pytest.raises(OutOfBlocksError, match="needs 2 new blocks of 4 positions but only 1 of 5 are free"):
        cache.append(0, b, torch.ones(6, H, D), torch.ones(6, H, D))
    assert cache.num_free_blocks == 1 and cache.block_table(b).tolist() == [[]]
    assert all(torch.equal(x, y) for x, y in zip(cache.k + cache.v, before))
    # Freeing a sequence returns its blocks (zeroed), lowest logical block first.
    cache.free(a)
    assert cache.num_free_blocks == 3
    for layer in range(2):
        assert (cache.k[layer][[0, 1]] == 0).all() and (cache.v[layer][[0, 1]] == 0).all()
    cache.append(0, b, torch.ones(6, H, D), torch.ones(6, H, D))
    assert cache.block_table([b]).tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="unknown sequence id"):
        cache.seq_lens([a])
    # truncate frees whole blocks past the new length (c: 7 tokens in blocks [2, 3] -> 4 tokens in [2])
    cache.truncate(c, 4)
    assert cache.block_table([c]).tolist() == [[2]] and cache.num_free_blocks == 2
    cache.truncate(c, 0)
    assert cache.block_table([c]).tolist() == [[]] and cache.num_free_blocks == 3


def test_paged_cache_slot_mapping_reserves_and_matches_append():
    # block_size 4; a holds 3 tokens (block 0), b none. The next 3 tokens of a take slot 3 of
    # block 0 and slots 0-1 of a new block 1; b's 2 tokens go to block 2: slots by hand.
    cache = PagedKVCache(2, 4, 4, 1, 2)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.append(0, a, torch.ones(3, 1, 2), torch.ones(3, 1, 2))
    cache.advance(a, 3)
    slots = cache.slot_mapping([a, b], [3, 2])
    assert slots.dtype == torch.int64 and slots.tolist() == [3, 4, 5, 8, 9]
    assert cache.block_table([a, b]).tolist() == [[0, 1], [2, -1]] and cache.num_free_blocks == 1
    assert cache.slot_mapping([a, b], [3, 2]) is slots  # the same step: the same tensor, nothing allocated
    key = torch.arange(5 * 2, dtype=torch.float32).view(5, 1, 2)
    cache.append(1, [a, b], key, -key, num_tokens=[3, 2])  # writes exactly those slots
    flat = cache.k[1].view(-1, 2)
    assert torch.equal(flat[[3, 4, 5, 8, 9]], key[:, 0])
    cache.advance([a, b], [3, 2])
    assert cache.seq_lens([a, b]).tolist() == [6, 2] and cache.num_free_blocks == 1
    with pytest.raises(OutOfBlocksError):  # a needs 1 more block, b 1: only 1 free, none taken
        cache.slot_mapping([a, b], [3, 3])
    assert cache.num_free_blocks == 1 and cache.block_table([a, b]).tolist() == [[0, 1], [2, -1]]
    with pytest.raises(ValueError, match="must not repeat"):
        cache.slot_mapping([a, a], 1)
    with pytest.raises(ValueError, match=">= 0"):
        cache.slot_mapping([a], -1)


def test_paged_cache_argument_errors():
    cache = PagedKVCache(1, 4, 2, 1, 2)
    s = cache.add_sequence()
    with pytest.raises(ValueError, match="seq_ids must not repeat"):
        cache.append(0, [s, s], torch.ones(2, 1, 1, 2), torch.ones(2, 1, 1, 2))
    with pytest.raises(ValueError, match="needs num_tokens"):
        t = cache.add_sequence()
        cache.append(0, [s, t], torch.ones(2, 1, 2), torch.ones(2, 1, 2))
    with pytest.raises(ValueError, match="num_tokens sum to 3 but key has N=2"):
        cache.append(0, [s, t], torch.ones(2, 1, 2), torch.ones(2, 1, 2), num_tokens=[1, 2])
    with pytest.raises(TypeError, match="key must have the cache's dtype"):
        cache.append(0, s, torch.ones(1, 1, 2).half(), torch.ones(1, 1, 2).half())
    with pytest.raises(ValueError, match="key has 2 heads but the cache has H=1"):
        cache.append(0, s, torch.ones(1, 2, 2), torch.ones(1, 2, 2))
    assert cache.num_free_blocks == 4  # none of the failed calls allocated
    with pytest.raises(ValueError, match="new_len must be an int in"):
        cache.truncate(s, 1)
    with pytest.raises(TypeError, match="dtype must be"):
        PagedKVCache(1, 4, 2, 1, 2, dtype=torch.int8)


def test_exports():
    for name in (
        "append_kv_cache",
        "append_paged_kv_cache",
        "compact_kv_cache",
        "compact_paged_kv_cache",
        "ContiguousKVCache",
        "PagedKVCache",
        "OutOfBlocksError",
    ):
        assert name in decodekit.__all__ and hasattr(decodekit, name)


def test_key_or_value_overlapping_the_cache_raises():
    # Found by a trial: appending a view of the cache into the cache read positions it had
    # already overwritten; torch's own in-place copies refuse overlapping memory, so does this.
    k = torch.randn(2, 8, 1, 4)
    v = torch.randn(2, 8, 1, 4)
    before = k.clone()
    with pytest.raises(ValueError, match="key overlaps k_cache"):
        append_kv_cache(k, v, k[:, 0:3], v[:, 0:3].clone(), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="value overlaps"):
        append_kv_cache(k, v, k[:, 0:3].clone(), k[:, 4:7], torch.tensor([0, 0]))
    assert torch.equal(k, before)
    pk = torch.randn(4, 4, 1, 2)
    pv = torch.randn(4, 4, 1, 2)
    with pytest.raises(ValueError, match="key overlaps k_cache"):
        append_paged_kv_cache(pk, pv, pk.view(16, 1, 2)[:3], pv.view(16, 1, 2)[:3].clone(), torch.tensor([5, 6, 7]))
    # a clone is fine, and lands where the indexing reference puts it
    src = pk.view(16, 1, 2)[:3].clone()
    append_paged_kv_cache(pk, pv, src, src, torch.tensor([5, 6, 7]))
    assert torch.equal(pk.view(16, 1, 2)[5:8], src)


# ------------------------------------------------------------- compaction ----
import reference as ref  # noqa: E402
from decodekit import compact_kv_cache, compact_paged_kv_cache  # noqa: E402


def random_paths(g, B, Q, L):
    """[B, L] accepted nodes: increasing subsets of range(Q) (lengths 0..L), -1 padded."""
    out = torch.full((B, L), -1, dtype=torch.int64)
    for b in range(B):
        n = int(torch.randint(0, min(L, Q) + 1, (1,), generator=g))
        nodes = torch.randperm(Q, generator=g)[:n].sort().values
        out[b, :n] = nodes
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compact_hand_cases(layout):
    # contiguous: row 0's tree at 2..6 keeps nodes 0, 2, 4; row 1's tree at 0..3 keeps node 3
    k = torch.arange(16.0).view(2, 8, 1, 1).expand(2, 8, 2, 3).contiguous()
    k = nhd_view(k, layout).contiguous() if layout == "HND" else k
    v = -k
    compact_kv_cache(k, v, [2, 0], torch.tensor([[0, 2, 4], [3, -1, -1]]), kv_layout=layout)
    first = nhd_view(k, layout)[:, :, 0, 0]
    assert first.tolist() == [[0, 1, 2, 4, 6, 5, 6, 7], [11, 9, 10, 11, 12, 13, 14, 15]]
    assert torch.equal(v, -k)
    # paged: 3 blocks of 4 slots; the sequence's positions 0..7 live in blocks 2, 0
    pk = torch.arange(12.0).view(3, 4, 1, 1)
    pk = pk.transpose(1, 2).contiguous() if layout == "HND" else pk
    pv = pk.clone()
    compact_paged_kv_cache(pk, pv, torch.tensor([[2, 0]]), [3], torch.tensor([[1, 4]]), kv_layout=layout)
    # tree at positions 3..7 = slots 11, 0, 1, 2, 3; node 1 (slot 0) -> position 3 (slot 11),
    # node 4 (slot 3) -> position 4 (slot 0)
    assert pk.flatten().tolist() == [3, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0]
    assert torch.equal(pk, pv)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_compact_random_against_reference(dtype, layout):
    g = torch.Generator().manual_seed(50)
    B, S, H, D, Q, L = 3, 40, 2, 8, 12, 6
    shape = (B, S, H, D) if layout == "NHD" else (B, H, S, D)
    for _ in range(4):
        k, v = random_bits(shape, dtype, g), random_bits(shape, dtype, g)
        start = torch.randint(0, S - Q + 1, (B,), generator=g)
        acc = random_paths(g, B, Q, L)
        ek, ev = ref.compact_kv_cache(k, v, start, acc, layout)
        compact_kv_cache(k, v, start, acc, kv_layout=layout)
        assert same_bits(k, ek) and same_bits(v, ev)
    NB, bs = 20, 4
    shape = (NB, bs, H, D) if layout == "NHD" else (NB, H, bs, D)
    for _ in range(4):
        k, v = random_bits(shape, dtype, g), random_bits(shape, dtype, g)
        tables = torch.randperm(NB, generator=g)[: B * 6].view(B, 6)
        start = torch.randint(0, 6 * bs - Q + 1, (B,), generator=g)
        acc = random_paths(g, B, Q, L).int()
        ek, ev = ref.compact_paged_kv_cache(k, v, tables, start, acc, layout)
        compact_paged_kv_cache(k, v, tables.int(), start, acc, kv_layout=layout)
        assert same_bits(k, ek) and same_bits(v, ev)


def test_compact_thread_count_does_not_matter():
    g = torch.Generator().manual_seed(51)
    B, NB, bs, H, D, Q = 16, 200, 16, 8, 64, 40
    k, v = torch.randn(NB, bs, H, D, generator=g), torch.randn(NB, bs, H, D, generator=g)
    tables = torch.randperm(NB, generator=g)[: B * 12].view(B, 12)
    start = torch.randint(0, 100, (B,), generator=g)
    acc = random_paths(g, B, Q, 10)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            kk, vv = k.clone(), v.clone()
            compact_paged_kv_cache(kk, vv, tables, start, acc)
            outs.append((kk, vv))
    finally:
        torch.set_num_threads(threads)
    ek, ev = ref.compact_paged_kv_cache(k, v, tables, start, acc)
    for kk, vv in outs:
        assert torch.equal(kk, ek) and torch.equal(vv, ev)


def test_compact_errors_leave_cache_unchanged():
    k, v = torch.randn(2, 10, 1, 2), torch.randn(2, 10, 1, 2)
    pk, pv = torch.randn(4, 4, 1, 2), torch.randn(4, 4, 1, 2)
    tables = torch.tensor([[0, 1], [2, 3]])
    before = [t.clone() for t in (k, v, pk, pv)]
    acc_ok = torch.tensor([[0, 2], [1, -1]])
    cases = [
        (ValueError, "increase strictly", torch.tensor([[0, 2], [3, 1]])),
        (ValueError, "increase strictly", torch.tensor([[2, 2], [0, -1]])),
        (ValueError, "after the -1 padding", torch.tensor([[0, -1], [-1, 2]])),
        (ValueError, "values < -1", torch.tensor([[0, -3], [0, -1]])),
    ]
    for exc, match, acc in cases:
        with pytest.raises(exc, match=match):
            compact_kv_cache(k, v, [1, 1], acc)
        with pytest.raises(exc, match=match):
            compact_paged_kv_cache(pk, pv, tables, [1, 1], acc)
    with pytest.raises(ValueError, match="past the cache"):
        compact_kv_cache(k, v, [1, 2], torch.tensor([[0, 2], [8, -1]]))  # position 10 >= S_max
    with pytest.raises(ValueError, match="past its block table"):
        compact_paged_kv_cache(pk, pv, tables, [1, 2], torch.tensor([[0, 2], [6, -1]]))
    with pytest.raises(ValueError, match="start must be >= 0"):
        compact_kv_cache(k, v, [-1, 0], acc_ok)
    with pytest.raises(ValueError, match=r"block_tables\[1, 1\] = 9"):
        compact_paged_kv_cache(pk, pv, torch.tensor([[0, 1], [2, 9]]), [1, 2], torch.tensor([[0, 2], [3, -1]]))
    with pytest.raises(ValueError, match="block 1 is moved in by rows 0 and 1"):
        compact_paged_kv_cache(pk, pv, torch.tensor([[0, 1], [1, 3]]), [1, 0], torch.tensor([[0, 4], [2, -1]]))
    with pytest.raises(ValueError, match=r"accepted_nodes must be \[B=2, L\]"):
        compact_kv_cache(k, v, [1, 1], acc_ok[:1])
    with pytest.raises(TypeError, match="accepted_nodes must be int32 or int64"):
        compact_kv_cache(k, v, [1, 1], acc_ok.float())
    with pytest.raises(TypeError, match="block_tables must be int32 or int64"):
        compact_paged_kv_cache(pk, pv, tables.float(), [1, 1], acc_ok)
    with pytest.raises(ValueError, match="kv_layout"):
        compact_kv_cache(k, v, [1, 1], acc_ok, kv_layout="BHSD")
    assert all(torch.equal(a, b) for a, b in zip((k, v, pk, pv), before))
    # the raw ops check shapes and dtypes too
    op = torch.ops.decodekit
    with pytest.raises(ValueError, match="accepted_nodes must be a contiguous int64"):
        op.compact_kv_cache(k, v, torch.tensor([1, 1]), acc_ok.int(), "NHD")
    with pytest.raises(ValueError, match="start must be a contiguous int64"):
        op.compact_kv_cache(k, v, torch.tensor([1]), acc_ok, "NHD")
    with pytest.raises(ValueError, match="accepted_nodes has 1 rows"):
        op.compact_kv_cache(k, v, torch.tensor([1]), acc_ok[:1], "NHD")
    with pytest.raises(ValueError, match="block_tables must be a contiguous int64"):
        op.compact_paged_kv_cache(pk, pv, tables[:1], torch.tensor([1, 1]), acc_ok, "NHD")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compact_kernels_stay_in_bounds_without_validation(layout):
    # validate=False with bogus data: the path stops at the first non-increasing or
    # out-of-range index, bad block ids are skipped; nothing outside the caches is touched.
    k = torch.arange(40.0).view(1, 40, 1, 1) if layout == "NHD" else torch.arange(40.0).view(1, 1, 40, 1)
    v = k.clone()
    compact_kv_cache(k, v, [30], torch.tensor([[0, 3, 2, 9]]), kv_layout=layout, validate=False)
    assert k.flatten()[30:34].tolist() == [30, 33, 32, 33]  # stopped at node 2 (not past 3)
    compact_kv_cache(k, v, [38], torch.tensor([[1, 2**40]]), kv_layout=layout, validate=False)
    assert k.flatten()[38].item() == 39
    compact_kv_cache(k, v, [2**62], torch.tensor([[1, 2]]), kv_layout=layout, validate=False)
    compact_kv_cache(k, v, [-5], torch.tensor([[1, 2]]), kv_layout=layout, validate=False)
    assert torch.equal(k, v)
    pk = torch.arange(8.0).view(2, 4, 1, 1)
    pk = pk if layout == "NHD" else pk.transpose(1, 2).contiguous()
    pv = pk.clone()
    compact_paged_kv_cache(
        pk, pv, torch.tensor([[0, 7]]), [0], torch.tensor([[1, 5, 6]]), kv_layout=layout, validate=False
    )  # nodes 5, 6 sit in block 7 (not in the pool): skipped
    assert pk.flatten().tolist() == [1, 1, 2, 3, 4, 5, 6, 7]
    compact_paged_kv_cache(
        pk, pv, torch.tensor([[0]]), [0], torch.tensor([[2**61, 2**62]]), kv_layout=layout, validate=False
    )
    assert torch.equal(pk, pv)


def test_compact_meta_and_opcheck():
    g = torch.Generator().manual_seed(52)
    k, v = torch.randn(2, 10, 2, 4, generator=g), torch.randn(2, 10, 2, 4, generator=g)
    acc = torch.tensor([[0, 2, 3], [1, -1, -1]])
    torch.library.opcheck(torch.ops.decodekit.compact_kv_cache.default, (k, v, torch.tensor([1, 4]), acc, "NHD"))
    pk, pv = torch.randn(5, 4, 2, 4, generator=g), torch.randn(5, 4, 2, 4, generator=g)
    tables = torch.tensor([[3, 0, -1], [1, 4, 2]])
    torch.library.opcheck(
        torch.ops.decodekit.compact_paged_kv_cache.default, (pk, pv, tables, torch.tensor([1, 4]), acc, "HND")
    )
    m = lambda t: t.to("meta")  # noqa: E731
    compact_kv_cache(m(k), m(v), m(torch.tensor([1, 4])), m(acc))
    compact_paged_kv_cache(m(pk), m(pv), m(tables), m(torch.tensor([1, 4])), m(acc))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_contiguous_cache_compact_equals_appending_only_the_path(dtype, layout):
    g = torch.Generator().manual_seed(53)
    L, B, S, H, D, Q = 2, 3, 24, 2, 4, 7
    prompt = [(random_bits((B, 5, H, D), dtype, g), random_bits((B, 5, H, D), dtype, g)) for _ in range(L)]
    tree = [(random_bits((B, Q, H, D), dtype, g), random_bits((B, Q, H, D), dtype, g)) for _ in range(L)]
    paths = [[0, 2, 5], [], [0, 1, 2, 3, 4, 5, 6]]
    lens = [5, 3, 4]  # the rows' prompt lengths
    real = ContiguousKVCache(L, B, S, H, D, dtype=dtype, kv_layout=layout)
    for layer, (key, value) in enumerate(prompt):
        real.append(layer, key, value)
    real.advance(5)
    for b in range(B):
        real.truncate(b, lens[b])
    for layer, (key, value) in enumerate(tree):
        real.append(layer, key, value)
    real.advance(Q)
    real.compact(lens, paths)
    # The expected cache: zeros, then each row's prompt and accepted path written by indexing.
    assert real.seq_lens.tolist() == [5 + 3, 3, 4 + 7]
    for layer in range(L):
        for got, src_p, src_t in (
            (real.k[layer], prompt[layer][0], tree[layer][0]),
            (real.v[layer], prompt[layer][1], tree[layer][1]),
        ):
            want = torch.zeros(B, S, H, D, dtype=dtype)
            for b in range(B):
                rows = torch.cat([src_p[b, : lens[b]], src_t[b, paths[b]]])
                want[b, : rows.size(0)] = rows
            assert same_bits(nhd_view(got, layout), want)


def test_contiguous_cache_compact_errors():
    c = ContiguousKVCache(1, 2, 10, 1, 2)
    c.append(0, torch.ones(2, 6, 1, 2), torch.ones(2, 6, 1, 2))
    c.advance(6)
    before = [t.clone() for t in c.k + c.v]
    with pytest.raises(ValueError, match="start = 7 of row 1 is past its length 6"):
        c.compact([2, 7], [[0], []])
    with pytest.raises(ValueError, match="accepted node 4 of row 0 .position 6. was never cached"):
        c.compact([2, 2], [[0, 4], [1]])
    with pytest.raises(ValueError, match="increase strictly"):
        c.compact([2, 2], [[1, 0], [1]])
    with pytest.raises(TypeError, match="2 lists of ints"):
        c.compact([2, 2], [[0.5], [1]])
    assert all(torch.equal(a, b) for a, b in zip(c.k + c.v, before)) and c.seq_lens.tolist() == [6, 6]
    c.compact(2, torch.tensor([[0, 3], [-1, -1]]))
    assert c.seq_lens.tolist() == [4, 2]


def paged_contents(cache: PagedKVCache, seqs):
    """Every layer's keys and values of each sequence, read through its block table."""
    return [[gather(cache, layer, s) for s in seqs] for layer in range(cache.num_layers)]


def assert_same_contents(a, b):
    for la, lb in zip(a, b):
        for (ka, va), (kb, vb) in zip(la, lb):
            assert same_bits(ka, kb) and same_bits(va, vb)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_cache_compact_equals_appending_only_the_path(dtype, layout):
    L, NB, bs, H, D, Q = 2, 16, 4, 2, 3, 9
    g = torch.Generator().manual_seed(54)
    prompts = [6, 8, 3]
    paths = [[0, 1, 4, 8], [], [0, 3, 5, 6, 7]]
    kv_prompt = [
        [(random_bits((n, H, D), dtype, g), random_bits((n, H, D), dtype, g)) for n in prompts] for _ in range(L)
    ]
    kv_tree = [
        [(random_bits((Q, H, D), dtype, g), random_bits((Q, H, D), dtype, g)) for _ in prompts] for _ in range(L)
    ]

    def build(only_path: bool):
        c = PagedKVCache(L, NB, bs, H, D, dtype=dtype, kv_layout=layout)
        ids = [c.add_sequence() for _ in prompts]
        for layer in range(L):
            c.append(
                layer,
                ids,
                torch.cat([k for k, _ in kv_prompt[layer]]),
                torch.cat([v for _, v in kv_prompt[layer]]),
                num_tokens=prompts,
            )
        c.advance(ids, prompts)
        counts = [len(p) if only_path else Q for p in paths]
        for layer in range(L):
            ks = [k[p] if only_path else k for (k, _), p in zip(kv_tree[layer], paths)]
            vs = [v[p] if only_path else v for (_, v), p in zip(kv_tree[layer], paths)]
            c.append(layer, ids, torch.cat(ks), torch.cat(vs), num_tokens=counts)
        c.advance(ids, counts)
        return c, ids

    real, ids = build(False)
    want, _ = build(True)
    free_before = real.num_free_blocks
    real.compact(ids, prompts, paths)
    assert real.seq_lens(ids).tolist() == want.seq_lens(ids).tolist() == [10, 8, 8]
    assert real.num_free_blocks == want.num_free_blocks
    # blocks freed: sequence 0 held ceil(15/4)=4 blocks and now 3, sequence 1 5 -> 2, sequence 2 3 -> 2
    assert real.num_free_blocks - free_before == 1 + 3 + 1
    assert_same_contents(paged_contents(real, ids), paged_contents(want, ids))
    for layer in range(L):  # everything not held by a sequence is zero
        free = ~used_mask(real, ids)
        for c in (real.k[layer], real.v[layer]):
            assert (bits(nhd_view(c, layout))[free] == 0).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_cache_compact_with_forks(layout):
    L, NB, bs, H, D = 2, 24, 4, 2, 3
    dtype = torch.float32
    g = torch.Generator().manual_seed(55)
    rb = lambda n: (random_bits((n, H, D), dtype, g), random_bits((n, H, D), dtype, g))  # noqa: E731
    prompt = [rb(8) for _ in range(L)]
    trees = [[rb(6) for _ in range(L)] for _ in range(2)]
    paths = [[0, 2, 3], [0, 1, 5]]

    # 1. A prompt of 8 (two full blocks, shared after the fork), then each sample appends its
    #    own tree and keeps a path: equal to appending only the paths; the shared prompt
    #    blocks are never copied.
    def build(only_path: bool):
        c = PagedKVCache(L, NB, bs, H, D, dtype=dtype, kv_layout=layout)
        a = c.add_sequence()
        for layer in range(L):
            c.append(layer, a, *prompt[layer])
        c.advance(a, 8)
        b = c.fork(a)
        for s, tree, path in zip((a, b), trees, paths):
            for layer in range(L):
                k, v = tree[layer]
                c.append(layer, s, k[path] if only_path else k, v[path] if only_path else v)
            c.advance(s, len(path) if only_path else 6)
        return c, [a, b]

    real, ids = build(False)
    want, _ = build(True)
    shared = real.block_table(ids)[0, :2].tolist()
    real.compact(ids, [8, 8], paths)
    assert [real.refcount(x) for x in shared] == [2, 2]
    assert real.block_table(ids)[:, :2].tolist() == [shared, shared]
    assert real.num_free_blocks == want.num_free_blocks == NB - 2 - 2
    assert_same_contents(paged_contents(real, ids), paged_contents(want, ids))

    # 2. The tree is appended first (8 + 8 = 4 full blocks), then the sequence is forked: the
    #    tree's blocks are shared. Compacting the original copies the shared blocks it writes
    #    (and the one whose tail the truncation zeroes); the fork keeps the whole tree.
    c = PagedKVCache(L, NB, bs, H, D, dtype=dtype, kv_layout=layout)
    a = c.add_sequence()
    tree8 = [rb(8) for _ in range(L)]
    for layer in range(L):
        c.append(
            layer, a, torch.cat([prompt[layer][0], tree8[layer][0]]), torch.cat([prompt[layer][1], tree8[layer][1]])
        )
    c.advance(a, 16)
    f = c.fork(a)
    fork_before = paged_contents(c, [f])
    table_before = c.block_table([a])[0].tolist()
    assert [c.refcount(x) for x in table_before] == [2, 2, 2, 2]
    path = [0, 1, 2, 5, 6]  # positions 8, 9, 10 stay; 13 -> 11, 14 -> 12; new length 13
    c.compact([a], [8], [path])
    assert c.seq_lens([a, f]).tolist() == [13, 16]
    table = c.block_table([a])[0].tolist()
    # blocks 0, 1 (the prompt) still shared; block 2 (positions 8-11, written) and block 3
    # (positions 12-15: written and its tail zeroed) copied
    assert table[:2] == table_before[:2] and table[2] not in table_before and table[3] not in table_before
    assert [c.refcount(x) for x in table_before] == [2, 2, 1, 1]
    assert c.num_free_blocks == NB - 4 - 2
    assert_same_contents(paged_contents(c, [f]), fork_before)
    want = [
        [(torch.cat([prompt[layer][0], tree8[layer][0][path]]), torch.cat([prompt[layer][1], tree8[layer][1][path]]))]
        for layer in range(L)
    ]
    assert_same_contents(paged_contents(c, [a]), want)
    # the fork's tree survives its original: freeing the fork releases only its own blocks
    c.free(f)
    assert c.num_free_blocks == NB - 4


def test_paged_cache_compact_errors_change_nothing():
    L, NB, bs, H, D = 1, 5, 4, 1, 2
    c = PagedKVCache(L, NB, bs, H, D)
    a = c.add_sequence()
    c.append(0, a, torch.randn(16, H, D), torch.randn(16, H, D))
    c.advance(a, 16)
    f = c.fork(a)  # all four blocks shared; one free block left
    snapshot = ([t.clone() for t in c.k + c.v], c.block_table([a, f]).clone(), c.num_free_blocks)

    def unchanged():
        assert all(torch.equal(x, y) for x, y in zip(c.k + c.v, snapshot[0]))
        assert torch.equal(c.block_table([a, f]), snapshot[1]) and c.num_free_blocks == snapshot[2]
        assert c.seq_lens([a, f]).tolist() == [16, 16]

    with pytest.raises(ValueError, match="was never cached"):
        c.compact([a], [8], [[0, 8]])  # position 16 is past the length
    with pytest.raises(ValueError, match="start = 17 of sequence 0 is past its length 16"):
        c.compact([a], [17], [[]])
    with pytest.raises(ValueError, match="increase strictly"):
        c.compact([a], [4], [[0, 3, 3]])
    with pytest.raises(ValueError, match="after the -1 padding"):
        c.compact([a], torch.tensor([4]), torch.tensor([[0, -1, 3]]))
    with pytest.raises(ValueError, match="unknown sequence id"):
        c.compact([7], [4], [[0]])
    # positions 5..8 written (blocks 1 and 2, both shared), new length 9: 2 copies, 1 free block
    with pytest.raises(OutOfBlocksError, match="copying 2 blocks shared with forks needs 2 free blocks"):
        c.compact([a], [4], [[0, 3, 4, 5, 6]])
    unchanged()
    # nothing moves; only block 2, whose tail the truncation zeroes, is copied (the last free
    # block); block 3 goes back to the fork alone, so nothing is freed
    c.compact([a], [4], [[0, 1, 2, 3, 4]])
    assert c.seq_lens([a, f]).tolist() == [9, 16] and c.num_free_blocks == 0
    assert [c.refcount(int(x)) for x in snapshot[1][1]] == [2, 2, 1, 1]
