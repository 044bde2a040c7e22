"""Decode attention on the CPU in Numba: one query token per sequence over its history, read in
place from a paged KV store (no gathered copy of the history).

The store is flat rows [slots, kv_heads, d] (what a paged cache's blocks are laid out as); each
sequence names its history's rows in order (`slots`). Torch's version of this step costs a
gather of every sequence's history per layer plus ~10 small ops (each ~5-40 us of dispatch on
the 2-core machines), which outweighs the arithmetic at decode lengths; this is one call."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# exp(x) = 2^n e^r with x = n ln2 + r: ln2 split in two (Cody-Waite) so n ln2 is exact enough
LOG2E = np.float32(1.4426950408889634)
LN2_HI = np.float32(0.693359375)  # 8 significant bits: n * LN2_HI is exact for |n| < 2^15
LN2_LO = np.float32(-2.12194440e-4)


@njit(nogil=True, inline="always", fastmath={"contract"})
def softmax_numerators(row, top, bits, poly):
    """row[t] = exp(row[t] - top) in place for a contiguous float32 row; returns their sum.
    Numba calls expf once per value (scalar); this is two loops LLVM vectorises: e^r by its
    degree-7 Taylor polynomial (|r| <= ln2 / 2: truncation below 6e-9 relative) times 2^n made
    from exponent bits. bits (int32) and poly (float32): scratch of at least len(row).
    Arguments below -87 are taken as -87 (e^-87 ~ 1.6e-38, still a normal float32)."""
    length = len(row)
    for t in range(length):
        x = max(row[t] - top, np.float32(-87.0))
        n = np.floor(x * LOG2E + np.float32(0.5))
        r = (x - n * LN2_HI) - n * LN2_LO
        p = np.float32(1.0 / 5040)
        p = p * r + np.float32(1.0 / 720)
        p = p * r + np.float32(1.0 / 120)
        p = p * r + np.float32(1.0 / 24)
        p = p * r + np.float32(1.0 / 6)
        p = p * r + np.float32(0.5)
        p = p * r + np.float32(1.0)
        p = p * r + np.float32(1.0)
        poly[t] = p
        bits[t] = (np.int32(n) + np.int32(127)) << np.int32(23)
    powers = bits[:length].view(np.float32)
    total = np.float32(0.0)
    for t in range(length):
        value = poly[t] * powers[t]
        row[t] = value
        total += value
    return total


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
    each head's maximum score, takes `softmax_numerators` (another 1.1-1.15x) and sums in
    float32."""
    n, heads, d = q.shape
    kv_heads, dv = k_store.shape[1], v_store.shape[2]
    groups = heads // kv_heads
    for job in prange(n * kv_heads):
        s, h = job // kv_heads, job % kv_heads
        length = lengths[s]
        queries = q[s, h * groups : (h + 1) * groups].copy()
        scores = np.empty((groups, length), np.float32)
        for t in range(length):
            key = k_store[slots[s, t], h]
            for g in range(groups):
                total = np.float32(0.0)
                for i in range(d):
                    total += queries[g, i] * key[i]
                scores[g, t] = total * scale
        bits = np.empty(length, np.int32)
        poly = np.empty(length, np.float32)
        norm = np.empty(groups, np.float32)
        for g in range(groups):
            row = scores[g]
            norm[g] = softmax_numerators(row, row.max(), bits, poly)
        acc = np.zeros((groups, dv), np.float32)
        for t in range(length):
            value = v_store[slots[s, t], h]
            for g in range(groups):
                weight = scores[g, t]
                for i in range(dv):
                    acc[g, i] += weight * value[i]
        for g in range(groups):
            inv = np.float32(1.0) / norm[g]
            for i in range(dv):
                out[s, h * groups + g, i] = acc[g, i] * inv
