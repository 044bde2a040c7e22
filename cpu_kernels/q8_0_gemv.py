"""Q8_0 decode GEMV: y[p, r] = sum_k W[e_p, r, k] * x[p, k] on int8 weights and int8 activations.

Weights are repacked once into `Q8Matrix` (int8 values plus float16 scales apart, 34 bytes per
32 values as GGUF stores them); activations are
quantised to int8 per 32-block. The AVX2 kernel's inner loop is an integer dot product emitted
through LLVM x86 intrinsics (`pmaddubsw` + `pmaddwd`), because plain Numba code never produces
those instructions (see shared/notes/cpu-kernels.md). Pairs that share an expert are grouped so
that each 32-byte weight vector is loaded once for a tile of up to TOKEN_TILE of them. A
plain-Numba path computes the same thing everywhere and is what the tests compare it with.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from functools import reduce

import llvmlite.binding as llvm_binding
import numpy as np
from gguf import GGMLQuantizationType as T
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from hetero.formats.gguf_quants import FORMATS, split_fields

QK8_0 = 32  # GGUF Q8_0: 32 int8 values and one float16 scale per block
KERNEL_PATHS = ("avx2", "plain")
PATH_ENV = "HETERO_CPU_KERNEL_PATH"  # force a path, e.g. "plain" on a machine with AVX2
# Pairs of one expert that share a pass over a weight row: per pair the tile keeps an
# accumulator and a block's temporaries in registers, and AVX2 has 16 of them.
TOKEN_TILE = 4
# Rows of one expert a thread runs before the next expert: one long sequential read at a time
# keeps the hardware prefetchers on it (a row of each of 50 experts in turn defeats them).
ROW_CHUNK = 64
# How far ahead of the multiply-adds the AVX2 kernels ask for weights (prefetcht0). On the Zen 3
# machines the BF16 GEMV, one token on 2048-wide rows, went from about 0.8 to 0.86-0.92 of the
# DRAM ceiling (512 to 2048 do about as well); past a row's end it reaches the chunk's next row.
PREFETCH_BYTES = 1024
CACHE_LINE = 64


@functools.cache  # asking LLVM for the host's features costs ~0.15 ms, more than a small GEMV
def host_cpu_features() -> dict[str, bool]:
    """This CPU's features as LLVM names them ("avx2", "avx512bf16", ...)."""
    return dict(llvm_binding.get_host_cpu_features())


def available_kernel_paths() -> tuple[str, ...]:
    """The paths this CPU can run (the plain one always). The AVX2 kernels also use FMA and
    F16C, which every AVX2 CPU of either vendor has; checked all the same."""
    features = host_cpu_features()
    avx2 = all(features.get(f) for f in ("avx2", "fma", "f16c"))
    return KERNEL_PATHS if avx2 else ("plain",)


def host_kernel_path() -> str:
    """The fastest path this CPU runs, unless HETERO_CPU_KERNEL_PATH names one."""
    return _kernel_path(os.environ.get(PATH_ENV))


