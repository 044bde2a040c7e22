"""How the tile kernels split a grouped GEMV: pairs of one expert in tiles that share each load
of a weight vector, rows in chunks per thread, and how far ahead to prefetch."""

from typing import NamedTuple

from numba import njit, prange, types

# Pairs of one expert that share a pass over a weight row: per pair the tile keeps an
# accumulator and a block's temporaries in registers, and AVX2 has 16 of them. `tiled_pairs`
# spells out the tiles of 1 to 4.
TOKEN_TILE = 4
CACHE_LINE = 64


class Tiles(NamedTuple):
    """Tuned sizes of one path's kernels. A kernel compiles them in as constants, and Numba's
    on-disk cache checks only the kernel's own file: after changing them, clear the cache
    (cpu_kernels/__pycache__/*.nbi, *.nbc) or set NUMBA_CACHE_DIR to an empty folder."""

    # Rows of one expert a thread runs before the next expert: one long sequential read at a
    # time keeps the hardware prefetchers on it (a row of each of 50 experts in turn defeats
    # them).
    row_chunk: int
    # How far ahead of the multiply-adds the kernels ask for weights (prefetcht0); past a row's
    # end it reaches the chunk's next row.
    prefetch_bytes: int


TILES = {
    # the AVX2 sizes, not tuned yet: on the shared Zen 4-class machine one token reads near the
    # DRAM ceiling on both paths and runs of 512 / 1024 / 2048 bytes of prefetch drowned in
    # the noise of other processes (bench/results/cpu-kernels.md, 2026-12-04)
    "avx512": Tiles(row_chunk=64, prefetch_bytes=1024),
    # On the Zen 3 machines the BF16 GEMV, one token on 2048-wide rows, went from about 0.8 to
    # 0.86-0.92 of the DRAM ceiling with 1024 bytes of prefetch (512 to 2048 do about as well).
    "avx2": Tiles(row_chunk=64, prefetch_bytes=1024),
    "plain": Tiles(row_chunk=64, prefetch_bytes=0),
}


def tile_type(pairs) -> int | None:
    """The tile size of a tuple of 1 to TOKEN_TILE integer pair indices, else None."""
    if isinstance(pairs, types.UniTuple) and isinstance(pairs.dtype, types.Integer):
        return pairs.count if 1 <= pairs.count <= TOKEN_TILE else None
    return None


@njit(inline="always")
def store_tile(out, pairs, col, values):
    """out[pairs[j], col] = values[j] for a tile's pairs."""
    for j in range(len(pairs)):
        out[pairs[j], col] = values[j]


def tiled_pairs(tile_dot):
    """An inlined Numba function (weights, acts, row, order, first, end, n, out, col) that sets
    out[p, col] = W[row] . x[p] for the pairs p = order[first:end], in tiles of up to 4 through
    the intrinsic `tile_dot(weights, acts, row, tile, n)` of a format. Made per format at import
    (a module global, like any other njit function), so the kernels that call it stay cached;
    a dispatcher passed in as an argument would not."""

    @njit(inline="always")
    def pairs(weights, acts, row, order, first, end, n, out, col):
        i = first
        while end - i >= 4:
            tile = (order[i], order[i + 1], order[i + 2], order[i + 3])
            store_tile(out, tile, col, tile_dot(weights, acts, row, tile, n))
            i += 4
        if end - i == 3:
            tile3 = (order[i], order[i + 1], order[i + 2])
            store_tile(out, tile3, col, tile_dot(weights, acts, row, tile3, n))
        elif end - i == 2:
            tile2 = (order[i], order[i + 1])
            store_tile(out, tile2, col, tile_dot(weights, acts, row, tile2, n))
        elif end - i == 1:
            tile1 = (order[i],)
            store_tile(out, tile1, col, tile_dot(weights, acts, row, tile1, n))

    return pairs


@njit(inline="always")
def tiled_rows(pairs, row_chunk, weights, acts, n, rows, order, group_start, group_expert, out):
    """out[p, r] = W[e, r] . x[p] for the pairs p = order[group_start[g]:group_start[g + 1]] of
    expert e = group_expert[g], r < rows, through `pairs` (a `tiled_pairs` function of the
    format and path; n: its blocks per row). Each thread takes chunks of row_chunk rows and
    runs them expert after expert."""
    for c in prange((rows + row_chunk - 1) // row_chunk):
        for g in range(len(group_expert)):
            first, end = group_start[g], group_start[g + 1]
            for r in range(c * row_chunk, min(rows, (c + 1) * row_chunk)):
                row = group_expert[g] * rows + r
                pairs(weights, acts, row, order, first, end, n, out, r)
