"""Which tensors the Numba kernels may take in place of a torch op."""

from __future__ import annotations

import numpy as np
import torch

# cache dtypes the kernels read: float32, and bfloat16 as its bits (numpy has no bfloat16)
KERNEL_STORE_DTYPES = {torch.float32: None, torch.bfloat16: torch.uint16}


def cpu_kernel_input(t: torch.Tensor) -> bool:
    """Whether the Numba glue kernels may take `t`: float32 in CPU memory, and no gradient to
    track (they return plain arrays, which autograd cannot run through)."""
    if t.dtype != torch.float32 or t.device.type != "cpu":
        return False
    return not (t.requires_grad and torch.is_grad_enabled())


def kernel_store(t: torch.Tensor) -> np.ndarray:
    """A CPU cache tensor as the array the kernels read (shared memory): bfloat16 as uint16."""
    bits = KERNEL_STORE_DTYPES[t.dtype]
    return (t if bits is None else t.view(bits)).numpy()