@functools.cache  # every GEMV call asks: resolved once per setting
def _kernel_path(forced: str | None) -> str:
    available = available_kernel_paths()
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
    int8 values row-major and the float16 block scales apart, as their bits (Numba has no
    float16 arrays; the kernels widen them to float32 exactly)."""

    values: np.ndarray  # int8 [..., rows, cols]
    scales: np.ndarray  # uint16 [..., rows, cols / 32]: float16 bits

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


@njit(inline="always")
def half_to_float32(bits):
    """The float32 value of float16 bits (exact: every float16 is a float32)."""
    exponent, mantissa = (bits >> 10) & 0x1F, bits & 0x3FF
    if exponent == 0:  # zero and subnormals: mantissa * 2^-24
        value = np.float32(mantissa) * np.float32(2.0**-24)
    elif exponent == 0x1F:
        value = np.float32(np.inf) if mantissa == 0 else np.float32(np.nan)
    else:
        value = np.float32(1024 + mantissa) * np.float32(2.0 ** (np.int64(exponent) - 25))
    return -value if bits & 0x8000 else value


def expert_slice(array: np.ndarray, index: int | None, matrix_ndim: int = 2) -> np.ndarray:
    """One expert's slice of a [experts, ...] array, or one matrix's array (`matrix_ndim` axes:
    [rows, cols], or [panels, cols, 16] for the panel formats) as it is."""
    if index is None and array.ndim != matrix_ndim:
        raise ValueError(f"a matrix of {len(array)} experts needs an expert index")
    if index is not None and array.ndim != matrix_ndim + 1:
        raise ValueError("a single [rows, cols] matrix takes no expert index")
    return array if index is None else array[index]


# LLVM IR for the AVX2 intrinsics' codegen.
I8X32 = ir.VectorType(ir.IntType(8), 32)
I16X16 = ir.VectorType(ir.IntType(16), 16)
I32X8 = ir.VectorType(ir.IntType(32), 8)
F32X8 = ir.VectorType(ir.FloatType(), 8)
ONES_I16X16 = ir.Constant(I16X16, [1] * 16)
BYTE_PTR = ir.IntType(8).as_pointer()


def vector_ptr(builder, context, arr_type, arr, offset, lanes: int):
    """LLVM IR: a <lanes x i8>* to element `offset` of a Numba byte array (for vector loads)."""
    data = context.make_array(arr_type)(context, builder, arr).data
    ptr = builder.gep(data, [offset])
    return builder.bitcast(ptr, ir.VectorType(ir.IntType(8), lanes).as_pointer())


def element_ptr(builder, context, arr_type, arr, offset):
    """LLVM IR: a pointer to element `offset` of a Numba array."""
    return builder.gep(context.make_array(arr_type)(context, builder, arr).data, [offset])


def lane_mask(indices) -> ir.Constant:
    """A shufflevector mask: the source lanes of each result lane."""
    indices = list(indices)
    return ir.Constant(ir.VectorType(ir.IntType(32), len(indices)), indices)


class Avx2Ir:
    """The AVX2 instructions the tile kernels are made of, as LLVM IR calls."""

    def __init__(self, builder: ir.IRBuilder):
        self.builder = builder

        def function(name, ret, *args):
            return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)

        self._maddubs = function("llvm.x86.avx2.pmadd.ub.sw", I16X16, I8X32, I8X32)
        self._maddwd = function("llvm.x86.avx2.pmadd.wd", I32X8, I16X16, I16X16)
        self._psign = function("llvm.x86.avx2.psign.b", I8X32, I8X32, I8X32)
        self._pshufb = function("llvm.x86.avx2.pshuf.b", I8X32, I8X32, I8X32)
        self._fma = function("llvm.fma.v8f32", F32X8, F32X8, F32X8, F32X8)
        i32 = ir.IntType(32)
        self._prefetch = function("llvm.prefetch.p0i8", ir.VoidType(), BYTE_PTR, i32, i32, i32)

    def prefetch(self, ptr, byte_offset):
        """Ask for the cache line `byte_offset` bytes past `ptr` (any pointer) into every cache
        level, for reading (prefetcht0)."""
        b = self.builder
        line = b.gep(b.bitcast(ptr, BYTE_PTR), [byte_offset])
        read, keep_in_all_caches, data = (ir.IntType(32)(v) for v in (0, 3, 1))
        b.call(self._prefetch, [line, read, keep_in_all_caches, data])

    def int_dot(self, unsigned, signed, pair_weights=ONES_I16X16):
        """i32x8: lane i = sum over bytes 4i..4i+3 of unsigned * signed, each adjacent pair's
        int16 sum times pair_weights (vpmaddubsw + vpmaddwd). The pair sums (two products)
        saturate at +-32767."""
        pairs = self.builder.call(self._maddubs, [unsigned, signed])
        return self.builder.call(self._maddwd, [pairs, pair_weights])

    def sign(self, values, signs):
        """values negated where signs < 0 and zeroed where signs == 0 (vpsignb)."""
        return self.builder.call(self._psign, [values, signs])

    def widen_byte(self, table, index: int):
        """i16x16 of byte `index` of each 128-bit half of `table` (i8x32), zero-extended: one
        vpshufb with a constant mask (bit 7 set in a mask byte zeroes the result byte)."""
        mask = ir.Constant(I8X32, [index, -128] * 16)
        return self.builder.bitcast(self.builder.call(self._pshufb, [table, mask]), I16X16)

    def fma(self, a, b, c):
        return self.builder.call(self._fma, [a, b, c])

    def splat(self, scalar, vector_type=F32X8):
        lane0 = self.builder.insert_element(
            ir.Constant(vector_type, None), scalar, ir.IntType(32)(0)
        )
        return self.builder.shuffle_vector(lane0, lane0, lane_mask([0] * vector_type.count))

    def horizontal_sum(self, vector):
        """The float sum of a vector's lanes, by halving (3 shuffles and adds for 8 lanes)."""
        b = self.builder
        while vector.type.count > 1:
            half = vector.type.count // 2
            low = b.shuffle_vector(vector, vector, lane_mask(range(half)))
            high = b.shuffle_vector(vector, vector, lane_mask(range(half, 2 * half)))
            vector = b.fadd(low, high)
        return b.extract_element(vector, ir.IntType(32)(0))


