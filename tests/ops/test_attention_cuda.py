"""paged_attention's CUDA kernel against the CPU kernel and the float64 reference.

Skipped without a GPU. The CUDA kernel performs the CPU kernel's float32 operations in the
CPU's order (csrc/cuda/attention.h: tiles of 16 positions from position 0, 16-lane FMA dot
products and the fixed tree, the same online-softmax update and exponential), so its output
must be the CPU's bits; a query row's result must not depend on the batch or on Q.
"""

from __future__ import annotations

import math

import pytest
import torch
from common_cuda import capture, cuda, no_sync

import reference as ref

pytestmark = cuda
ops = torch.ops.decodekit


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _case(B=4, Q=1, Hq=9, Hkv=3, D=64, bs=16, NB=40, max_blocks=8, layout="NHD", dtype=torch.float32, seed=0):
    shape = (NB, bs, Hkv, D) if layout == "NHD" else (NB, Hkv, bs, D)
    k = torch.randn(shape, generator=_g(seed)).to(dtype)
    v = torch.randn(shape, generator=_g(seed + 1)).to(dtype)
    tables = torch.stack([torch.randperm(NB, generator=_g(seed + 2 + b))[:max_blocks] for b in range(B)])
    lens = torch.randint(Q, max_blocks * bs + 1, (B,), generator=_g(seed + 50))
    q = torch.randn(B, Q, Hq, D, generator=_g(seed + 60))
    return q, k, v, tables, lens, 1.0 / math.sqrt(D), layout


def _both(args):
    cpu = ops.paged_attention(*args)
    dev = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    with no_sync():
        gpu = ops.paged_attention(*dev)
    return cpu, gpu.cpu()


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Q", [1, 4])
def test_same_bits_as_cpu(layout, dtype, Q):
    args = _case(Q=Q, layout=layout, dtype=dtype)
    cpu, gpu = _both(args)
    assert torch.equal(gpu, cpu)
    q, k, v, tables, lens, scale, layout = args
    expected = ref.paged_attention(q, k.float(), v.float(), tables, lens, scale=scale, kv_layout=layout)
    torch.testing.assert_close(gpu.double(), expected.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "Hq,Hkv,D,bs", [(4, 4, 128, 16), (8, 1, 80, 8), (32, 2, 64, 32), (2, 1, 256, 16), (6, 3, 24, 5)]
)
def test_shapes_same_bits_as_cpu(Hq, Hkv, D, bs):
    # MHA, MQA, more than 8 query heads per KV head (several warps' groups), padded head_dim, odd block size.
    args = _case(B=3, Q=3, Hq=Hq, Hkv=Hkv, D=D, bs=bs, NB=30, max_blocks=6, seed=7)
    cpu, gpu = _both(args)
    assert torch.equal(gpu, cpu)


def test_edge_rows_same_as_cpu():
    q, k, v, tables, lens, scale, layout = _case(B=5, Q=2, seed=3)
    tables[1, 2] = -1  # an absent block: its positions contribute nothing
    tables[2, 0] = 10_000  # out of the pool
    lens = torch.tensor([0, 100, 50, -4, 10_000])  # empty, absent block, bad id, negative, past the table
    q[4, 1, 2, 5] = float("nan")  # a NaN query row
    cpu, gpu = _both((q, k, v, tables, lens, scale, layout))
    assert torch.equal(torch.isnan(gpu), torch.isnan(cpu))
    assert torch.equal(torch.nan_to_num(gpu), torch.nan_to_num(cpu))
    assert torch.equal(gpu[0], torch.zeros_like(gpu[0]))


def test_rows_do_not_depend_on_the_batch():
    q, k, v, tables, lens, scale, layout = _case(B=6, Q=2, seed=11)
    d = lambda t: t.cuda()  # noqa: E731
    whole = ops.paged_attention(d(q), d(k), d(v), d(tables), d(lens), scale, layout)
    for b in (0, 3, 5):
        part = ops.paged_attention(d(q[b : b + 1]), d(k), d(v), d(tables[b : b + 1]), d(lens[b : b + 1]), scale, layout)
        assert torch.equal(part, whole[b : b + 1]), b


def test_in_a_cuda_graph():
    q, k, v, tables, lens, scale, layout = _case(B=4, seed=21)
    dq, dk, dv, dt, dl = q.cuda(), k.cuda(), v.cuda(), tables.cuda(), lens.cuda()
    graph, out = capture(lambda: ops.paged_attention(dq, dk, dv, dt, dl, scale, layout))
    q2 = torch.randn(q.shape, generator=_g(99))
    lens2 = (lens - 3).clamp(min=1)
    dq.copy_(q2), dl.copy_(lens2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), ops.paged_attention(q2, k, v, tables, lens2, scale, layout))


def test_bad_arguments_are_named():
    q, k, v, tables, lens, scale, layout = _case(B=2)
    with pytest.raises(RuntimeError, match="kv_layout"):
        ops.paged_attention(q.cuda(), k.cuda(), v.cuda(), tables.cuda(), lens.cuda(), scale, "NDH")
    with pytest.raises(RuntimeError, match="device"):
        ops.paged_attention(q.cuda(), k.cuda(), v.cuda(), tables, lens.cuda(), scale, layout)
    big = torch.zeros(2, 1, 2, 512, device="cuda")
    kb = torch.zeros(4, 16, 2, 512, device="cuda")
    with pytest.raises(RuntimeError, match="head_dim"):
        ops.paged_attention(big, kb, kb, tables[:, :2].cuda(), lens.cuda(), 1.0, "NHD")
