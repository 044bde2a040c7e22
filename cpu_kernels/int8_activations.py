"""Activations quantised to int8 per block for the integer dot products of the quantised GEMVs:
symmetric, one float32 scale per block (32 values for Q8_0 and Q6_K, 256 for Q4_K, like GGUF's
Q8_0 and Q8_K)."""

from __future__ import annotations

import numpy as np
from numba import njit

QK8_0 = 32  # GGUF Q8_0: 32 int8 values and one float16 scale per block


def quantize_q8_activations(x: np.ndarray, block: int = QK8_0) -> tuple[np.ndarray, np.ndarray]:
    """x: float32 [tokens, k] -> (int8 [tokens, k], float32 scales [tokens, k / block])."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    tokens, k = x.shape
    if k % block:
        raise ValueError(f"activation width {k} is not a multiple of the block ({block})")
    x_q = np.empty((tokens, k), np.int8)
    x_scales = np.empty((tokens, k // block), np.float32)
    _quantize_activations_q8(x, x_q, x_scales)
    return x_q, x_scales


@njit(nogil=True, cache=True)
def _quantize_activations_q8(x, x_q, x_scales):
    """x: float32 [tokens, k] -> x_q int8 [tokens, k], x_scales float32 [tokens, k / block]
    with block = k / x_scales.shape[1]."""
    tokens, k = x.shape
    block = k // x_scales.shape[1]
    for t in range(tokens):
        for b in range(k // block):
            amax = np.float32(0.0)
            for j in range(block):
                amax = max(amax, abs(x[t, b * block + j]))
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            x_scales[t, b] = d
            for j in range(block):
                x_q[t, b * block + j] = np.int8(np.rint(x[t, b * block + j] * inv))
