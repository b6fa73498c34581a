"""The speculative family's new registered ops: greedy_verify (a C++ kernel with the semantics of
decodekit.greedy_verify) and the private row check _check_probability_rows."""

from __future__ import annotations

import pytest
import torch

import decodekit

ops = torch.ops.decodekit


def greedy_reference(ids: torch.Tensor, top: torch.Tensor):
    """Plain Python: accept draft j while it is real (the leading ids >= 0) and equals the target's
    token top[j]; then emit top[a] (a = accepted); -1 after."""
    B, K = ids.shape
    out = torch.full((B, K + 1), -1, dtype=torch.int64)
    acc, emit = [], []
    for b in range(B):
        a = 0
        while a < K and int(ids[b, a]) >= 0 and int(ids[b, a]) == int(top[b, a]):
            out[b, a] = ids[b, a]
            a += 1
        out[b, a] = top[b, a]
        acc.append(a)
        emit.append(a + (1 if int(top[b, a]) >= 0 else 0))
    return out, torch.tensor(acc), torch.tensor(emit)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_verify_op_matches_the_python_composition(dtype):
    g = torch.Generator().manual_seed(11)
    B, K, V = 64, 5, 37
    logits = (torch.randn(B, K + 1, V, generator=g) * 3).to(dtype)
    top = logits.float().argmax(-1)
    # Drafts that agree with the target for a random prefix, then disagree or pad.
    ids = top[:, :K].clone()
    cut = torch.randint(0, K + 1, (B,), generator=g)
    for b in range(B):
        if cut[b] < K:
            ids[b, cut[b]] = (ids[b, cut[b]] + 1 + b % 3) % V
            if b % 4 == 0:
                ids[b, cut[b] :] = -1  # padding
    out, acc, emit = ops.greedy_verify(ids, logits, V)
    ref = greedy_reference(ids, top)
    assert torch.equal(out, ref[0]) and torch.equal(acc, ref[1]) and torch.equal(emit, ref[2])
    wrapped = decodekit.greedy_verify(ids, logits)
    assert torch.equal(out, wrapped.output_token_ids) and torch.equal(acc, wrapped.num_accepted)
    assert torch.equal(emit, wrapped.num_emitted)
    # The same from the target ids (an argmax computed elsewhere).
    by_ids = ops.greedy_verify(ids, top, 0)
    assert all(torch.equal(a, b) for a, b in zip(by_ids, (out, acc, emit)))


def test_greedy_verify_ties_padding_vocab_and_invalid_rows():
    ties = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]]])
    assert ops.greedy_verify(torch.tensor([[0]]), ties, 3)[0].tolist() == [[0, 1]]  # lowest index wins
    assert ops.greedy_verify(torch.tensor([[1]]), ties, 3)[0].tolist() == [[0, -1]]
    # vocab_size: columns past it are padding.
    pad = torch.tensor([[[0.0, 1.0, 9.0], [3.0, 1.0, 9.0]]])
    out, acc, emit = ops.greedy_verify(torch.tensor([[1]]), pad, 2)
    assert out.tolist() == [[1, 0]] and acc.tolist() == [1] and emit.tolist() == [2]
    # A target row with a NaN is -1: no draft matches it, nothing is emitted there.
    bad = torch.tensor([[[0.0, 1.0], [float("nan"), 0.0]]])
    out, acc, emit = ops.greedy_verify(torch.tensor([[1]]), bad, 2)
    assert out.tolist() == [[1, -1]] and acc.tolist() == [1] and emit.tolist() == [1]
    # K = 0: the bonus token only.
    out, acc, emit = ops.greedy_verify(torch.zeros(2, 0, dtype=torch.long), torch.tensor([[3], [1]]), 0)
    assert out.tolist() == [[3], [1]] and acc.tolist() == [0, 0] and emit.tolist() == [1, 1]


def test_greedy_verify_non_contiguous_target_and_errors():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 50, 4, generator=g).transpose(1, 2)  # [3, 4, 50], stride(2) != 1
    ids = logits[:, :3].argmax(-1)
    out, acc, _ = ops.greedy_verify(ids, logits, 50)
    assert acc.tolist() == [3, 3, 3] and torch.equal(out[:, :3], ids)
    with pytest.raises(RuntimeError, match="target logits must be"):
        ops.greedy_verify(ids, torch.zeros(3, 3, 5), 5)
    with pytest.raises(RuntimeError, match="draft_token_ids"):
        ops.greedy_verify(ids.float(), logits, 50)
    with pytest.raises(RuntimeError, match="vocab_size"):
        ops.greedy_verify(ids, logits, 51)


def test_greedy_verify_opcheck_and_meta():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 3, 20, generator=g)
    ids = torch.tensor([[1, 2], [-1, -1], [0, 5], [7, -1]])
    torch.library.opcheck(ops.greedy_verify.default, (ids, logits, 20))
    torch.library.opcheck(ops.greedy_verify.default, (ids, logits.argmax(-1), 0))
    out, acc, emit = ops.greedy_verify(ids.to("meta"), logits.to("meta"), 20)
    assert out.shape == (4, 3) and acc.shape == (4,) and emit.shape == (4,) and out.dtype == torch.int64


@pytest.mark.parametrize("V,vs", [(37, 37), (64, 33)])
def test_private_check_probability_rows(V, vs):
    t = torch.rand(3, 4, V) + 0.01
    u = t.clone()
    u[1, 2, 5] = float("nan")
    e = t.clone()
    e[2, 0, :vs] = 0
    for x, need in ((t, True), (u, True), (e, True), (e, False)):
        status = ops._check_probability_rows(x, vs, need)
        assert status.dim() == 0 and status.dtype == torch.int64
        assert int(status) == ops.check_probability_rows(x, vs, need)
    assert [int(ops._check_probability_rows(x, vs, True)) for x in (t, u, e)] == [0, 1, 2]
    torch.library.opcheck(ops._check_probability_rows.default, (u, vs, True))
    meta = ops._check_probability_rows(t.to("meta"), vs, True)
    assert meta.shape == () and meta.dtype == torch.int64
