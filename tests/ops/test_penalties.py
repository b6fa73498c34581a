"""Tests of apply_penalties (and the penalties in sample_from_logits) against hand-computed
values, tests/reference.py and HF transformers' repetition-penalty processor."""

from __future__ import annotations

import pytest
import torch

import decodekit
import reference as ref


def test_hand_computed_row():
    x = torch.tensor([[1.0, -2.0, 3.0, 4.0]])
    out = decodekit.apply_penalties(
        x, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25, token_ids=[[0, 1, 0]]
    )
    # token 0 (count 2): 1/2 - 0.5*2 - 0.25 = -0.75; token 1 (count 1): -2*2 - 0.5 - 0.25 = -4.75
    assert out.tolist() == [[-0.75, -4.75, 3.0, 4.0]]
    assert torch.equal(x, torch.tensor([[1.0, -2.0, 3.0, 4.0]]))  # input untouched


def test_counts_and_ids_agree_and_padding_ignored():
    g = torch.Generator().manual_seed(40)
    x = torch.randn(4, 300, generator=g) * 3
    ids = torch.randint(-1, 300, (4, 50), generator=g)
    counts = torch.zeros(4, 300, dtype=torch.int64)
    for b in range(4):
        for t in ids[b].tolist():
            if t >= 0:
                counts[b, t] += 1
    kw = dict(repetition_penalty=torch.tensor([1.0, 1.3, 0.8, 2.0]), frequency_penalty=0.3, presence_penalty=-0.2)
    a = decodekit.apply_penalties(x, token_ids=ids, **kw)
    c = decodekit.apply_penalties(x, token_counts=counts, **kw)
    assert torch.equal(a, c)
    for b in range(4):
        expected = ref.apply_penalties(x[b], float(kw["repetition_penalty"][b]), 0.3, -0.2, ids[b].tolist())
        torch.testing.assert_close(a[b].double(), expected, rtol=1e-6, atol=1e-6)


def test_bias_and_masks():
    x = torch.zeros(2, 5)
    out = decodekit.apply_penalties(x, logit_bias=[{1: 2.5}, {4: -1.0, 0: 0.5}])
    assert out.tolist() == [[0, 2.5, 0, 0, 0], [0.5, 0, 0, 0, -1.0]]
    dense = decodekit.apply_penalties(x, logit_bias=torch.arange(10.0).reshape(2, 5))
    assert torch.equal(dense, torch.arange(10.0).reshape(2, 5))
    allowed = decodekit.apply_penalties(x, allowed_token_ids=[2, 3])
    assert torch.isinf(allowed[:, [0, 1, 4]]).all() and (allowed[:, [2, 3]] == 0).all()
    banned = decodekit.apply_penalties(x, banned_token_ids=[[0], [1, 2]])
    assert torch.isinf(banned).nonzero().tolist() == [[0, 0], [1, 1], [1, 2]]
    for s in range(50):  # a banned token is never sampled; an allowed set is respected
        assert decodekit.sample_from_logits(x, 1.0, seed=s, banned_token_ids=[0, 1, 2, 3])[0] == 4
        assert decodekit.sample_from_logits(x, 1.0, seed=s, allowed_token_ids=[[2], [3]]).tolist() == [2, 3]


def test_matches_hf_repetition_penalty_processor():
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(41)
    x = torch.randn(3, 200, generator=g) * 4
    ids = torch.randint(0, 200, (3, 30), generator=g)
    hf = transformers.RepetitionPenaltyLogitsProcessor(penalty=1.7)(ids, x.clone())
    ours = decodekit.apply_penalties(x, repetition_penalty=1.7, token_ids=ids)
    torch.testing.assert_close(ours, hf, rtol=1e-6, atol=1e-6)


def test_penalties_feed_sampling_and_raw_logprobs_ignore_them():
    x = torch.tensor([[5.0, 4.9, 0.0]])
    ids = decodekit.sample_from_logits(x, 0.0, token_ids=[[0]], repetition_penalty=2.0)
    assert ids.item() == 1  # 5 / 2 = 2.5 < 4.9
    out = decodekit.sample_from_logits(
        x, 0.0, token_ids=[[0]], repetition_penalty=2.0, return_logprobs=True, logprobs_mode="raw"
    )
    assert abs(out.logprobs.item() - float(torch.log_softmax(x.double(), -1)[0, 1])) < 1e-6


def test_bad_penalty_arguments():
    x = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="repetition_penalty"):
        decodekit.apply_penalties(x, repetition_penalty=0.0)
    with pytest.raises(ValueError, match="frequency_penalty"):
        decodekit.apply_penalties(x, frequency_penalty=float("nan"))
    with pytest.raises(ValueError, match="token_ids"):
        decodekit.apply_penalties(x, token_ids=[[7], [0]], repetition_penalty=1.2)
    with pytest.raises(ValueError, match="token_ids"):
        decodekit.apply_penalties(x, token_ids=[[1]], repetition_penalty=1.2)
    with pytest.raises(ValueError, match="logit_bias"):
        decodekit.apply_penalties(x, logit_bias={9: 1.0})
    with pytest.raises(ValueError, match="not both"):
        decodekit.apply_penalties(x, allowed_token_ids=[1], banned_token_ids=[2])
    with pytest.raises(TypeError, match="unexpected keyword"):
        decodekit.sample_from_logits(x, 0.0, repetition=1.2)


