"""The sampler's filtered distribution equals transformers' logits processors, and its edge
cases (greedy, seeds, invalid values) behave."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from hetero.errors import InvalidRequestError
from hetero.runtime.sampling import Sampler, SamplingParams

VOCAB = 97


def reference_probs(logits, history, p: SamplingParams) -> torch.Tensor:
    scores = logits[None].clone()
    ids = torch.tensor([history])
    if p.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, scores)
    scores = TemperatureLogitsWarper(p.temperature)(ids, scores)
    if p.top_k:
        scores = TopKLogitsWarper(p.top_k)(ids, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(ids, scores)
    if p.min_p:
        scores = MinPLogitsWarper(p.min_p)(ids, scores)
    return torch.softmax(scores[0], dim=-1)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=1.0, top_p=0.8),
        SamplingParams(temperature=0.9, min_p=0.1),
        SamplingParams(temperature=1.0, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
    ],
)
def test_sampling_distribution_matches_transformers(params):
    g = torch.Generator().manual_seed(7)
    for _ in range(5):
        logits = torch.randn(VOCAB, generator=g) * 3
        history = torch.randint(0, VOCAB, (12,), generator=g).tolist()
        ours = Sampler(params).distribution(logits, history[:6], history[6:])
        torch.testing.assert_close(
            ours, reference_probs(logits, history, params), atol=1e-6, rtol=1e-5
        )


def test_temperature_zero_is_argmax_after_penalties():
    logits = torch.zeros(VOCAB)
    logits[3], logits[4] = 2.0, 1.9
    assert Sampler(SamplingParams())(logits, [], []) == 3
    # a repeated token is penalised below its rival
    assert Sampler(SamplingParams(repetition_penalty=1.2))(logits, [3], []) == 4


def test_same_seed_same_draws_and_different_seeds_differ():
    logits = torch.zeros(VOCAB)

    def draws(seed):
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [sampler(logits, [], []) for _ in range(20)]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)


def test_draws_follow_the_distribution():
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0))
    counts = torch.bincount(
        torch.tensor([sampler(logits, [], []) for _ in range(3000)]), minlength=3
    )
    assert torch.allclose(counts / 3000, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


def test_presence_and_frequency_penalties_follow_openai_definition():
    logits = torch.zeros(5)
    sampler = Sampler(SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.25))
    probs = sampler.distribution(logits, [], [1, 1, 2])
    expected = torch.softmax(torch.tensor([0.0, -1.0, -0.75, 0.0, 0.0]), dim=-1)
    torch.testing.assert_close(probs, expected)


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-2),
        dict(min_p=2.0),
        dict(repetition_penalty=0.0),
        dict(presence_penalty=3.0),
        dict(temperature=float("nan")),
    ],
)
def test_invalid_sampling_values_are_refused(bad):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**bad)
