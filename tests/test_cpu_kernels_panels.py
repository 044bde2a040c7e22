"""Panel GEMV kernels (BF16, F16 and F32 weights) against a float64 reference on the dequantised
weights.

Error budget (`gemv_error_bound`): the weights widen exactly and the activations stay float32, so
the kernels differ from the float64 dot only by float32 summation: in any order, a sum of n
products moves by at most about n * 2^-24 * sum |w * x| (one more rounding where a product is
not fused into its add), and n * 2^-23 covers both with room to spare."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from kernel_paths import path_params, runnable_paths
from machine_code import CPU_KINDS, count, fresh_llvm_ir, machine_code

from cpu_kernels.cpu_features import available_kernel_paths
from cpu_kernels.panel_gemv import (
    GROUPED_GEMV_PANELS,
    PANEL_ALIGN_BYTES,
    PANEL_ROWS,
    BF16Matrix,
    F16Matrix,
    F32Matrix,
    _panel_tile_avx2,
)
from cpu_kernels.quant_matrix import gemv, grouped_gemv, join_rows, row_slice
from hetero.formats.gguf_quantize import quantize
from hetero.formats.gguf_quants import dequantize

# tokens per call: one tile of each size 1 to 6 (PANEL_TILE), two tiles (7: 4 + 3), three
# (13: 5 + 4 + 4), four (19)
TOKEN_COUNTS = [1, 2, 3, 4, 5, 6, 7, 13, 19]


FORMATS = {"bf16": (BF16Matrix, T.BF16), "f16": (F16Matrix, T.F16), "f32": (F32Matrix, T.F32)}


def random_matrix(rng: np.random.Generator, shape: tuple[int, ...], fmt: str = "bf16"):
    cls, ggml_type = FORMATS[fmt]
    return cls.from_blocks(quantize(rng.standard_normal(shape, dtype=np.float32), ggml_type))


def random_bf16(rng: np.random.Generator, shape: tuple[int, ...]) -> BF16Matrix:
    return random_matrix(rng, shape, "bf16")


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
    np.testing.assert_array_equal(BF16Matrix.from_values(values[1]).dequantize(), w.dequantize(1))


def test_bf16_from_blocks_reads_gguf_bf16_rows():
    x = np.random.default_rng().standard_normal((2, 5, 200), dtype=np.float32)
    blocks = quantize(x, T.BF16)  # uint8 [2, 5, 400]
    w = BF16Matrix.from_blocks(blocks)
    # 5 rows take a whole panel of 16 in memory
    assert w.shape == (2, 5, 200) and w.nbytes == blocks.nbytes // 5 * PANEL_ROWS
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
        BF16Matrix.from_values(w.values()[0]).dequantize(0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("path", path_params(GROUPED_GEMV_PANELS))
@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
@pytest.mark.parametrize(
    "rows,cols", [(1, 1), (1, 96), (3, 7), (37, 200), (130, 256), (64, 2048), (5, 24)]
)
def test_panel_gemv_matches_reference(fmt, path, tokens, rows, cols):
    # rows: within one panel, several with a short last one, a chunk of whole panels; cols: one
    # column, whole unrolled steps, only a tail, steps and a tail
    rng = np.random.default_rng()
    w = random_matrix(rng, (rows, cols), fmt)
    x = rng.standard_normal((tokens, cols), dtype=np.float32)
    assert_matches_reference(gemv(w, x, path), w.dequantize(), x)


@pytest.mark.parametrize("fmt", FORMATS)
def test_panel_gemv_paths_agree(fmt):
    rng = np.random.default_rng()
    w = random_matrix(rng, (50, 333), fmt)
    x = rng.standard_normal((6, 333), dtype=np.float32)
    results = [gemv(w, x, path) for path in runnable_paths(GROUPED_GEMV_PANELS)]
    for got in results[1:]:
        np.testing.assert_allclose(got, results[0], rtol=1e-4, atol=1e-4)


def test_bf16_gemv_handles_zero_activations():
    w = BF16Matrix.from_blocks(quantize(np.ones((4, 72), np.float32), T.BF16))
    for path in runnable_paths(GROUPED_GEMV_PANELS):
        assert not gemv(w, np.zeros((3, 72), np.float32), path).any()


def test_bf16_gemv_runs_on_read_only_memory_mapped_weights(tmp_path):
    # a GGUF BF16 tensor is a view of the mapped file, repacked into panels
    rng = np.random.default_rng()
    blocks = quantize(rng.standard_normal((3, 10, 96), dtype=np.float32), T.BF16)
    blocks.tofile(tmp_path / "weights.bin")
    mapped = np.memmap(tmp_path / "weights.bin", np.uint8, "r", shape=blocks.shape)
    w = BF16Matrix.from_blocks(mapped)
    x = rng.standard_normal((4, 96), dtype=np.float32)
    for path in runnable_paths(GROUPED_GEMV_PANELS):
        got = grouped_gemv(w, x, np.array([2, 0, 2, 1]), path)
        for p, expert in enumerate([2, 0, 2, 1]):
            assert_matches_reference(got[p : p + 1], w.dequantize(expert), x[p : p + 1])


def test_bf16_gemv_rejects_mismatched_width():
    w = random_bf16(np.random.default_rng(), (4, 64))
    with pytest.raises(ValueError, match="expected"):
        gemv(w, np.ones((1, 32), np.float32))


PAIR_EXPERTS = {
    "one expert": [2] * 9,  # tiles of 5 and 4
    "distinct experts": [4, 0, 3, 1, 2],
    # 6 pairs of expert 2 (one tile), 3 of expert 0, none of expert 3
    "mixed": [2, 0, 2, 2, 1, 2, 0, 2, 2, 4, 0],
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("path", path_params(GROUPED_GEMV_PANELS))
@pytest.mark.parametrize("pair_expert", PAIR_EXPERTS.values(), ids=PAIR_EXPERTS.keys())
def test_grouped_panel_gemv_matches_reference_per_expert(fmt, path, pair_expert):
    rng = np.random.default_rng()
    experts, rows, cols = 5, 70, 200  # 70 rows: a chunk of 4 panels and a short one
    w = random_matrix(rng, (experts, rows, cols), fmt)
    x = rng.standard_normal((len(pair_expert), cols), dtype=np.float32)
    got = grouped_gemv(w, x, np.array(pair_expert), path)
    for p, expert in enumerate(pair_expert):
        assert_matches_reference(got[p : p + 1], w.dequantize(expert), x[p : p + 1])


def test_grouped_panel_gemv_with_no_pairs():
    w = random_bf16(np.random.default_rng(), (3, 4, 64))
    for path in runnable_paths(GROUPED_GEMV_PANELS):
        got = grouped_gemv(w, np.zeros((0, 64), np.float32), np.zeros(0, np.int64), path)
        assert got.shape == (0, 4)


def test_grouped_panel_gemv_rejects_bad_operands():
    w = random_bf16(np.random.default_rng(), (3, 4, 64))
    with pytest.raises(ValueError, match="outside 0..2"):
        grouped_gemv(w, np.ones((2, 64), np.float32), np.array([0, 3]))
    with pytest.raises(ValueError, match="expected"):
        grouped_gemv(w, np.ones((2, 64), np.float32), np.array([0]))
    with pytest.raises(ValueError, match="takes \\[experts, rows, cols\\]"):
        one = BF16Matrix.from_values(w.values()[0])
        grouped_gemv(one, np.ones((1, 64), np.float32), np.array([0]))


def test_bf16_panels_hold_each_column_of_16_rows_first_and_last_eight_interleaved():
    values = np.arange(2 * 35 * 3, dtype=np.uint16).reshape(
        2, 35, 3
    )  # 3 panels, 3 rows in the last
    w = BF16Matrix.from_values(values)
    assert w.shape == (2, 35, 3) and w.panels.shape == (2, 3, 3, PANEL_ROWS)
    for n in range(3):
        for i in range(8):
            for half in (0, 1):
                row = n * PANEL_ROWS + half * 8 + i
                want = values[:, row] if row < 35 else 0  # padding rows are zero
                np.testing.assert_array_equal(w.panels[:, n, :, 2 * i + half], want)
    np.testing.assert_array_equal(w.values(), values)
    assert w.panels.ctypes.data % PANEL_ALIGN_BYTES == 0


def test_f32_panels_hold_each_column_of_16_rows_in_order():
    values = np.arange(35 * 3, dtype=np.float32).reshape(35, 3)  # 3 panels, 3 rows in the last
    w = F32Matrix.from_values(values)
    assert w.shape == (35, 3) and w.panels.shape == (3, 3, PANEL_ROWS)
    for n in range(3):
        for lane in range(PANEL_ROWS):
            row = n * PANEL_ROWS + lane
            want = values[row] if row < 35 else 0
            np.testing.assert_array_equal(w.panels[n, :, lane], want)
    np.testing.assert_array_equal(w.values(), values)
    np.testing.assert_array_equal(w.dequantize(), values)
    with pytest.raises(ValueError, match="expected float32"):
        F32Matrix.from_values(values.astype(np.float64))


@pytest.mark.parametrize("fmt", FORMATS)
def test_panel_join_and_slice_rows_across_panels(fmt):
    rng = np.random.default_rng()
    parts = [random_matrix(rng, (rows, 40), fmt) for rows in (20, 3, 16)]
    joined = join_rows(parts)
    want = np.concatenate([p.dequantize() for p in parts])
    np.testing.assert_array_equal(joined.dequantize(), want)
    np.testing.assert_array_equal(row_slice(joined, 5, 30).dequantize(), want[5:30])
    x = rng.standard_normal((3, 40), dtype=np.float32)
    for path in runnable_paths(GROUPED_GEMV_PANELS):
        assert_matches_reference(gemv(joined, x, path), want, x)


def tile_ir(tile: int, storage=np.uint16) -> str:
    """LLVM IR of `_panel_tile_avx2` on a tile of `tile` pairs and 8 columns."""

    def tile_run(w, x, pairs, out):
        _panel_tile_avx2(w, 0, x, pairs, 8, out, 16, 0)

    w, x = np.zeros(8, storage), np.zeros(8, np.float32)
    return fresh_llvm_ir(tile_run, (w, x, tuple(range(tile)), x))


needs_avx2 = pytest.mark.skipif("avx2" not in available_kernel_paths(), reason="CPU without AVX2")


@needs_avx2
@pytest.mark.parametrize("cpu", CPU_KINDS)
@pytest.mark.parametrize("tile", [1, 2, 6])
def test_bf16_avx2_tile_widens_each_column_once_for_all_pairs(tile, cpu):
    code = machine_code(tile_ir(tile), cpu)
    shifts, masks = count(code, "shift dwords left", "%ymm"), count(code, "mask dwords", "%ymm")
    # each 32-byte column: one shift (rows 0-7) and one mask (rows 8-15), and per pair one
    # broadcast activation and two multiply-adds; no horizontal sums
    assert shifts and shifts == masks
    assert count(code, "float multiply-add", "%ymm") == 2 * tile * shifts
    assert count(code, "broadcast float", "%ymm") == tile * shifts
    assert not count(code, "horizontal sum") and count(code, "prefetch")


@needs_avx2
@pytest.mark.parametrize("cpu", CPU_KINDS)
@pytest.mark.parametrize("tile", [1, 6])
def test_f32_avx2_tile_multiplies_each_column_into_all_pairs(tile, cpu):
    code = machine_code(tile_ir(tile, np.float32), cpu)
    broadcasts = count(code, "broadcast float", "%ymm")
    # two multiply-adds (rows 0-7, 8-15) per pair and column, against one broadcast each
    assert broadcasts and count(code, "float multiply-add", "%ymm") == 2 * broadcasts
    assert not count(code, "horizontal sum") and not count(code, "shift dwords left")


def test_f16_dequantize_matches_numpy_for_every_bit_pattern():
    bits = np.arange(2**16, dtype=np.uint16).reshape(4096, 16).view(np.int16)
    w = F16Matrix.from_values(bits)
    want = bits.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(w.dequantize(), want)  # NaNs compare equal here
    x = np.ones((1, 16), np.float32)
    finite = np.isfinite(want).all(axis=1)
    for path in runnable_paths(GROUPED_GEMV_PANELS):
        got = gemv(w, x, path)[0]
        np.testing.assert_allclose(
            got[finite], want[finite].astype(np.float64).sum(axis=1), rtol=1e-6, atol=1e-6
        )


@needs_avx2
@pytest.mark.parametrize("cpu", CPU_KINDS)
@pytest.mark.parametrize("tile", [1, 6])
def test_f16_avx2_tile_widens_each_column_once_for_all_pairs(tile, cpu):
    code = machine_code(tile_ir(tile, np.int16), cpu)
    widened = count(code, "widen float16", "%ymm")
    # each 32-byte column: two conversions (rows 0-7, 8-15), and per pair two multiply-adds
    assert widened and count(code, "float multiply-add", "%ymm") == tile * widened
