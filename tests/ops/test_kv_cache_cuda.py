"""The KV-cache family's CUDA kernels against the CPU kernels and the plain-torch references.

Skipped without a GPU. The kernels copy raw element bytes, so the caches after an append must
be bit-identical on both devices (every dtype, both layouts), positions past the cache and
negative or out-of-pool slots must leave the cache untouched, and the ops must run without a
host synchronisation and inside a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
from common_cuda import capture, cuda, no_sync

import reference as ref

pytestmark = cuda
ops = torch.ops.decodekit
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _paged_case(layout, dtype, NB=7, bs=16, H=3, D=64, N=40, seed=0):
    shape = (NB, bs, H, D) if layout == "NHD" else (NB, H, bs, D)
    k = torch.randn(shape, generator=_g(seed)).to(dtype)
    v = torch.randn(shape, generator=_g(seed + 1)).to(dtype)
    # A strided key (a slice of a wider projection output) and a contiguous value.
    key = torch.randn(N, H, 2 * D, generator=_g(seed + 2)).to(dtype)[:, :, :D]
    value = torch.randn(N, H, D, generator=_g(seed + 3)).to(dtype)
    slots = torch.randperm(NB * bs, generator=_g(seed + 4))[:N]
    slots[3] = -1  # padding
    slots[5] = NB * bs + 3  # outside the pool: skipped
    slots[7] = -100
    return k, v, key, value, slots


def _in_pool(slots, cache, layout):
    """The slots with those outside the pool marked -1 (the reference indexes them; the kernels skip them)."""
    bs = cache.size(1) if layout == "NHD" else cache.size(2)
    return torch.where(slots < cache.size(0) * bs, slots, -1)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_append_equals_cpu_and_reference(layout, dtype):
    k, v, key, value, slots = _paged_case(layout, dtype)
    ck, cv = k.clone(), v.clone()
    ops.append_paged_kv_cache(ck, cv, key, value, slots, layout)
    ek, ev = ref.append_paged_kv_cache(k, v, key, value, _in_pool(slots, k, layout), layout)
    assert torch.equal(ck, ek) and torch.equal(cv, ev)
    gk, gv, dkey, dvalue, dslots = k.cuda(), v.cuda(), key.cuda(), value.cuda(), slots.cuda()
    with no_sync():  # host-to-device copies synchronise: done before
        ops.append_paged_kv_cache(gk, gv, dkey, dvalue, dslots, layout)
    assert torch.equal(gk.cpu(), ck) and torch.equal(gv.cpu(), cv)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_append_fewer_slots_than_rows(layout, dtype):
    # Rows at or past num_slots are never read.
    k, v, key, value, slots = _paged_case(layout, dtype, D=40, seed=10)
    slots = slots[:25]
    ck, cv = k.clone(), v.clone()
    ops.append_paged_kv_cache(ck, cv, key, value, slots, layout)
    gk, gv = k.cuda(), v.cuda()
    ops.append_paged_kv_cache(gk, gv, key.cuda(), value.cuda(), slots.cuda(), layout)
    assert torch.equal(gk.cpu(), ck) and torch.equal(gv.cpu(), cv)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 8, 3])  # 16-byte vectors, narrower ones, and 2-byte elements one by one
def test_contiguous_append_equals_cpu_and_reference(layout, dtype, D):
    B, S, H, T = 5, 12, 2, 4
    shape = (B, S, H, D) if layout == "NHD" else (B, H, S, D)
    k = torch.randn(shape, generator=_g(1)).to(dtype)
    v = torch.randn(shape, generator=_g(2)).to(dtype)
    key = torch.randn(B, T, H, D, generator=_g(3)).to(dtype)
    value = torch.randn(B, T + 1, H, D, generator=_g(4)).to(dtype)[:, :T]  # strided over t
    seq_lens = torch.tensor([0, 3, -1, 10, 12])  # 10: two positions fit; -1 and 12: nothing written
    ck, cv = k.clone(), v.clone()
    ops.append_kv_cache(ck, cv, key, value, seq_lens, layout)
    ek, ev = ref.append_kv_cache(k.clone(), v.clone(), key, value, seq_lens, layout)
    assert torch.equal(ck, ek) and torch.equal(cv, ev)
    gk, gv, dkey, dvalue, dlens = k.cuda(), v.cuda(), key.cuda(), value.cuda(), seq_lens.cuda()
    with no_sync():
        ops.append_kv_cache(gk, gv, dkey, dvalue, dlens, layout)
    assert torch.equal(gk.cpu(), ck) and torch.equal(gv.cpu(), cv)


def test_paged_append_in_a_cuda_graph():
    k, v, key, value, slots = _paged_case("NHD", torch.float32, seed=20)
    gk, gv = torch.zeros_like(k).cuda(), torch.zeros_like(v).cuda()
    dkey, dvalue, dslots = key.cuda(), value.cuda(), slots.cuda()
    graph, _ = capture(lambda: ops.append_paged_kv_cache(gk, gv, dkey, dvalue, dslots, "NHD"))
    # New inputs in the captured buffers, then one replay.
    k2, v2, key2, value2, slots2 = _paged_case("NHD", torch.float32, seed=30)
    gk.copy_(k2), gv.copy_(v2), dkey.copy_(key2), dvalue.copy_(value2), dslots.copy_(slots2)
    graph.replay()
    torch.cuda.synchronize()
    ek, ev = ref.append_paged_kv_cache(k2, v2, key2, value2, _in_pool(slots2, k2, "NHD"), "NHD")
    assert torch.equal(gk.cpu(), ek) and torch.equal(gv.cpu(), ev)


def test_bad_arguments_are_named():
    k = torch.zeros(2, 4, 2, 8, device="cuda")
    key = torch.zeros(3, 2, 8, device="cuda")
    with pytest.raises(RuntimeError, match="kv_layout"):
        ops.append_paged_kv_cache(k, k.clone(), key, key, torch.zeros(3, dtype=torch.long, device="cuda"), "NDH")
    with pytest.raises(RuntimeError, match="slot_mapping is on"):
        ops.append_paged_kv_cache(k, k.clone(), key, key, torch.zeros(3, dtype=torch.long), "NHD")
    with pytest.raises(RuntimeError, match="dtype"):
        ops.append_paged_kv_cache(
            k, k.clone(), key.half(), key.half(), torch.zeros(3, dtype=torch.long, device="cuda"), "NHD"
        )
