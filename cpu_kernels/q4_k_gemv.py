"""Q4_K decode GEMV: y[t, r] = sum_k W[r, k] * x[t, k] on 4-bit weights and int8 activations.

GGUF Q4_K: 256-value super-blocks of 8 sub-blocks of 32, value = d * scale_j * q - dmin * min_j.
`Q4KMatrix` keeps the packed nibbles as stored and unpacks each sub-block's scale and min into
float32 at load time. The nibbles are unsigned, so they feed `pmaddubsw`'s unsigned operand
directly; the min term needs only each activation block's sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from cpu_kernels.gguf_quants import FORMATS, QK_K, k_scales_mins, split_fields
from cpu_kernels.q8_0_gemv import QK8_0, host_kernel_path, quantize_q8_activations, vector_ptr


@dataclass(frozen=True)
class Q4KMatrix:
    """Q4_K weights [rows, cols]: nibbles as stored (a 32-byte run holds sub-block 2i in its low
    nibbles and 2i+1 in its high ones) and per-sub-block scale and min."""

    nibbles: np.ndarray  # uint8 [rows, cols / 2]
    scales: np.ndarray  # float32 [rows, cols / 32], d * scale_j
    mins: np.ndarray  # float32 [rows, cols / 32], dmin * min_j

    @property
    def shape(self) -> tuple[int, int]:
        return self.nibbles.shape[0], self.nibbles.shape[1] * 2

    @property
    def nbytes(self) -> int:
        return self.nibbles.nbytes + self.scales.nbytes + self.mins.nbytes

    @classmethod
    def from_blocks(cls, blocks: np.ndarray) -> Q4KMatrix:
        """blocks: uint8 [rows, cols / 256 * 144], GGUF Q4_K as stored (a raw tensor)."""
        rows = blocks.shape[0]
        fmt = FORMATS[T.Q4_K]
        f = split_fields(np.ascontiguousarray(blocks).reshape(-1, fmt.type_size), fmt)
        sc, mn = k_scales_mins(f["scales"])
        d = f["d"].copy().view(np.float16).astype(np.float32)
        dmin = f["dmin"].copy().view(np.float16).astype(np.float32)
        return cls(
            np.ascontiguousarray(f["qs"].reshape(rows, -1)),
            np.ascontiguousarray((d * sc.astype(np.float32)).reshape(rows, -1)),
            np.ascontiguousarray((dmin * mn.astype(np.float32)).reshape(rows, -1)),
        )


@intrinsic
def _q4k_row_dot_avx2(typingctx, q, q_off, sc, mn, s_off, x, x_off, dx, xsum, xs_off, chunks):
    """sum over `chunks` 64-value runs of the scaled nibble . x dot products, minus the mins
    times the activation block sums; float32."""
    sig = types.float32(q, q_off, sc, mn, s_off, x, x_off, dx, xsum, xs_off, types.intp)

    def codegen(context, builder, signature, args):
        qa, qo, sca, mna, so, xa, xo, dxa, xsa, xso, nchunks = args
        i8x32 = ir.VectorType(ir.IntType(8), 32)
        i16x16 = ir.VectorType(ir.IntType(16), 16)
        i32x8 = ir.VectorType(ir.IntType(32), 8)
        f32x8 = ir.VectorType(ir.FloatType(), 8)
        maddubs = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(i16x16, [i8x32, i8x32]), "llvm.x86.avx2.pmadd.ub.sw"
        )
        maddwd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(i32x8, [i16x16, i16x16]), "llvm.x86.avx2.pmadd.wd"
        )
        a = signature.args
        q_ptr = vector_ptr(builder, context, a[0], qa, qo, 32)
        x_ptr = vector_ptr(builder, context, a[5], xa, xo, 32)

        def data(i, arr):
            return context.make_array(a[i])(context, builder, arr).data

        sc_d, mn_d, dx_d, xs_d = data(2, sca), data(3, mna), data(7, dxa), data(8, xsa)
        ones16 = ir.Constant(i16x16, [1] * 16)
        acc = cgutils.alloca_once_value(builder, ir.Constant(f32x8, None))
        min_acc = cgutils.alloca_once_value(builder, ir.Constant(ir.FloatType(), 0.0))
        with cgutils.for_range(builder, nchunks) as loop:
            c = loop.index
            packed = builder.load(builder.gep(q_ptr, [c]), align=1)
            halves = (
                builder.and_(packed, ir.Constant(i8x32, [0x0F] * 32)),
                builder.lshr(packed, ir.Constant(i8x32, [4] * 32)),
            )
            for half, nib in enumerate(halves):
                sub = builder.add(builder.mul(c, c.type(2)), c.type(half))
                xv = builder.load(builder.gep(x_ptr, [sub]), align=1)
                quads = builder.call(maddwd, [builder.call(maddubs, [nib, xv]), ones16])
                s_idx, x_idx = builder.add(so, sub), builder.add(xso, sub)
                scale = builder.fmul(
                    builder.load(builder.gep(sc_d, [s_idx])),
                    builder.load(builder.gep(dx_d, [x_idx])),
                )
                splat = builder.insert_element(ir.Constant(f32x8, None), scale, ir.IntType(32)(0))
                splat = builder.shuffle_vector(splat, splat, ir.Constant(i32x8, None))
                term = builder.fmul(builder.sitofp(quads, f32x8), splat)
                builder.store(builder.fadd(builder.load(acc), term), acc)
                offset = builder.fmul(
                    builder.load(builder.gep(mn_d, [s_idx])),
                    builder.load(builder.gep(xs_d, [x_idx])),
                )
                builder.store(builder.fadd(builder.load(min_acc), offset), min_acc)
        total = builder.load(acc)
        result = builder.extract_element(total, ir.IntType(32)(0))
        for lane in range(1, 8):
            result = builder.fadd(result, builder.extract_element(total, ir.IntType(32)(lane)))
        return builder.fsub(result, builder.load(min_acc))

    return sig, codegen


@njit(nogil=True, cache=True)
def _q4k_row_dot_plain(q, q_off, sc, mn, s_off, x, x_off, dx, xsum, xs_off, chunks):
    """`_q4k_row_dot_avx2` in plain Numba."""
    acc = np.float32(0.0)
    for c in range(chunks):
        for half in range(2):
            sub = 2 * c + half
            # unsigned indices spare Numba's negative-index wraparound, as in q8_0_gemv
            q_base, x_base = np.uint64(q_off + c * QK8_0), np.uint64(x_off + sub * QK8_0)
            dot = 0
            for j in range(QK8_0):
                jj = np.uint64(j)
                nib = (np.int32(q[q_base + jj]) >> (4 * half)) & 15
                dot += nib * np.int32(x[x_base + jj])
            acc += np.float32(dot) * sc[s_off + sub] * dx[xs_off + sub]
            acc -= mn[s_off + sub] * xsum[xs_off + sub]
    return acc


@njit(parallel=True, nogil=True, cache=True)
def gemv_q4_k_avx2(nibbles, scales, mins, x_q, x_scales, x_sums, out):
    """out[t, r] = W[r] . x[t]; nibbles uint8 [rows, k / 2], x_q int8 [tokens, k]."""
    rows, half_k = nibbles.shape
    k, subs = 2 * half_k, x_scales.shape[1]
    q, sc, mn = nibbles.reshape(-1), scales.reshape(-1), mins.reshape(-1)
    x, dx, xs = x_q.reshape(-1), x_scales.reshape(-1), x_sums.reshape(-1)
    for r in prange(rows):
        for t in range(x_q.shape[0]):
            out[t, r] = _q4k_row_dot_avx2(
                q, r * half_k, sc, mn, r * subs, x, t * k, dx, xs, t * subs, subs // 2
            )


@njit(parallel=True, nogil=True, cache=True)
def gemv_q4_k_plain(nibbles, scales, mins, x_q, x_scales, x_sums, out):
    """`gemv_q4_k_avx2` through `_q4k_row_dot_plain`."""
    rows, half_k = nibbles.shape
    k, subs = 2 * half_k, x_scales.shape[1]
    q, sc, mn = nibbles.reshape(-1), scales.reshape(-1), mins.reshape(-1)
    x, dx, xs = x_q.reshape(-1), x_scales.reshape(-1), x_sums.reshape(-1)
    for r in prange(rows):
        for t in range(x_q.shape[0]):
            out[t, r] = _q4k_row_dot_plain(
                q, r * half_k, sc, mn, r * subs, x, t * k, dx, xs, t * subs, subs // 2
            )


GEMV_Q4_K = {"avx2": gemv_q4_k_avx2, "plain": gemv_q4_k_plain}


def q4_k_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x: float32 [tokens, k] -> int8 values, float32 block scales and block sums (value units)."""
    x_q, x_scales = quantize_q8_activations(x)
    blocks = x_q.reshape(x_q.shape[0], -1, QK8_0).sum(axis=-1, dtype=np.int32)
    return x_q, x_scales, (blocks * x_scales).astype(np.float32)


def q4_k_gemv(w: Q4KMatrix, x: np.ndarray, path: str | None = None) -> np.ndarray:
    """w: [rows, cols]; x: float32 [tokens, cols] -> float32 [tokens, rows] = x @ W.T."""
    if x.ndim != 2 or x.shape[1] != w.shape[1] or x.shape[1] % QK_K:
        raise ValueError(f"x has shape {x.shape}; expected [tokens, {w.shape[1]}]")
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    GEMV_Q4_K[path or host_kernel_path()](w.nibbles, w.scales, w.mins, *q4_k_activations(x), out)
    return out
