"""Next-token choice: penalties, then temperature, top-k, top-p and min-p, then a seeded draw.
Temperature 0 is greedy. The order matches transformers' logits processors."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from hetero.errors import InvalidRequestError

GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # over prompt and completion, as in transformers
    presence_penalty: float = 0.0  # OpenAI-style, over the completion
    frequency_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            # torch takes a seed in [0, 2**64); clients send any integer (negative, or wider)
            self.generator.manual_seed(params.seed % 2**64)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, prompt_ids: list[int], output_ids: list[int]) -> int:
        """logits: [vocab] -> the chosen token id."""
        # below this, logits / temperature overflow to inf: the draw is the argmax anyway
        if self.params.temperature < GREEDY_BELOW_TEMPERATURE:
            scores = self.penalised(logits, prompt_ids, output_ids)
            if scores.device.type == "cpu":  # numpy's argmax: ~15x torch's on a vocab row here
                return int(np.argmax(scores.float().numpy()))
            return int(torch.argmax(scores))
        probs = self.distribution(logits, prompt_ids, output_ids)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def penalised(
        self, logits: torch.Tensor, prompt_ids: list[int], output_ids: list[int]
    ) -> torch.Tensor:
        p = self.params
        penalties = p.repetition_penalty != 1.0 or (
            (p.presence_penalty or p.frequency_penalty) and output_ids
        )
        if not penalties:
            return logits.float()
        # a copy only when it changes: a vocab-sized fresh allocation costs page faults per token
        logits = logits.float().clone()
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long)
            if len(seen):
                scores = logits[seen]
                logits[seen] = torch.where(
                    scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty
                )
        if (p.presence_penalty or p.frequency_penalty) and output_ids:
            counts = Counter(output_ids)
            ids = torch.tensor(list(counts), dtype=torch.long)
            freq = torch.tensor(list(counts.values()), dtype=torch.float32)
            logits[ids] -= p.presence_penalty + p.frequency_penalty * freq
        return logits

    def distribution(
        self, logits: torch.Tensor, prompt_ids: list[int], output_ids: list[int]
    ) -> torch.Tensor:
        """The probabilities a token is drawn from (temperature > 0): [vocab] float32."""
        p = self.params
        logits = self.penalised(logits, prompt_ids, output_ids) / p.temperature
        if 0 < p.top_k < logits.shape[0]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits[logits < kth] = -math.inf
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            sorted_probs = torch.softmax(sorted_logits, dim=-1)
            # drop a token when the mass before it already reaches top_p; keep at least one
            drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= p.top_p
            drop[0] = False
            logits[order[drop]] = -math.inf
        probs = torch.softmax(logits, dim=-1)
        if p.min_p > 0.0:
            probs = torch.where(probs < p.min_p * probs.max(), torch.zeros_like(probs), probs)
            probs = probs / probs.sum()
        return probs
