"""GEMV/GEMM on float weights in row panels: y[p, r] = sum_k W[e_p, r, k] * x[p, k], float32 x.

BF16, F16 and F32 weights are repacked at load into panels of 16 rows stored column by column.
A BF16 column is one 32-byte load, widened exactly (a bfloat16 is the top half of a float32)
into rows 0-7 by a shift of its even lanes and rows 8-15 by a mask of its odd ones; an F16
column is one load and two vcvtph2ps; an F32 column is two loads. The AVX2 kernel multiply-adds
each column into a tile of up to PANEL_TILE pairs (one broadcast activation each): 12
accumulators and no horizontal sums, so a batch of tokens runs near the FMA peak and one token
at the DRAM ceiling. The plain-Numba kernel widens a panel into a per-thread buffer: slower,
but it runs on any CPU (HETERO_CPU_KERNEL_PATH=plain forces it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import ClassVar

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from cpu_kernels.float16_bits import half_to_float32
from cpu_kernels.kernel_matrix import KernelMatrix, expert_slice
from cpu_kernels.tiling import CACHE_LINE, TILES
from cpu_kernels.x86_ir import F32X8, I16X16, I32X8, Avx2Ir, element_ptr, lane_mask

LANES = 8  # float32 lanes of an AVX2 register
PANEL_ROWS = 2 * LANES  # rows of a panel: one 32-byte load holds a column of it
# Pairs that share a pass over a panel: two accumulators each (first and last 8 rows), 12 of
# the 16 ymm registers, the rest for the widened column and a broadcast activation. Against the
# dot-product tiles this replaced (2 rows x 4 pairs, activations reloaded for every row), 16
# tokens on a 151936x2048 matrix went from ~60 to ~88 GMAC/s and 294 tokens on 1536x2048 from
# ~59 to ~97 (2-core Zen 3, in one run).
PANEL_TILE = 6
PANEL_CHUNK = TILES["avx2"].row_chunk // PANEL_ROWS  # panels a thread runs, expert after expert
PREFETCH_BYTES = TILES["avx2"].prefetch_bytes
PANEL_ALIGN_BYTES = 64  # panels start on a cache line: every 32-byte load stays within one


@dataclass(frozen=True)
class PanelMatrix(KernelMatrix):
    """Weights [..., rows, cols] (one matrix, or one per expert) in panels of PANEL_ROWS rows
    stored column by column: panels[..., n, k, lane] is column k of one of rows 16n to 16n + 15
    (INTERLEAVED: lane 2i holds row 16n + i and lane 2i + 1 row 16n + 8 + i; otherwise lane i
    holds row 16n + i). Rows past `rows` (the last panel's padding) are zero."""

    panels: np.ndarray  # [..., ceil(rows / 16), cols, 16] of STORAGE
    rows: int

    NAME: ClassVar[str]  # the GGUF type
    STORAGE: ClassVar[type]
    INTERLEAVED: ClassVar[bool]  # lane 2i: row i, lane 2i + 1: row 8 + i; else lane i: row i

    @classmethod
    def from_blocks(cls, blocks: np.ndarray) -> PanelMatrix:
        """blocks: uint8 [..., rows, cols * value bytes], a GGUF tensor of this type as stored
        (little-endian)."""
        size = np.dtype(cls.STORAGE).itemsize
        if blocks.dtype != np.uint8 or blocks.ndim < 2 or blocks.shape[-1] % size:
            raise ValueError(
                f"{cls.NAME} blocks of dtype {blocks.dtype} and shape {blocks.shape}: expected "
                f"uint8 [..., rows, cols * {size}] ({size} bytes per value)"
            )
        return cls.from_values(np.ascontiguousarray(blocks).view(cls.STORAGE))

    @classmethod
    def from_values(cls, values: np.ndarray) -> PanelMatrix:
        """values: [..., rows, cols] of STORAGE, row by row -> panels (a copy)."""
        if values.dtype != cls.STORAGE or values.ndim < 2:
            raise ValueError(
                f"{cls.__name__} values of dtype {values.dtype} and shape {values.shape}: "
                f"expected {np.dtype(cls.STORAGE).name} [..., rows, cols]"
            )
        *lead, rows, cols = values.shape
        panels = aligned_empty((*lead, -(-rows // PANEL_ROWS), cols, PANEL_ROWS), cls.STORAGE)
        flat = (math.prod(lead), *panels.shape[-3:])
        _pack_panels(
            np.ascontiguousarray(values).reshape(flat[0], rows, cols), panels.reshape(flat)
        )
        return cls(panels, rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.panels.shape[:-3], self.rows, self.panels.shape[-2])

    @property
    def arrays(self) -> tuple[np.ndarray, ...]:
        return (self.panels,)

    @staticmethod
    def activations(x: np.ndarray) -> tuple[np.ndarray]:
        """x as it is: the panel kernels multiply float32 activations."""
        return (np.ascontiguousarray(x, np.float32),)

    @property
    def out_rows(self) -> int:
        return self.panels.shape[-3] * PANEL_ROWS

    def values(self) -> np.ndarray:
        """[..., rows, cols] of STORAGE, row by row (a copy)."""
        *lead, count, cols, _ = self.panels.shape
        if self.INTERLEAVED:
            halves = self.panels.reshape(*lead, count, cols, LANES, 2)
            # [..., panel, col, i, half] -> [..., panel, half, i, col]: row 16 panel + 8 half + i
            rows = np.moveaxis(halves, (-3, -2, -1), (-1, -2, -3))
        else:
            rows = np.moveaxis(self.panels, -1, -2)  # [..., panel, lane, col]
        rows = rows.reshape(*lead, -1, cols)
        return np.ascontiguousarray(rows[..., : self.rows, :])

    def _one(self, index: int | None) -> PanelMatrix:
        return type(self)(expert_slice(self.panels, index, matrix_ndim=3), self.rows)


class BF16Matrix(PanelMatrix):
    """BF16 weights as raw bfloat16 bits; a column of a panel is one 32-byte load, widened by a
    shift (even lanes: rows 0-7) and a mask (odd lanes: rows 8-15)."""

    NAME, STORAGE, INTERLEAVED = "BF16", np.uint16, True

    def dequantize(self, index: int | None = None) -> np.ndarray:
        """float32 [rows, cols] of one expert (`index`) or of a 2-D matrix (None); exact."""
        return (self._one(index).values().astype(np.uint32) << np.uint32(16)).view(np.float32)


class F32Matrix(PanelMatrix):
    """float32 weights; a column of a panel is two 32-byte loads (rows 0-7, rows 8-15)."""

    NAME, STORAGE, INTERLEAVED = "F32", np.float32, False

    def dequantize(self, index: int | None = None) -> np.ndarray:
        """float32 [rows, cols] of one expert (`index`) or of a 2-D matrix (None)."""
        return self._one(index).values()


class F16Matrix(PanelMatrix):
    """float16 weights as their bits, stored as int16: Numba has no float16 arrays, and the
    signed type tells the kernels the format apart from BF16's uint16. A column of a panel is
    one 32-byte load, widened exactly by two vcvtph2ps (rows 0-7, rows 8-15)."""

    NAME, STORAGE, INTERLEAVED = "F16", np.int16, False

    def dequantize(self, index: int | None = None) -> np.ndarray:
        """float32 [rows, cols] of one expert (`index`) or of a 2-D matrix (None); exact."""
        return self._one(index).values().view(np.float16).astype(np.float32)


@njit(parallel=True, nogil=True, cache=True)
def _pack_panels(values, panels):
    """values [m, rows, cols] -> panels [m, ceil(rows / 16), cols, 16] (see PanelMatrix)."""
    m, rows, cols = values.shape
    count = panels.shape[1]
    for job in prange(m * count):
        e, n = job // count, job % count
        for lane in range(PANEL_ROWS):
            r = n * PANEL_ROWS + _lane_row(panels, lane)
            if r < rows:
                for k in range(cols):
                    panels[e, n, k, lane] = values[e, r, k]
            else:
                for k in range(cols):
                    panels[e, n, k, lane] = 0


@intrinsic
def _panel_tile_avx2(typingctx, w, w_start, x, pairs, cols, out, out_cols, out_start):
    """out[p, out_start : out_start + 16] = the panel at w[w_start:] times x[p], for p in pairs:
    w uint16 (BF16 panels), int16 (F16) or float32 (F32), x and out float32, all flat; x has
    `cols` values per pair, out `out_cols`; pairs: a tuple of 1 to PANEL_TILE pair indices. A
    BF16 column is widened into rows 0-7 by a shift of its even lanes and rows 8-15 by a mask of
    its odd ones; an F16 column is rows 0-15 in order, widened by two vcvtph2ps; an F32 column
    is rows 0-7 then 8-15, two loads.

    Each step reads one column once for the whole tile and multiply-adds it into two
    accumulators per pair, against the pair's activation broadcast to all lanes. Small tiles
    spread their steps over `chains` accumulator sets, so that the multiply-add latency (4
    cycles on Zen 3) does not serialise one; each step of `unroll` columns prefetches
    PREFETCH_BYTES ahead (past a panel's end: the chunk's next panel)."""
    if not (isinstance(pairs, types.UniTuple) and isinstance(pairs.dtype, types.Integer)):
        return None
    if w.dtype not in (types.uint16, types.int16, types.float32):
        return None
    wide, half = w.dtype == types.float32, w.dtype == types.int16
    column_bytes = PANEL_ROWS * (4 if wide else 2)
    tile = pairs.count
    if not 1 <= tile <= PANEL_TILE:
        return None
    sig = types.void(w, types.intp, x, pairs, types.intp, out, types.intp, types.intp)
    chains = max(1, min(4, PANEL_TILE // tile))

    def codegen(context, builder, signature, args):
        w_type, _, x_type, _, _, out_type, _, _ = signature.args
        w, w_start, x, pair_ids, cols, out, out_cols, out_start = args
        pair_ids = cgutils.unpack_tuple(builder, pair_ids)
        avx2 = Avx2Ir(builder)
        w_ptr = element_ptr(builder, context, w_type, w, w_start)
        columns = builder.bitcast(
            w_ptr, (F32X8 if wide else I16X16 if half else I32X8).as_pointer()
        )
        x_ptrs = [element_ptr(builder, context, x_type, x, builder.mul(p, cols)) for p in pair_ids]
        accs = [
            [
                [
                    cgutils.alloca_once_value(builder, ir.Constant(F32X8, None))
                    for _ in range(chains)
                ]
                for _ in range(2)
            ]
            for _ in pair_ids
        ]
        high_half = ir.Constant(I32X8, [-65536] * LANES)  # 0xFFFF0000
        shift = ir.Constant(I32X8, [16] * LANES)

        def column(k):
            """Column k of the panel as float32 rows 0-7 and rows 8-15."""
            if wide:
                first = builder.mul(k, k.type(2))
                return tuple(
                    builder.load(builder.gep(columns, [builder.add(first, k.type(h))]), align=4)
                    for h in (0, 1)
                )
            bits = builder.load(builder.gep(columns, [k]), align=2)
            if half:  # two vcvtph2ps
                halves = builder.bitcast(bits, ir.VectorType(ir.HalfType(), PANEL_ROWS))
                return tuple(
                    builder.fpext(
                        builder.shuffle_vector(
                            halves, halves, lane_mask(range(h * LANES, (h + 1) * LANES))
                        ),
                        F32X8,
                    )
                    for h in (0, 1)
                )
            return (
                builder.bitcast(builder.shl(bits, shift), F32X8),
                builder.bitcast(builder.and_(bits, high_half), F32X8),
            )

        def step(k, chain: int):
            halves = column(k)
            for x_ptr, pair_accs in zip(x_ptrs, accs, strict=True):
                xs = avx2.splat(builder.load(builder.gep(x_ptr, [k]), align=4))
                for weights, acc_set in zip(halves, pair_accs, strict=True):
                    acc = acc_set[chain]
                    builder.store(avx2.fma(weights, xs, builder.load(acc)), acc)

        unroll = max(chains, CACHE_LINE // column_bytes)  # whole cache lines per step
        steps = builder.udiv(cols, cols.type(unroll))
        with cgutils.for_range(builder, steps) as loop:
            first = builder.mul(loop.index, cols.type(unroll))
            ahead = builder.add(
                builder.mul(first, cols.type(column_bytes)), cols.type(PREFETCH_BYTES)
            )
            for line in range(0, unroll * column_bytes, CACHE_LINE):
                avx2.prefetch(w_ptr, builder.add(ahead, cols.type(line)))
            for i in range(unroll):
                step(builder.add(first, cols.type(i)), i % chains)
        left = builder.mul(steps, cols.type(unroll))
        with cgutils.for_range_slice(builder, left, cols, cols.type(1)) as (k, _):
            step(k, 0)
        for p, pair_accs in zip(pair_ids, accs, strict=True):
            start = builder.add(builder.mul(p, out_cols), out_start)
            halves = builder.bitcast(
                element_ptr(builder, context, out_type, out, start), F32X8.as_pointer()
            )
            for h, acc_set in enumerate(pair_accs):
                total = reduce(builder.fadd, [builder.load(a) for a in acc_set])
                builder.store(total, builder.gep(halves, [cols.type(h)]), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def panel_pairs_avx2(w, w_start, x, order, first, end, cols, out, out_cols, out_start):
    """The panel at w[w_start:] times x[p] for the pairs p = order[first:end], in tiles of up
    to PANEL_TILE of even size (14 pairs: 5, 5, 4 rather than 6, 6, 2)."""
    i = first
    while i < end:
        tiles = -(-(end - i) // PANEL_TILE)
        size = -(-(end - i) // tiles)
        o = order
        if size == 6:
            tile6 = (o[i], o[i + 1], o[i + 2], o[i + 3], o[i + 4], o[i + 5])
            _panel_tile_avx2(w, w_start, x, tile6, cols, out, out_cols, out_start)
        elif size == 5:
            tile5 = (o[i], o[i + 1], o[i + 2], o[i + 3], o[i + 4])
            _panel_tile_avx2(w, w_start, x, tile5, cols, out, out_cols, out_start)
        elif size == 4:
            tile4 = (o[i], o[i + 1], o[i + 2], o[i + 3])
            _panel_tile_avx2(w, w_start, x, tile4, cols, out, out_cols, out_start)
        elif size == 3:
            tile3 = (o[i], o[i + 1], o[i + 2])
            _panel_tile_avx2(w, w_start, x, tile3, cols, out, out_cols, out_start)
        elif size == 2:
            _panel_tile_avx2(w, w_start, x, (o[i], o[i + 1]), cols, out, out_cols, out_start)
        else:
            _panel_tile_avx2(w, w_start, x, (o[i],), cols, out, out_cols, out_start)
        i += size


# Both kernels: out[p, r] = W[e, r] . x[p] for the pairs p = order[group_start[g]:
# group_start[g + 1]] of expert e = group_expert[g]; panels [experts, count, cols, 16] (uint16
# BF16, int16 F16 or float32), x float32 [pairs, cols], out float32 [pairs, count * 16] (the
# padding rows included).
@njit(parallel=True, nogil=True, cache=True)
def grouped_gemv_panels_avx2(panels, x, order, group_start, group_expert, out):
    """Each thread takes PANEL_CHUNK panels and runs them expert after expert, a panel's pairs
    in tiles through `_panel_tile_avx2`."""
    _, count, cols, _ = panels.shape
    w, x_flat, out_flat, out_cols = panels.reshape(-1), x.reshape(-1), out.reshape(-1), out.shape[1]
    for c in prange((count + PANEL_CHUNK - 1) // PANEL_CHUNK):
        for g in range(len(group_expert)):
            first, end = group_start[g], group_start[g + 1]
            for n in range(c * PANEL_CHUNK, min(count, (c + 1) * PANEL_CHUNK)):
                start = (group_expert[g] * count + n) * cols * PANEL_ROWS
                panel_pairs_avx2(
                    w, start, x_flat, order, first, end, cols, out_flat, out_cols, n * PANEL_ROWS
                )


@njit(parallel=True, nogil=True, fastmath=True, cache=True)
def grouped_gemv_panels_plain(panels, x, order, group_start, group_expert, out):
    """Each panel widened once into a per-thread float32 buffer, then one pass per pair."""
    _, count, cols, _ = panels.shape
    for n in prange(count):
        panel_f32 = np.empty((cols, PANEL_ROWS), np.float32)
        acc = np.empty(PANEL_ROWS, np.float32)
        for g in range(len(group_expert)):
            _widen_plain(panels[group_expert[g], n].reshape(-1), panel_f32.reshape(-1))
            for p in order[group_start[g] : group_start[g + 1]]:
                acc[:] = 0.0
                for k in range(cols):
                    for lane in range(PANEL_ROWS):
                        acc[lane] += panel_f32[k, lane] * x[p, k]
                for lane in range(PANEL_ROWS):
                    out[p, n * PANEL_ROWS + _lane_row(panels, lane)] = acc[lane]


def _lane_row(panels, lane):
    """The row within its panel that a lane holds (in Numba; the layout follows the storage
    type: BF16's uint16 bits interleaved, F16 and F32 in order, as PanelMatrix.INTERLEAVED
    says)."""


@overload(_lane_row, jit_options={"nogil": True})
def _lane_row_numba(panels, lane):
    if panels.dtype == types.uint16:
        return lambda panels, lane: lane // 2 + LANES * (lane % 2)
    return lambda panels, lane: lane


def _widen_plain(stored, wide):
    """stored: [n] uint16 bfloat16 bits, int16 float16 bits or float32 -> wide: float32 [n]
    (in Numba)."""


@overload(_widen_plain, jit_options={"nogil": True})
def _widen_plain_numba(stored, wide):
    if stored.dtype == types.uint16:

        def widen_bits(stored, wide):
            bits = wide.view(np.uint32)
            for j in range(len(stored)):  # a loop LLVM vectorises
                bits[j] = np.uint32(stored[j]) << np.uint32(16)

        return widen_bits

    if stored.dtype == types.int16:

        def widen_halves(stored, wide):
            for j in range(len(stored)):
                wide[j] = half_to_float32(np.uint16(stored[j]))

        return widen_halves

    def copy(stored, wide):
        wide[:] = stored

    return copy


GROUPED_GEMV_PANELS = {"avx2": grouped_gemv_panels_avx2, "plain": grouped_gemv_panels_plain}


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised C-contiguous array starting on a PANEL_ALIGN_BYTES boundary."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    buffer = np.empty(nbytes + PANEL_ALIGN_BYTES, np.uint8)
    start = -buffer.ctypes.data % PANEL_ALIGN_BYTES
    return buffer[start : start + nbytes].view(dtype).reshape(shape)
