"""Q8_0 decode GEMV: y[p, r] = sum_k W[e_p, r, k] * x[p, k] on int8 weights and int8 activations.

Weights are repacked once into `Q8Matrix` (int8 values plus float16 scales apart, 34 bytes per
32 values as GGUF stores them); activations are
quantised to int8 per 32-block. The AVX2 kernel's inner loop is an integer dot product emitted
through LLVM x86 intrinsics (`pmaddubsw` + `pmaddwd`), because plain Numba code never produces
those instructions (see shared/notes/cpu-kernels.md). Pairs that share an expert are grouped so
that each 32-byte weight vector is loaded once for a tile of up to TOKEN_TILE of them. The
AVX-512 kernel does the same on 64-byte loads with one VNNI `vpdpbusd` per two blocks. A
plain-Numba path computes the same thing everywhere and is what the tests compare it with.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

import numpy as np
from gguf import GGMLQuantizationType as T
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from cpu_kernels.float16_bits import half_to_float32
from cpu_kernels.int8_activations import QK8_0, quantize_q8_activations
from cpu_kernels.kernel_matrix import KernelMatrix, expert_slice
from cpu_kernels.tiling import CACHE_LINE, TILES, tile_type, tiled_pairs, tiled_rows
from cpu_kernels.x86_ir import (
    F32X8,
    F32X16,
    Avx2Ir,
    Avx512Ir,
    element_ptr,
    lane_mask,
    vector_ptr,
)
from hetero.formats.gguf_quants import FORMATS, split_fields

AVX512, AVX2, PLAIN = TILES["avx512"], TILES["avx2"], TILES["plain"]


@dataclass(frozen=True)
class Q8Matrix(KernelMatrix):
    """Q8_0 weights [..., rows, cols] (one matrix, or one per expert), repacked for the GEMV:
    int8 values row-major and the float16 block scales apart, as their bits (Numba has no
    float16 arrays; the kernels widen them to float32 exactly)."""

    values: np.ndarray  # int8 [..., rows, cols]
    scales: np.ndarray  # uint16 [..., rows, cols / 32]: float16 bits

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.values, self.scales

    @staticmethod
    def activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """int8 values and a float32 scale per 32-block."""
        return quantize_q8_activations(x)

    @classmethod
    def from_blocks(cls, blocks: np.ndarray) -> Q8Matrix:
        """blocks: uint8 [..., rows, cols / 32 * 34], GGUF Q8_0 as stored (a raw tensor)."""
        lead, fmt = blocks.shape[:-1], FORMATS[T.Q8_0]
        f = split_fields(np.ascontiguousarray(blocks).reshape(-1, fmt.type_size), fmt)
        values = f["qs"].view(np.int8).reshape(*lead, -1)
        scales = f["d"].copy().view(np.uint16).reshape(*lead, -1)
        return cls(np.ascontiguousarray(values), np.ascontiguousarray(scales))

    def dequantize(self, index: int | None = None) -> np.ndarray:
        """float32 [rows, cols] of one expert (`index`) or of a 2-D matrix (None); bit for bit
        `gguf.quants.dequantize` of the source blocks (the same float32 products)."""
        values, scales = expert_slice(self.values, index), expert_slice(self.scales, index)
        out = np.empty(values.shape, np.float32)
        _dequantize_q8_0(values, scales, out)
        return out


@njit(parallel=True, nogil=True, cache=True)
def _dequantize_q8_0(values, scales, out):
    """int8 [rows, cols] and float16 bits [rows, cols / 32] -> out float32 [rows, cols] (prefill
    dequantises a whole expert per call: numpy's temporaries made that 3x slower)."""
    for r in prange(values.shape[0]):
        for b in range(scales.shape[1]):
            scale = half_to_float32(scales[r, b])
            for j in range(QK8_0):
                out[r, b * QK8_0 + j] = np.float32(values[r, b * QK8_0 + j]) * scale


def combined_scales8(builder, sw_ptr, sx_ptrs, first):
    """LLVM IR: per pair, float32x8 of the weight * activation scales of blocks first to first +
    7: the 8 float16 weight scales widened by one conversion (vcvtph2ps), times the pair's 8
    activation scales in one vector. sw_ptr: the row's float16 bits; sx_ptrs: each pair's
    float32 scales."""
    half8 = ir.VectorType(ir.HalfType(), 8)
    w_bits8 = builder.load(
        builder.bitcast(builder.gep(sw_ptr, [first]), half8.as_pointer()), align=2
    )
    w_scales8 = builder.fpext(w_bits8, F32X8)
    return [
        builder.fmul(
            w_scales8,
            builder.load(builder.bitcast(builder.gep(sx, [first]), F32X8.as_pointer()), align=4),
        )
        for sx in sx_ptrs
    ]


@intrinsic
def _q8_tile_dot_avx2(typingctx, weights, acts, row, pairs, blocks):
    """(W[row] . x[p] for p in pairs): weights = (int8 values, float16 bits), acts = (int8
    values, float32 scales), flat arrays of `blocks` 32-blocks per row; pairs: a tuple of 1 to
    TOKEN_TILE activation rows -> a tuple of float32.

    Each weight vector is loaded, and made absolute, once for the whole tile. The sign trick of
    llama.cpp: pmaddubsw wants an unsigned operand, so it gets |w| and x carries w's sign;
    |w| <= 128 and |x| <= 127 keep its int16 pair sums below saturation."""
    tile = tile_type(pairs)
    if tile is None or weights[1].dtype != types.uint16:
        return None
    sig = types.UniTuple(types.float32, tile)(weights, acts, types.intp, pairs, types.intp)

    def codegen(context, builder, signature, args):
        (w_type, sw_type), (x_type, sx_type) = signature.args[0], signature.args[1]
        w, sw = cgutils.unpack_tuple(builder, args[0])
        x, sx = cgutils.unpack_tuple(builder, args[1])
        row, pair_ids, nblocks = args[2], cgutils.unpack_tuple(builder, args[3]), args[4]
        avx2 = Avx2Ir(builder)
        k = builder.mul(nblocks, nblocks.type(QK8_0))
        w_ptr = vector_ptr(builder, context, w_type, w, builder.mul(row, k), 32)
        sw_ptr = element_ptr(builder, context, sw_type, sw, builder.mul(row, nblocks))
        # a small tile alternates blocks between two accumulators per pair: one FMA chain
        # would wait out the FMA latency (4 cycles on Zen 3) every block
        chains = 2 if tile <= 2 else 1
        tokens = [
            (
                vector_ptr(builder, context, x_type, x, builder.mul(p, k), 32),
                element_ptr(builder, context, sx_type, sx, builder.mul(p, nblocks)),
                [
                    cgutils.alloca_once_value(builder, ir.Constant(F32X8, None))
                    for _ in range(chains)
                ],
            )
            for p in pair_ids
        ]

        def block(b, chain: int, scales=None, lane: int = 0):
            """Block b into the pairs' accumulators; `scales`: each pair's combined weight *
            activation scales of the 8 blocks from b - lane (None: read b's own)."""
            wv = builder.load(builder.gep(w_ptr, [b]), align=1)
            w_abs = avx2.sign(wv, wv)
            if scales is None:
                w_bits = builder.bitcast(builder.load(builder.gep(sw_ptr, [b])), ir.HalfType())
                w_scale = builder.fpext(w_bits, ir.FloatType())  # vcvtph2ps
            for t, (x_ptr, sx_ptr, accs) in enumerate(tokens):
                xv = builder.load(builder.gep(x_ptr, [b]), align=1)
                dot = builder.sitofp(avx2.int_dot(w_abs, avx2.sign(xv, wv)), F32X8)
                if scales is None:
                    x_scale = builder.load(builder.gep(sx_ptr, [b]))
                    scale = avx2.splat(builder.fmul(w_scale, x_scale))
                else:
                    scale = builder.shuffle_vector(scales[t], scales[t], lane_mask([lane] * 8))
                builder.store(avx2.fma(dot, scale, builder.load(accs[chain])), accs[chain])

        # 8 blocks at a time: their 8 weight scales widened by one vcvtph2ps and multiplied by
        # the pair's 8 activation scales in one vector; each block then takes its lane
        with cgutils.for_range(builder, builder.udiv(nblocks, nblocks.type(8))) as loop:
            first = builder.mul(loop.index, loop.index.type(8))
            here = builder.gep(w_ptr, [first])
            for line in range(0, 8 * QK8_0, CACHE_LINE):
                avx2.prefetch(here, first.type(AVX2.prefetch_bytes + line))
            scales = combined_scales8(builder, sw_ptr, [sx_ptr for _, sx_ptr, _ in tokens], first)
            for lane in range(8):
                block(builder.add(first, first.type(lane)), lane % chains, scales, lane)
        tail_start = builder.sub(nblocks, builder.urem(nblocks, nblocks.type(8)))
        with cgutils.for_range_slice(builder, tail_start, nblocks, nblocks.type(1)) as (b, _):
            block(b, 0)
        totals = [reduce(builder.fadd, map(builder.load, accs)) for _, _, accs in tokens]
        sums = [avx2.horizontal_sum(total) for total in totals]
        return context.make_tuple(builder, signature.return_type, sums)

    return sig, codegen


@intrinsic
def _q8_tile_dot_avx512(typingctx, weights, acts, row, pairs, blocks):
    """`_q8_tile_dot_avx2` on AVX-512 VNNI: a 64-byte load holds two blocks, and one vpdpbusd
    their |w| . x (x negated where w < 0, the sign trick) in 16 int32 lanes, 8 per block; then
    to float, times each lane's block scale, into the pair's accumulators."""
    tile = tile_type(pairs)
    if tile is None or weights[1].dtype != types.uint16:
        return None
    sig = types.UniTuple(types.float32, tile)(weights, acts, types.intp, pairs, types.intp)

    def codegen(context, builder, signature, args):
        (w_type, sw_type), (x_type, sx_type) = signature.args[0], signature.args[1]
        w, sw = cgutils.unpack_tuple(builder, args[0])
        x, sx = cgutils.unpack_tuple(builder, args[1])
        row, pair_ids, nblocks = args[2], cgutils.unpack_tuple(builder, args[3]), args[4]
        avx512 = Avx512Ir(builder)
        k = builder.mul(nblocks, nblocks.type(QK8_0))
        w_start, sw_start = builder.mul(row, k), builder.mul(row, nblocks)
        w_pairs = vector_ptr(builder, context, w_type, w, w_start, 2 * QK8_0)  # 2 blocks each
        w_blocks = vector_ptr(builder, context, w_type, w, w_start, QK8_0)
        sw_ptr = element_ptr(builder, context, sw_type, sw, sw_start)
        # small tiles alternate between two accumulators per pair (FMA latency, as in AVX2)
        chains = 2 if tile <= 2 else 1
        tokens = [
            (
                vector_ptr(builder, context, x_type, x, builder.mul(p, k), 2 * QK8_0),
                vector_ptr(builder, context, x_type, x, builder.mul(p, k), QK8_0),
                element_ptr(builder, context, sx_type, sx, builder.mul(p, nblocks)),
                [
                    cgutils.alloca_once_value(builder, ir.Constant(F32X16, None))
                    for _ in range(chains)
                ],
            )
            for p in pair_ids
        ]

        def multiply_add(wv, xvs, scales, chain: int):
            """wv: i8x64 of weights; xvs, scales: each pair's i8x64 activations and f32x16
            combined scales (lane i: of the block that holds bytes 4i..4i+3)."""
            w_abs = avx512.abs(wv)
            for (*_, accs), xv, scale in zip(tokens, xvs, scales, strict=True):
                dot = avx512.byte_dot(w_abs, avx512.negate_where_negative(xv, wv))
                total = avx512.fma(builder.sitofp(dot, F32X16), scale, builder.load(accs[chain]))
                builder.store(total, accs[chain])

        # 8 blocks at a time, as in AVX2: 8 weight scales widened by one conversion, times the
        # pair's 8 activation scales; the 64-byte vector v takes lanes 2v and 2v + 1
        with cgutils.for_range(builder, builder.udiv(nblocks, nblocks.type(8))) as loop:
            first = builder.mul(loop.index, loop.index.type(8))
            here = builder.gep(w_blocks, [first])
            for line in range(0, 8 * QK8_0, CACHE_LINE):
                avx512.prefetch(here, first.type(AVX512.prefetch_bytes + line))
            scales8 = combined_scales8(builder, sw_ptr, [t[2] for t in tokens], first)
            first_pair = builder.udiv(first, first.type(2))
            for v in range(4):
                at = builder.add(first_pair, first.type(v))
                wv = builder.load(builder.gep(w_pairs, [at]), align=1)
                xvs = [builder.load(builder.gep(x_pairs, [at]), align=1) for x_pairs, *_ in tokens]
                lanes = lane_mask([2 * v] * 8 + [2 * v + 1] * 8)
                scales = [builder.shuffle_vector(s8, s8, lanes) for s8 in scales8]
                multiply_add(wv, xvs, scales, v % chains)
        # the last blocks one at a time, in the low half of a vector (the high half zero)
        to_64 = lane_mask(range(2 * QK8_0))
        zeros = ir.Constant(ir.VectorType(ir.IntType(8), QK8_0), None)
        tail_start = builder.sub(nblocks, builder.urem(nblocks, nblocks.type(8)))
        with cgutils.for_range_slice(builder, tail_start, nblocks, nblocks.type(1)) as (b, _):
            wv = builder.load(builder.gep(w_blocks, [b]), align=1)
            wv = builder.shuffle_vector(wv, zeros, to_64)
            w_bits = builder.bitcast(builder.load(builder.gep(sw_ptr, [b])), ir.HalfType())
            w_scale = builder.fpext(w_bits, ir.FloatType())
            xvs, scales = [], []
            for _, x_blocks, sx_ptr, _ in tokens:
                xv = builder.load(builder.gep(x_blocks, [b]), align=1)
                xvs.append(builder.shuffle_vector(xv, zeros, to_64))
                x_scale = builder.load(builder.gep(sx_ptr, [b]))
                scales.append(avx512.splat(builder.fmul(w_scale, x_scale), F32X16))
            multiply_add(wv, xvs, scales, 0)
        totals = [reduce(builder.fadd, map(builder.load, accs)) for *_, accs in tokens]
        sums = [avx512.horizontal_sum(total) for total in totals]
        return context.make_tuple(builder, signature.return_type, sums)

    return sig, codegen


@njit(nogil=True, cache=True)
def _q8_row_dot_plain(w, w_off, x, x_off, scale_w, sw_off, scale_x, sx_off, blocks):
    """One pair's row dot in plain Numba: per-block int32 dot products, float scales after."""
    acc = np.float32(0.0)
    for b in range(blocks):
        # unsigned indices spare Numba's negative-index wraparound (which defeats vector loads)
        w_base, x_base = np.uint64(w_off + b * QK8_0), np.uint64(x_off + b * QK8_0)
        dot = 0
        for j in range(QK8_0):
            jj = np.uint64(j)
            dot += np.int32(w[w_base + jj]) * np.int32(x[x_base + jj])
        acc += np.float32(dot) * half_to_float32(scale_w[sw_off + b]) * scale_x[sx_off + b]
    return acc


_q8_pairs_avx2 = tiled_pairs(_q8_tile_dot_avx2)
_q8_pairs_avx512 = tiled_pairs(_q8_tile_dot_avx512)


# The kernels: out[p, r] = W[e, r] . x[p] for the pairs p = order[group_start[g]:
# group_start[g + 1]] of expert e = group_expert[g]; w_values int8 [experts, rows, k], x_q int8
# [pairs, k]. Each thread takes chunks of rows (TILES) and runs them expert after expert. One
# kernel per path, each naming its own tile function: a dispatcher passed as an argument would
# defeat Numba's on-disk cache, and a path's kernel must not be compiled on other CPUs.
@njit(parallel=True, nogil=True, cache=True)
def grouped_gemv_q8_0_avx512(
    w_values, w_scales, x_q, x_scales, order, group_start, group_expert, out
):
    """Tiles of up to 4 pairs of one expert through `_q8_tile_dot_avx512`."""
    _, rows, k = w_values.shape
    weights = (w_values.reshape(-1), w_scales.reshape(-1))
    acts = (x_q.reshape(-1), x_scales.reshape(-1))
    pairs, chunk = _q8_pairs_avx512, AVX512.row_chunk
    tiled_rows(pairs, chunk, weights, acts, k // QK8_0, rows, order, group_start, group_expert, out)


@njit(parallel=True, nogil=True, cache=True)
def grouped_gemv_q8_0_avx2(
    w_values, w_scales, x_q, x_scales, order, group_start, group_expert, out
):
    """Tiles of up to 4 pairs of one expert through `_q8_tile_dot_avx2`."""
    _, rows, k = w_values.shape
    weights = (w_values.reshape(-1), w_scales.reshape(-1))
    acts = (x_q.reshape(-1), x_scales.reshape(-1))
    pairs, chunk = _q8_pairs_avx2, AVX2.row_chunk
    tiled_rows(pairs, chunk, weights, acts, k // QK8_0, rows, order, group_start, group_expert, out)


@njit(parallel=True, nogil=True, cache=True)
def grouped_gemv_q8_0_plain(
    w_values, w_scales, x_q, x_scales, order, group_start, group_expert, out
):
    """One `_q8_row_dot_plain` per pair."""
    _, rows, k = w_values.shape
    blocks = k // QK8_0
    w_flat, sw_flat = w_values.reshape(-1), w_scales.reshape(-1)
    x_flat, sx_flat = x_q.reshape(-1), x_scales.reshape(-1)
    for c in prange((rows + PLAIN.row_chunk - 1) // PLAIN.row_chunk):
        for g in range(len(group_expert)):
            for r in range(c * PLAIN.row_chunk, min(rows, (c + 1) * PLAIN.row_chunk)):
                row = group_expert[g] * rows + r
                for p in order[group_start[g] : group_start[g + 1]]:
                    out[p, r] = _q8_row_dot_plain(
                        w_flat,
                        row * k,
                        x_flat,
                        p * k,
                        sw_flat,
                        row * blocks,
                        sx_flat,
                        p * blocks,
                        blocks,
                    )


GROUPED_GEMV_Q8_0 = {
    "avx512": grouped_gemv_q8_0_avx512,
    "avx2": grouped_gemv_q8_0_avx2,
    "plain": grouped_gemv_q8_0_plain,
}
