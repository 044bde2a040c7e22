"""GGUF block formats: our numpy dequantisers equal gguf.quants.dequantize bit for bit on random
blocks; our quantisers equal gguf's where it has them (Q8_0, Q5_0, Q5_1, BF16) and meet error
budgets where it does not (the K-quants, which follow llama.cpp's reference code)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from hetero.formats.gguf_quantize import quantize
from hetero.formats.gguf_quants import FORMATS, dequantize

# relative RMS error of dequantize(quantize(x)) on Gaussian rows with random scales; measured
# 0.0054, 0.0177, 0.0361, 0.0713 (Q8_0, Q6_K, Q5_K, Q4_K)
ROUNDTRIP_BUDGETS = {T.Q8_0: 0.006, T.Q6_K: 0.019, T.Q5_K: 0.038, T.Q4_K: 0.075}


def random_rows(rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = rng.uniform(1e-3, 10.0, size=(rows, 1))
    return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)


def relative_rms(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.sqrt(np.mean((ours - reference) ** 2) / np.mean(reference**2)))


@pytest.mark.parametrize("ggml_type", list(FORMATS), ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (2, 5, 2)])
def test_dequantize_matches_gguf_bit_for_bit(ggml_type, shape):
    fmt = FORMATS[ggml_type]
    rng = np.random.default_rng(hash((ggml_type.name, shape)) % 2**32)
    # random bytes everywhere, scales included: subnormal, huge, inf and NaN f16 scales too
    raw = rng.integers(0, 256, size=(*shape[:-1], shape[-1] * fmt.type_size), dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 in garbage blocks
        ours = dequantize(raw, ggml_type)
        reference = gguf.quants.dequantize(raw, ggml_type)
    assert ours.dtype == np.float32
    assert ours.shape == reference.shape
    assert ours.tobytes() == np.ascontiguousarray(reference, dtype=np.float32).tobytes()


@pytest.mark.parametrize("ggml_type", [T.Q8_0, T.Q5_0, T.Q5_1, T.BF16], ids=lambda t: t.name)
def test_quantize_matches_gguf_reference(ggml_type):
    x = random_rows(33, 256, seed=int(ggml_type))
    x[0] = 0.0  # an all-zero block
    x[1, :32] = 3.0  # a constant block
    ours = quantize(x, ggml_type)
    reference = gguf.quants.quantize(x, ggml_type)
    assert ours.tobytes() == reference.tobytes()


@pytest.mark.parametrize("ggml_type", list(ROUNDTRIP_BUDGETS), ids=lambda t: t.name)
def test_roundtrip_error_within_budget(ggml_type):
    x = random_rows(96, 1024, seed=7 + int(ggml_type))
    q = quantize(x, ggml_type)
    assert q.dtype == np.uint8 and q.shape == (96, FORMATS[ggml_type].row_bytes(1024))
    error = relative_rms(dequantize(q, ggml_type), x)
    assert error < ROUNDTRIP_BUDGETS[ggml_type]


def test_q4_k_search_beats_plain_min_max_rounding():
    # make_qkx2_quants' scale search at 4.5 bits a value beats Q4_1's min/max grid at 5
    x = random_rows(64, 1024, seed=3)
    q4_k = relative_rms(dequantize(quantize(x, T.Q4_K), T.Q4_K), x)
    q4_1 = relative_rms(gguf.quants.dequantize(gguf.quants.quantize(x, T.Q4_1), T.Q4_1), x)
    assert q4_k < q4_1


@pytest.mark.parametrize("ggml_type", [T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0], ids=lambda t: t.name)
def test_degenerate_blocks_quantise_cleanly(ggml_type):
    x = np.zeros((4, 256), dtype=np.float32)
    x[1] = 0.25  # constant
    x[2, 17] = -1e4  # one outlier among zeros
    x[3] = np.linspace(-1e-20, 1e-20, 256)  # below float16's range
    y = dequantize(quantize(x, ggml_type), ggml_type)
    assert np.isfinite(y).all()
    assert (y[0] == 0).all()
    assert np.abs(y[1] - 0.25).max() < 0.25 * ROUNDTRIP_BUDGETS[ggml_type] * 4
    assert abs(y[2, 17] + 1e4) < 1e4 * 0.02 and np.abs(np.delete(y[2], 17)).max() < 1e4 * 0.02
    assert np.abs(y[3]).max() < 1e-6


def test_quantize_refuses_partial_blocks():
    with pytest.raises(ValueError, match="Q4_K"):
        quantize(np.zeros((2, 100), dtype=np.float32), T.Q4_K)
    with pytest.raises(ValueError, match="Q8_0"):
        dequantize(np.zeros((2, 35), dtype=np.uint8), T.Q8_0)
