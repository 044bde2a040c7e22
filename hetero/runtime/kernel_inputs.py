"""Which tensors the Numba kernels may take in place of a torch op."""

from __future__ import annotations

import torch


def cpu_kernel_input(t: torch.Tensor) -> bool:
    """Whether the Numba glue kernels may take `t`: float32 in CPU memory, and no gradient to
    track (they return plain arrays, which autograd cannot run through)."""
    if t.dtype != torch.float32 or t.device.type != "cpu":
        return False
    return not (t.requires_grad and torch.is_grad_enabled())
