"""Weights a plan leaves on disk: they stay memory-mapped in the model file as stored and are
computed from it a tile at a time, so a model larger than DRAM runs (slower: the OS pages the
weights in on each use and may drop them again) instead of failing. Their backward (training a
LoRA over them) reads the same tiles."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T
from torch import nn

from hetero.formats.gguf_quants import dequantize
from hetero.runtime.frozen import frozen_linear
from hetero.runtime.prefill_matmul import prefill_dtype

TILE_BYTES = 64 * 1024 * 1024  # float32 bytes of weight dequantised at a time (disk, prefill)


class StoredMatrix:
    """An [out, in] weight as stored (GGUF blocks or a safetensors tensor in its own dtype,
    memory-mapped; or a CPU kernel's repacked matrix) that `read_rows(start, stop)` reads a
    tile of as float32. `quantized`: its tiles are dequantised, and multiply in the prefill
    dtype (float weights multiply in float32, as torch runs them in DRAM)."""

    def __init__(
        self,
        shape: tuple[int, int],
        read_rows: Callable[[int, int], torch.Tensor],
        quantized: bool = True,
    ):
        self.shape = shape
        self._read_rows = read_rows
        self.quantized = quantized

    @classmethod
    def from_blocks(cls, blocks: np.ndarray, ggml_type: T, cols: int) -> StoredMatrix:
        # blocks: uint8 [rows, row_bytes], a view of the mapped file
        def read(start: int, stop: int) -> torch.Tensor:
            return torch.from_numpy(dequantize(blocks[start:stop], ggml_type))

        return cls((blocks.shape[0], cols), read)

    @classmethod
    def from_tensor(cls, weight: torch.Tensor) -> StoredMatrix:
        # weight: [rows, cols], a zero-copy view of the mapped file
        return cls(tuple(weight.shape), lambda start, stop: weight[start:stop].float(), False)

    def row_tiles(self):
        """(start, stop) of the row tiles read one at a time: TILE_BYTES of float32 each."""
        out_features, in_features = self.shape
        step = max(1, TILE_BYTES // (4 * in_features))
        for start in range(0, out_features, step):
            yield start, min(start + step, out_features)

    def matmul(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """x: float32 [tokens, in] -> x @ W.T, float32 [tokens, out], one tile at a time, each
        multiplied in `dtype` (None: the prefill dtype, hetero/runtime/prefill_matmul.py, if
        quantised)."""
        y = x.new_empty(x.shape[0], self.shape[0])
        if dtype is None:
            dtype = prefill_dtype(x) if self.quantized else torch.float32
        xs = x.to(dtype)
        for start, stop in self.row_tiles():
            tile = self._read_rows(start, stop).to(dtype)
            if dtype == y.dtype:
                torch.matmul(xs, tile.T, out=y[:, start:stop])
            else:
                y[:, start:stop] = xs @ tile.T
        return y

    def grad_input(self, grad_out: torch.Tensor) -> torch.Tensor:
        """grad_out: float32 [tokens, out] -> grad_out @ W, [tokens, in]: the backward of
        `matmul`, from the same row tiles (W is never transposed or held whole)."""
        grad_in = None
        for start, stop in self.row_tiles():
            tile = self._read_rows(start, stop)
            if grad_in is None:  # the first tile writes, the others add: no zero-fill pass
                grad_in = grad_out[:, start:stop] @ tile
            else:
                grad_in.addmm_(grad_out[:, start:stop], tile)
        return grad_in


class DiskLinear(nn.Module):
    """`nn.Linear` computed from the file: weights never held in DRAM beyond one tile."""

    def __init__(self, weight: StoredMatrix, bias: torch.Tensor | None):
        super().__init__()
        self.weight_file = weight
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        y = frozen_linear(x.reshape(-1, self.in_features), self.weight_file)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, on disk"


class DiskMLP(nn.Module):
    """One SwiGLU expert (or dense FFN) computed from the file: down(silu(gate(x)) * up(x))."""

    def __init__(self, gate: StoredMatrix, up: StoredMatrix, down: StoredMatrix):
        super().__init__()
        self.gate, self.up, self.down = gate, up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [tokens, hidden] -> [tokens, hidden]
        hidden = F.silu(frozen_linear(x, self.gate)) * frozen_linear(x, self.up)
        return frozen_linear(hidden, self.down).to(x.dtype)

    def extra_repr(self) -> str:
        return f"expert_size={self.gate.shape[0]}, on disk"


def stored_matrix(checkpoint, tensor_name: str) -> StoredMatrix | None:
    """The stored form of a checkpoint tensor, or None where it has none that can be computed
    from in place (MLA's kv_b joined from two GGUF tensors; fp8 weights with block scales):
    such a tensor loads into DRAM like any other."""
    if hasattr(checkpoint, "raw_tensor"):  # GGUF
        try:
            blocks, ggml_type = checkpoint.raw_tensor(tensor_name)
        except KeyError:
            return None
        return StoredMatrix.from_blocks(
            blocks, ggml_type, checkpoint.entries[tensor_name].shape[-1]
        )
    weight = checkpoint.tensor(tensor_name)
    if not weight.dtype.is_floating_point or weight.element_size() == 1:
        return None
    return StoredMatrix.from_tensor(weight)