def tile_type(pairs) -> int | None:
    """The tile size of a tuple of 1 to TOKEN_TILE integer pair indices, else None."""
    if isinstance(pairs, types.UniTuple) and isinstance(pairs.dtype, types.Integer):
        return pairs.count if 1 <= pairs.count <= TOKEN_TILE else None
    return None


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
        half8, float8 = ir.VectorType(ir.HalfType(), 8), F32X8
        with cgutils.for_range(builder, builder.udiv(nblocks, nblocks.type(8))) as loop:
            first = builder.mul(loop.index, loop.index.type(8))
            here = builder.gep(w_ptr, [first])
            for line in range(0, 8 * QK8_0, CACHE_LINE):
                avx2.prefetch(here, first.type(PREFETCH_BYTES + line))
            w_bits8 = builder.load(
                builder.bitcast(builder.gep(sw_ptr, [first]), half8.as_pointer()), align=2
            )
            w_scales8 = builder.fpext(w_bits8, float8)
            scales = [
                builder.fmul(
                    w_scales8,
                    builder.load(
                        builder.bitcast(builder.gep(sx_ptr, [first]), float8.as_pointer()),
                        align=4,
                    ),
                )
                for _, sx_ptr, _ in tokens
            ]
            for lane in range(8):
                block(builder.add(first, first.type(lane)), lane % chains, scales, lane)
        tail_start = builder.sub(nblocks, builder.urem(nblocks, nblocks.type(8)))
        with cgutils.for_range_slice(builder, tail_start, nblocks, nblocks.type(1)) as (b, _):
            block(b, 0)
        totals = [reduce(builder.fadd, map(builder.load, accs)) for _, _, accs in tokens]
        sums = [avx2.horizontal_sum(total) for total in totals]
        return context.make_tuple(builder, signature.return_type, sums)

    return sig, codegen


@njit(inline="always")
def store_tile(out, pairs, col, values):
    """out[pairs[j], col] = values[j] for a tile's pairs."""
    for j in range(len(pairs)):
        out[pairs[j], col] = values[j]


@njit(nogil=True, cache=True)
def group_pairs_by_expert(pair_expert, experts):
    """Counting sort of the pairs by expert -> (order: pair indices, each expert's together in
    pair order; group_start: int64 [groups + 1] into order; group_expert: int64 [groups]), or
    None where an id is outside 0..experts - 1."""
    counts = np.zeros(experts, np.int64)
    for e in pair_expert:
        if not 0 <= e < experts:
            return None
        counts[e] += 1
    group_expert = np.flatnonzero(counts)
    group_start = np.zeros(len(group_expert) + 1, np.int64)
    group_start[1:] = np.cumsum(counts[group_expert])
    next_slot = np.zeros(experts, np.int64)
    next_slot[group_expert] = group_start[:-1]
    order = np.empty(len(pair_expert), np.int64)
    for p in range(len(pair_expert)):
        order[next_slot[pair_expert[p]]] = p
        next_slot[pair_expert[p]] += 1
    return order, group_start, group_expert.astype(np.int64)


