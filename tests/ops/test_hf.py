"""The transformers adapter (decodekit.hf): same kept sets as transformers' own warpers,
and usable in model.generate."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from decodekit import hf  # noqa: E402


def _scores(seed, B=6, V=500):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (lambda: hf.DecodekitTopK(20), lambda: transformers.TopKLogitsWarper(20)),
        (lambda: hf.DecodekitTopP(0.9), lambda: transformers.TopPLogitsWarper(0.9)),
        (lambda: hf.DecodekitMinP(0.1), lambda: transformers.MinPLogitsWarper(0.1)),
        (lambda: hf.DecodekitTemperature(0.7), lambda: transformers.TemperatureLogitsWarper(0.7)),
    ],
)
def test_same_kept_tokens_and_values_as_transformers_warpers(ours, theirs):
    for seed in range(5):
        s = _scores(seed)
        ids = torch.zeros(6, 3, dtype=torch.long)
        a, b = ours()(ids, s.clone()), theirs()(ids, s.clone())
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))
        torch.testing.assert_close(a[torch.isfinite(a)], b[torch.isfinite(b)].float())


def test_chain_matches_sequential_transformers_warpers():
    s = _scores(9)
    ids = torch.zeros(6, 3, dtype=torch.long)
    ours = hf.logits_processor_list(temperature=0.8, top_k=30, top_p=0.8, min_p=0.05)(ids, s.clone())
    theirs = transformers.LogitsProcessorList(
        [
            transformers.TemperatureLogitsWarper(0.8),
            transformers.TopKLogitsWarper(30),
            transformers.TopPLogitsWarper(0.8),
            transformers.MinPLogitsWarper(0.05),
        ]
    )(ids, s.clone())
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))


def test_penalties_match_transformers_repetition_processor():
    s = _scores(10)
    ids = torch.randint(0, 500, (6, 40), generator=torch.Generator().manual_seed(11))
    ours = hf.DecodekitPenalties(repetition_penalty=1.3)(ids, s.clone())
    theirs = transformers.RepetitionPenaltyLogitsProcessor(1.3)(ids, s.clone())
    torch.testing.assert_close(ours, theirs)


def test_model_generate_uses_the_processors():
    cfg = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.tensor([[1, 5, 9, 12]])
    torch.manual_seed(1)
    out = model.generate(
        ids,
        max_new_tokens=8,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        **hf.generate_kwargs(temperature=0.9, top_k=5, repetition_penalty=1.2),
    )
    assert out.sequences.shape == (1, 12)
    for step, scores in enumerate(out.scores):
        finite = torch.isfinite(scores[0])
        assert 1 <= int(finite.sum()) <= 5
        assert finite[out.sequences[0, 4 + step]]  # the sampled token was kept


def test_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        hf.DecodekitSamplingFilter(temperature=0.0)


def test_tiny_temperature_gives_finite_scores_at_the_kept_tokens():
    # Below 1.18e-38 the filter acts at 1.18e-38 (as the kernels do) and, where logits / T
    # would overflow, shifts by the row maximum first: no NaN or +inf reaches generate's softmax.
    for T in (1e-46, 1e-40, 1.1754943508222875e-38):
        out = hf.DecodekitSamplingFilter(T)(None, torch.tensor([[0.0, 0.0, -1.0], [5.0, 5.0, 4.0]]))
        assert torch.isfinite(out[:, :2]).all() and (out[:, 2] == float("-inf")).all()
        assert torch.equal(torch.softmax(out, -1), torch.tensor([[0.5, 0.5, 0.0]] * 2))
