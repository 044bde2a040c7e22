"""Q8_0 decode GEMV: y[t, r] = sum_k W[r, k] * x[t, k] on int8 weights and int8 activations.

Weights are repacked once into `Q8Matrix` (int8 values [rows, k] plus float32 scales
[rows, k / 32]); activations are quantised to int8 per 32-block. The hot loop is an integer dot
product emitted through an LLVM x86 intrinsic (AVX2 `pmaddubsw` + `pmaddwd`), because plain
Numba code never produces those instructions (see shared/notes/cpu-kernels.md). A plain-Numba
path computes the same thing everywhere and is what the tests compare the intrinsic path with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import llvmlite.binding as llvm_binding
import numpy as np
from gguf import GGMLQuantizationType as T
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from cpu_kernels.gguf_quants import FORMATS, split_fields

QK8_0 = 32  # GGUF Q8_0: 32 int8 values and one float16 scale per block
KERNEL_PATHS = ("avx2", "plain")
PATH_ENV = "HETERO_CPU_KERNEL_PATH"  # force a path, e.g. "plain" on a machine with AVX2


def available_kernel_paths() -> tuple[str, ...]:
    """The paths this CPU can run (the plain one always)."""
    avx2 = llvm_binding.get_host_cpu_features().get("avx2")
    return KERNEL_PATHS if avx2 else ("plain",)


def host_kernel_path() -> str:
    """The fastest path this CPU runs, unless HETERO_CPU_KERNEL_PATH names one."""
    available = available_kernel_paths()
    forced = os.environ.get(PATH_ENV)
    if forced:
        if forced not in available:
            raise ValueError(
                f"{PATH_ENV}={forced!r}: this CPU runs {', '.join(available)}; "
                f"unset it or pick one of those"
            )
        return forced
    return available[0]


@dataclass(frozen=True)
class Q8Matrix:
    """Q8_0 weights [..., rows, cols] (one matrix, or one per expert), repacked for the GEMV:
    int8 values row-major and float32 block scales apart."""

    values: np.ndarray  # int8 [..., rows, cols]
    scales: np.ndarray  # float32 [..., rows, cols / 32]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scales.nbytes

    @classmethod
    def from_blocks(cls, blocks: np.ndarray) -> Q8Matrix:
        """blocks: uint8 [..., rows, cols / 32 * 34], GGUF Q8_0 as stored (a raw tensor)."""
        lead, fmt = blocks.shape[:-1], FORMATS[T.Q8_0]
        f = split_fields(np.ascontiguousarray(blocks).reshape(-1, fmt.type_size), fmt)
        values = f["qs"].view(np.int8).reshape(*lead, -1)
        scales = f["d"].copy().view(np.float16).astype(np.float32).reshape(*lead, -1)
        return cls(np.ascontiguousarray(values), np.ascontiguousarray(scales))


def vector_ptr(builder, context, arr_type, arr, offset, lanes: int):
    """LLVM IR: a <lanes x i8>* to element `offset` of a Numba byte array (for vector loads)."""
    data = context.make_array(arr_type)(context, builder, arr).data
    ptr = builder.gep(data, [offset])
    return builder.bitcast(ptr, ir.VectorType(ir.IntType(8), lanes).as_pointer())


@intrinsic
def _q8_row_dot_avx2(typingctx, w, w_off, x, x_off, scale_w, sw_off, scale_x, sx_off, blocks):
    """sum over `blocks` 32-blocks of (w . x as int32) * scale_w[b] * scale_x[b], float32.

    The sign trick of llama.cpp: pmaddubsw wants an unsigned operand, so it gets |w| and x
    carries w's sign; |w| <= 127 keeps the int16 pair sums below saturation."""
    sig = types.float32(w, w_off, x, x_off, scale_w, sw_off, scale_x, sx_off, types.intp)

    def codegen(context, builder, signature, args):
        wa, wo, xa, xo, swa, swo, sxa, sxo, nblocks = args
        i8x32 = ir.VectorType(ir.IntType(8), 32)
        i16x16 = ir.VectorType(ir.IntType(16), 16)
        i32x8 = ir.VectorType(ir.IntType(32), 8)
        f32x8 = ir.VectorType(ir.FloatType(), 8)
        module = builder.module
        maddubs = cgutils.get_or_insert_function(
            module, ir.FunctionType(i16x16, [i8x32, i8x32]), "llvm.x86.avx2.pmadd.ub.sw"
        )
        maddwd = cgutils.get_or_insert_function(
            module, ir.FunctionType(i32x8, [i16x16, i16x16]), "llvm.x86.avx2.pmadd.wd"
        )
        sig_args = signature.args
        w_ptr = vector_ptr(builder, context, sig_args[0], wa, wo, 32)
        x_ptr = vector_ptr(builder, context, sig_args[2], xa, xo, 32)
        sw_data = context.make_array(sig_args[4])(context, builder, swa).data
        sx_data = context.make_array(sig_args[6])(context, builder, sxa).data
        zero8 = ir.Constant(i8x32, None)
        ones16 = ir.Constant(i16x16, [1] * 16)
        acc = cgutils.alloca_once_value(builder, ir.Constant(f32x8, None))
        with cgutils.for_range(builder, nblocks) as loop:
            b = loop.index
            wv = builder.load(builder.gep(w_ptr, [b]), align=1)
            xv = builder.load(builder.gep(x_ptr, [b]), align=1)
            negative = builder.icmp_signed("<", wv, zero8)
            w_abs = builder.select(negative, builder.sub(zero8, wv), wv)
            x_signed = builder.select(negative, builder.sub(zero8, xv), xv)
            pairs = builder.call(maddubs, [w_abs, x_signed])
            quads = builder.call(maddwd, [pairs, ones16])
            scale = builder.fmul(
                builder.load(builder.gep(sw_data, [builder.add(swo, b)])),
                builder.load(builder.gep(sx_data, [builder.add(sxo, b)])),
            )
            splat = builder.insert_element(ir.Constant(f32x8, None), scale, ir.IntType(32)(0))
            splat = builder.shuffle_vector(splat, splat, ir.Constant(i32x8, None))
            term = builder.fmul(builder.sitofp(quads, f32x8), splat)
            builder.store(builder.fadd(builder.load(acc), term), acc)
        total = builder.load(acc)
        result = builder.extract_element(total, ir.IntType(32)(0))
        for lane in range(1, 8):
            result = builder.fadd(result, builder.extract_element(total, ir.IntType(32)(lane)))
        return result

    return sig, codegen