@njit(nogil=True, cache=True)
def quantize_activations_q8(x, x_q, x_scales):
    """x: float32 [tokens, k] -> x_q int8 [tokens, k], x_scales float32 [tokens, k / block]:
    symmetric int8 per block of k / x_scales.shape[1] values (32 for Q8_0, 256 for the
    K-quants' kernels)."""
    tokens, k = x.shape
    block = k // x_scales.shape[1]
    for t in range(tokens):
        for b in range(k // block):
            amax = np.float32(0.0)
            for j in range(block):
                amax = max(amax, abs(x[t, b * block + j]))
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            x_scales[t, b] = d
            for j in range(block):
                x_q[t, b * block + j] = np.int8(np.rint(x[t, b * block + j] * inv))


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


_q8_pairs_avx2 = tiled_pairs(_q8_tile_dot_avx2)


# Both kernels: out[p, r] = W[e, r] . x[p] for the pairs p = order[group_start[g]:
# group_start[g + 1]] of expert e = group_expert[g]; w_values int8 [experts, rows, k], x_q int8
# [pairs, k]. Each thread takes chunks of ROW_CHUNK rows and runs them expert after expert. The
# kernels differ in how they run a row's pairs: a dispatcher passed as an argument would defeat
# Numba's on-disk cache, and the AVX2 one must not be compiled on other CPUs.
@njit(parallel=True, nogil=True, cache=True)
def grouped_gemv_q8_0_avx2(
    w_values, w_scales, x_q, x_scales, order, group_start, group_expert, out
):
    """Tiles of up to 4 pairs of one expert through `_q8_tile_dot_avx2`."""
    _, rows, k = w_values.shape
    blocks = k // QK8_0
    weights = (w_values.reshape(-1), w_scales.reshape(-1))
    acts = (x_q.reshape(-1), x_scales.reshape(-1))
    for c in prange((rows + ROW_CHUNK - 1) // ROW_CHUNK):
        for g in range(len(group_expert)):
            first, end = group_start[g], group_start[g + 1]
            for r in range(c * ROW_CHUNK, min(rows, (c + 1) * ROW_CHUNK)):
                row = group_expert[g] * rows + r
                _q8_pairs_avx2(weights, acts, row, order, first, end, blocks, out, r)


@njit(parallel=True, nogil=True, cache=True)
def grouped_gemv_q8_0_plain(
    w_values, w_scales, x_q, x_scales, order, group_start, group_expert, out
):
    """One `_q8_row_dot_plain` per pair."""
    _, rows, k = w_values.shape
    blocks = k // QK8_0
    w_flat, sw_flat = w_values.reshape(-1), w_scales.reshape(-1)
    x_flat, sx_flat = x_q.reshape(-1), x_scales.reshape(-1)
    for c in prange((rows + ROW_CHUNK - 1) // ROW_CHUNK):
        for g in range(len(group_expert)):
            for r in range(c * ROW_CHUNK, min(rows, (c + 1) * ROW_CHUNK)):
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


GROUPED_GEMV_Q8_0 = {"avx2": grouped_gemv_q8_0_avx2, "plain": grouped_gemv_q8_0_plain}


def quantize_q8_activations(x: np.ndarray, block: int = QK8_0) -> tuple[np.ndarray, np.ndarray]:
    """x: float32 [tokens, k] -> (int8 [tokens, k], float32 scales [tokens, k / block])."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    tokens, k = x.shape
    if k % block:
        raise ValueError(f"activation width {k} is not a multiple of the block ({block})")
    x_q = np.empty((tokens, k), np.int8)
    x_scales = np.empty((tokens, k // block), np.float32)
    quantize_activations_q8(x, x_q, x_scales)
    return x_q, x_scales


def activation_error_bound(w: np.ndarray, x: np.ndarray, block: int = QK8_0) -> np.ndarray:
    """The most `quantize_q8_activations` can change x @ w.T (rounding each value by at most
    half a step, amax / 254 of its block), plus float32 summation slack: [tokens, rows]."""
    block_max = np.abs(x).reshape(x.shape[0], -1, block).max(axis=-1)
    step = np.repeat(block_max / 254, block, axis=-1)
    return step @ np.abs(w).T + 1e-5 * np.abs(x) @ np.abs(w).T


def gemv_error_bound(
    w: np.ndarray, x: np.ndarray, magnitude: np.ndarray | None = None, block: int = QK8_0
) -> np.ndarray:
    """The most the GEMV kernels can differ from x @ w.T for weights w [rows, cols] exact in
    float32 (the dequantised blocks): [tokens, rows].

    - int8 activations: x' = q * d with d = amax / 127 of the block (`block` values: 32, or
      256 for the K-quant kernels); the float32 rounding of
      x * (1 / d) before rint moves q by at most 127 * 2u past half a step (u = 2^-24), so
      |x - x'| <= amax / 254 * (1 + 2^-14) per value.
    - float32 arithmetic on exact integer block dots: each term t (a weight times x') passes
      through at most blocks + 16 roundings (scale products, one lane's running sum over the
      row's blocks, the 3 steps of the lane reduction; Q4_K's per-super-block steps fit in
      that too), so the sum moves by at most (blocks + 16) * u * sum |t|, with |t| <=
      magnitude * |x'| and magnitude = |w| unless the kernel adds larger partial terms (Q4_K's
      d * scale * q and dmin * min, whose magnitudes are at most |w| + 2 dmin * min)."""
    magnitude = np.abs(w) if magnitude is None else magnitude
    block_max = np.abs(x).reshape(x.shape[0], -1, block).max(axis=-1)
    step = np.repeat(block_max / 254 * (1 + 2.0**-14), block, axis=-1)
    blocks = x.shape[1] // QK8_0
    rounding = (blocks + 16) * 2.0**-24 * (np.abs(x) + step) @ magnitude.T
    return step @ np.abs(w).T + rounding


def check_pairs(shape: tuple[int, ...], x: np.ndarray, pair_expert: np.ndarray):
    """Shapes of a grouped GEMV's operands (w: [experts, rows, cols]) -> the pair grouping of
    `group_pairs_by_expert`."""
    if len(shape) != 3:
        raise ValueError(f"weights of shape {shape}: a grouped GEMV takes [experts, rows, cols]")
    experts, _, cols = shape
    if x.ndim != 2 or x.shape[1] != cols or pair_expert.shape != (x.shape[0],):
        raise ValueError(
            f"x has shape {x.shape} and pair_expert {pair_expert.shape}; expected "
            f"[pairs, {cols}] and [pairs]"
        )
    if pair_expert.dtype != np.int64:
        pair_expert = pair_expert.astype(np.int64)
    groups = group_pairs_by_expert(pair_expert, experts)
    if groups is None:
        raise ValueError(f"pair_expert holds ids outside 0..{experts - 1}")
    return groups


def grouped_q8_0_gemv(
    w: Q8Matrix, x: np.ndarray, pair_expert: np.ndarray, path: str | None = None
) -> np.ndarray:
    """w: [experts, rows, cols]; x: float32 [pairs, cols]; pair_expert: int [pairs]
    -> float32 [pairs, rows], row p = W[pair_expert[p]] @ x[p]."""
    groups = check_pairs(w.shape, x, pair_expert)
    x_q, x_scales = quantize_q8_activations(x)
    out = np.empty((x.shape[0], w.shape[1]), np.float32)
    GROUPED_GEMV_Q8_0[path or host_kernel_path()](w.values, w.scales, x_q, x_scales, *groups, out)
    return out
