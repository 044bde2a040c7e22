"""Q6_K decode GEMV: y[p, r] = sum_k W[e_p, r, k] * x[p, k] on 6-bit weights and int8 activations.

GGUF Q6_K: 256-value super-blocks of 16 sub-blocks of 16, value = d * scale_j * (q - 32) with
q = 4 low bits (ql) + 2 high bits (qh). `Q6KMatrix` repacks the 6-bit codes so that three of
every four 32-value blocks are one mask away from a 32-byte load, and keeps the int8 scales
(they go into `pmaddwd` as its second operand): 212 bytes per 256 values against GGUF's 210.
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
    F32X16,
    I8X32,
    I8X64,
    I16X16,
    I32X16,
    Avx2Ir,
    Avx512Ir,
    element_ptr,
    lane_mask,
    vector_ptr,
)
from hetero.formats.gguf_quants import FORMATS, QK_K, split_fields

AVX512, AVX2 = TILES["avx512"], TILES["avx2"]

BLOCKS, SUBS = QK_K // QK8_0, QK_K // 16  # 32-value blocks and 16-value sub-blocks per super-block
# A super-block's codes as stored here: per half (128 values, blocks 4h..4h+3), three 32-byte
# runs; byte l of run i holds code l of block 4h+i in bits 0-5 and bits 2i, 2i+1 of code l of
# block 4h+3 in bits 6-7.
CODE_BYTES = QK_K * 3 // 4


@njit(parallel=True, nogil=True, cache=True)
def _pack_codes(ql, qh, packed):
    """GGUF ql: uint8 [n, 128], qh: uint8 [n, 64] -> packed: uint8 [n, 192] (the layout above).
    In GGUF's half h, with lo, hi, bits = ql[64h + l], ql[64h + 32 + l], qh[32h + l], code l of
    blocks 0..3 has low 4 bits lo & 15, hi & 15, lo >> 4, hi >> 4 and high 2 bits bits' 0-1, 2-3,
    4-5, 6-7. Each line below: code i, then code 3's bit pair i moved to bits 6-7."""
    for n in prange(ql.shape[0]):
        for h in range(2):
            for l in range(QK8_0):
                lo, hi, bits = ql[n, 64 * h + l], ql[n, 64 * h + 32 + l], qh[n, 32 * h + l]
                out = 96 * h + l
                packed[n, out] = (lo & 0x0F) | (bits & 0x03) << 4 | (hi & 0x30) << 2
                packed[n, out + 32] = (hi & 0x0F) | (bits & 0x0C) << 2 | (hi & 0xC0)
                packed[n, out + 64] = (lo >> 4) | (bits & 0x30) | (bits & 0xC0)