@njit(nogil=True, cache=True)
def quantize_activations_q8(x, x_q, x_scales):
    """x: float32 [tokens, k] -> x_q int8 [tokens, k], x_scales float32 [tokens, k / 32]."""
    tokens, k = x.shape
    for t in range(tokens):
        for b in range(k // QK8_0):
            amax = np.float32(0.0)
            for j in range(QK8_0):
                amax = max(amax, abs(x[t, b * QK8_0 + j]))
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            x_scales[t, b] = d
            for j in range(QK8_0):
                x_q[t, b * QK8_0 + j] = np.int8(np.rint(x[t, b * QK8_0 + j] * inv))


@njit(nogil=True, cache=True)
def _q8_row_dot_plain(w, w_off, x, x_off, scale_w, sw_off, scale_x, sx_off, blocks):
    """`_q8_row_dot_avx2` in plain Numba: per-block int32 dot products, float scales after."""
    acc = np.float32(0.0)
    for b in range(blocks):
        # unsigned indices spare Numba's negative-index wraparound (which defeats vector loads)
        w_base, x_base = np.uint64(w_off + b * QK8_0), np.uint64(x_off + b * QK8_0)
        dot = 0
        for j in range(QK8_0):
            jj = np.uint64(j)
            dot += np.int32(w[w_base + jj]) * np.int32(x[x_base + jj])
        acc += np.float32(dot) * scale_w[sw_off + b] * scale_x[sx_off + b]
    return acc


# The two kernels differ only in the row dot they call: a dispatcher passed as an argument
# would defeat Numba's on-disk cache, and the AVX2 one must not be compiled on other CPUs.
@njit(parallel=True, nogil=True, cache=True)
def grouped_gemv_q8_0_avx2(w_values, w_scales, x_q, x_scales, pair_expert, out):
    """out[p, r] = W[pair_expert[p], r] . x[p]; w_values int8 [experts, rows, k], x_q [pairs, k]."""
    _, rows, k = w_values.shape
    blocks = k // QK8_0
    w_flat, sw_flat = w_values.reshape(-1), w_scales.reshape(-1)
    x_flat, sx_flat = x_q.reshape(-1), x_scales.reshape(-1)
    for r in prange(rows):
        for p in range(x_q.shape[0]):
            row = pair_expert[p] * rows + r
            out[p, r] = _q8_row_dot_avx2(
                w_flat, row * k, x_flat, p * k, sw_flat, row * blocks, sx_flat, p * blocks, blocks
            )


@njit(parallel=True, nogil=True, cache=True)
def grouped_gemv_q8_0_plain(w_values, w_scales, x_q, x_scales, pair_expert, out):
    """`grouped_gemv_q8_0_avx2` through `_q8_row_dot_plain`."""
    _, rows, k = w_values.shape
    blocks = k // QK8_0
    w_flat, sw_flat = w_values.reshape(-1), w_scales.reshape(-1)
    x_flat, sx_flat = x_q.reshape(-1), x_scales.reshape(-1)
    for r in prange(rows):
        for p in range(x_q.shape[0]):
            row = pair_expert[p] * rows + r
            out[p, r] = _q8_row_dot_plain(
                w_flat, row * k, x_flat, p * k, sw_flat, row * blocks, sx_flat, p * blocks, blocks
            )


GROUPED_GEMV_Q8_0 = {"avx2": grouped_gemv_q8_0_avx2, "plain": grouped_gemv_q8_0_plain}


def quantize_q8_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x: float32 [tokens, k] -> (int8 [tokens, k], float32 scales [tokens, k / 32])."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    tokens, k = x.shape
    if k % QK8_0:
        raise ValueError(f"activation width {k} is not a multiple of the Q8_0 block ({QK8_0})")
    x_q = np.empty((tokens, k), np.int8)
    x_scales = np.empty((tokens, k // QK8_0), np.float32)
    quantize_activations_q8(x, x_q, x_scales)
    return x_q, x_scales


def activation_error_bound(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The most `quantize_q8_activations` can change x @ w.T (rounding each value by at most
    half a step, amax / 254 of its block), plus float32 summation slack: [tokens, rows]."""
    block_max = np.abs(x).reshape(x.shape[0], -1, QK8_0).max(axis=-1)
    step = np.repeat(block_max / 254, QK8_0, axis=-1)
    return step @ np.abs(w).T + 1e-5 * np.abs(x) @ np.abs(w).T


def grouped_q8_0_gemv(
    w: Q8Matrix, x: np.ndarray, pair_expert: np.ndarray, path: str | None = None
) -> np.ndarray:
    """w: [experts, rows, cols]; x: float32 [pairs, cols]; pair_expert: int [pairs]
    -> float32 [pairs, rows], row p = W[pair_expert[p]] @ x[p]."""
    experts, rows, cols = w.shape
    if x.ndim != 2 or x.shape[1] != cols or pair_expert.shape != (x.shape[0],):
        raise ValueError(
            f"x has shape {x.shape} and pair_expert {pair_expert.shape}; expected "
            f"[pairs, {cols}] and [pairs]"
        )
    if len(pair_expert) and not 0 <= pair_expert.min() <= pair_expert.max() < experts:
        raise ValueError(f"pair_expert holds ids outside 0..{experts - 1}")
    x_q, x_scales = quantize_q8_activations(x)
    out = np.empty((x.shape[0], rows), np.float32)
    kernel = GROUPED_GEMV_Q8_0[path or host_kernel_path()]
    kernel(w.values, w.scales, x_q, x_scales, pair_expert.astype(np.int64), out)
    return out


def q8_0_gemv(w: Q8Matrix, x: np.ndarray, path: str | None = None) -> np.ndarray:
    """w: [rows, cols]; x: float32 [tokens, cols] -> float32 [tokens, rows] = x @ W.T."""
    stacked = Q8Matrix(w.values[None], w.scales[None])
    return grouped_q8_0_gemv(stacked, x, np.zeros(x.shape[0], np.int64), path)
