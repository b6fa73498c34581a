"""The speculative family's CUDA kernels (chain_speculative_sampling, greedy_verify) against
the CPU kernels.

Skipped without a GPU. Both devices use the same Philox streams (acceptance uniform j of
stream 1, the residual or bonus draw with stream 2 + j) and the same draw (csrc/cuda/
speculative.h): emitted tokens and counts must equal the CPU's. The one documented source of
a difference, the row masses' float64 rounding, moves a token only with a probability far
below 1e-6 per draw, so these sizes must match exactly.
"""

from __future__ import annotations

import pytest
import torch
from common_cuda import capture, cuda, no_sync

pytestmark = cuda
ops = torch.ops.decodekit


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _case(B=32, K=4, V=3000, sharp=2.0, seed=0, one_hot=False):
    gen = _g(seed)
    target = torch.softmax(torch.randn(B, K + 1, V, generator=gen) * sharp, -1)
    # Drafts close to the target (most accepted) for half the rows, far for the rest.
    noise = torch.randn(B, K, V, generator=gen) * sharp
    mix = torch.where(torch.arange(B)[:, None, None] % 2 == 0, 0.2, 1.0)
    draft = torch.softmax(torch.log(target[:, :K]) * (1 - mix) + noise * mix, -1)
    ids = torch.multinomial(draft.reshape(-1, V), 1, generator=gen).reshape(B, K)
    ids[B - 1, 2:] = -1  # padding after the last real draft
    seed_t = torch.randint(-(2**62), 2**62, (B,), generator=gen)
    offset_t = torch.randint(0, 2**40, (B,), generator=gen)
    return (None if one_hot else draft), ids, target, seed_t, offset_t


def _on(device, *ts):
    return tuple(None if t is None else t.to(device) for t in ts)


def _run(draft, ids, target, seed, offset, vocab_size, device=None):
    """The op on the arguments' device (moved to `device` first when given)."""
    if device is not None:
        draft, ids, target, seed, offset = _on(device, draft, ids, target, seed, offset)
    return ops.chain_speculative_sampling(draft, ids, target, seed, 0, offset, 0, vocab_size)


@pytest.mark.parametrize("one_hot", [False, True])
@pytest.mark.parametrize("V,vs", [(3000, 3000), (5000, 4100), (128256, 128256)])
def test_chain_same_tokens_as_cpu(one_hot, V, vs):
    B = 8 if V > 10000 else 32
    draft, ids, target, seed, offset = _case(B=B, V=V, one_hot=one_hot, seed=V)
    ids = ids.clamp(max=vs - 1)
    cpu = _run(draft, ids, target, seed, offset, vs, "cpu")
    dev = _on("cuda", draft, ids, target, seed, offset)
    with no_sync():  # host-to-device copies synchronise: done before
        gpu = _run(*dev, vs)
    for c, g in zip(cpu, gpu):
        assert torch.equal(g.cpu(), c)
    assert 0 < int(cpu[1].sum()) < B * 4  # both acceptances and rejections were exercised


def test_chain_invalid_and_empty_rows_same_as_cpu():
    draft, ids, target, seed, offset = _case(B=6, V=700, seed=5)
    target[1, 0, 3] = float("nan")  # invalid target row at the first draft
    draft[2, 1, 9] = -1.0  # invalid draft row
    target[3, 2] = 0.0  # no target mass at draft 2
    ids[4] = -1  # no drafts: only the bonus token
    target[5, 4] = float("inf")  # invalid bonus row
    ids[5] = target[5, :4].argmax(-1)
    draft[5] = torch.nn.functional.one_hot(ids[5], 700).float()
    target[5, :4] = draft[5]  # every draft accepted
    cpu = _run(draft, ids, target, seed, offset, 700, "cpu")
    gpu = _run(draft, ids, target, seed, offset, 700, "cuda")
    for c, g in zip(cpu, gpu):
        assert torch.equal(g.cpu(), c)


def test_chain_rows_do_not_depend_on_the_batch():
    draft, ids, target, seed, offset = _case(B=12, V=2000, seed=9)
    whole = _run(draft, ids, target, seed, offset, 2000, "cuda")
    for b in (0, 7, 11):
        s = slice(b, b + 1)
        part = _run(draft[s], ids[s], target[s], seed[s], offset[s], 2000, "cuda")
        for w, p in zip(whole, part):
            assert torch.equal(w[s], p), b


def test_chain_in_a_cuda_graph():
    draft, ids, target, seed, offset = _case(B=8, V=1000, seed=13)
    dd, di, dt, ds, do = draft.cuda(), ids.cuda(), target.cuda(), seed.cuda(), offset.cuda()
    graph, out = capture(lambda: ops.chain_speculative_sampling(dd, di, dt, ds, 0, do, 0, 1000))
    draft2, ids2, target2, seed2, offset2 = _case(B=8, V=1000, seed=14)
    dd.copy_(draft2), di.copy_(ids2), dt.copy_(target2), ds.copy_(seed2), do.copy_(offset2)
    graph.replay()
    torch.cuda.synchronize()
    for c, g in zip(_run(draft2, ids2, target2, seed2, offset2, 1000, "cpu"), out):
        assert torch.equal(g.cpu(), c)


@pytest.mark.parametrize("kind", ["ids", "logits", "bf16"])
def test_greedy_verify_same_as_cpu(kind):
    B, K, V = 16, 5, 900
    gen = _g(3)
    logits = torch.randn(B, K + 1, V, generator=gen)
    top = logits.argmax(-1)
    drafts = top[:, :K].clone()
    for b in range(B):  # a mismatch at position b % (K + 1) (none when b % (K + 1) == K)
        if b % (K + 1) < K:
            drafts[b, b % (K + 1)] = (drafts[b, b % (K + 1)] + 1) % V
    drafts[3, 3:] = -1
    logits[5, 0, 7] = float("nan")  # an invalid target row: -1
    target = top if kind == "ids" else (logits.bfloat16() if kind == "bf16" else logits)
    cpu = ops.greedy_verify(drafts, target, V)
    ddrafts, dtarget = drafts.cuda(), target.cuda()
    with no_sync():
        gpu = ops.greedy_verify(ddrafts, dtarget, V)
    for c, g in zip(cpu, gpu):
        assert torch.equal(g.cpu(), c)


def test_greedy_verify_in_a_cuda_graph():
    drafts = torch.tensor([[1, 2, 3], [4, 5, 6]], device="cuda")
    target = torch.tensor([[1, 2, 9, 8], [4, 5, 6, 7]], device="cuda")
    graph, out = capture(lambda: ops.greedy_verify(drafts, target, 10))
    target.copy_(torch.tensor([[0, 2, 3, 4], [4, 5, 6, 7]]))
    graph.replay()
    torch.cuda.synchronize()
    assert out[0].tolist() == [[0, -1, -1, -1], [4, 5, 6, 7]]
    assert out[1].tolist() == [0, 3] and out[2].tolist() == [1, 4]
