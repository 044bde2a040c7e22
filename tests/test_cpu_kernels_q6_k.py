"""Q6_K GEMV kernels against a float64 reference on the dequantised weights.

Error budget: the kernel's integer sums (q - 32) * scale * x are exact and its weights are the
same blocks the reference dequantises; it also rounds activations to int8 per 32-block, which
moves each output by at most `activation_error_bound` (half a step per value, float32 slack)."""

import gguf.quants
import numpy as np
import pytest
from gemv_error_bounds import activation_error_bound
from gguf import GGMLQuantizationType as T
from kernel_paths import path_params, runnable_paths
from machine_code import AVX512_CPU_KINDS, CPU_KINDS, count, fresh_llvm_ir, machine_code

from cpu_kernels.cpu_features import available_kernel_paths
from cpu_kernels.q6_k_gemv import (
    GROUPED_GEMV_Q6_K,
    Q6KMatrix,
    _q6k_tile_dot_avx2,
    _q6k_tile_dot_avx512,
)
from cpu_kernels.quant_matrix import gemv, grouped_gemv
from hetero.formats.gguf_quantize import quantize

SHAPES = [(1, 256, 1), (37, 512, 1), (130, 768, 3), (64, 2048, 5)]  # rows, cols, tokens


def random_q6_k_blocks(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    # a few large values per row give sub-blocks with small scales next to large ones
    values = rng.standard_normal(shape, dtype=np.float32)
    values[..., ::97] *= 8
    return quantize(values, T.Q6_K)


def test_q6_k_dequantize_matches_gguf_bit_for_bit():
    rng = np.random.default_rng()
    blocks = random_q6_k_blocks(rng, (3, 7, 512))
    w = Q6KMatrix.from_blocks(blocks)
    assert w.shape == (3, 7, 512)
    for expert in range(3):
        want = gguf.quants.dequantize(blocks[expert], T.Q6_K)
        np.testing.assert_array_equal(w.dequantize(expert).view(np.uint32), want.view(np.uint32))
    matrix = Q6KMatrix.from_blocks(blocks[1])
    np.testing.assert_array_equal(matrix.dequantize(), w.dequantize(1))


def test_q6_k_matrix_keeps_under_one_byte_per_value():
    w = Q6KMatrix.from_blocks(quantize(np.ones((4, 1024), np.float32), T.Q6_K))
    assert w.nbytes == 4 * 1024 // 256 * 212  # GGUF's 210 bytes, d widened to float32


def test_q6_k_dequantize_needs_an_index_for_experts_only():
    blocks = quantize(np.ones((2, 4, 256), np.float32), T.Q6_K)
    with pytest.raises(ValueError, match="index"):
        Q6KMatrix.from_blocks(blocks).dequantize()
    with pytest.raises(ValueError, match="index"):
        Q6KMatrix.from_blocks(blocks[0]).dequantize(0)


@pytest.mark.parametrize("path", path_params(GROUPED_GEMV_Q6_K))
@pytest.mark.parametrize("rows,cols,tokens", SHAPES)
def test_q6_k_gemv_matches_reference(path, rows, cols, tokens):
    rng = np.random.default_rng()
    blocks = random_q6_k_blocks(rng, (rows, cols))
    x = rng.standard_normal((tokens, cols), dtype=np.float32)
    w = Q6KMatrix.from_blocks(blocks)
    dense = w.dequantize().astype(np.float64)
    want = x.astype(np.float64) @ dense.T
    got = gemv(w, x, path)
    assert got.shape == (tokens, rows)
    assert (np.abs(got - want) <= activation_error_bound(dense, x)).all()


@pytest.mark.parametrize("path", path_params(GROUPED_GEMV_Q6_K))
def test_q6_k_gemv_does_not_saturate_at_extreme_codes(path):
    # all q in {0, 63}, scales in {-128, 127}, activations all +-amax (int8 +-127): pmaddubsw's
    # int16 pair sums and pmaddwd's products are at their largest
    rng = np.random.default_rng()
    rows, cols = 16, 512
    blocks = np.zeros((rows, cols // 256, 210), np.uint8)
    blocks[..., :192] = rng.choice(np.array([0, 255], np.uint8), blocks[..., :192].shape)
    blocks[..., 192:208] = rng.choice(np.array([-128, 127], np.int8), (rows, 2, 16)).view(np.uint8)
    blocks[..., 208:] = np.full((rows, 2, 1), 0.01, np.float16).view(np.uint8)
    blocks = blocks.reshape(rows, -1)
    x = rng.choice(np.array([-2.0, 2.0], np.float32), (3, cols))
    w = Q6KMatrix.from_blocks(blocks)
    dense = w.dequantize().astype(np.float64)
    got = gemv(w, x, path)
    assert (np.abs(got - x @ dense.T) <= activation_error_bound(dense, x)).all()


def test_q6_k_gemv_paths_agree_on_integer_sums():
    # the int32 block sums are exact on both paths; only float summation order differs
    rng = np.random.default_rng()
    w = Q6KMatrix.from_blocks(random_q6_k_blocks(rng, (50, 1280)))
    x = rng.standard_normal((2, 1280), dtype=np.float32)
    results = [gemv(w, x, path) for path in runnable_paths(GROUPED_GEMV_Q6_K)]
    for got in results[1:]:
        np.testing.assert_allclose(got, results[0], rtol=1e-4, atol=1e-4)


def test_q6_k_gemv_handles_zero_activations():
    w = Q6KMatrix.from_blocks(quantize(np.ones((4, 256), np.float32), T.Q6_K))
    for path in runnable_paths(GROUPED_GEMV_Q6_K):
        assert not gemv(w, np.zeros((1, 256), np.float32), path).any()


@pytest.mark.parametrize("path", path_params(GROUPED_GEMV_Q6_K))
def test_grouped_q6_k_gemv_matches_reference_per_expert(path):
    rng = np.random.default_rng()
    experts, rows, cols = 5, 33, 768
    # 9, 3, 2 and 1 pairs of experts 0, 2, 3, 4 (shuffled): tiles of every size; none for 1
    pair_expert = rng.permutation(np.repeat([0, 2, 3, 4], [9, 3, 2, 1]))
    w = Q6KMatrix.from_blocks(random_q6_k_blocks(rng, (experts, rows, cols)))
    x = rng.standard_normal((len(pair_expert), cols), dtype=np.float32)
    got = grouped_gemv(w, x, pair_expert, path)
    for p, expert in enumerate(pair_expert):
        dense = w.dequantize(expert).astype(np.float64)
        want = x[p : p + 1].astype(np.float64) @ dense.T
        assert (np.abs(got[p] - want) <= activation_error_bound(dense, x[p : p + 1])).all()


def test_grouped_q6_k_gemv_with_no_pairs():
    w = Q6KMatrix.from_blocks(quantize(np.ones((3, 4, 256), np.float32), T.Q6_K))
    got = grouped_gemv(w, np.zeros((0, 256), np.float32), np.zeros(0, np.int64))
    assert got.shape == (0, 4)


def test_q6_k_gemv_rejects_mismatched_shapes():
    blocks = quantize(np.ones((2, 4, 256), np.float32), T.Q6_K)
    experts, matrix = Q6KMatrix.from_blocks(blocks), Q6KMatrix.from_blocks(blocks[0])
    x = np.ones((1, 256), np.float32)
    with pytest.raises(ValueError, match="expected"):
        gemv(matrix, np.ones((1, 512), np.float32))
    with pytest.raises(ValueError, match=r"takes \[experts, rows, cols\]"):
        grouped_gemv(matrix, x, np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="expected"):
        grouped_gemv(experts, x, np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="outside 0..1"):
        grouped_gemv(experts, x, np.array([2]))


def tile_of_4_ir(tile_dot=_q6k_tile_dot_avx2) -> str:
    """LLVM IR of a Q6_K tile intrinsic on a tile of 4 pairs and one super-block."""

    def tile_of_4(weights, acts, row, pairs, superblocks):
        return tile_dot(weights, acts, row, pairs, superblocks)

    weights = (np.zeros(8, np.uint8), np.zeros(8, np.int8), np.zeros(8, np.float32))
    acts = (np.zeros(8, np.int8), np.zeros(8, np.float32), np.zeros(8, np.float32))
    return fresh_llvm_ir(tile_of_4, (weights, acts, 0, (0, 0, 0, 0), 1))


@pytest.mark.skipif("avx2" not in available_kernel_paths(), reason="CPU without AVX2")
@pytest.mark.parametrize("cpu", CPU_KINDS)
def test_q6_k_avx2_tile_unpacks_each_run_of_codes_once_for_4_pairs(cpu):
    code = machine_code(tile_of_4_ir(), cpu)
    # a super-block's 8 blocks of 32 codes, each unpacked once (per half, the fourth block from
    # the top bits of its three runs, one shift each) and multiplied into 4 pairs by integer
    # multiply-adds
    assert count(code, "shift bytes") == 2 * 3
    assert count(code, "multiply-add bytes") == count(code, "multiply-add words") == 8 * 4


@pytest.mark.skipif("avx512" not in available_kernel_paths(), reason="CPU without AVX-512 VNNI")
@pytest.mark.parametrize("cpu", ("host", *AVX512_CPU_KINDS))
def test_q6_k_avx512_tile_unpacks_each_64_code_bytes_once_for_4_pairs(cpu):
    code = machine_code(tile_of_4_ir(_q6k_tile_dot_avx512), cpu)
    # a super-block's 4 vectors of two blocks' codes, made once (blocks 3 and 7 from the top
    # bits of three runs, one shift each) and multiplied into 4 pairs on 512-bit registers
    assert count(code, "shift bytes", "%zmm") == 3
    assert count(code, "multiply-add bytes", "%zmm") == 4 * 4
    assert count(code, "multiply-add words", "%zmm") == 4 * 4
