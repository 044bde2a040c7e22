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
    float32 [n, heads, dv]. Parallel over (sequence, kv head): each job reads a key and a value
    row once for all the query heads that share it, and keeps their outputs in a local
    [groups, dv] sum (1.6x the speed of per-head passes at 544 tokens); the softmax subtracts
    each head's maximum score and sums in float32."""
    n, heads, d = q.shape
    kv_heads, dv = k_store.shape[1], v_store.shape[2]
    groups = heads // kv_heads
    for job in prange(n * kv_heads):
        s, h = job // kv_heads, job % kv_heads
        length = lengths[s]
        queries = q[s, h * groups : (h + 1) * groups].copy()
        scores = np.empty((length, groups), np.float32)
        for t in range(length):
            key = k_store[slots[s, t], h]
            for g in range(groups):
                total = np.float32(0.0)
                for i in range(d):
                    total += queries[g, i] * key[i]
                scores[t, g] = total * scale
        top = np.full(groups, -np.inf, np.float32)
        for t in range(length):
            for g in range(groups):
                top[g] = max(top[g], scores[t, g])
        norm = np.zeros(groups, np.float32)
        for t in range(length):
            for g in range(groups):
                weight = np.exp(scores[t, g] - top[g])
                scores[t, g] = weight
                norm[g] += weight
        acc = np.zeros((groups, dv), np.float32)
        for t in range(length):
            value = v_store[slots[s, t], h]
            for g in range(groups):
                weight = scores[t, g]
                for i in range(dv):
                    acc[g, i] += weight * value[i]
        for g in range(groups):
            inv = np.float32(1.0) / norm[g]
            for i in range(dv):
                out[s, h * groups + g, i] = acc[g, i] * inv
