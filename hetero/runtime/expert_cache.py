"""Which routed experts a layer keeps in its accelerator slots: a pool of `capacity` experts
filled by use. A routed pair whose expert is resident is a hit (it runs on the accelerator);
a miss runs on the CPU and its expert may be admitted, evicting another, by one of two
policies: least recently used, or a score from routing statistics (a decayed count of uses,
so an expert used once does not push out one used every few tokens). The static hot set of a
plan (`hetero profile` + `hetero plan`) seeds the pool."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import numpy as np

POLICIES = ("static", "lru", "score")
SCORE_DECAY = 0.95  # per routing step: a use 14 steps ago counts half as much as one now


class ExpertSlots:
    """One layer's resident experts under `policy` ("static": the seed set never changes)."""

    def __init__(self, num_experts: int, capacity: int, policy: str, seed: Iterable[int] = ()):
        if policy not in POLICIES:
            raise ValueError(f"unknown expert cache policy {policy!r}; choose {POLICIES}")
        self.capacity, self.policy = capacity, policy
        self.scores = np.zeros(num_experts)
        self.resident: OrderedDict[int, None] = OrderedDict()  # least recently used first
        for expert in list(seed)[:capacity]:
            self.resident[expert] = None
            self.scores[expert] = 1.0
        self.hits = self.pairs = 0
        self.admitted: list[tuple[int, int | None]] = []  # last step's (expert, evicted one)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.pairs if self.pairs else 0.0

    def access(self, experts: np.ndarray) -> np.ndarray:
        """One routing step's pairs (expert ids, any shape): which were resident (bool, same
        shape), counted; then the pool learns from the step."""
        hit = np.isin(experts, list(self.resident))
        self.admitted = []
        self.hits += int(hit.sum())
        self.pairs += hit.size
        if self.policy == "static":
            return hit
        used = np.unique(experts)
        self.scores *= SCORE_DECAY
        np.add.at(self.scores, experts.reshape(-1), 1.0)
        for expert in used.tolist():
            if expert in self.resident:
                self.resident.move_to_end(expert)
            else:
                self._admit(expert)
        return hit

    def _admit(self, expert: int) -> None:
        if self.capacity == 0:
            return
        if len(self.resident) < self.capacity:
            self.resident[expert] = None
            self.admitted.append((expert, None))
            return
        if self.policy == "lru":
            victim = next(iter(self.resident))
        else:  # the lowest score goes, and only for a newcomer that scores higher
            victim = min(self.resident, key=lambda e: self.scores[e])
            if self.scores[victim] >= self.scores[expert]:
                return
        del self.resident[victim]
        self.resident[expert] = None
        self.admitted.append((expert, victim))
