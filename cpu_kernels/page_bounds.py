"""Upper bounds of q.k per KV page for sparse decode attention (Quest), in Numba: read each
page's per-channel key minimum and maximum rows in place from a paged summary store and bound
every query head's score against any key of the page.

The summary stores are head-major [kv_heads, blocks, d] like the cache's own (float32, or
bfloat16 bits as uint16, widened exactly); a sequence names its pages' blocks in `tables`.
Torch's version gathers and widens a copy of both stores per layer: about 4x the bytes, and the
copies, not the arithmetic, were its time."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from cpu_kernels.attention import float32_row


@njit(parallel=True, nogil=True, cache=True, fastmath={"reassoc", "contract"})
def accumulate_page_bounds(q, lo_store, hi_store, tables, page_counts, out):
    """out[s, h, g, p] += sum_i max(q[s, h, g, i] * lo_i, q[s, h, g, i] * hi_i), where lo and hi
    are rows tables[s, p] of lo_store[h] and hi_store[h]: the largest q.k any key between them
    channel by channel can reach. Pages p >= page_counts[s] are left as they are.

    q: float32 [n, kv_heads, groups, d]; lo_store, hi_store: float32 or uint16 (bfloat16 bits)
    [kv_heads, blocks, d]; tables: int64 [n, >= max pages]; page_counts: int64 [n]; out:
    float32 [n, kv_heads, groups, >= max pages]. Accumulating lets a cache of several key parts
    (MLA: the latent and the roped part) add its bounds before the caller takes the maximum
    over a group's heads. Parallel over (sequence, kv head)."""
    n, kv_heads, groups, d = q.shape
    for job in prange(n * kv_heads):
        s, h = job // kv_heads, job % kv_heads
        # max(q lo, q hi) = q+ hi + q- lo (q+ = max(q, 0), q- = min(q, 0)): two FMAs a channel,
        # a plain dot product LLVM vectorises, where the max of two products is three ops
        positive = np.maximum(q[s, h], np.float32(0.0))
        negative = np.minimum(q[s, h], np.float32(0.0))
        lo_row = np.empty(d, np.float32)
        hi_row = np.empty(d, np.float32)
        for p in range(page_counts[s]):
            lo = float32_row(lo_store[h, tables[s, p]], lo_row)
            hi = float32_row(hi_store[h, tables[s, p]], hi_row)
            for g in range(groups):
                total = np.float32(0.0)
                for i in range(d):
                    total += positive[g, i] * hi[i] + negative[g, i] * lo[i]
                out[s, h, g, p] += total
