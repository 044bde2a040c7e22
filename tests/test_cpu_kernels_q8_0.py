"""Q8_0 GEMV kernels against a float64 reference on the dequantised weights.

Error budget (`gemv_error_bound`): the weights are exact (the reference dequantises the same
blocks) and the per-block integer dots are exact; the kernel rounds activations to int8 per
32-block (half a step per value) and sums in float32 (at most blocks + 16 roundings per term)."""

import gguf.quants
import numba
import numpy as np
import pytest
from gemv_error_bounds import gemv_error_bound
from gguf import GGMLQuantizationType as T
from kernel_paths import path_params, runnable_paths
from machine_code import AVX512_CPU_KINDS, CPU_KINDS, OPERATIONS, count, fresh_llvm_ir, machine_code

from cpu_kernels.cpu_features import available_kernel_paths
from cpu_kernels.expert_pairs import group_pairs_by_expert
from cpu_kernels.float16_bits import half_to_float32
from cpu_kernels.int8_activations import quantize_q8_activations
from cpu_kernels.q8_0_gemv import (
    GROUPED_GEMV_Q8_0,
    Q8Matrix,
    _q8_tile_dot_avx2,
    _q8_tile_dot_avx512,
)
from cpu_kernels.quant_matrix import gemv, grouped_gemv
from hetero.formats.gguf_quantize import quantize


@numba.njit
def all_halves(bits):
    out = np.empty(len(bits), np.float32)
    for i in range(len(bits)):
        out[i] = half_to_float32(bits[i])
    return out


def test_half_to_float32_equals_numpy_for_every_float16():
    bits = np.arange(2**16, dtype=np.uint16)
    want = bits.view(np.float16).astype(np.float32)
    got = all_halves(bits)
    np.testing.assert_array_equal(
        got.view(np.uint32)[~np.isnan(want)], want.view(np.uint32)[~np.isnan(want)]
    )
    assert np.isnan(got[np.isnan(want)]).all()


# tokens per call: a single tile of 1 to 4, a full tile plus a tail, two full tiles plus one
TOKEN_COUNTS = [1, 2, 3, 4, 5, 9]


