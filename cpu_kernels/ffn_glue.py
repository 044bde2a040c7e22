"""The small steps between an expert FFN's GEMVs, in Numba so that a decode step does not go
through numpy and torch temporaries between the kernels: SiLU(gate) * up, and each token's sum
of its experts' outputs weighted by the routing weights."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def silu_mul(gate_up, size):
    """gate_up: float32 [pairs, 2 * size] (gate, then up) -> float32 [pairs, size] of
    silu(gate) * up."""
    pairs = gate_up.shape[0]
    out = np.empty((pairs, size), np.float32)
    for p in range(pairs):
        for j in range(size):
            gate = gate_up[p, j]
            out[p, j] = gate / (np.float32(1.0) + np.exp(-gate)) * gate_up[p, size + j]
    return out


@njit(nogil=True, cache=True)
def weighted_pair_sum(y, weights, top_k):
    """y: float32 [tokens * top_k, width], token-major pairs; weights: float32 [tokens, top_k]
    -> float32 [tokens, width], row t = sum_j weights[t, j] * y[t * top_k + j]."""
    tokens, width = weights.shape[0], y.shape[1]
    out = np.zeros((tokens, width), np.float32)
    for t in range(tokens):
        for j in range(top_k):
            w = weights[t, j]
            for c in range(width):
                out[t, c] += w * y[t * top_k + j, c]
    return out
