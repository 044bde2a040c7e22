"""Multi-head latent attention (DeepSeek MLA) decode on the CPU in Numba, in the absorbed form: the
queries arrive already mapped into the latent space, so every head scores against the cached
latents themselves and sums them, and the per-head keys and values are never built.

The stores are a paged cache's flat rows: latents [rows, rank] and roped keys [rows, rope],
float32 or bfloat16 bits (uint16), read in place through each sequence's `slots`. Mapping the
queries in (q_nope through kv_b's key part) and the result out (through kv_b's value part) are
two batched matmuls the caller runs in torch."""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from cpu_kernels.attention import float32_row, softmax_rows, weighted_rows


@njit(parallel=True, nogil=True, cache=True, fastmath={"reassoc", "contract"})
def paged_latent_attention(
    q_latent, q_rope, latent_store, rope_store, slots, lengths, scale, head_block, out
):
    """out[s, h] = softmax(scale * (q_latent[s, h] . C_s + q_rope[s, h] . R_s)) @ C_s, where
    C_s, R_s are rows slots[s, 0, :lengths[s, 0]] of the latent and rope stores (one kv head:
    the layout `paged_decode_attention` takes, so one page selection feeds both).

    q_latent: float32 [n, heads, rank]; q_rope: float32 [n, heads, rope]; latent_store: float32
    or uint16 (bfloat16 bits) [rows, rank]; rope_store: like it, [rows, rope]; slots: int64
    [n, 1, >= max length]; lengths: int64 [n, 1] (each >= 1); out: float32 [n, heads, rank]. Every
    head shares each cached row (multi-query attention over the latents): a job takes one
    sequence and `head_block` heads, reads each row once for all of them, and keeps their
    outputs in a local [heads, rank] sum; the softmax is `paged_decode_attention`'s."""
    n, heads, rank = q_latent.shape
    rope = q_rope.shape[2]
    blocks = -(-heads // head_block)
    for job in prange(n * blocks):
        s, b = job // blocks, job % blocks
        first, end = b * head_block, min(heads, (b + 1) * head_block)
        rows, length = slots[s, 0], lengths[s, 0]
        count = end - first
        queries = q_latent[s, first:end].copy()
        rope_queries = q_rope[s, first:end].copy()
        latent_row = np.empty(rank, np.float32)
        rope_row = np.empty(rope, np.float32)
        scores = np.empty((count, length), np.float32)
        for t in range(length):
            latent = float32_row(latent_store[rows[t]], latent_row)
            k_rope = float32_row(rope_store[rows[t]], rope_row)
            for g in range(count):
                total = np.float32(0.0)
                for i in range(rank):
                    total += queries[g, i] * latent[i]
                for i in range(rope):
                    total += rope_queries[g, i] * k_rope[i]
                scores[g, t] = total * scale
        norm = softmax_rows(scores, np.empty(length, np.int32), np.empty(length, np.float32))
        weighted_rows(scores, norm, latent_store, rows, latent_row, out[s], first)


def latent_attention_decode(
    q_latent: np.ndarray,
    q_rope: np.ndarray,
    latent_store: np.ndarray,
    rope_store: np.ndarray,
    slots: np.ndarray,
    lengths: np.ndarray,
    scale: float,
) -> np.ndarray:
    """`paged_latent_attention` with its head blocks chosen: each sequence's heads split into
    as many blocks as there are threads left over after one job per sequence, so a lone
    sequence still runs on every thread -> float32 [n, heads, rank]."""
    n, heads, rank = q_latent.shape
    if latent_store.shape[1:] != (rank,) or rope_store.shape[1:] != q_rope.shape[2:]:
        raise ValueError(
            f"latent attention: queries [{n}, {heads}, {rank}] + rope {list(q_rope.shape)} do "
            f"not match stores {list(latent_store.shape)} and {list(rope_store.shape)}"
        )
    splits = max(1, -(-numba.get_num_threads() // n))
    head_block = -(-heads // min(splits, heads))
    out = np.empty((n, heads, rank), np.float32)
    paged_latent_attention(
        q_latent,
        q_rope,
        latent_store,
        rope_store,
        slots,
        lengths,
        np.float32(scale),
        head_block,
        out,
    )
    return out
