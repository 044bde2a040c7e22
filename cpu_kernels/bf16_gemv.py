"""BF16 decode GEMV: y[p, r] = sum_k W[e_p, r, k] * x[p, k], bfloat16 weights, float32 activations.

A bfloat16 is the top half of a float32, so widening one is exact. The AVX2 kernel loads 16
weights (32 bytes) at a time and widens them in two registers: a 32-bit shift left by 16 makes
float32s of the even ones, a mask of the top halves the odd ones (one instruction per 8
weights). The wrapper stores each 16 activations evens first to match. It multiply-adds them
into float32 accumulators for a tile of up to TOKEN_TILE pairs of one expert per weight load,
and of two weight rows at a time where an expert has ROW_TILE_PAIRS pairs or more. The
plain-Numba kernel widens a row into a per-thread buffer and dots it with each pair: slower,
but it runs on any CPU (HETERO_CPU_KERNEL_PATH=plain forces it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from cpu_kernels.q8_0_gemv import (
    CACHE_LINE,
    F32X8,
    I32X8,
    PREFETCH_BYTES,
    ROW_CHUNK,
    Avx2Ir,
    check_pairs,
    element_ptr,
    expert_slice,
    host_kernel_path,
    store_block,
    tile_type,
    tiled_pairs,
)

LANES = 8  # float32 lanes of an AVX2 register
# Activations and weights start on a 32-byte boundary: a ymm load across a cache line costs
# two, which took 10 to 25% off 4-token tiles (run from L2) with numpy's 16-byte aligned
# activations.
X_ALIGN_BYTES = 32
UNIT = 2 * LANES  # weights per 32-byte load of the AVX2 kernel
# Groups of at least this many pairs run two weight rows per tile (each activation vector loaded
# once for both): from L2 that doubled the multiply-adds per load. Below it the one-row tiles
# are as fast or faster, since a few pairs leave the kernel bound by reading the weights.
ROW_TILE_PAIRS = 8


@dataclass(frozen=True)
class BF16Matrix:
    """BF16 weights [..., rows, cols] (one matrix, or one per expert) as raw bfloat16 bits."""

    values: np.ndarray  # uint16 [..., rows, cols]

    def __post_init__(self):
        # the AVX2 kernel reads 32 bytes at a time: where rows are whole 32-byte lines apart,
        # a misaligned start (numpy's 16-byte alignment) split every other load across two
        # cache lines, about 5-15% of a one-token GEMV. A mapped GGUF is 32-byte aligned.
        values = self.values
        if values.ctypes.data % X_ALIGN_BYTES and values.shape[-1] * 2 % X_ALIGN_BYTES == 0:
            aligned = aligned_empty(values.shape, values.dtype)
            aligned[...] = values
            object.__setattr__(self, "values", aligned)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def arrays(self) -> tuple[np.ndarray, ...]:
        """The kernels' weight arguments, in their order."""
        return (self.values,)

    @property
    def nbytes(self) -> int:
        return self.values.nbytes

    @classmethod
    def from_blocks(cls, blocks: np.ndarray) -> BF16Matrix:
        """blocks: uint8 [..., rows, cols * 2], a GGUF BF16 tensor as stored (little-endian).
        Contiguous blocks are viewed, not copied: a memory-mapped file stays in the page cache."""
        if blocks.dtype != np.uint8 or blocks.ndim < 2 or blocks.shape[-1] % 2:
            raise ValueError(
                f"BF16 blocks of dtype {blocks.dtype} and shape {blocks.shape}: expected uint8 "
                f"[..., rows, cols * 2] (2 bytes per value)"
            )
        return cls(np.ascontiguousarray(blocks).view(np.uint16))

    def dequantize(self, index: int | None = None) -> np.ndarray:
        """float32 [rows, cols] of one expert (`index`) or of a 2-D matrix (None); exact."""
        values = expert_slice(self.values, index)
        return (values.astype(np.uint32) << np.uint32(16)).view(np.float32)


