"""Error budgets of the quantised GEMV kernels against a float64 reference, derived from what
the kernels round: activations to int8 per block, and float32 sums."""

import numpy as np

QK8_0 = 32  # the kernels' integer dot products run over 32-value blocks


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


BF16_UNIT_ROUNDOFF = 2.0**-8  # an 8-bit significand rounded to nearest


def prefill_error_budget(dtype, matmuls: int) -> float:
    """Relative error budget of `matmuls` chained prefill matmuls on dequantised tiles against
    float32 ones: float32 rounding only, or in bfloat16 each product's two inputs rounded
    (2u of each term) per matmul; fp32 accumulation in both."""
    import torch

    if dtype == torch.float32:
        return 1e-4
    return matmuls * 2 * BF16_UNIT_ROUNDOFF
