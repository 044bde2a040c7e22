"""BF16 GEMV kernels against a float64 reference on the dequantised weights.

Error budget (`gemv_error_bound`): the weights widen exactly and the activations stay float32, so
the kernels differ from the float64 dot only by float32 summation: in any order, a sum of n
products moves by at most about n * 2^-24 * sum |w * x| (one more rounding where a product is
not fused into its add), and n * 2^-23 covers both with room to spare."""

import numba
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from cpu_kernels.bf16_gemv import (
    X_ALIGN_BYTES,
    BF16Matrix,
    _bf16_tile_dot_avx2,
    aligned_activations,
    grouped_bf16_gemv,
    interleaved,
)
from cpu_kernels.gguf_quantize import quantize
from cpu_kernels.gguf_quants import dequantize
from cpu_kernels.q8_0_gemv import available_kernel_paths
from cpu_kernels.quant_matrix import gemv

# tokens per call: a single tile of 1 to 4, a full tile plus a tail, two full tiles plus one;
# from ROW_TILE_PAIRS (8) on, two weight rows per tile (with an odd row count, one row alone)
TOKEN_COUNTS = [1, 2, 3, 4, 5, 8, 9, 19]


def random_bf16(rng: np.random.Generator, shape: tuple[int, ...]) -> BF16Matrix:
    return BF16Matrix.from_blocks(quantize(rng.standard_normal(shape, dtype=np.float32), T.BF16))


