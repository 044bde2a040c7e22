"""Q8_0 GEMV kernels against a float64 reference on the dequantised weights.

Error budget: the weights are exact (the reference dequantises the same blocks); the kernel also
rounds activations to int8 per 32-block, which moves each output by at most
`activation_error_bound` (half a step per value, float32 summation slack)."""

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from cpu_kernels.gguf_quantize import quantize
from cpu_kernels.gguf_quants import dequantize
from cpu_kernels.q8_0_gemv import (
    PATH_ENV,
    Q8Matrix,
    activation_error_bound,
    available_kernel_paths,
    grouped_gemv_q8_0_avx2,
    grouped_q8_0_gemv,
    host_kernel_path,
    q8_0_gemv,
)


@pytest.mark.parametrize("path", available_kernel_paths())
@pytest.mark.parametrize(
    "rows,cols,tokens", [(1, 32, 1), (37, 96, 1), (130, 256, 3), (64, 2048, 5)]
)
def test_q8_0_gemv_matches_reference(path, rows, cols, tokens):
    rng = np.random.default_rng()
    blocks = quantize(rng.standard_normal((rows, cols), dtype=np.float32), T.Q8_0)
    x = rng.standard_normal((tokens, cols), dtype=np.float32)
    dense = dequantize(blocks, T.Q8_0).astype(np.float64)
    want = x.astype(np.float64) @ dense.T
    got = q8_0_gemv(Q8Matrix.from_blocks(blocks), x, path)
    assert got.shape == (tokens, rows)
    assert (np.abs(got - want) <= activation_error_bound(dense, x)).all()


def test_q8_0_gemv_paths_agree_on_integer_sums():
    # the int32 block sums are exact on both paths; only float summation order differs
    rng = np.random.default_rng()
    w = Q8Matrix.from_blocks(quantize(rng.standard_normal((50, 320), dtype=np.float32), T.Q8_0))
    x = rng.standard_normal((2, 320), dtype=np.float32)
    results = [q8_0_gemv(w, x, path) for path in available_kernel_paths()]
    for got in results[1:]:
        np.testing.assert_allclose(got, results[0], rtol=1e-4, atol=1e-4)


def test_q8_0_gemv_handles_zero_activations():
    w = Q8Matrix.from_blocks(quantize(np.ones((4, 64), np.float32), T.Q8_0))
    for path in available_kernel_paths():
        assert not q8_0_gemv(w, np.zeros((1, 64), np.float32), path).any()


def test_q8_0_gemv_rejects_mismatched_width():
    w = Q8Matrix.from_blocks(quantize(np.ones((4, 64), np.float32), T.Q8_0))
    with pytest.raises(ValueError, match="expected"):
        q8_0_gemv(w, np.ones((1, 32), np.float32))


def test_kernel_path_can_be_forced(monkeypatch):
    monkeypatch.setenv(PATH_ENV, "plain")
    assert host_kernel_path() == "plain"
    monkeypatch.setenv(PATH_ENV, "sse9")
    with pytest.raises(ValueError, match=PATH_ENV):
        host_kernel_path()


@pytest.mark.parametrize("path", available_kernel_paths())
def test_grouped_q8_0_gemv_matches_reference_per_expert(path):
    rng = np.random.default_rng()
    experts, rows, cols, pairs = 5, 33, 160, 7
    blocks = quantize(rng.standard_normal((experts, rows, cols), dtype=np.float32), T.Q8_0)
    dense = dequantize(blocks, T.Q8_0).astype(np.float64)
    x = rng.standard_normal((pairs, cols), dtype=np.float32)
    pair_expert = rng.integers(0, experts, pairs)
    got = grouped_q8_0_gemv(Q8Matrix.from_blocks(blocks), x, pair_expert, path)
    for p, expert in enumerate(pair_expert):
        want = x[p : p + 1].astype(np.float64) @ dense[expert].T
        assert (np.abs(got[p] - want) <= activation_error_bound(dense[expert], x[p : p + 1])).all()


def test_grouped_q8_0_gemv_with_no_pairs():
    blocks = quantize(np.ones((3, 4, 64), np.float32), T.Q8_0)
    got = grouped_q8_0_gemv(
        Q8Matrix.from_blocks(blocks), np.zeros((0, 64), np.float32), np.zeros(0, np.int64)
    )
    assert got.shape == (0, 4)


@pytest.mark.skipif("avx2" not in available_kernel_paths(), reason="CPU without AVX2")
def test_q8_0_avx2_kernel_uses_integer_dot_product_instructions():
    w = Q8Matrix.from_blocks(quantize(np.ones((4, 64), np.float32), T.Q8_0))
    q8_0_gemv(w, np.ones((1, 64), np.float32), "avx2")
    # a fresh compile: functions loaded from Numba's cache keep no assembly
    signature = grouped_gemv_q8_0_avx2.signatures[0]
    fresh = numba.njit(parallel=True)(grouped_gemv_q8_0_avx2.py_func)
    fresh.compile(signature)
    asm = fresh.inspect_asm(signature)
    assert "vpmaddubsw" in asm and "vpmaddwd" in asm
