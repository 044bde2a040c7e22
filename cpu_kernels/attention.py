"""Decode attention on the CPU in Numba: one query token per sequence over its history, read in
place from a paged KV store (no gathered copy of the history).

The store is flat rows [slots, kv_heads, d] (what a paged cache's blocks are laid out as); each
sequence names its history's rows in order (`slots`). Torch's version of this step costs a
gather of every sequence's history per layer plus ~10 small ops (each ~5-40 us of dispatch on
the 2-core machines), which outweighs the arithmetic at decode lengths; this is one call."""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, nogil=True, cache=True, fastmath={"reassoc", "contract"})
def paged_decode_attention(q, k_store, v_store, slots, lengths, scale, out):
    """out[s, h] = softmax(scale * q[s, h] . K_s) @ V_s for each sequence s and query head h,
    where K_s, V_s are rows slots[s, :lengths[s]] of the stores at kv head h // (heads /
    kv_heads) (grouped-query attention).

    q: float32 [n, heads, d]; k_store: float32 [rows, kv_heads, d]; v_store: float32 [rows,
    kv_heads, dv]; slots: int64 [n, >= max length]; lengths: int64 [n] (each >= 1); out:
    float32 [n, heads, dv]. Parallel over (sequence, kv head); the softmax subtracts each row's
    maximum score and sums in float32."""
    n, heads, d = q.shape
    kv_heads, dv = k_store.shape[1], v_store.shape[2]
    groups = heads // kv_heads
    for job in prange(n * kv_heads):
        s, h = job // kv_heads, job % kv_heads
        length = lengths[s]
        scores = np.empty((groups, length), np.float32)
        for t in range(length):
            key = k_store[slots[s, t], h]
            for g in range(groups):
                query = q[s, h * groups + g]
                total = np.float32(0.0)
                for i in range(d):
                    total += query[i] * key[i]
                scores[g, t] = total * scale
        for g in range(groups):
            row = scores[g]
            top = row.max()
            norm = np.float32(0.0)
            for t in range(length):
                row[t] = np.exp(row[t] - top)
                norm += row[t]
            inv = np.float32(1.0) / norm
            acc = out[s, h * groups + g]
            acc[:] = 0.0
            for t in range(length):
                weight = row[t] * inv
                value = v_store[slots[s, t], h]
                for i in range(dv):
                    acc[i] += weight * value[i]
