"""BF16 decode GEMV: y[p, r] = sum_k W[e_p, r, k] * x[p, k], bfloat16 weights, float32 activations.

A bfloat16 is the top half of a float32, so widening one is exact: zero-extend to 32 bits and
shift left by 16. The AVX2 kernel does that on 8 weights at a time in registers (vpmovzxwd,
vpslld) and multiply-adds them into float32 accumulators, a tile of up to TOKEN_TILE pairs of
one expert per weight load. The plain-Numba kernel widens a row into a per-thread buffer and
dots it with each pair: slower, but it runs on any CPU (HETERO_CPU_KERNEL_PATH=plain forces it).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from cpu_kernels.q8_0_gemv import (
    F32X8,
    I32X8,
    PREFETCH_BYTES,
    ROW_CHUNK,
    Avx2Ir,
    check_pairs,
    element_ptr,
    expert_slice,
    host_kernel_path,
    tile_type,
    tiled_pairs,
)

LANES = 8  # float32 lanes of an AVX2 register
I16X8 = ir.VectorType(ir.IntType(16), LANES)
# Activations start on a 32-byte boundary: a ymm load across a cache line costs two, which took
# 10 to 25% off 4-token tiles (run from L2) with numpy's 16-byte aligned activations.
X_ALIGN_BYTES = 32


@dataclass(frozen=True)
class BF16Matrix:
    """BF16 weights [..., rows, cols] (one matrix, or one per expert) as raw bfloat16 bits."""

    values: np.ndarray  # uint16 [..., rows, cols]

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
def _bf16_tile_dot_avx2(typingctx, w, x, row, pairs, cols):
    """(W[row] . x[p] for p in pairs): w uint16 and x float32 flat, `cols` values per row;
    pairs: a tuple of 1 to TOKEN_TILE activation rows -> a tuple of float32.

    Each 8-weight vector is loaded and widened once for the whole tile. Every pair spreads its
    vectors over `chains` accumulators so that the multiply-add latency (4 cycles on Zen 3)
    does not serialise a single chain; a row's last cols % 8 values go one at a time. Each step
    prefetches the weights PREFETCH_BYTES ahead (past a row's end: the next row of the chunk)."""
    tile = tile_type(pairs)
    if tile is None:
        return None
    sig = types.UniTuple(types.float32, tile)(w, x, types.intp, pairs, types.intp)
    chains = min(4, 8 // tile)  # at most 8 accumulators of 16 ymm registers

    def codegen(context, builder, signature, args):
        w_type, x_type = signature.args[:2]
        w, x, row, pair_ids, cols = args[0], args[1], args[2], args[3], args[4]
        pair_ids = cgutils.unpack_tuple(builder, pair_ids)
        avx2 = Avx2Ir(builder)
        w_ptr = element_ptr(builder, context, w_type, w, builder.mul(row, cols))
        x_ptrs = [element_ptr(builder, context, x_type, x, builder.mul(p, cols)) for p in pair_ids]
        w_vectors = builder.bitcast(w_ptr, I16X8.as_pointer())
        x_vectors = [builder.bitcast(ptr, F32X8.as_pointer()) for ptr in x_ptrs]
        accs = [
            [cgutils.alloca_once_value(builder, ir.Constant(F32X8, None)) for _ in range(chains)]
            for _ in pair_ids
        ]

        def widen(bits, wide_type, float_type):
            """bfloat16 bits -> the float32 they are the top half of."""
            shift = ir.Constant(wide_type, [16] * LANES if wide_type is I32X8 else 16)
            return builder.bitcast(builder.shl(builder.zext(bits, wide_type), shift), float_type)

        def vector_step(v, chain: int):
            bits = builder.load(builder.gep(w_vectors, [v]), align=2)
            weights = widen(bits, I32X8, F32X8)
            for x_vec, acc in zip(x_vectors, accs, strict=True):
                xv = builder.load(builder.gep(x_vec, [v]), align=4)
                builder.store(avx2.fma(weights, xv, builder.load(acc[chain])), acc[chain])

        one = cols.type(1)
        vectors = builder.udiv(cols, cols.type(LANES))
        with cgutils.for_range(builder, builder.udiv(vectors, cols.type(chains))) as loop:
            first = builder.mul(loop.index, cols.type(chains))
            vector_bytes = cols.type(2 * LANES)
            ahead = builder.add(builder.mul(first, vector_bytes), cols.type(PREFETCH_BYTES))
            avx2.prefetch(w_ptr, ahead)
            for chain in range(chains):
                vector_step(builder.add(first, cols.type(chain)), chain)
        left_start = builder.sub(vectors, builder.urem(vectors, cols.type(chains)))
        with cgutils.for_range_slice(builder, left_start, vectors, one) as (v, _):
            vector_step(v, 0)
        sums = [avx2.horizontal_sum(reduce(builder.fadd, map(builder.load, a))) for a in accs]
        tails = [cgutils.alloca_once_value(builder, s) for s in sums]
        tail_start = builder.mul(vectors, cols.type(LANES))
        with cgutils.for_range_slice(builder, tail_start, cols, one) as (j, _):
            bits = builder.load(builder.gep(w_ptr, [j]))
            weight = widen(bits, ir.IntType(32), ir.FloatType())
            for x_ptr, tail in zip(x_ptrs, tails, strict=True):
                term = builder.fmul(weight, builder.load(builder.gep(x_ptr, [j])))
                builder.store(builder.fadd(builder.load(tail), term), tail)
        results = [builder.load(tail) for tail in tails]
        return context.make_tuple(builder, signature.return_type, results)

    return sig, codegen


_bf16_pairs_avx2 = tiled_pairs(_bf16_tile_dot_avx2)


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
    """Tiles of up to 4 pairs of one expert through `_bf16_tile_dot_avx2`."""
    _, rows, cols = w.shape
    w_flat, x_flat = w.reshape(-1), x.reshape(-1)
    for c in prange((rows + ROW_CHUNK - 1) // ROW_CHUNK):
        for g in range(len(group_expert)):
            first, end = group_start[g], group_start[g + 1]
            for r in range(c * ROW_CHUNK, min(rows, (c + 1) * ROW_CHUNK)):
                row = group_expert[g] * rows + r
                _bf16_pairs_avx2(w_flat, x_flat, row, order, first, end, cols, out, r)


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


def aligned_activations(x: np.ndarray) -> np.ndarray:
    """x as a C-contiguous float32 array starting on an X_ALIGN_BYTES boundary (a copy only
    where it is not one already)."""
    x = np.asarray(x, dtype=np.float32)
    if x.flags.c_contiguous and x.ctypes.data % X_ALIGN_BYTES == 0:
        return x
    spare = X_ALIGN_BYTES // x.itemsize
    buffer = np.empty(x.size + spare, np.float32)
    start = -buffer.ctypes.data % X_ALIGN_BYTES // x.itemsize
    aligned = buffer[start : start + x.size].reshape(x.shape)
    aligned[...] = x
    return aligned


def grouped_bf16_gemv(
    w: BF16Matrix, x: np.ndarray, pair_expert: np.ndarray, path: str | None = None
) -> np.ndarray:
    """w: [experts, rows, cols]; x: float32 [pairs, cols]; pair_expert: int [pairs]
    -> float32 [pairs, rows], row p = W[pair_expert[p]] @ x[p]."""
    groups = check_pairs(w.shape, x, pair_expert)
    out = np.empty((x.shape[0], w.shape[1]), np.float32)
    kernel = GROUPED_GEMV_BF16[path or host_kernel_path()]
    kernel(w.values, aligned_activations(x), *groups, out)
    return out
