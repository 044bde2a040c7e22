"""Q4_K decode GEMV: y[p, r] = sum_k W[e_p, r, k] * x[p, k] on 4-bit weights and int8 activations.

GGUF Q4_K: 256-value super-blocks of 8 sub-blocks of 32, value = d * scale_j * q - dmin * min_j.
`Q4KMatrix` keeps the packed nibbles as stored and unpacks the 6-bit scales and mins to a byte
each (d and dmin to float32): 152 bytes per super-block against GGUF's 144. The nibbles are
unsigned, so they feed `pmaddubsw`'s unsigned operand directly, and `pmaddwd` multiplies by the
sub-block's scale (on AVX-512 VNNI one `vpdpwssd` multiplies and adds, on 64-byte loads); the
min term needs only each activation block's sum. Pairs that share an expert run in tiles of up
to TOKEN_TILE, as in q8_0_gemv.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from cpu_kernels.int8_activations import QK8_0, quantize_q8_activations
from cpu_kernels.kernel_matrix import KernelMatrix, expert_slice
from cpu_kernels.tiling import CACHE_LINE, TILES, tile_type, tiled_pairs, tiled_rows
from cpu_kernels.x86_ir import (
    F32X8,
    I8X32,
    I8X64,
    I32X8,
    I32X16,
    Avx2Ir,
    Avx512Ir,
    element_ptr,
    lane_mask,
    vector_ptr,
)
from hetero.formats.gguf_quants import FORMATS, QK_K, k_scales_mins, split_fields

AVX512, AVX2, PLAIN = TILES["avx512"], TILES["avx2"], TILES["plain"]

SUBS = QK_K // QK8_0  # sub-blocks of 32 per super-block


@dataclass(frozen=True)
class Q4KMatrix(KernelMatrix):
    """Q4_K weights [..., rows, cols] (one matrix, or one per expert): nibbles as stored (a
    32-byte run holds sub-block 2i in its low nibbles and 2i+1 in its high ones), the 6-bit
    sub-block scales and mins unpacked, and each super-block's d and dmin."""

    nibbles: np.ndarray  # uint8 [..., rows, cols / 2]
    scales: np.ndarray  # uint8 [..., rows, cols / 32], 0..63
    mins: np.ndarray  # uint8 [..., rows, cols / 32], 0..63
    d: np.ndarray  # float32 [..., rows, cols / 256]
    dmin: np.ndarray  # float32 [..., rows, cols / 256]

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.nibbles.shape[:-1], self.nibbles.shape[-1] * 2)

    @property
    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.nibbles, self.scales, self.mins, self.d, self.dmin

    @staticmethod
    def activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return q4_k_activations(x)

    @classmethod
    def from_blocks(cls, blocks: np.ndarray) -> Q4KMatrix:
        """blocks: uint8 [..., rows, cols / 256 * 144], GGUF Q4_K as stored (a raw tensor)."""
        lead, fmt = blocks.shape[:-1], FORMATS[T.Q4_K]
        f = split_fields(np.ascontiguousarray(blocks).reshape(-1, fmt.type_size), fmt)
        sc, mn = k_scales_mins(f["scales"])

        def per_row(a: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(a.reshape(*lead, -1))

        return cls(
            per_row(f["qs"]),
            per_row(sc),
            per_row(mn),
            per_row(f["d"].copy().view(np.float16).astype(np.float32)),
            per_row(f["dmin"].copy().view(np.float16).astype(np.float32)),
        )

    def dequantize(self, index: int | None = None) -> np.ndarray:
        """float32 [rows, cols] of one expert (`index`) or of a 2-D matrix (None); bit for bit
        `gguf.quants.dequantize` of the source blocks (the same float32 operations)."""
        nibbles, sc, mn, d, dmin = (expert_slice(a, index) for a in self.arrays)
        out = np.empty((nibbles.shape[0], nibbles.shape[1] * 2), np.float32)
        _dequantize_q4_k(nibbles, sc, mn, d, dmin, out)
        return out


@njit(parallel=True, nogil=True, cache=True)
def _dequantize_q4_k(nibbles, sc, mn, d, dmin, out):
    """`Q4KMatrix.dequantize` of one [rows, cols] matrix into out (float32, same operations as
    gguf.quants: (d * scale) * q - (dmin * min)); parallel over rows."""
    for r in prange(nibbles.shape[0]):
        for s in range(sc.shape[1]):
            scale = d[r, s // SUBS] * np.float32(sc[r, s])
            offset = dmin[r, s // SUBS] * np.float32(mn[r, s])
            run, shift = (s // 2) * QK8_0, 4 * (s % 2)
            for j in range(QK8_0):
                q = (np.int32(nibbles[r, run + j]) >> shift) & 15
                out[r, s * QK8_0 + j] = scale * np.float32(q) - offset


class _Q4KOperands:
    """LLVM IR pointers to a Q4_K tile's operands (Numba arguments of `_q4k_tile_dot_*`): the
    row's nibbles as vectors of `lanes` bytes, its scales and mins as 8 bytes per super-block,
    d and dmin; per pair its activations as vectors of `lanes` bytes, their super-block scales,
    their 32-block sums as 8 floats per super-block, and a float32x8 accumulator."""

    def __init__(self, context, builder, signature, args, lanes: int):
        (q_t, sc_t, mn_t, d_t, dmin_t), (x_t, dx_t, xs_t) = signature.args[:2]
        q, sc, mn, d, dmin = cgutils.unpack_tuple(builder, args[0])
        x, dx, xs = cgutils.unpack_tuple(builder, args[1])
        row, pair_ids, self.nsuper = args[2], cgutils.unpack_tuple(builder, args[3]), args[4]
        i8x8 = ir.VectorType(ir.IntType(8), SUBS)
        nsuper = self.nsuper
        subs = builder.mul(nsuper, nsuper.type(SUBS))
        k = builder.mul(nsuper, nsuper.type(QK_K))
        row_bytes = builder.mul(nsuper, nsuper.type(QK_K // 2))
        self.q = vector_ptr(builder, context, q_t, q, builder.mul(row, row_bytes), lanes)
        self.sc, self.mn = (
            builder.bitcast(
                element_ptr(builder, context, t, a, builder.mul(row, subs)), i8x8.as_pointer()
            )
            for t, a in ((sc_t, sc), (mn_t, mn))
        )
        self.d = element_ptr(builder, context, d_t, d, builder.mul(row, nsuper))
        self.dmin = element_ptr(builder, context, dmin_t, dmin, builder.mul(row, nsuper))
        self.tokens = [
            (
                vector_ptr(builder, context, x_t, x, builder.mul(p, k), lanes),
                element_ptr(builder, context, dx_t, dx, builder.mul(p, nsuper)),
                builder.bitcast(
                    element_ptr(builder, context, xs_t, xs, builder.mul(p, subs)),
                    F32X8.as_pointer(),
                ),
                cgutils.alloca_once_value(builder, ir.Constant(F32X8, None)),
            )
            for p in pair_ids
        ]

    def min_terms(self, builder, simd, s):
        """float32x8: -dmin * min of super-block s's 8 sub-blocks."""
        mins = builder.uitofp(builder.load(builder.gep(self.mn, [s]), align=1), F32X8)
        neg_dmin = builder.fneg(builder.load(builder.gep(self.dmin, [s])))
        return builder.fmul(mins, simd.splat(neg_dmin))

    def end_superblock(self, builder, simd, s, int_sums, min_terms):
        """Each pair's int32x8 sums of super-block s to float, times d * the activation scale,
        plus the min terms times the activation block sums, into its accumulator."""
        d_w = builder.load(builder.gep(self.d, [s]))
        for (_, dx_ptr, xs_ptr, acc), int_sum in zip(self.tokens, int_sums, strict=True):
            scale = simd.splat(builder.fmul(d_w, builder.load(builder.gep(dx_ptr, [s]))))
            total = simd.fma(builder.sitofp(int_sum, F32X8), scale, builder.load(acc))
            block_sums = builder.load(builder.gep(xs_ptr, [s]), align=4)
            builder.store(simd.fma(min_terms, block_sums, total), acc)

    def results(self, builder, simd):
        return [simd.horizontal_sum(builder.load(acc)) for *_, acc in self.tokens]


@intrinsic
def _q4k_tile_dot_avx2(typingctx, weights, acts, row, pairs, superblocks):
    """(W[row] . x[p] for p in pairs): weights = Q4KMatrix.arrays and acts = q4_k_activations,
    flat, `superblocks` 256-value super-blocks per row; pairs: a tuple of 1 to TOKEN_TILE
    activation rows -> a tuple of float32.

    Each 32-byte nibble run is loaded and split once for the whole tile. Per sub-block and
    pair: pmaddubsw(nibbles, x) pairs (at most 2 * 15 * 127, no saturation), pmaddwd by the
    6-bit scale, added to the super-block's int32 sums (at most 8 * 8 * 15 * 127 * 63 per
    lane, far from overflow): the activations have one scale per super-block, as llama.cpp's
    Q8_K, so the sub-blocks need no float work. Per super-block: the sums to float times
    d * the activation scale, minus dmin * mins * activation block sums."""
    tile = tile_type(pairs)
    if tile is None:
        return None
    sig = types.UniTuple(types.float32, tile)(weights, acts, types.intp, pairs, types.intp)

    def codegen(context, builder, signature, args):
        ops = _Q4KOperands(context, builder, signature, args, 32)
        avx2, nsuper, q_ptr = Avx2Ir(builder), ops.nsuper, ops.q
        with cgutils.for_range(builder, nsuper) as loop:
            s = loop.index
            here = builder.gep(q_ptr, [builder.mul(s, s.type(SUBS // 2))])
            for line in range(0, QK_K // 2, CACHE_LINE):  # a super-block's nibbles
                avx2.prefetch(here, s.type(AVX2.prefetch_bytes + line))
            # the 8 scale bytes in both 128-bit halves, for vpshufb to widen one at a time
            sc = builder.load(builder.gep(ops.sc, [s]), align=1)
            sc_table = builder.shuffle_vector(sc, sc, lane_mask(list(range(SUBS)) * 4))
            min_terms = ops.min_terms(builder, avx2, s)
            int_sums = [ir.Constant(I32X8, None)] * tile
            for run in range(SUBS // 2):
                packed_idx = builder.add(builder.mul(s, s.type(SUBS // 2)), s.type(run))
                packed = builder.load(builder.gep(q_ptr, [packed_idx]), align=1)
                halves = (
                    builder.and_(packed, ir.Constant(I8X32, [0x0F] * 32)),
                    builder.lshr(packed, ir.Constant(I8X32, [4] * 32)),
                )
                for half, nibbles in enumerate(halves):
                    j = 2 * run + half
                    scale = avx2.widen_byte(sc_table, j)
                    sub = builder.add(builder.mul(s, s.type(SUBS)), s.type(j))
                    for t, (x_ptr, _, _, _) in enumerate(ops.tokens):
                        xv = builder.load(builder.gep(x_ptr, [sub]), align=1)
                        dot = avx2.int_dot(nibbles, xv, scale)
                        int_sums[t] = builder.add(int_sums[t], dot)
            ops.end_superblock(builder, avx2, s, int_sums, min_terms)
        return context.make_tuple(builder, signature.return_type, ops.results(builder, avx2))

    return sig, codegen


@intrinsic
def _q4k_tile_dot_avx512(typingctx, weights, acts, row, pairs, superblocks):
    """`_q4k_tile_dot_avx2` on AVX-512: a 64-byte load holds two nibble runs, whose low nibbles
    are sub-blocks 4m and 4m + 2 and high ones 4m + 1 and 4m + 3; each pair's activations of the
    two are gathered from its 64-byte loads by one shuffle, then vpmaddubsw and vpdpwssd by the
    two sub-blocks' scales into the super-block's int32 sums (the bounds of the AVX2 tile hold).
    The float work per super-block is the AVX2 tile's, on the sums' two halves added."""
    tile = tile_type(pairs)
    if tile is None:
        return None
    sig = types.UniTuple(types.float32, tile)(weights, acts, types.intp, pairs, types.intp)

    def codegen(context, builder, signature, args):
        ops = _Q4KOperands(context, builder, signature, args, 64)
        avx512, nsuper, q_ptr = Avx512Ir(builder), ops.nsuper, ops.q
        runs_per_load = 2
        with cgutils.for_range(builder, nsuper) as loop:
            s = loop.index
            here = builder.gep(q_ptr, [builder.mul(s, s.type(2))])
            for line in range(0, QK_K // 2, CACHE_LINE):  # a super-block's nibbles
                avx512.prefetch(here, s.type(AVX512.prefetch_bytes + line))
            # the 8 scale bytes in each 128-bit quarter, for vpshufb to widen two at a time
            sc = builder.load(builder.gep(ops.sc, [s]), align=1)
            sc_table = builder.shuffle_vector(sc, sc, lane_mask(list(range(SUBS)) * 8))
            min_terms = ops.min_terms(builder, avx512, s)
            # each pair's 256 activations of the super-block: sub-blocks 2i and 2i + 1 in load i
            xvs = [
                [
                    builder.load(builder.gep(x_ptr, [builder.add(at, s.type(i))]), align=1)
                    for i in range(QK_K // 64)
                ]
                for x_ptr, *_ in ops.tokens
                for at in [builder.mul(s, s.type(QK_K // 64))]
            ]
            int_sums = [ir.Constant(I32X16, None)] * tile
            for m in range(SUBS // 2 // runs_per_load):
                packed_idx = builder.add(builder.mul(s, s.type(2)), s.type(m))
                packed = builder.load(builder.gep(q_ptr, [packed_idx]), align=1)
                halves = (
                    builder.and_(packed, ir.Constant(I8X64, [0x0F] * 64)),
                    builder.lshr(packed, ir.Constant(I8X64, [4] * 64)),
                )
                for half, nibbles in enumerate(halves):
                    scale = avx512.widen_bytes(sc_table, 4 * m + half, 4 * m + 2 + half)
                    gather = lane_mask(
                        [32 * half + i for i in range(32)] + [64 + 32 * half + i for i in range(32)]
                    )
                    for t, loads in enumerate(xvs):
                        xv = builder.shuffle_vector(loads[2 * m], loads[2 * m + 1], gather)
                        int_sums[t] = avx512.scaled_byte_dot(int_sums[t], nibbles, xv, scale)
            halves_added = [
                builder.add(
                    builder.shuffle_vector(int_sum, int_sum, lane_mask(range(8))),
                    builder.shuffle_vector(int_sum, int_sum, lane_mask(range(8, 16))),
                )
                for int_sum in int_sums
            ]
            ops.end_superblock(builder, avx512, s, halves_added, min_terms)
        return context.make_tuple(builder, signature.return_type, ops.results(builder, avx512))

    return sig, codegen


@njit(nogil=True, cache=True)
def _q4k_row_dot_plain(q, sc, mn, d, dmin, row, x, dx, xsum, pair, superblocks):
    """One pair's row dot in plain Numba, the same sums as `_q4k_tile_dot_avx2`."""
    acc = np.float32(0.0)
    for s in range(superblocks):
        scaled, offset = 0, np.float32(0.0)
        for j in range(SUBS):
            run, half = j // 2, j % 2
            w_sub = (row * superblocks + s) * SUBS + j
            x_sub = (pair * superblocks + s) * SUBS + j
            # unsigned indices spare Numba's negative-index wraparound, as in q8_0_gemv
            q_base = np.uint64((row * superblocks + s) * QK_K // 2 + run * QK8_0)
            x_base = np.uint64(x_sub * QK8_0)
            dot = 0
            for i in range(QK8_0):
                ii = np.uint64(i)
                nib = (np.int32(q[q_base + ii]) >> (4 * half)) & 15
                dot += nib * np.int32(x[x_base + ii])
            scaled += dot * np.int32(sc[w_sub])
            offset += np.float32(mn[w_sub]) * xsum[x_sub]
        scale = d[row * superblocks + s] * dx[pair * superblocks + s]
        acc += scale * np.float32(scaled) - dmin[row * superblocks + s] * offset
    return acc


_q4k_pairs_avx2 = tiled_pairs(_q4k_tile_dot_avx2)
_q4k_pairs_avx512 = tiled_pairs(_q4k_tile_dot_avx512)


# Both kernels: out[p, r] = W[e, r] . x[p] for the pairs p = order[group_start[g]:
# group_start[g + 1]] of expert e = group_expert[g]; weights as Q4KMatrix.arrays with a leading
# experts dim, x_q int8 [pairs, k]. Chunks of rows and a kernel per path as in q8_0_gemv.
@njit(parallel=True, nogil=True, cache=True)
def grouped_gemv_q4_k_avx512(
    nibbles, scales, mins, d, dmin, x_q, x_scales, x_sums, order, group_start, group_expert, out
):
    """Tiles of up to 4 pairs of one expert through `_q4k_tile_dot_avx512`."""
    rows, superblocks = d.shape[1], d.shape[2]
    weights = (
        nibbles.reshape(-1),
        scales.reshape(-1),
        mins.reshape(-1),
        d.reshape(-1),
        dmin.reshape(-1),
    )
    acts = (x_q.reshape(-1), x_scales.reshape(-1), x_sums.reshape(-1))
    pairs, chunk = _q4k_pairs_avx512, AVX512.row_chunk
    n = superblocks
    tiled_rows(pairs, chunk, weights, acts, n, rows, order, group_start, group_expert, out)


@njit(parallel=True, nogil=True, cache=True)
def grouped_gemv_q4_k_avx2(
    nibbles, scales, mins, d, dmin, x_q, x_scales, x_sums, order, group_start, group_expert, out
):
    """Tiles of up to 4 pairs of one expert through `_q4k_tile_dot_avx2`."""
    rows, superblocks = d.shape[1], d.shape[2]
    weights = (
        nibbles.reshape(-1),
        scales.reshape(-1),
        mins.reshape(-1),
        d.reshape(-1),
        dmin.reshape(-1),
    )
    acts = (x_q.reshape(-1), x_scales.reshape(-1), x_sums.reshape(-1))
    pairs, chunk = _q4k_pairs_avx2, AVX2.row_chunk
    n = superblocks
    tiled_rows(pairs, chunk, weights, acts, n, rows, order, group_start, group_expert, out)


@njit(parallel=True, nogil=True, cache=True)
def grouped_gemv_q4_k_plain(
    nibbles, scales, mins, d, dmin, x_q, x_scales, x_sums, order, group_start, group_expert, out
):
    """One `_q4k_row_dot_plain` per pair."""
    rows, superblocks = d.shape[1], d.shape[2]
    q, sc, mn = nibbles.reshape(-1), scales.reshape(-1), mins.reshape(-1)
    d_flat, dmin_flat = d.reshape(-1), dmin.reshape(-1)
    x, dx, xs = x_q.reshape(-1), x_scales.reshape(-1), x_sums.reshape(-1)
    for c in prange((rows + PLAIN.row_chunk - 1) // PLAIN.row_chunk):
        for g in range(len(group_expert)):
            for r in range(c * PLAIN.row_chunk, min(rows, (c + 1) * PLAIN.row_chunk)):
                row = group_expert[g] * rows + r
                for p in order[group_start[g] : group_start[g + 1]]:
                    out[p, r] = _q4k_row_dot_plain(
                        q, sc, mn, d_flat, dmin_flat, row, x, dx, xs, p, superblocks
                    )


GROUPED_GEMV_Q4_K = {
    "avx512": grouped_gemv_q4_k_avx512,
    "avx2": grouped_gemv_q4_k_avx2,
    "plain": grouped_gemv_q4_k_plain,
}


def q4_k_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x: float32 [tokens, k] -> int8 values, float32 scales, one per 256-value super-block
    (like GGUF's Q8_K: the kernel sums a super-block's sub-blocks in integers), and each
    32-block's sum in value units (for the min term)."""
    x_q, x_scales = quantize_q8_activations(x, QK_K)
    sums = np.empty((x_q.shape[0], x_q.shape[1] // QK8_0), np.float32)
    _block_sums(x_q, x_scales, sums)
    return x_q, x_scales, sums


@njit(nogil=True, cache=True)
def _block_sums(x_q, x_scales, sums):
    """sums[t, b] = the int sum of 32-block b of x_q[t] times its super-block's scale (one
    compiled call: the numpy version cost ~8 us a GEMV)."""
    tokens, blocks = sums.shape
    for t in range(tokens):
        for b in range(blocks):
            total = 0
            for j in range(QK8_0):
                total += x_q[t, b * QK8_0 + j]
            sums[t, b] = np.float32(total) * x_scales[t, b // SUBS]
