"""Q4_K GEMV kernels against a float64 reference on the dequantised weights.

Error budget (`gemv_error_bound`): weights are exact (the reference dequantises the same blocks;
d * scale and dmin * min are exact in float32) and the integer sub-block dots are exact; the
kernel rounds activations to int8 per 256-value super-block (one scale each, as GGUF's Q8_K; the
min term uses the rounded block sums too) and sums the scale and min terms apart in float32, so
the rounding budget is taken on their magnitudes, |w| + 2 dmin * min per value."""

import gguf.quants
import numpy as np
import pytest
from gemv_error_bounds import gemv_error_bound
from gguf import GGMLQuantizationType as T
from kernel_paths import path_params, runnable_paths
from machine_code import AVX512_CPU_KINDS, CPU_KINDS, count, fresh_llvm_ir, machine_code

from cpu_kernels.cpu_features import available_kernel_paths
from cpu_kernels.q4_k_gemv import (
    GROUPED_GEMV_Q4_K,
    Q4KMatrix,
    _q4k_tile_dot_avx2,
    _q4k_tile_dot_avx512,
)
from cpu_kernels.quant_matrix import gemv, grouped_gemv
from hetero.formats.gguf_quantize import quantize

TOKEN_COUNTS = [1, 2, 3, 4, 5, 9]  # a single tile of 1 to 4, then tiles of 4 plus a tail


def random_q4_k(rng: np.random.Generator, shape: tuple[int, ...]) -> Q4KMatrix:
    # an offset makes the mins matter
    return Q4KMatrix.from_blocks(quantize(rng.standard_normal(shape, np.float32) + 0.5, T.Q4_K))


def assert_matches_reference(got: np.ndarray, w: Q4KMatrix, x: np.ndarray, expert=None):
    # got: [tokens, rows] from the kernel for x: [tokens, cols] and one matrix of w
    dense = w.dequantize(expert).astype(np.float64)
    mins = w.mins if expert is None else w.mins[expert]
    dmin = w.dmin if expert is None else w.dmin[expert]
    offsets = dmin[..., None] * mins.reshape(*dmin.shape, -1).astype(np.float64)
    magnitude = np.abs(dense) + 2 * np.repeat(offsets.reshape(len(dense), -1), 32, axis=-1)
    want = x.astype(np.float64) @ dense.T
    assert got.shape == want.shape
    assert (np.abs(got - want) <= gemv_error_bound(dense, x, magnitude, block=256)).all()


def test_q4_k_dequantize_matches_gguf_bit_for_bit():
    rng = np.random.default_rng()
    blocks = quantize(rng.standard_normal((3, 7, 512), np.float32) + 0.5, T.Q4_K)
    w = Q4KMatrix.from_blocks(blocks)
    assert w.shape == (3, 7, 512)
    for expert in range(3):
        want = gguf.quants.dequantize(blocks[expert], T.Q4_K)
        np.testing.assert_array_equal(w.dequantize(expert).view(np.uint32), want.view(np.uint32))
    np.testing.assert_array_equal(Q4KMatrix.from_blocks(blocks[1]).dequantize(), w.dequantize(1))


def test_q4_k_dequantize_needs_an_index_for_experts_only():
    blocks = quantize(np.ones((2, 4, 256), np.float32), T.Q4_K)
    with pytest.raises(ValueError, match="expert index"):
        Q4KMatrix.from_blocks(blocks).dequantize()
    with pytest.raises(ValueError, match="expert index"):
        Q4KMatrix.from_blocks(blocks[0]).dequantize(0)


def test_q4_k_matrix_reads_152_bytes_per_256_values():
    # GGUF's 144: scales and mins widened from 6 bits to a byte, d and dmin to float32
    w = Q4KMatrix.from_blocks(quantize(np.ones((4, 1024), np.float32), T.Q4_K))
    assert w.nbytes == 4 * 1024 // 256 * 152


@pytest.mark.parametrize("path", path_params(GROUPED_GEMV_Q4_K))
@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("rows,cols", [(1, 256), (37, 512), (130, 768), (64, 2048)])
def test_q4_k_gemv_matches_reference(path, tokens, rows, cols):
    rng = np.random.default_rng()
    w = random_q4_k(rng, (rows, cols))
    x = rng.standard_normal((tokens, cols), dtype=np.float32)
    assert_matches_reference(gemv(w, x, path), w, x)


