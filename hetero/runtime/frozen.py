"""The backward of frozen weights held as stored (quantised blocks, kernel panels, a mapped
file): dX = dY W, computed a row tile of W at a time from the same stored form, so training
through a frozen base keeps no float or transposed copy of it. The weights take no gradient."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # disk.py's modules call frozen_linear
    from hetero.runtime.disk import StoredMatrix


class FrozenLinear(torch.autograd.Function):
    """x @ W.T for a frozen `StoredMatrix` W, differentiable in x only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: StoredMatrix) -> torch.Tensor:
        # x: float32 [tokens, in] -> [tokens, out]
        ctx.weight = weight
        # float32 tiles, as the backward's: autograd is off in here, so the prefill's choice
        # of dtype (bf16 on some CPUs, for inference only) cannot see that this is training
        return weight.matmul(x, torch.float32)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        # grad_out: [tokens, out] -> grad_in [tokens, in]
        return ctx.weight.grad_input(grad_out), None


def frozen_linear(x: torch.Tensor, weight: StoredMatrix) -> torch.Tensor:
    """x: [tokens, in] -> float32 [tokens, out], with a backward to x through the stored W."""
    return FrozenLinear.apply(x.float(), weight)


def needs_gradient(*inputs: torch.Tensor) -> bool:
    """Whether autograd records a call on these inputs (then the kernel modules take the
    differentiable path: their Numba kernels compute outside autograd)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
