"""Q4_K GEMV kernels against a float64 reference on the dequantised weights.

Error budget: weights are exact (the reference dequantises the same blocks); the kernel also
rounds activations to int8 per 32-block (the min term uses the rounded block sums too), which
moves each output by at most `activation_error_bound`."""

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from cpu_kernels.gguf_quantize import quantize
from cpu_kernels.gguf_quants import dequantize
from cpu_kernels.q4_k_gemv import Q4KMatrix, gemv_q4_k_avx2, q4_k_gemv
from cpu_kernels.q8_0_gemv import activation_error_bound, available_kernel_paths

SHAPES = [(1, 256, 1), (37, 512, 1), (130, 768, 3), (64, 2048, 5)]  # rows, cols, tokens


@pytest.mark.parametrize("path", available_kernel_paths())
@pytest.mark.parametrize("rows,cols,tokens", SHAPES)
def test_q4_k_gemv_matches_reference(path, rows, cols, tokens):
    rng = np.random.default_rng()
    # an offset makes the mins matter
    weights = rng.standard_normal((rows, cols), dtype=np.float32) + 0.5
    blocks = quantize(weights, T.Q4_K)
    x = rng.standard_normal((tokens, cols), dtype=np.float32)
    dense = dequantize(blocks, T.Q4_K).astype(np.float64)
    want = x.astype(np.float64) @ dense.T
    got = q4_k_gemv(Q4KMatrix.from_blocks(blocks), x, path)
    assert got.shape == (tokens, rows)
    assert (np.abs(got - want) <= activation_error_bound(dense, x)).all()


def test_q4_k_gemv_rejects_mismatched_width():
    w = Q4KMatrix.from_blocks(quantize(np.ones((4, 256), np.float32), T.Q4_K))
    with pytest.raises(ValueError, match="expected"):
        q4_k_gemv(w, np.ones((1, 512), np.float32))


@pytest.mark.skipif("avx2" not in available_kernel_paths(), reason="CPU without AVX2")
def test_q4_k_avx2_kernel_uses_integer_dot_product_instructions():
    w = Q4KMatrix.from_blocks(quantize(np.ones((4, 256), np.float32), T.Q4_K))
    q4_k_gemv(w, np.ones((1, 256), np.float32), "avx2")
    # a fresh compile: functions loaded from Numba's cache keep no assembly
    signature = gemv_q4_k_avx2.signatures[0]
    fresh = numba.njit(parallel=True)(gemv_q4_k_avx2.py_func)
    fresh.compile(signature)
    asm = fresh.inspect_asm(signature)
    assert "vpmaddubsw" in asm and "vpmaddwd" in asm