def test_opcheck_apply_penalties():
    x = torch.randn(2, 20)
    torch.library.opcheck(
        torch.ops.decodekit.apply_penalties.default,
        (
            x,
            None,
            1.2,
            None,
            0.1,
            None,
            0.0,
            torch.tensor([[1, 2, -1], [3, 3, 3]]),
            None,
            None,
            None,
            None,
            None,
            False,
            20,
        ),
    )


def test_trial_regressions():
    x = torch.zeros(3, 5)
    with pytest.raises(TypeError, match="token_ids"):
        decodekit.apply_penalties(x, token_ids=[1, 2, 3], repetition_penalty=1.2)
    with pytest.raises(ValueError, match="bool mask"):
        decodekit.apply_penalties(x, allowed_token_ids=torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="1 dicts for B=3"):
        decodekit.apply_penalties(x, logit_bias=[{}])
    with pytest.raises(ValueError, match="NaN"):
        decodekit.apply_penalties(x, logit_bias=torch.full((3, 5), float("nan")))
    with pytest.raises(ValueError, match="token_counts"):
        decodekit.apply_penalties(x, token_counts=-torch.ones(3, 5, dtype=torch.long), frequency_penalty=1.0)
    with pytest.raises(ValueError, match="top_p_renorm_probs"):
        decodekit.top_p_renorm_probs(torch.ones(2, 3) / 3, 1.1)


def test_hf_adapter_drops_ids_past_the_vocabulary_and_checks_its_settings():
    hf = pytest.importorskip("decodekit.hf")
    sc = torch.zeros(1, 10)
    sc[0, 9] = 2.0
    out = hf.DecodekitPenalties(repetition_penalty=2.0)(torch.tensor([[15]]), sc)
    assert out[0, 9] == 2.0
    for kwargs in (dict(top_p=1.5), dict(top_p=float("nan")), dict(min_p=-1.0), dict(temperature=float("inf"))):
        with pytest.raises(ValueError):
            hf.DecodekitSamplingFilter(**kwargs)
    with pytest.raises(TypeError, match="top_k"):
        hf.DecodekitSamplingFilter(top_k="5")
    with pytest.raises(ValueError, match="repetition_penalty"):
        hf.DecodekitPenalties(repetition_penalty=0.0)


# ------------------------------------------------- new-user trial (2026-12) ----
def test_meta_tensors_with_token_lists_and_masks():
    # Found by a trial: token lists, masks and dict biases on meta logits raised instead of
    # giving the output's shape like every other op.
    x = torch.empty(3, 50, device="meta")
    for kw in (
        dict(token_ids=[[1, 2], [3], []], repetition_penalty=1.2),
        dict(allowed_token_ids=[1, 2, 3]),
        dict(banned_token_ids=[[4], [5], [6]]),
        dict(logit_bias={3: 1.0}),
        dict(token_counts=torch.zeros(3, 50, dtype=torch.int64, device="meta"), presence_penalty=0.5),
    ):
        out = decodekit.apply_penalties(x, **kw)
        assert out.device.type == "meta" and out.shape == (3, 50) and out.dtype == torch.float32, kw


def test_plus_inf_logit_bias_is_rejected_naming_logit_bias():
    # Found by a trial: +inf was documented as allowed but made the row +inf, which no sampler
    # can draw from. It is now an error naming logit_bias; -inf still bans a token.
    x = torch.zeros(2, 8)
    for bias in ({3: float("inf")}, [{1: 0.5}, {2: float("inf")}]):
        with pytest.raises(ValueError, match="logit_bias.*allowed_token_ids"):
            decodekit.apply_penalties(x, logit_bias=bias)
        with pytest.raises(ValueError, match="logit_bias"):
            decodekit.sample_from_logits(x, 1.0, seed=1, logit_bias=bias)
    dense = torch.zeros(2, 8)
    dense[1, 4] = float("inf")
    with pytest.raises(ValueError, match="logit_bias must not contain NaN or \\+inf"):
        decodekit.apply_penalties(x, logit_bias=dense)
    out = decodekit.apply_penalties(x, logit_bias={3: -float("inf"), 5: 2.0})
    assert out[0, 3] == -float("inf") and out[1, 5] == 2.0 and out[0, 0] == 0.0
    # forcing a token: allowed_token_ids
    assert decodekit.sample_from_logits(x, 1.0, seed=torch.tensor([1, 2]), allowed_token_ids=[6]).tolist() == [6, 6]
    with pytest.raises(ValueError, match="logit_bias"):
        decodekit.SamplingParams(logit_bias={3: float("inf")})
