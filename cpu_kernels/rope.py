"""Rotary position embedding in Numba for the decode glue: torch spends ~10 small ops (each
~5-40 us of dispatch on the 2-core machines) on a step's cos/sin and 3 per rotation, on a few
thousand values; these are one call each. Half-split layout (GPT-NeoX/Llama): value j pairs
with value j + dim / 2."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def rope_cos_sin(positions, inv_freq, scaling):
    """positions: int64 [tokens]; inv_freq: float32 [dim / 2] -> (cos, sin) float32 [tokens,
    dim], each frequency twice (both halves), times `scaling`; sin's first half negated (the
    sign the rotation puts on the swapped halves). Angles in float32, as torch computes them."""
    tokens, half = len(positions), len(inv_freq)
    cos = np.empty((tokens, 2 * half), np.float32)
    sin = np.empty((tokens, 2 * half), np.float32)
    for t in range(tokens):
        position = np.float32(positions[t])
        for j in range(half):
            angle = position * inv_freq[j]
            c, s = np.cos(angle) * scaling, np.sin(angle) * scaling
            cos[t, j], cos[t, half + j] = c, c
            sin[t, j], sin[t, half + j] = -s, s
    return cos, sin


@njit(nogil=True, cache=True, fastmath={"contract"})
def rope_rotate(x, cos, sin):
    """x: float32 [tokens, heads, dim]; cos, sin: float32 [tokens, dim] from `rope_cos_sin`
    -> x * cos + (x with its halves swapped) * sin, a new array."""
    tokens, heads, dim = x.shape
    half = dim // 2
    out = np.empty_like(x)
    for t in range(tokens):
        for h in range(heads):
            for j in range(half):
                out[t, h, j] = x[t, h, j] * cos[t, j] + x[t, h, half + j] * sin[t, j]
            for j in range(half, dim):
                out[t, h, j] = x[t, h, j] * cos[t, j] + x[t, h, j - half] * sin[t, j]
    return out
