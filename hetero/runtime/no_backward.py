"""The CPU kernels compute outside autograd (numpy arrays in, numpy arrays out). The modules
that call them refuse inputs that need a gradient, where detaching them would train nothing
without a word."""

from __future__ import annotations

import torch
from torch import nn

from hetero.errors import KernelGradientError


def refuse_gradient(module: nn.Module, *inputs: torch.Tensor) -> None:
    """Raise `KernelGradientError` when autograd is on and any input requires a gradient."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        raise KernelGradientError(
            f"{type(module).__name__}({module.extra_repr()}) runs on the CPU kernels, which "
            f"have no backward yet, and its input requires a gradient: to train, load the "
            f'model with quant="none" (--quant none); for inference, run under torch.no_grad()'
        )