@intrinsic
def _bf16_tile_dot_avx2(typingctx, w, x, rows, pairs, cols):
    """(W[r] . x[p] for r in rows for p in pairs): w uint16 and x float32 flat (x in the
    `interleaved` order), `cols` values per row; rows: one weight row, or a tuple of them run
    together; pairs: a tuple of 1 to TOKEN_TILE activation rows -> a tuple of float32,
    row-major over (rows, pairs).

    Each 16-weight load is widened once for the whole tile, and with several weight rows each
    activation vector is loaded once for all of them: two rows took 16 pairs from about 30 to
    45-55 GMAC/s on weights in L2 (2-core Zen 3), where the activations of a 4-pair tile
    (32 KB at 2048 columns) no longer fit L1 beside the weights. Every (row, pair) spreads its
    vectors over `chains` accumulators so that the multiply-add latency (4 cycles on Zen 3)
    does not serialise a single chain; a row's last cols % UNIT values go one at a time. Each
    step covers a cache line of every row and prefetches PREFETCH_BYTES ahead (past a row's
    end: the next row of the chunk)."""
    tile = tile_type(pairs)
    if isinstance(rows, types.Integer):
        row_count = 0  # a lone row, not a tuple
    elif isinstance(rows, types.UniTuple) and isinstance(rows.dtype, types.Integer):
        row_count = rows.count
    else:
        return None
    if tile is None:
        return None
    outputs = tile * max(1, row_count)
    sig = types.UniTuple(types.float32, outputs)(w, x, rows, pairs, types.intp)
    chains = max(1, min(4, 8 // outputs))  # at most 8 accumulators of 16 ymm registers

    def codegen(context, builder, signature, args):
        w_type, x_type = signature.args[:2]
        w, x, row_ids, pair_ids, cols = args[0], args[1], args[2], args[3], args[4]
        row_ids = cgutils.unpack_tuple(builder, row_ids) if row_count else [row_ids]
        pair_ids = cgutils.unpack_tuple(builder, pair_ids)
        avx2 = Avx2Ir(builder)
        w_ptrs = [element_ptr(builder, context, w_type, w, builder.mul(r, cols)) for r in row_ids]
        x_ptrs = [element_ptr(builder, context, x_type, x, builder.mul(p, cols)) for p in pair_ids]
        w_units = [builder.bitcast(ptr, I32X8.as_pointer()) for ptr in w_ptrs]
        x_vectors = [builder.bitcast(ptr, F32X8.as_pointer()) for ptr in x_ptrs]
        accs = [
            [cgutils.alloca_once_value(builder, ir.Constant(F32X8, None)) for _ in range(chains)]
            for _ in range(len(w_ptrs) * len(x_ptrs))
        ]
        high_half = ir.Constant(I32X8, [-65536] * LANES)  # 0xFFFF0000
        shift = ir.Constant(I32X8, [16] * LANES)

        def unit_step(u, chain: int):
            """16 weights of each row: one 32-byte load, the even ones widened by a shift and
            the odd ones by a mask, against the unit's even and odd activations (the wrapper
            stores each 16 activations evens first)."""
            halves = []
            for wu in w_units:
                bits = builder.load(builder.gep(wu, [u]), align=2)
                even = builder.bitcast(builder.shl(bits, shift), F32X8)
                odd = builder.bitcast(builder.and_(bits, high_half), F32X8)
                halves.append((even, odd))
            two_u = builder.mul(u, u.type(2))
            xs = [
                (
                    builder.load(builder.gep(x_vec, [two_u]), align=4),
                    builder.load(builder.gep(x_vec, [builder.add(two_u, u.type(1))]), align=4),
                )
                for x_vec in x_vectors
            ]
            for half in (0, 1):
                for i, weights in enumerate(halves):
                    for j, x_pair in enumerate(xs):
                        acc = accs[i * len(xs) + j][(chain + half) % chains]
                        builder.store(avx2.fma(weights[half], x_pair[half], builder.load(acc)), acc)

        one = cols.type(1)
        units = builder.udiv(cols, cols.type(UNIT))
        # a step covers a cache line of each weight row and asks for one line ahead
        unroll = max(chains // 2, CACHE_LINE // (2 * UNIT))
        with cgutils.for_range(builder, builder.udiv(units, cols.type(unroll))) as loop:
            first = builder.mul(loop.index, cols.type(unroll))
            unit_bytes = cols.type(2 * UNIT)
            ahead = builder.add(builder.mul(first, unit_bytes), cols.type(PREFETCH_BYTES))
            for line in range(0, unroll * 2 * UNIT, CACHE_LINE):
                for w_ptr in w_ptrs:
                    avx2.prefetch(w_ptr, builder.add(ahead, cols.type(line)))
            for i in range(unroll):
                unit_step(builder.add(first, cols.type(i)), 2 * i % chains)
        left_start = builder.sub(units, builder.urem(units, cols.type(unroll)))
        with cgutils.for_range_slice(builder, left_start, units, one) as (u, _):
            unit_step(u, 0)
        sums = [avx2.horizontal_sum(reduce(builder.fadd, map(builder.load, a))) for a in accs]
        tails = [cgutils.alloca_once_value(builder, s) for s in sums]
        tail_start = builder.mul(units, cols.type(UNIT))
        with cgutils.for_range_slice(builder, tail_start, cols, one) as (j, _):
            for i, w_ptr in enumerate(w_ptrs):
                bits = builder.zext(builder.load(builder.gep(w_ptr, [j])), ir.IntType(32))
                weight = builder.bitcast(builder.shl(bits, bits.type(16)), ir.FloatType())
                for k, x_ptr in enumerate(x_ptrs):
                    tail = tails[i * len(x_ptrs) + k]
                    term = builder.fmul(weight, builder.load(builder.gep(x_ptr, [j])))
                    builder.store(builder.fadd(builder.load(tail), term), tail)
        results = [builder.load(tail) for tail in tails]
        return context.make_tuple(builder, signature.return_type, results)

    return sig, codegen


_bf16_pairs_avx2 = tiled_pairs(_bf16_tile_dot_avx2)
_bf16_row_pairs_avx2 = tiled_pairs(_bf16_tile_dot_avx2, store_block)


@njit(nogil=True, cache=True)
def _widen_bf16_plain(bits, wide):
    """bits: uint16 [n] -> wide: uint32 [n], the float32 bit patterns (a loop LLVM vectorises)."""
    for j in range(len(bits)):
        wide[j] = np.uint32(bits[j]) << np.uint32(16)


@njit(nogil=True, fastmath=True, cache=True)
def _dot_plain(a, b):
    acc = np.float32(0.0)
    for j in range(len(a)):
        acc += a[j] * b[j]
    return acc


# Both kernels: out[p, r] = W[e, r] . x[p] for the pairs p = order[group_start[g]:
# group_start[g + 1]] of expert e = group_expert[g]; w uint16 [experts, rows, cols], x float32
# [pairs, cols]. Chunks of rows and two kernels as in q8_0_gemv.
@njit(parallel=True, nogil=True, cache=True)
def grouped_gemv_bf16_avx2(w, x, order, group_start, group_expert, out):
    """Tiles of up to 4 pairs of one expert, on one or two weight rows, through
    `_bf16_tile_dot_avx2`; x holds each UNIT of values evens first (`interleaved`)."""
    _, rows, cols = w.shape
    w_flat, x_flat = w.reshape(-1), x.reshape(-1)
    for c in prange((rows + ROW_CHUNK - 1) // ROW_CHUNK):
        for g in range(len(group_expert)):
            first, end = group_start[g], group_start[g + 1]
            r, stop = c * ROW_CHUNK, min(rows, (c + 1) * ROW_CHUNK)
            base = group_expert[g] * rows
            if end - first >= ROW_TILE_PAIRS:
                while r + 2 <= stop:
                    two, at = (base + r, base + r + 1), (r, r + 1)
                    _bf16_row_pairs_avx2(w_flat, x_flat, two, order, first, end, cols, out, at)
                    r += 2
            while r < stop:
                _bf16_pairs_avx2(w_flat, x_flat, base + r, order, first, end, cols, out, r)
                r += 1


@njit(parallel=True, nogil=True, cache=True)
def grouped_gemv_bf16_plain(w, x, order, group_start, group_expert, out):
    """Each row widened once into a per-thread float32 buffer, then one dot per pair."""
    _, rows, cols = w.shape
    for c in prange((rows + ROW_CHUNK - 1) // ROW_CHUNK):
        wide = np.empty(cols, np.uint32)
        row_f32 = wide.view(np.float32)
        for g in range(len(group_expert)):
            for r in range(c * ROW_CHUNK, min(rows, (c + 1) * ROW_CHUNK)):
                _widen_bf16_plain(w[group_expert[g], r], wide)
                for p in order[group_start[g] : group_start[g + 1]]:
                    out[p, r] = _dot_plain(row_f32, x[p])


GROUPED_GEMV_BF16 = {"avx2": grouped_gemv_bf16_avx2, "plain": grouped_gemv_bf16_plain}


@njit(nogil=True, cache=True)
def interleaved(x):
    """x float32 [pairs, cols] -> an X_ALIGN_BYTES-aligned copy with each whole UNIT of values
    stored evens first, then odds: the order in which the AVX2 kernel widens a 32-byte load of
    bfloat16 weights (a shift puts the even ones in float32 lanes, a mask the odd ones). A
    row's last cols % UNIT values stay put. (One compiled call: numpy's pieces cost ~30 us.)"""
    pairs, cols = x.shape
    spare = X_ALIGN_BYTES // 4
    buffer = np.empty(pairs * cols + spare, np.float32)
    start = (X_ALIGN_BYTES - buffer.ctypes.data % X_ALIGN_BYTES) % X_ALIGN_BYTES // 4
    out = buffer[start : start + pairs * cols].reshape(pairs, cols)
    whole = cols // UNIT * UNIT
    for p in range(pairs):
        for u in range(0, whole, UNIT):
            for i in range(LANES):
                out[p, u + i] = x[p, u + 2 * i]
                out[p, u + LANES + i] = x[p, u + 2 * i + 1]
        for j in range(whole, cols):
            out[p, j] = x[p, j]
    return out


def aligned_empty(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """An uninitialised C-contiguous array starting on an X_ALIGN_BYTES boundary."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    buffer = np.empty(nbytes + X_ALIGN_BYTES, np.uint8)
    start = -buffer.ctypes.data % X_ALIGN_BYTES
    return buffer[start : start + nbytes].view(dtype).reshape(shape)


def aligned_activations(x: np.ndarray) -> np.ndarray:
    """x as a C-contiguous float32 array starting on an X_ALIGN_BYTES boundary (a copy only
    where it is not one already)."""
    x = np.asarray(x, dtype=np.float32)
    if x.flags.c_contiguous and x.ctypes.data % X_ALIGN_BYTES == 0:
        return x
    aligned = aligned_empty(x.shape)
    aligned[...] = x
    return aligned


def grouped_bf16_gemv(
    w: BF16Matrix, x: np.ndarray, pair_expert: np.ndarray, path: str | None = None
) -> np.ndarray:
    """w: [experts, rows, cols]; x: float32 [pairs, cols]; pair_expert: int [pairs]
    -> float32 [pairs, rows], row p = W[pair_expert[p]] @ x[p]."""
    groups = check_pairs(w.shape, x, pair_expert)
    out = np.empty((x.shape[0], w.shape[1]), np.float32)
    path = path or host_kernel_path()
    x = interleaved(np.asarray(x, np.float32)) if path == "avx2" else aligned_activations(x)
    GROUPED_GEMV_BF16[path](w.values, x, *groups, out)
    return out
