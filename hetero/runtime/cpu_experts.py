"""`NumbaExperts`: a layer's routed experts held as Q8_0 blocks and run by cpu_kernels' GEMVs.

Same call as `TorchExperts`, so the runtime can swap a layer's `mlp.experts` for it. Decode (few
tokens) runs the grouped GEMV over all (token, expert) pairs at once, parallel over rows;
prefill (many tokens) dequantises one expert at a time and uses torch's matmul."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from torch import nn

from cpu_kernels.gguf_quantize import quantize
from cpu_kernels.q8_0_gemv import QK8_0, Q8Matrix, grouped_q8_0_gemv
from hetero.runtime.experts import TorchExperts


class RawTensorSource(Protocol):
    """What `from_checkpoint` needs of a checkpoint (hetero.loading's GGUF checkpoint has it)."""

    def raw_tensor(self, name: str) -> tuple[np.ndarray, T]: ...


DECODE_MAX_TOKENS = 16  # more tokens per call go to the prefill path (a guess, not yet tuned)


def dequantize_expert(w: Q8Matrix, expert: int) -> torch.Tensor:
    """One expert's [rows, cols] float32 weight from the repacked Q8_0 values."""
    values = w.values[expert].astype(np.float32)
    rows, cols = values.shape
    dense = values.reshape(rows, cols // QK8_0, QK8_0) * w.scales[expert][..., None]
    return torch.from_numpy(dense.reshape(rows, cols))


class NumbaExperts(nn.Module):
    """Routed experts of one layer in Q8_0: gate and up stacked as one [experts, 2 * size, hidden]
    weight (one GEMV pass reads both), down as [experts, hidden, size]."""

    def __init__(self, gate_up: Q8Matrix, down: Q8Matrix, path: str | None = None):
        super().__init__()
        experts, double_size, hidden = gate_up.shape
        if down.shape != (experts, hidden, double_size // 2):
            raise ValueError(
                f"down weights {down.shape} do not fit gate/up {gate_up.shape}: expected "
                f"{(experts, hidden, double_size // 2)}"
            )
        self.gate_up, self.down, self.path = gate_up, down, path
        self.expert_size = double_size // 2

    @classmethod
    def from_gguf_blocks(
        cls, gate: np.ndarray, up: np.ndarray, down: np.ndarray, path: str | None = None
    ) -> NumbaExperts:
        """Raw Q8_0 tensors `ffn_{gate,up,down}_exps`: uint8 [experts, rows, row_bytes]."""
        gate_up = np.concatenate([gate, up], axis=1)
        return cls(Q8Matrix.from_blocks(gate_up), Q8Matrix.from_blocks(down), path)

    @classmethod
    def from_checkpoint(
        cls, checkpoint: RawTensorSource, prefix: str, num_experts: int, path: str | None = None
    ) -> NumbaExperts:
        """Q8_0 experts `{prefix}.{e}.{gate,up,down}_proj.weight` straight from a checkpoint's
        `raw_tensor` (a GGUF file), without dequantising them."""

        def stacked(name: str) -> np.ndarray:
            blocks = []
            for e in range(num_experts):
                data, ggml_type = checkpoint.raw_tensor(f"{prefix}.{e}.{name}.weight")
                if ggml_type != T.Q8_0:
                    raise ValueError(
                        f"{prefix}.{e}.{name} is {ggml_type.name}; NumbaExperts runs Q8_0 "
                        f"(quantise with from_torch instead)"
                    )
                blocks.append(data)
            return np.stack(blocks)

        return cls.from_gguf_blocks(
            stacked("gate_proj"), stacked("up_proj"), stacked("down_proj"), path
        )

    @classmethod
    def from_torch(cls, experts: TorchExperts, path: str | None = None) -> NumbaExperts:
        """Quantise a float `TorchExperts` to Q8_0."""

        def stacked(name: str) -> np.ndarray:
            weights = [getattr(mlp, name).weight.detach().float().numpy() for mlp in experts]
            return quantize(np.stack(weights), T.Q8_0)

        return cls.from_gguf_blocks(
            stacked("gate_proj"), stacked("up_proj"), stacked("down_proj"), path
        )

    def forward(
        self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor
    ) -> torch.Tensor:
        # x: [tokens, hidden]; expert_ids, expert_weights: [tokens, top_k] -> [tokens, hidden]
        if x.shape[0] > DECODE_MAX_TOKENS:
            return self._prefill(x, expert_ids, expert_weights)
        tokens, top_k = expert_ids.shape
        pair_token = np.repeat(np.arange(tokens), top_k)
        pair_expert = expert_ids.reshape(-1).numpy().astype(np.int64)
        xs = x.detach().float().numpy()[pair_token]
        gate_up = grouped_q8_0_gemv(self.gate_up, xs, pair_expert, self.path)
        gate, up = torch.from_numpy(gate_up).split(self.expert_size, dim=-1)
        hidden = (torch.nn.functional.silu(gate) * up).numpy()
        y = grouped_q8_0_gemv(self.down, hidden, pair_expert, self.path)
        y *= expert_weights.reshape(-1, 1).float().numpy()
        # pairs are token-major, so each token's top_k outputs are adjacent rows
        out = y.reshape(tokens, top_k, -1).sum(axis=1)
        return torch.from_numpy(out).to(x.dtype)

    def _prefill(
        self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor
    ) -> torch.Tensor:
        xf = x.float()
        out = torch.zeros_like(xf)
        for expert in torch.unique(expert_ids).tolist():
            token, slot = torch.nonzero(expert_ids == expert, as_tuple=True)
            gate_up = xf[token] @ dequantize_expert(self.gate_up, expert).T
            gate, up = gate_up.split(self.expert_size, dim=-1)
            y = (torch.nn.functional.silu(gate) * up) @ dequantize_expert(self.down, expert).T
            out.index_add_(0, token, y * expert_weights[token, slot, None].float())
        return out.to(x.dtype)
