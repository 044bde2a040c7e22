"""RMSNorm on the GPU, plain and fused with the residual add that precedes it in every decoder
block (one read of x and the residual, one write of each result, where torch runs 6 kernels).
The fused form normalises the sum as rounded to the residual's dtype, as the models do."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_kernels.launch_checks import (
    next_power_of_2,
    require_float_rows,
    require_same_device,
    require_shape,
)
from gpu_kernels.tuning import block_sizes


@triton.jit
def _rmsnorm_kernel(
    x, residual, weight, out, new_residual, hidden, eps,
    stride_x, stride_r, stride_o, stride_nr,
    ADD_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # one program: one token's row, in float32
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < hidden
    values = tl.load(x + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if ADD_RESIDUAL:
        values += tl.load(residual + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        rounded = values.to(new_residual.dtype.element_ty)
        tl.store(new_residual + row * stride_nr + cols, rounded, mask=ok)
        values = rounded.to(tl.float32)
    inverse_rms = 1.0 / tl.sqrt(tl.sum(values * values, 0) / hidden + eps)
    w = tl.load(weight + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(
        out + row * stride_o + cols, (values * inverse_rms * w).to(out.dtype.element_ty), mask=ok
    )


def _launch(x, residual, weight, eps):
    require_shape("x", x, (None, None), "[tokens, hidden]")
    tokens, hidden = x.shape
    require_shape("weight", weight, (hidden,), "[hidden]")
    require_float_rows("x", x)
    require_float_rows("weight", weight)
    tensors = dict(x=x, weight=weight)
    if residual is not None:
        require_shape("residual", residual, (tokens, hidden), "[tokens, hidden]")
        require_float_rows("residual", residual)
        tensors["residual"] = residual
    require_same_device(**tensors)
    out = torch.empty_like(x)
    new_residual = None if residual is None else torch.empty_like(residual)
    if tokens:
        _rmsnorm_kernel[(tokens,)](
            x, x if residual is None else residual, weight, out,
            out if new_residual is None else new_residual, hidden, eps,
            x.stride(0), 0 if residual is None else residual.stride(0), out.stride(0),
            0 if new_residual is None else new_residual.stride(0),
            ADD_RESIDUAL=residual is not None, BLOCK=next_power_of_2(hidden),
            **block_sizes("rmsnorm", hidden),
        )  # fmt: skip
    return out, new_residual


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight per row, computed in float32 -> x's shape and dtype.
    x: [tokens, hidden]; weight: [hidden]."""
    return _launch(x, None, weight, eps)[0]


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(s) in x's dtype, s) with s = x + residual rounded to residual's dtype.
    x, residual: [tokens, hidden]; weight: [hidden]."""
    return _launch(x, residual, weight, eps)
