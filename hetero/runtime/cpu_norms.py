"""RMSNorm on the CPU kernels' side: when the kernels run a model's weights, its norms run
through cpu_kernels.norms too (inference only), swapped in like the kernel linears."""

from __future__ import annotations

import torch
from torch import nn

from cpu_kernels.norms import rms_norm
from hetero.models.decoder import RMSNorm


class NumbaRMSNorm(nn.Module):
    """`RMSNorm` (no autograd) whose float32 CPU inputs go to the Numba kernel; other inputs to
    the torch module it replaced."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.torch_norm = norm
        self._weight = norm.weight.detach().float().contiguous().numpy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            return self.torch_norm(x)
        rows = x.detach().reshape(-1, x.shape[-1])
        out = rms_norm(rows.contiguous().numpy(), self._weight, self.torch_norm.eps)
        return torch.from_numpy(out).view(x.shape)


def install_cpu_norms(net: nn.Module) -> None:
    """Every float32 `RMSNorm` of `net` becomes a `NumbaRMSNorm`."""
    for name, module in list(net.named_modules()):
        if isinstance(module, RMSNorm) and module.weight.dtype == torch.float32:
            net.set_submodule(name, NumbaRMSNorm(module))
