"""The expert cache's policies: a pool of N slots seeded with the static hot set; static never
changes, LRU evicts the least recently used, score keeps an expert used often over one used
once; hits are counted per routed pair."""

from __future__ import annotations

import numpy as np
import pytest

from hetero.runtime.expert_cache import ExpertSlots


def steps(*ids: list[int]) -> list[np.ndarray]:
    return [np.array([step]) for step in ids]


def test_the_seed_is_resident_and_static_never_changes():
    slots = ExpertSlots(8, 2, "static", seed=[5, 6, 7])
    assert list(slots.resident) == [5, 6]  # the hottest first, as many as fit
    for ids in steps([0, 1], [0, 1], [5, 0]):
        slots.access(ids)
    assert list(slots.resident) == [5, 6]
    assert (slots.hits, slots.pairs) == (1, 6)


def test_lru_evicts_the_least_recently_used():
    slots = ExpertSlots(8, 2, "lru", seed=[0, 1])
    hits = [slots.access(ids).tolist() for ids in steps([0], [2], [0], [1])]
    assert hits == [[[True]], [[False]], [[True]], [[False]]]
    assert set(slots.resident) == {0, 1}  # 2 took 1's slot, then 1 took 2's


def test_score_keeps_a_frequent_expert_over_a_one_off():
    slots = ExpertSlots(8, 1, "score", seed=[3])
    for ids in steps([3], [3], [3], [4], [3]):
        slots.access(ids)
    assert list(slots.resident) == [3] and slots.hit_rate == pytest.approx(4 / 5)
    lru = ExpertSlots(8, 1, "lru", seed=[3])
    for ids in steps([3], [3], [3], [4], [3]):
        lru.access(ids)
    assert lru.hit_rate == pytest.approx(3 / 5)


def test_a_pool_of_no_slots_hits_nothing_and_an_unknown_policy_is_refused():
    slots = ExpertSlots(4, 0, "lru")
    assert not slots.access(np.array([[0, 1]])).any() and not slots.resident
    with pytest.raises(ValueError, match="unknown expert cache policy"):
        ExpertSlots(4, 1, "random")