def random_q8_0(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return quantize(rng.standard_normal(shape, dtype=np.float32), T.Q8_0)


def assert_matches_reference(got: np.ndarray, dense: np.ndarray, x: np.ndarray):
    # got: [tokens, rows] from the kernel; dense: float32 [rows, cols]
    want = x.astype(np.float64) @ dense.astype(np.float64).T
    assert got.shape == want.shape
    assert (np.abs(got - want) <= gemv_error_bound(dense.astype(np.float64), x)).all()


def test_q8_0_dequantize_matches_gguf_bit_for_bit():
    rng = np.random.default_rng()
    blocks = random_q8_0(rng, (3, 7, 96))
    w = Q8Matrix.from_blocks(blocks)
    for expert in range(3):
        want = gguf.quants.dequantize(blocks[expert], T.Q8_0)
        np.testing.assert_array_equal(w.dequantize(expert).view(np.uint32), want.view(np.uint32))
    np.testing.assert_array_equal(Q8Matrix.from_blocks(blocks[1]).dequantize(), w.dequantize(1))


def test_q8_0_dequantize_needs_an_index_for_experts_only():
    blocks = random_q8_0(np.random.default_rng(), (2, 4, 64))
    with pytest.raises(ValueError, match="expert index"):
        Q8Matrix.from_blocks(blocks).dequantize()
    with pytest.raises(ValueError, match="expert index"):
        Q8Matrix.from_blocks(blocks[0]).dequantize(0)


@pytest.mark.parametrize("path", path_params(GROUPED_GEMV_Q8_0))
@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
# cols: 1 and 3 blocks (a tail only), 8 and 64 (whole steps of 8 blocks), 11 (a step and a tail)
@pytest.mark.parametrize("rows,cols", [(1, 32), (37, 96), (130, 256), (64, 2048), (5, 352)])
def test_q8_0_gemv_matches_reference(path, tokens, rows, cols):
    rng = np.random.default_rng()
    w = Q8Matrix.from_blocks(random_q8_0(rng, (rows, cols)))
    x = rng.standard_normal((tokens, cols), dtype=np.float32)
    assert_matches_reference(gemv(w, x, path), w.dequantize(), x)


@pytest.mark.parametrize("path", path_params(GROUPED_GEMV_Q8_0))
def test_q8_0_gemv_does_not_saturate_at_extreme_values(path):
    # weights -128 or 127 against activations all +-amax (int8 +-127): pmaddubsw's int16 pair
    # sums reach 2 * 128 * 127 = 32512, just under saturation
    rng = np.random.default_rng()
    rows, cols = 16, 256
    blocks = np.zeros((rows, cols // 32, 34), np.uint8)
    blocks[..., :2] = np.full((rows, cols // 32, 1), 0.01, np.float16).view(np.uint8)
    blocks[..., 2:] = rng.choice(np.array([-128, 127], np.int8), (rows, cols // 32, 32)).view(
        np.uint8
    )
    w = Q8Matrix.from_blocks(blocks.reshape(rows, -1))
    x = rng.choice(np.array([-2.0, 2.0], np.float32), (5, cols))
    assert_matches_reference(gemv(w, x, path), w.dequantize(), x)


def test_q8_0_gemv_paths_agree_on_integer_sums():
    # the int32 block sums are exact on both paths; only float summation order differs
    rng = np.random.default_rng()
    w = Q8Matrix.from_blocks(random_q8_0(rng, (50, 320)))
    x = rng.standard_normal((6, 320), dtype=np.float32)
    results = [gemv(w, x, path) for path in runnable_paths(GROUPED_GEMV_Q8_0)]
    for got in results[1:]:
        np.testing.assert_allclose(got, results[0], rtol=1e-4, atol=1e-4)


def test_q8_0_gemv_handles_zero_activations():
    w = Q8Matrix.from_blocks(quantize(np.ones((4, 64), np.float32), T.Q8_0))
    for path in runnable_paths(GROUPED_GEMV_Q8_0):
        assert not gemv(w, np.zeros((3, 64), np.float32), path).any()


def test_q8_0_gemv_rejects_mismatched_width():
    w = Q8Matrix.from_blocks(quantize(np.ones((4, 64), np.float32), T.Q8_0))
    with pytest.raises(ValueError, match="expected"):
        gemv(w, np.ones((1, 32), np.float32))


def test_pairs_are_grouped_by_expert_in_pair_order():
    order, group_start, group_expert = group_pairs_by_expert(np.array([3, 0, 3, 3, 1, 0]), 5)
    assert group_expert.tolist() == [0, 1, 3]
    assert group_start.tolist() == [0, 2, 3, 6]
    assert order.tolist() == [1, 5, 4, 0, 2, 3]


PAIR_EXPERTS = {
    "one expert": [2] * 9,  # tiles of 4, 4 and 1
    "distinct experts": [4, 0, 3, 1, 2],
    "mixed": [2, 0, 2, 2, 1, 2, 0, 2, 2, 4, 0],  # 6 pairs of expert 2: a tile of 4 and one of 2
}


@pytest.mark.parametrize("path", path_params(GROUPED_GEMV_Q8_0))
@pytest.mark.parametrize("pair_expert", PAIR_EXPERTS.values(), ids=PAIR_EXPERTS.keys())
def test_grouped_q8_0_gemv_matches_reference_per_expert(path, pair_expert):
    rng = np.random.default_rng()
    experts, rows, cols = 5, 33, 160
    w = Q8Matrix.from_blocks(random_q8_0(rng, (experts, rows, cols)))
    x = rng.standard_normal((len(pair_expert), cols), dtype=np.float32)
    got = grouped_gemv(w, x, np.array(pair_expert), path)
    for p, expert in enumerate(pair_expert):
        assert_matches_reference(got[p : p + 1], w.dequantize(expert), x[p : p + 1])


def test_grouped_q8_0_gemv_with_no_pairs():
    blocks = quantize(np.ones((3, 4, 64), np.float32), T.Q8_0)
    got = grouped_gemv(
        Q8Matrix.from_blocks(blocks), np.zeros((0, 64), np.float32), np.zeros(0, np.int64)
    )
    assert got.shape == (0, 4)


def test_grouped_q8_0_gemv_rejects_unknown_experts():
    w = Q8Matrix.from_blocks(quantize(np.ones((3, 4, 64), np.float32), T.Q8_0))
    with pytest.raises(ValueError, match="outside 0..2"):
        grouped_gemv(w, np.ones((2, 64), np.float32), np.array([0, 3]))


def tile_of_4_ir(tile_dot=_q8_tile_dot_avx2) -> str:
    """LLVM IR of a Q8_0 tile intrinsic on a tile of 4 pairs."""

    def tile_of_4(weights, acts, row, pairs, blocks):
        return tile_dot(weights, acts, row, pairs, blocks)

    weights = (np.zeros(64, np.int8), np.zeros(2, np.uint16))
    acts = (np.zeros(64, np.int8), np.zeros(2, np.float32))
    return fresh_llvm_ir(tile_of_4, (weights, acts, 0, (0, 0, 0, 0), 2))


@pytest.mark.skipif("avx2" not in available_kernel_paths(), reason="CPU without AVX2")
@pytest.mark.parametrize("cpu", CPU_KINDS)
def test_q8_0_avx2_tile_loads_each_weight_vector_once_for_4_pairs(cpu):
    code = machine_code(tile_of_4_ir(), cpu)
    # |w| is the sign of a weight vector applied to itself: once per 32-byte weight vector
    signs = [words for words in code if words[0] in OPERATIONS["byte sign"]]
    absolutes = [words for words in signs if words[1] == words[2]]
    assert count(code, "multiply-add words")
    assert count(code, "multiply-add bytes") == 4 * len(absolutes) > 0


@pytest.mark.parametrize("block", [32, 256])
def test_activations_round_to_int8_per_block_within_half_a_step(block):
    rng = np.random.default_rng()
    x = rng.standard_normal((3, 4 * block), dtype=np.float32)
    x[1, :block] = 0  # an all-zero block: scale 0, values 0
    x_q, scales = quantize_q8_activations(x, block)
    assert x_q.dtype == np.int8 and scales.shape == (3, 4)
    blocks = x.reshape(3, 4, block)
    np.testing.assert_allclose(scales, np.abs(blocks).max(axis=-1) / 127, rtol=1e-6)
    assert np.abs(x_q).max() <= 127 and not x_q[1, :block].any()
    restored = x_q.reshape(3, 4, block) * scales[..., None]
    assert (np.abs(restored - blocks) <= scales[..., None] * (0.5 + 2.0**-14)).all()
    with pytest.raises(ValueError, match="multiple of the block"):
        quantize_q8_activations(x[:, :-1], block)


@pytest.mark.skipif("avx512" not in available_kernel_paths(), reason="CPU without AVX-512 VNNI")
@pytest.mark.parametrize("cpu", ("host", *AVX512_CPU_KINDS))
def test_q8_0_avx512_tile_makes_each_weight_vector_absolute_once_for_4_pairs(cpu):
    code = machine_code(tile_of_4_ir(_q8_tile_dot_avx512), cpu)
    # per 64-byte weight vector (2 blocks; one more for a tail block) one absolute value, and per
    # pair one VNNI byte dot on 512-bit registers; no AVX2 multiply-adds left
    absolutes = count(code, "byte absolute", "%zmm")
    assert absolutes == 4 + 1
    assert count(code, "byte dot", "%zmm") == 4 * absolutes
    assert not count(code, "multiply-add bytes") and not count(code, "byte sign")
