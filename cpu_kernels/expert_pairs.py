"""The (token, expert) pairs of a grouped GEMV: their operands checked, and the pairs grouped by
expert so that each expert's weights are read once for all its pairs."""

from __future__ import annotations

import numpy as np
from numba import njit


def check_pairs(shape: tuple[int, ...], x: np.ndarray, pair_expert: np.ndarray):
    """Shapes of a grouped GEMV's operands (w: [experts, rows, cols]) -> the pair grouping of
    `group_pairs_by_expert`."""
    if len(shape) != 3:
        raise ValueError(f"weights of shape {shape}: a grouped GEMV takes [experts, rows, cols]")
    experts, _, cols = shape
    if x.ndim != 2 or x.shape[1] != cols or pair_expert.shape != (x.shape[0],):
        raise ValueError(
            f"x has shape {x.shape} and pair_expert {pair_expert.shape}; expected "
            f"[pairs, {cols}] and [pairs]"
        )
    if pair_expert.dtype != np.int64:
        pair_expert = pair_expert.astype(np.int64)
    groups = group_pairs_by_expert(pair_expert, experts)
    if groups is None:
        raise ValueError(f"pair_expert holds ids outside 0..{experts - 1}")
    return groups


@njit(nogil=True, cache=True)
def group_pairs_by_expert(pair_expert, experts):
    """Counting sort of the pairs by expert -> (order: pair indices, each expert's together in
    pair order; group_start: int64 [groups + 1] into order; group_expert: int64 [groups]), or
    None where an id is outside 0..experts - 1."""
    counts = np.zeros(experts, np.int64)
    for e in pair_expert:
        if not 0 <= e < experts:
            return None
        counts[e] += 1
    group_expert = np.flatnonzero(counts)
    group_start = np.zeros(len(group_expert) + 1, np.int64)
    group_start[1:] = np.cumsum(counts[group_expert])
    next_slot = np.zeros(experts, np.int64)
    next_slot[group_expert] = group_start[:-1]
    order = np.empty(len(pair_expert), np.int64)
    for p in range(len(pair_expert)):
        order[next_slot[pair_expert[p]]] = p
        next_slot[pair_expert[p]] += 1
    return order, group_start, group_expert.astype(np.int64)
