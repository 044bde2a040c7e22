"""The decode glue on the CPU kernels' side: when the kernels run a model's weights, its RMSNorms
and rotary embeddings run through cpu_kernels too (inference only; other inputs go to the torch
modules they replaced), swapped in like the kernel linears."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cpu_kernels.norms import rms_norm
from cpu_kernels.rope import rope_cos_sin, rope_rotate
from hetero.models.decoder import RMSNorm
from hetero.models.rope import RotaryEmbedding
from hetero.runtime.kernel_inputs import cpu_kernel_input


class NumbaRMSNorm(nn.Module):
    """`RMSNorm` whose float32 CPU inputs without autograd go to the Numba kernel (with the
    weight as it was when swapped in); other inputs, and any call while the weight itself
    takes a gradient, go to the torch module it replaced."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.torch_norm = norm
        self._weight = norm.weight.detach().float().contiguous().numpy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.torch_norm.weight
        if not cpu_kernel_input(x) or (weight.requires_grad and torch.is_grad_enabled()):
            return self.torch_norm(x)
        rows = x.detach().reshape(-1, x.shape[-1])
        out = rms_norm(rows.contiguous().numpy(), self._weight, self.torch_norm.eps)
        return torch.from_numpy(out).view(x.shape)


class NumbaRotary(RotaryEmbedding):
    """`RotaryEmbedding` whose float32 CPU tables and rotations (half-split layout, without
    autograd) are one Numba call each; anything else takes the torch path it inherits."""

    def __init__(self, rotary: RotaryEmbedding):
        dim, rope = rotary.settings
        super().__init__(dim, rope, interleaved=rotary.interleaved)
        self._inv_freq = self.inv_freq.detach().float().contiguous().numpy()

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if dtype != torch.float32 or positions.device.type != "cpu":
            return super().cos_sin(positions, dtype)
        scaling = np.float32(self.attention_scaling)
        cos, sin = rope_cos_sin(positions.numpy(), self._inv_freq, scaling)
        return torch.from_numpy(cos)[:, None, :], torch.from_numpy(sin)[:, None, :]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.interleaved or not cpu_kernel_input(x):
            return super().apply(x, cos, sin)
        out = rope_rotate(x.detach().contiguous().numpy(), cos[:, 0].numpy(), sin[:, 0].numpy())
        return torch.from_numpy(out)


def install_cpu_glue(net: nn.Module) -> None:
    """Every float32 `RMSNorm` of `net` becomes a `NumbaRMSNorm`, every rotary embedding a
    `NumbaRotary`."""
    for name, module in list(net.named_modules()):
        if isinstance(module, RMSNorm) and module.weight.dtype == torch.float32:
            net.set_submodule(name, NumbaRMSNorm(module))
        elif type(module) is RotaryEmbedding:
            net.set_submodule(name, NumbaRotary(module))