@dataclass(frozen=True)
class Q6KMatrix(KernelMatrix):
    """Q6_K weights [..., rows, cols] (one matrix, or one per expert): the codes repacked as
    above, the 16 int8 scales of a super-block reordered even sub-blocks first ([s0, s2, ..,
    s14, s1, s3, .., s15], so one in-lane shuffle gives a 32-value block's pair), d as float32."""

    codes: np.ndarray  # uint8 [..., rows, cols * 3 / 4]
    scales: np.ndarray  # int8 [..., rows, cols / 16], reordered as above
    d: np.ndarray  # float32 [..., rows, cols / 256]

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.codes.shape[:-1], self.codes.shape[-1] * 4 // 3)

    @property
    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.codes, self.scales, self.d

    @staticmethod
    def activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return q6_k_activations(x)

    @classmethod
    def from_blocks(cls, blocks: np.ndarray) -> Q6KMatrix:
        """blocks: uint8 [..., rows, cols / 256 * 210], GGUF Q6_K as stored (a raw tensor)."""
        lead, fmt = blocks.shape[:-1], FORMATS[T.Q6_K]
        f = split_fields(np.ascontiguousarray(blocks).reshape(-1, fmt.type_size), fmt)
        scales = f["scales"].view(np.int8).reshape(-1, SUBS // 2, 2).transpose(0, 2, 1)
        packed = np.empty((len(f["ql"]), CODE_BYTES), np.uint8)
        _pack_codes(f["ql"], f["qh"], packed)
        return cls(
            packed.reshape(*lead, -1),
            np.ascontiguousarray(scales.reshape(*lead, -1)),
            f["d"].copy().view(np.float16).astype(np.float32).reshape(*lead, -1),
        )

    def dequantize(self, index: int | None = None) -> np.ndarray:
        """float32 [rows, cols] of one expert (`index`) or of a 2-D matrix (None); bit for bit
        `gguf.quants.dequantize` of the source blocks: d * scale is exact in float32 (11 + 8
        significant bits), so d * scale * (q - 32) is rounded once, as there."""
        packed, scales, d = (expert_slice(a, index) for a in self.arrays)
        out = np.empty((packed.shape[0], d.shape[1] * QK_K), np.float32)
        _dequantize_q6_k(packed, scales, d, out)
        return out


@njit(parallel=True, nogil=True, cache=True)
def _dequantize_q6_k(packed, scales, d, out):
    """`Q6KMatrix.dequantize` of one [rows, cols] matrix into out: (d * scale) * (q - 32) per
    value, as gguf.quants does; parallel over rows. Codes unpack as `_pack_codes` packed them;
    16-value sub-block k's scale is stored at (k % 2) * 8 + k // 2."""
    for r in prange(packed.shape[0]):
        step = np.empty(SUBS, np.float32)  # d * scale of each 16-value sub-block, value order
        for n in range(d.shape[1]):
            for k in range(SUBS):
                step[k] = d[r, n] * np.float32(scales[r, n * SUBS + (k % 2) * 8 + k // 2])
            for h in range(2):
                base = n * CODE_BYTES + 96 * h
                for l in range(QK8_0):
                    b0 = np.int32(packed[r, base + l])
                    b1 = np.int32(packed[r, base + 32 + l])
                    b2 = np.int32(packed[r, base + 64 + l])
                    codes = (
                        b0 & 0x3F,
                        b1 & 0x3F,
                        b2 & 0x3F,
                        (b0 >> 6) | (b1 >> 6) << 2 | (b2 >> 6) << 4,
                    )
                    for i in range(4):
                        k32 = 4 * h + i
                        out[r, n * QK_K + k32 * QK8_0 + l] = step[2 * k32 + l // 16] * np.float32(
                            codes[i] - 32
                        )


class _Q6KOperands:
    """LLVM IR pointers to a Q6_K tile's operands (Numba arguments of `_q6k_tile_dot_*`): the
    row's codes as vectors of `lanes` bytes, its 16 scales per super-block, d; per pair its
    activations as vectors of `lanes` bytes, their 32-block scales, their offsets as 8 floats
    per half super-block, and a float32x8 accumulator."""

    def __init__(self, context, builder, signature, args, lanes: int):
        (q_t, sc_t, d_t), (x_t, dx_t, xo_t) = signature.args[:2]
        q, sc, d = cgutils.unpack_tuple(builder, args[0])
        x, dx, xo = cgutils.unpack_tuple(builder, args[1])
        row, pair_ids, self.nsuper = args[2], cgutils.unpack_tuple(builder, args[3]), args[4]
        self.builder = builder
        row_super = builder.mul(row, self.nsuper)
        self.q = vector_ptr(builder, context, q_t, q, self.at(row_super, CODE_BYTES), lanes)
        self.sc = vector_ptr(builder, context, sc_t, sc, self.at(row_super, SUBS), SUBS)
        self.d = element_ptr(builder, context, d_t, d, row_super)
        self.tokens = []
        for p in pair_ids:
            p_super = builder.mul(p, self.nsuper)
            offsets = element_ptr(builder, context, xo_t, xo, self.at(p_super, SUBS))
            self.tokens.append(
                (
                    vector_ptr(builder, context, x_t, x, self.at(p_super, QK_K), lanes),
                    element_ptr(builder, context, dx_t, dx, self.at(p_super, BLOCKS)),
                    builder.bitcast(offsets, F32X8.as_pointer()),
                    cgutils.alloca_once_value(builder, ir.Constant(F32X8, None)),
                )
            )

    def at(self, super_block, per: int):
        """The index of super-block `super_block`'s first item, `per` items per super-block."""
        return self.builder.mul(super_block, super_block.type(per))

    def scales_and_offsets(self, simd, s):
        """Super-block s's 16 scales as int16 (even sub-blocks first), and per pair the float32x8
        sum of the scales times its offsets (the - 32 of every code)."""
        b = self.builder
        scales = b.load(b.gep(self.sc, [s]), align=1)
        # even sub-blocks' scales, then the odd ones', against the pairs' offsets
        halves = [
            b.sitofp(b.shuffle_vector(scales, scales, lane_mask(range(8 * h, 8 * h + 8))), F32X8)
            for h in (0, 1)
        ]
        totals = []
        for _, _, xo_ptr, _ in self.tokens:
            total = ir.Constant(F32X8, None)
            for h, half_scales in enumerate(halves):
                offsets_ptr = b.gep(xo_ptr, [b.add(self.at(s, 2), s.type(h))])
                total = simd.fma(half_scales, b.load(offsets_ptr, align=4), total)
            totals.append(total)
        return b.sext(scales, I16X16), totals

    def end_superblock(self, simd, s, totals):
        """Each pair's float32x8 total of super-block s, times d, into its accumulator."""
        b = self.builder
        d_splat = simd.splat(b.load(b.gep(self.d, [s])))
        for (*_, acc), total in zip(self.tokens, totals, strict=True):
            b.store(simd.fma(total, d_splat, b.load(acc)), acc)

    def results(self, simd):
        return [simd.horizontal_sum(self.builder.load(acc)) for *_, acc in self.tokens]


@intrinsic
def _q6k_tile_dot_avx2(typingctx, weights, acts, row, pairs, superblocks):
    """(W[row] . x[p] for p in pairs): weights = Q6KMatrix.arrays and acts = q6_k_activations,
    flat, `superblocks` 256-value super-blocks per row; pairs: a tuple of 1 to TOKEN_TILE
    activation rows -> a tuple of float32.

    Each run of codes is loaded and unpacked once for the whole tile. Per 32-value block and
    pair: pmaddubsw(q, x) with the unsigned codes (pairs at most 2 * 63 * 128, no saturation),
    pmaddwd by [s_2b x8, s_2b+1 x8], times the activation scale; per super-block: plus the
    scales times the pair's offsets (which carry the - 32), times d."""
    tile = tile_type(pairs)
    if tile is None:
        return None
    sig = types.UniTuple(types.float32, tile)(weights, acts, types.intp, pairs, types.intp)

    def codegen(context, builder, signature, args):
        ops = _Q6KOperands(context, builder, signature, args, 32)
        avx2, at, q_ptr, tokens = Avx2Ir(builder), ops.at, ops.q, ops.tokens

        def bytes_of(value):
            return ir.Constant(I8X32, [value] * 32)

        with cgutils.for_range(builder, ops.nsuper) as loop:
            s = loop.index
            here = builder.gep(q_ptr, [at(s, 6)])
            for line in range(0, CODE_BYTES, CACHE_LINE):  # a super-block's codes
                avx2.prefetch(here, s.type(AVX2.prefetch_bytes + line))
            scales16, sums = ops.scales_and_offsets(avx2, s)
            for half in (0, 1):
                runs = [
                    builder.load(
                        builder.gep(q_ptr, [builder.add(at(s, 6), s.type(3 * half + i))]), align=1
                    )
                    for i in range(3)
                ]
                # block 4h+3 from bits 6-7 of the runs, (run_i & 0xC0) >> (6 - 2i); with the low
                # 6 bits clear, the 16-bit shift moves no set bit into the next byte
                spread = [
                    shift_words_right(builder, builder.and_(r, bytes_of(0xC0)), 6 - 2 * i)
                    for i, r in enumerate(runs)
                ]
                last = builder.or_(builder.or_(spread[0], spread[1]), spread[2])
                for i, codes in enumerate([builder.and_(r, bytes_of(0x3F)) for r in runs] + [last]):
                    b = 4 * half + i
                    pair_scales = builder.shuffle_vector(
                        scales16, scales16, lane_mask([b] * 8 + [8 + b] * 8)
                    )
                    block = builder.add(at(s, BLOCKS), s.type(b))
                    for t, (x_ptr, dx_ptr, _, _) in enumerate(tokens):
                        xv = builder.load(builder.gep(x_ptr, [block]), align=1)
                        dot = builder.sitofp(avx2.int_dot(codes, xv, pair_scales), F32X8)
                        x_scale = avx2.splat(builder.load(builder.gep(dx_ptr, [block])))
                        sums[t] = avx2.fma(dot, x_scale, sums[t])
            ops.end_superblock(avx2, s, sums)
        return context.make_tuple(builder, signature.return_type, ops.results(avx2))

    return sig, codegen


@intrinsic
def _q6k_tile_dot_avx512(typingctx, weights, acts, row, pairs, superblocks):
    """`_q6k_tile_dot_avx2` on AVX-512: a super-block's codes are three 64-byte loads, runs
    (h0 r0, h0 r1), (h0 r2, h1 r0), (h1 r1, h1 r2); masked, they are blocks (0, 1), (2, 4), (5,
    6), and blocks (3, 7) come from the top bits of the runs gathered by half. Each pair's
    activations of two blocks come from its 64-byte loads by at most one shuffle, the blocks'
    sub-block scales by a byte shuffle widened to words; vpmaddubsw and vpdpwssd by them, to
    float, times each lane's activation scale. The offsets and d as in the AVX2 tile."""
    tile = tile_type(pairs)
    if tile is None:
        return None
    sig = types.UniTuple(types.float32, tile)(weights, acts, types.intp, pairs, types.intp)

    def codegen(context, builder, signature, args):
        ops = _Q6KOperands(context, builder, signature, args, 64)
        avx512, at, q_ptr = Avx512Ir(builder), ops.at, ops.q

        def bytes_of(value):
            return ir.Constant(I8X64, [value] * 64)

        def halves_of(a, b, first: int, second: int):
            """[32-byte half `first` of a, half `second` of b] (halves 0, 1: low, high)."""
            return builder.shuffle_vector(
                a,
                b,
                lane_mask(
                    [32 * first + i for i in range(32)] + [64 + 32 * second + i for i in range(32)]
                ),
            )

        with cgutils.for_range(builder, ops.nsuper) as loop:
            s = loop.index
            here = builder.gep(q_ptr, [at(s, 3)])
            for line in range(0, CODE_BYTES, CACHE_LINE):  # a super-block's codes
                avx512.prefetch(here, s.type(AVX512.prefetch_bytes + line))
            scales16, offset_totals = ops.scales_and_offsets(avx512, s)
            loads = [
                builder.load(builder.gep(q_ptr, [builder.add(at(s, 3), s.type(i))]), align=1)
                for i in range(3)
            ]
            # runs r0, r1, r2 of both halves: [h0 ri | h1 ri]
            runs = [
                halves_of(loads[0], loads[1], 0, 1),
                halves_of(loads[0], loads[2], 1, 0),
                halves_of(loads[1], loads[2], 0, 1),
            ]
            spread = [
                shift_words_right(builder, builder.and_(r, bytes_of(0xC0)), 6 - 2 * i)
                for i, r in enumerate(runs)
            ]
            last = builder.or_(builder.or_(spread[0], spread[1]), spread[2])
            # (codes of two blocks, the blocks)
            masked = [builder.and_(v, bytes_of(0x3F)) for v in loads]
            block_pairs = [*zip(masked, [(0, 1), (2, 4), (5, 6)], strict=True), (last, (3, 7))]
            totals = []
            for (x_ptr, dx_ptr, _, _), total8 in zip(ops.tokens, offset_totals, strict=True):
                xs = [
                    builder.load(builder.gep(x_ptr, [builder.add(at(s, 4), s.type(i))]), align=1)
                    for i in range(4)
                ]
                x_scales = builder.load(  # the 8 blocks'
                    builder.bitcast(builder.gep(dx_ptr, [at(s, BLOCKS)]), F32X8.as_pointer()),
                    align=4,
                )
                total16 = ir.Constant(F32X16, None)
                for codes, (b0, b1) in block_pairs:
                    xv = halves_of(xs[b0 // 2], xs[b1 // 2], b0 % 2, b1 % 2)
                    pair_scales = builder.shuffle_vector(
                        scales16,
                        scales16,
                        lane_mask([b0] * 8 + [8 + b0] * 8 + [b1] * 8 + [8 + b1] * 8),
                    )
                    dot = avx512.scaled_byte_dot(ir.Constant(I32X16, None), codes, xv, pair_scales)
                    lanes = builder.shuffle_vector(
                        x_scales, x_scales, lane_mask([b0] * 8 + [b1] * 8)
                    )
                    total16 = avx512.fma(builder.sitofp(dot, F32X16), lanes, total16)
                totals.append(
                    builder.fadd(
                        total8,
                        builder.fadd(
                            builder.shuffle_vector(total16, total16, lane_mask(range(8))),
                            builder.shuffle_vector(total16, total16, lane_mask(range(8, 16))),
                        ),
                    )
                )
            ops.end_superblock(avx512, s, totals)
        return context.make_tuple(builder, signature.return_type, ops.results(avx512))

    return sig, codegen


def shift_words_right(builder, vector, bits: int):
    """A byte vector shifted right by `bits` as 16-bit words (one vpsrlw): the same as a per-byte
    shift when no set bit crosses into the byte below, which LLVM cannot know and so would mask
    after an i8 shift."""
    words_type = ir.VectorType(ir.IntType(16), vector.type.count // 2)
    words = builder.bitcast(vector, words_type)
    shifted = builder.lshr(words, ir.Constant(words_type, [bits] * words_type.count))
    return builder.bitcast(shifted, vector.type)


@njit(nogil=True, cache=True)
def _q6k_row_dot_plain(codes, sc, d, row, x, dx, x_offsets, pair, superblocks):
    """One pair's row dot in plain Numba, the same sums as `_q6k_tile_dot_avx2`."""
    acc = np.float32(0.0)
    for s in range(superblocks):
        w_super, x_super = row * superblocks + s, pair * superblocks + s
        total = np.float32(0.0)
        for j in range(SUBS):
            total += np.float32(sc[w_super * SUBS + j]) * x_offsets[x_super * SUBS + j]
        for b in range(BLOCKS):
            half, i = b // 4, b % 4
            # unsigned indices spare Numba's negative-index wraparound, as in q8_0_gemv
            q_base = np.uint64(w_super * CODE_BYTES + half * 3 * QK8_0)
            x_base = np.uint64((x_super * BLOCKS + b) * QK8_0)
            dot = 0
            for u in range(2):  # the block's two sub-blocks, their scales at b and 8 + b
                sub_dot = 0
                for v in range(16):
                    l = np.uint64(16 * u + v)
                    if i < 3:
                        q = np.int32(codes[q_base + np.uint64(i * QK8_0) + l]) & 63
                    else:
                        q = np.int32(codes[q_base + l]) >> 6
                        q |= np.int32(codes[q_base + np.uint64(QK8_0) + l]) >> 6 << 2
                        q |= np.int32(codes[q_base + np.uint64(2 * QK8_0) + l]) >> 6 << 4
                    sub_dot += q * np.int32(x[x_base + l])
                dot += sub_dot * np.int32(sc[w_super * SUBS + b + 8 * u])
            total += np.float32(dot) * dx[x_super * BLOCKS + b]
        acc += total * d[w_super]
    return acc


_q6k_pairs_avx2 = tiled_pairs(_q6k_tile_dot_avx2)
_q6k_pairs_avx512 = tiled_pairs(_q6k_tile_dot_avx512)


# Both kernels: out[p, r] = W[e, r] . x[p] for the pairs p = order[group_start[g]:
# group_start[g + 1]] of expert e = group_expert[g]; weights as Q6KMatrix.arrays with a leading
# experts dim, x_q int8 [pairs, k]. Two kernels for the reasons given in q8_0_gemv.
@njit(parallel=True, nogil=True, cache=True)
def grouped_gemv_q6_k_avx512(
    codes, scales, d, x_q, x_scales, x_offsets, order, group_start, group_expert, out
):
    """Tiles of up to 4 pairs of one expert through `_q6k_tile_dot_avx512`."""
    rows, superblocks = d.shape[1], d.shape[2]
    weights = (codes.reshape(-1), scales.reshape(-1), d.reshape(-1))
    acts = (x_q.reshape(-1), x_scales.reshape(-1), x_offsets.reshape(-1))
    pairs, chunk = _q6k_pairs_avx512, AVX512.row_chunk
    n = superblocks
    tiled_rows(pairs, chunk, weights, acts, n, rows, order, group_start, group_expert, out)


@njit(parallel=True, nogil=True, cache=True)
def grouped_gemv_q6_k_avx2(
    codes, scales, d, x_q, x_scales, x_offsets, order, group_start, group_expert, out
):
    """Tiles of up to 4 pairs of one expert through `_q6k_tile_dot_avx2`."""
    rows, superblocks = d.shape[1], d.shape[2]
    weights = (codes.reshape(-1), scales.reshape(-1), d.reshape(-1))
    acts = (x_q.reshape(-1), x_scales.reshape(-1), x_offsets.reshape(-1))
    pairs, chunk = _q6k_pairs_avx2, AVX2.row_chunk
    n = superblocks
    tiled_rows(pairs, chunk, weights, acts, n, rows, order, group_start, group_expert, out)


@njit(parallel=True, nogil=True, cache=True)
def grouped_gemv_q6_k_plain(
    codes, scales, d, x_q, x_scales, x_offsets, order, group_start, group_expert, out
):
    """One `_q6k_row_dot_plain` per pair."""
    rows, superblocks = d.shape[1], d.shape[2]
    q, sc, d_flat = codes.reshape(-1), scales.reshape(-1), d.reshape(-1)
    x, dx, xo = x_q.reshape(-1), x_scales.reshape(-1), x_offsets.reshape(-1)
    for r in prange(rows):
        for g in range(len(group_expert)):
            row = group_expert[g] * rows + r
            for p in order[group_start[g] : group_start[g + 1]]:
                out[p, r] = _q6k_row_dot_plain(q, sc, d_flat, row, x, dx, xo, p, superblocks)


GROUPED_GEMV_Q6_K = {
    "avx512": grouped_gemv_q6_k_avx512,
    "avx2": grouped_gemv_q6_k_avx2,
    "plain": grouped_gemv_q6_k_plain,
}


def q6_k_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x: float32 [tokens, k] -> int8 values, float32 block scales [tokens, k / 32] and offsets
    [tokens, k / 16]: -32 times each 16-value sub-block's sum (value units), in the scales'
    order (per super-block the even sub-blocks, then the odd ones)."""
    x_q, x_scales = quantize_q8_activations(x)
    tokens, k = x_q.shape
    offsets = np.empty((tokens, k // 16), np.float32)
    _q6_k_offsets(x_q, x_scales, offsets)
    return x_q, x_scales, offsets


@njit(nogil=True, cache=True)
def _q6_k_offsets(x_q, x_scales, offsets):
    """offsets[t, s * 16 + half * 8 + b] = -32 * x_scales[t, s * 8 + b] * the int sum of
    values 16 * half .. 16 * half + 15 of 32-block b of super-block s (one compiled call: the
    numpy version cost ~14 us a GEMV)."""
    tokens, k = x_q.shape
    for t in range(tokens):
        for s in range(k // QK_K):
            for b in range(BLOCKS):
                for half in range(2):
                    start = (s * BLOCKS + b) * QK8_0 + half * 16
                    total = 0
                    for j in range(16):
                        total += x_q[t, start + j]
                    scale = np.float32(-32) * x_scales[t, s * BLOCKS + b]
                    offsets[t, s * SUBS + half * BLOCKS + b] = np.float32(total) * scale
