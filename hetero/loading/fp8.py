"""Block-scaled FP8 weights (DeepSeek-V3/R1's released format): float8_e4m3fn values with one
float32 `weight_scale_inv` per block of rows x columns (128 x 128 in DeepSeek's config)."""

from __future__ import annotations

import torch

SCALE_SUFFIX = "_scale_inv"


def dequantize_fp8_rows(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int],
    rows: slice,
    dtype: torch.dtype,
) -> torch.Tensor:
    """weight: [out, in] float8; scale_inv: [ceil(out/b0), ceil(in/b1)] -> weight[rows] in dtype.
    `rows` must start on a block boundary."""
    b0, b1 = block
    w = weight[rows].float()
    first_block = rows.start // b0
    s = scale_inv[first_block : first_block + -(-w.shape[0] // b0)].float()
    s = s.repeat_interleave(b0, dim=0)[: w.shape[0]].repeat_interleave(b1, dim=1)[:, : w.shape[1]]
    return (w * s).to(dtype)