@pytest.mark.parametrize("path", path_params(GROUPED_GEMV_Q4_K))
def test_q4_k_gemv_does_not_saturate_at_extreme_codes(path):
    # nibbles 0 or 15, scales and mins 63, activations all +-amax (int8 +-127): pmaddubsw's
    # pair sums reach 2 * 15 * 127, pmaddwd's products 63 times that
    rng = np.random.default_rng()
    rows, cols = 16, 512
    blocks = np.zeros((rows, cols // 256, 144), np.uint8)
    blocks[..., :4] = np.full((rows, 2, 2), 0.01, np.float16).view(np.uint8)
    blocks[..., 4:16] = 0xFF  # every 6-bit scale and min 63
    blocks[..., 16:] = rng.choice(np.array([0x00, 0xFF, 0x0F, 0xF0], np.uint8), (rows, 2, 128))
    w = Q4KMatrix.from_blocks(blocks.reshape(rows, -1))
    assert (w.scales == 63).all() and (w.mins == 63).all()
    x = rng.choice(np.array([-2.0, 2.0], np.float32), (5, cols))
    assert_matches_reference(gemv(w, x, path), w, x)


def test_q4_k_gemv_paths_agree_on_integer_sums():
    rng = np.random.default_rng()
    w = random_q4_k(rng, (50, 1280))
    x = rng.standard_normal((6, 1280), dtype=np.float32)
    results = [gemv(w, x, path) for path in runnable_paths(GROUPED_GEMV_Q4_K)]
    for got in results[1:]:
        np.testing.assert_allclose(got, results[0], rtol=1e-4, atol=1e-4)


def test_q4_k_gemv_handles_zero_activations():
    w = Q4KMatrix.from_blocks(quantize(np.ones((4, 256), np.float32), T.Q4_K))
    for path in runnable_paths(GROUPED_GEMV_Q4_K):
        assert not gemv(w, np.zeros((3, 256), np.float32), path).any()


def test_q4_k_gemv_rejects_mismatched_width():
    w = Q4KMatrix.from_blocks(quantize(np.ones((4, 256), np.float32), T.Q4_K))
    with pytest.raises(ValueError, match="expected"):
        gemv(w, np.ones((1, 512), np.float32))


PAIR_EXPERTS = {
    "one expert": [2] * 9,  # tiles of 4, 4 and 1
    "distinct experts": [4, 0, 3, 1, 2],
    "mixed": [2, 0, 2, 2, 1, 2, 0, 2, 2, 4, 0],  # 6 pairs of expert 2: a tile of 4 and one of 2
}


@pytest.mark.parametrize("path", path_params(GROUPED_GEMV_Q4_K))
@pytest.mark.parametrize("pair_expert", PAIR_EXPERTS.values(), ids=PAIR_EXPERTS.keys())
def test_grouped_q4_k_gemv_matches_reference_per_expert(path, pair_expert):
    rng = np.random.default_rng()
    w = random_q4_k(rng, (5, 33, 768))
    x = rng.standard_normal((len(pair_expert), 768), dtype=np.float32)
    got = grouped_gemv(w, x, np.array(pair_expert), path)
    for p, expert in enumerate(pair_expert):
        assert_matches_reference(got[p : p + 1], w, x[p : p + 1], expert)


def test_grouped_q4_k_gemv_with_no_pairs():
    w = Q4KMatrix.from_blocks(quantize(np.ones((3, 4, 256), np.float32), T.Q4_K))
    got = grouped_gemv(w, np.zeros((0, 256), np.float32), np.zeros(0, np.int64))
    assert got.shape == (0, 4)


def test_grouped_q4_k_gemv_needs_experts_dim():
    w = Q4KMatrix.from_blocks(quantize(np.ones((4, 256), np.float32), T.Q4_K))
    with pytest.raises(ValueError, match=r"\[experts, rows, cols\]"):
        grouped_gemv(w, np.ones((1, 256), np.float32), np.zeros(1, np.int64))


def tile_of_4_ir(tile_dot=_q4k_tile_dot_avx2) -> str:
    """LLVM IR of a Q4_K tile intrinsic on a tile of 4 pairs and one super-block."""

    def tile_of_4(weights, acts, row, pairs, superblocks):
        return tile_dot(weights, acts, row, pairs, superblocks)

    u8, f32 = np.zeros(8, np.uint8), np.zeros(8, np.float32)
    args = ((u8, u8, u8, f32, f32), (np.zeros(8, np.int8), f32, f32), 0, (0, 0, 0, 0), 1)
    return fresh_llvm_ir(tile_of_4, args)


@pytest.mark.skipif("avx2" not in available_kernel_paths(), reason="CPU without AVX2")
@pytest.mark.parametrize("cpu", CPU_KINDS)
def test_q4_k_avx2_tile_unpacks_each_nibble_run_once_for_4_pairs(cpu):
    code = machine_code(tile_of_4_ir(), cpu)
    # a super-block's 4 runs of 32 nibble bytes, each split once (one byte shift gives its high
    # nibbles): 2 sub-blocks x 4 pairs of byte multiply-adds per run, then one by the scales
    assert count(code, "shift bytes") == 4
    assert count(code, "multiply-add bytes") == count(code, "multiply-add words") == 8 * 4


@pytest.mark.skipif("avx512" not in available_kernel_paths(), reason="CPU without AVX-512 VNNI")
@pytest.mark.parametrize("cpu", ("host", *AVX512_CPU_KINDS))
def test_q4_k_avx512_tile_unpacks_each_64_nibble_bytes_once_for_4_pairs(cpu):
    code = machine_code(tile_of_4_ir(_q4k_tile_dot_avx512), cpu)
    # a super-block's 2 loads of 64 nibble bytes (4 sub-blocks each), each split once, and per
    # half (2 sub-blocks) and pair one byte and one word multiply-add on 512-bit registers
    assert count(code, "shift bytes", "%zmm") == 2
    multiply_adds = 2 * 2 * 4
    assert count(code, "multiply-add bytes", "%zmm") == multiply_adds
    assert count(code, "multiply-add words", "%zmm") == multiply_adds