def gemv_error_bound(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """w: [rows, cols] exact in float32; x: float32 [tokens, cols] -> [tokens, rows]."""
    return x.shape[1] * 2.0**-23 * np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T


def assert_matches_reference(got: np.ndarray, dense: np.ndarray, x: np.ndarray):
    # got: [tokens, rows] from the kernel; dense: float32 [rows, cols]
    want = x.astype(np.float64) @ dense.astype(np.float64).T
    assert got.dtype == np.float32 and got.shape == want.shape
    assert (np.abs(got - want) <= gemv_error_bound(dense, x)).all()


def torch_bf16_to_f32_bits(values: np.ndarray) -> np.ndarray:
    widened = torch.from_numpy(values.view(np.int16)).view(torch.bfloat16).float()
    return widened.numpy().view(np.uint32)


def test_bf16_dequantize_matches_torch_bit_for_bit():
    rng = np.random.default_rng()
    values = rng.integers(0, 2**16, (3, 7, 96), dtype=np.uint16)
    # signed zeros, infinities, the smallest subnormal and the largest finite value
    values[0, 0, :8] = [0x0000, 0x8000, 0x7F80, 0xFF80, 0x0001, 0x8001, 0x7F7F, 0xFF7F]
    w = BF16Matrix.from_blocks(values.view(np.uint8))
    for expert in range(3):
        want = torch_bf16_to_f32_bits(values[expert])
        np.testing.assert_array_equal(w.dequantize(expert).view(np.uint32), want)
    np.testing.assert_array_equal(BF16Matrix(values[1]).dequantize(), w.dequantize(1))


def test_bf16_from_blocks_reads_gguf_bf16_rows():
    x = np.random.default_rng().standard_normal((2, 5, 200), dtype=np.float32)
    blocks = quantize(x, T.BF16)  # uint8 [2, 5, 400]
    w = BF16Matrix.from_blocks(blocks)
    assert w.shape == (2, 5, 200) and w.nbytes == blocks.nbytes
    for expert in range(2):
        want = dequantize(blocks[expert], T.BF16)
        np.testing.assert_array_equal(w.dequantize(expert).view(np.uint32), want.view(np.uint32))


def test_bf16_from_blocks_rejects_odd_byte_rows():
    with pytest.raises(ValueError, match="2 bytes per value"):
        BF16Matrix.from_blocks(np.zeros((4, 7), np.uint8))
    with pytest.raises(ValueError, match="2 bytes per value"):
        BF16Matrix.from_blocks(np.zeros((4, 8), np.float32))


def test_bf16_dequantize_needs_an_index_for_experts_only():
    w = random_bf16(np.random.default_rng(), (2, 4, 64))
    with pytest.raises(ValueError, match="expert index"):
        w.dequantize()
    with pytest.raises(ValueError, match="expert index"):
        BF16Matrix(w.values[0]).dequantize(0)


@pytest.mark.parametrize("path", available_kernel_paths())
@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
@pytest.mark.parametrize(
    "rows,cols", [(1, 1), (1, 96), (3, 7), (37, 200), (130, 256), (64, 2048), (5, 24)]
)
def test_bf16_gemv_matches_reference(path, tokens, rows, cols):
    # cols: one value, whole 64-value steps, only a scalar tail, steps plus a 16-value unit and
    # a tail, one unit and a tail
    rng = np.random.default_rng()
    w = random_bf16(rng, (rows, cols))
    x = rng.standard_normal((tokens, cols), dtype=np.float32)
    assert_matches_reference(gemv(w, x, path), w.dequantize(), x)


def test_bf16_gemv_paths_agree():
    rng = np.random.default_rng()
    w = random_bf16(rng, (50, 333))
    x = rng.standard_normal((6, 333), dtype=np.float32)
    results = [gemv(w, x, path) for path in available_kernel_paths()]
    for got in results[1:]:
        np.testing.assert_allclose(got, results[0], rtol=1e-4, atol=1e-4)


def test_bf16_gemv_handles_zero_activations():
    w = BF16Matrix.from_blocks(quantize(np.ones((4, 72), np.float32), T.BF16))
    for path in available_kernel_paths():
        assert not gemv(w, np.zeros((3, 72), np.float32), path).any()


def test_bf16_gemv_runs_on_read_only_memory_mapped_weights(tmp_path):
    # a GGUF BF16 tensor is a view of the mapped file: from_blocks must not need to copy it
    rng = np.random.default_rng()
    blocks = quantize(rng.standard_normal((3, 10, 96), dtype=np.float32), T.BF16)
    blocks.tofile(tmp_path / "weights.bin")
    mapped = np.memmap(tmp_path / "weights.bin", np.uint8, "r", shape=blocks.shape)
    w = BF16Matrix.from_blocks(mapped)
    assert np.shares_memory(w.values, mapped)
    x = rng.standard_normal((4, 96), dtype=np.float32)
    for path in available_kernel_paths():
        got = grouped_bf16_gemv(w, x, np.array([2, 0, 2, 1]), path)
        for p, expert in enumerate([2, 0, 2, 1]):
            assert_matches_reference(got[p : p + 1], w.dequantize(expert), x[p : p + 1])


def test_bf16_activations_are_aligned_copying_only_when_needed():
    x = np.random.default_rng().standard_normal((3, 2 * 37))
    for given in (x, x.astype(np.float32), x.astype(np.float32)[:, 1::2], x.astype(np.float32)[1:]):
        aligned = aligned_activations(given)
        assert aligned.dtype == np.float32 and aligned.flags.c_contiguous
        assert aligned.ctypes.data % X_ALIGN_BYTES == 0
        np.testing.assert_array_equal(aligned, given.astype(np.float32))
        assert aligned_activations(aligned) is aligned


def test_bf16_gemv_rejects_mismatched_width():
    w = random_bf16(np.random.default_rng(), (4, 64))
    with pytest.raises(ValueError, match="expected"):
        gemv(w, np.ones((1, 32), np.float32))


PAIR_EXPERTS = {
    "one expert": [2] * 9,  # tiles of 4, 4 and 1
    "distinct experts": [4, 0, 3, 1, 2],
    # 6 pairs of expert 2 (a tile of 4 and one of 2), 3 of expert 0, none of expert 3
    "mixed": [2, 0, 2, 2, 1, 2, 0, 2, 2, 4, 0],
}


@pytest.mark.parametrize("path", available_kernel_paths())
@pytest.mark.parametrize("pair_expert", PAIR_EXPERTS.values(), ids=PAIR_EXPERTS.keys())
def test_grouped_bf16_gemv_matches_reference_per_expert(path, pair_expert):
    rng = np.random.default_rng()
    experts, rows, cols = 5, 70, 200  # 70 rows: a chunk of 64 and a short one
    w = random_bf16(rng, (experts, rows, cols))
    x = rng.standard_normal((len(pair_expert), cols), dtype=np.float32)
    got = grouped_bf16_gemv(w, x, np.array(pair_expert), path)
    for p, expert in enumerate(pair_expert):
        assert_matches_reference(got[p : p + 1], w.dequantize(expert), x[p : p + 1])


def test_grouped_bf16_gemv_with_no_pairs():
    w = random_bf16(np.random.default_rng(), (3, 4, 64))
    for path in available_kernel_paths():
        got = grouped_bf16_gemv(w, np.zeros((0, 64), np.float32), np.zeros(0, np.int64), path)
        assert got.shape == (0, 4)


def test_grouped_bf16_gemv_rejects_bad_operands():
    w = random_bf16(np.random.default_rng(), (3, 4, 64))
    with pytest.raises(ValueError, match="outside 0..2"):
        grouped_bf16_gemv(w, np.ones((2, 64), np.float32), np.array([0, 3]))
    with pytest.raises(ValueError, match="expected"):
        grouped_bf16_gemv(w, np.ones((2, 64), np.float32), np.array([0]))
    with pytest.raises(ValueError, match="takes \\[experts, rows, cols\\]"):
        grouped_bf16_gemv(BF16Matrix(w.values[0]), np.ones((1, 64), np.float32), np.array([0]))


def test_bf16_interleaved_puts_each_unit_evens_first():
    x = np.arange(2 * 37, dtype=np.float32).reshape(2, 37)  # two 16-value units and 5 left over
    got = interleaved(x)
    for row in range(2):
        for unit in range(2):
            values = x[row, unit * 16 : (unit + 1) * 16]
            want = np.concatenate([values[0::2], values[1::2]])
            np.testing.assert_array_equal(got[row, unit * 16 : (unit + 1) * 16], want)
        np.testing.assert_array_equal(got[row, 32:], x[row, 32:])
    assert interleaved(np.zeros((0, 37), np.float32)).shape == (0, 37)


def tile_asm(tile: int, rows: int) -> str:
    """Machine code of `_bf16_tile_dot_avx2` on a tile of `tile` pairs and `rows` weight rows
    (0: a lone row index; a fresh compile: functions loaded from Numba's cache keep no
    assembly)."""

    def tile_dot(w, x, row, pairs, cols):
        return _bf16_tile_dot_avx2(w, x, row, pairs, cols)

    arrays = (np.zeros(8, np.uint16), np.zeros(8, np.float32))
    row = tuple(range(rows)) if rows else 0
    sig = tuple(numba.typeof(a) for a in (*arrays, row, tuple(range(tile)), 8))
    fresh = numba.njit(tile_dot)
    fresh.compile(sig)
    return fresh.inspect_asm(sig)


@pytest.mark.skipif("avx2" not in available_kernel_paths(), reason="CPU without AVX2")
@pytest.mark.parametrize("tile,rows", [(1, 0), (4, 0), (4, 2), (1, 2)])
def test_bf16_avx2_tile_widens_each_weight_load_once_in_ymm_registers(tile, rows):
    ops = [line.split() for line in tile_asm(tile, rows).splitlines()]
    ymm = [op[0] for op in ops if op and any("%ymm" in arg for arg in op[1:])]
    shifts = ymm.count("vpslld")
    # LLVM may keep the top halves by a blend with zero instead of an and
    masks = sum(op in ("vpand", "vandps", "vpblendw") for op in ymm)
    fmas = sum(op.startswith("vfmadd") and op.endswith("ps") for op in ymm)
    # each 32-byte load: one shift (evens) and one mask (odds), two multiply-adds per (row, pair)
    assert shifts and shifts == masks
    assert fmas == 2 * tile * shifts
    assert [op[0] for op in ops if op].count("prefetcht0")


def test_bf16_matrix_starts_whole_line_rows_on_a_32_byte_boundary():
    buffer = np.zeros(4096, np.uint8)
    start = (16 - buffer.ctypes.data) % 32  # 16 bytes past a 32-byte boundary
    for cols, moved in ((64, True), (7, False)):  # rows 128 bytes apart; 14 bytes apart
        values = buffer[start : start + 2 * 3 * cols].view(np.uint16).reshape(3, cols)
        values[...] = np.arange(values.size).reshape(values.shape)
        w = BF16Matrix(values)
        np.testing.assert_array_equal(w.values, values)
        assert (w.values.ctypes.data % X_ALIGN_BYTES == 0) is moved
        assert np.shares_memory(w.values, values) is not moved
