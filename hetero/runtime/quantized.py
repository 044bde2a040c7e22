"""Quantised weights on the CPU kernels: `QuantLinear` for dense layers, and the builders the
model assembler calls for a group the kernels run: from a GGUF file's tensors as stored, or
from float weights converted at load (`--quant q8_0|q4_k|...`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from torch import nn

from cpu_kernels.quant_matrix import (
    QuantMatrix,
    grouped_gemv,
    join_rows,
    kernel_type,
    one_expert,
    repack,
    row_slice,
    runs_many_rows,
)
from hetero.runtime.cpu_experts import FLOAT_PANELS, NumbaExperts, matrix_from_weights
from hetero.runtime.disk import StoredMatrix
from hetero.runtime.frozen import frozen_linear, needs_gradient
from hetero.runtime.prefill_matmul import DECODE_MAX_TOKENS, prefill_dtype_name

# llama.cpp's K-quant mixes keep the output layer at Q6_K: it decides every token's ranking
LM_HEAD_TYPE = {T.Q4_K: T.Q6_K}


class QuantLinear(nn.Module):
    """`nn.Linear` over a frozen quantised [out, in] matrix: the GEMV for a few tokens,
    dequantised row tiles and torch's matmul for many, and the tiles again (dX = dY W) for an
    input that needs a gradient."""

    def __init__(self, weight: QuantMatrix, bias: nn.Parameter | None, path: str | None = None):
        super().__init__()
        self.qweight, self.path = weight, path
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self._stacked = one_expert(weight)  # the GEMV's [1, rows, cols] view, made once
        # prefill: dequantised row tiles through torch's matmul, as for weights left on disk
        self._tiles = StoredMatrix(
            weight.shape,
            lambda start, stop: torch.from_numpy(row_slice(weight, start, stop).dequantize()),
            quantized=not isinstance(weight, FLOAT_PANELS),
        )

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes

    @property
    def matrices(self) -> tuple[QuantMatrix, ...]:
        return (self.qweight,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        flat = x.reshape(-1, self.in_features).float()
        if needs_gradient(x):
            y = frozen_linear(flat, self._tiles)
        elif flat.shape[0] <= DECODE_MAX_TOKENS or runs_many_rows(self.qweight, self.path):
            pair_expert = np.zeros(flat.shape[0], np.int64)
            rows = flat.detach().numpy()
            y = torch.from_numpy(grouped_gemv(self._stacked, rows, pair_expert, self.path))
        else:
            y = self._tiles.matmul(flat)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        name = type(self.qweight).__name__
        return f"in_features={self.in_features}, out_features={self.out_features}, {name}"


def join_key(part: QuantLinear) -> tuple:
    """Kernel linears with equal keys (format, width, bias or none) stack into one matrix."""
    return type(part.qweight), part.in_features, part.bias is None


class JoinedQuantLinear(nn.Module):
    """Linears that read the same input (q/k/v, gate/up) in as few GEMV passes as their formats
    allow: parts of one format and width (and all or none with a bias) are stacked into one
    matrix that a single pass reads, e.g. Q4_K q/k beside a Q6_K v in a Q4_K_M file. Returns
    each part's output, in order."""

    def __init__(self, parts: list[QuantLinear], path: str | None = None):
        super().__init__()
        groups: dict[tuple, list[int]] = {}
        for i, part in enumerate(parts):
            groups.setdefault(join_key(part), []).append(i)
        self.passes = nn.ModuleList()
        self.sizes = [p.out_features for p in parts]
        self._where: list[tuple[int, int, int]] = [(0, 0, 0)] * len(parts)  # pass, start, stop
        for members in groups.values():
            start = 0
            for i in members:
                self._where[i] = (len(self.passes), start, start + parts[i].out_features)
                start += parts[i].out_features
            biases = [parts[i].bias for i in members]
            bias = None
            if biases[0] is not None:
                bias = nn.Parameter(torch.cat(biases), requires_grad=False)
            weight = join_rows([parts[i].qweight for i in members])
            self.passes.append(QuantLinear(weight, bias, path))

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.passes)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, passes={len(self.passes)}"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = [p(x) for p in self.passes]
        return tuple(outs[k][..., start:stop] for k, start, stop in self._where)


@dataclass
class QuantReport:
    """What a quantisation pass did, for the load log."""

    modules: int = 0
    kernel_bytes: int = 0
    seconds: float = 0.0
    types: dict[str, int] = field(default_factory=dict)

    def add(self, module: QuantLinear | NumbaExperts) -> None:
        self.modules += 1
        self.kernel_bytes += module.nbytes
        matrix = module.qweight if isinstance(module, QuantLinear) else module.gate_up
        name = type(matrix).__name__
        self.types[name] = self.types.get(name, 0) + 1

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.types.items()))
        return (
            f"{self.modules} modules on the CPU kernels ({kinds}): "
            f"{self.kernel_bytes / 2**30:.2f} GiB, repacked in {self.seconds:.1f} s"
            + self.prefill_note()
        )

    def prefill_note(self) -> str:
        rounded = set(self.types) - {panel.__name__ for panel in FLOAT_PANELS}
        if not rounded or prefill_dtype_name() == "f32":
            return ""
        return f"; prefill multiplies their dequantised tiles in {prefill_dtype_name()}"


def join_projections(net: nn.Module, report: QuantReport, path: str | None = None) -> None:
    """Join kernel linears that read the same input, where a module names them in `JOINABLE`
    ({joined name: part names}) and at least two of them share a format and width."""
    began = time.perf_counter()
    for module in list(net.modules()):
        for name, part_names in getattr(module, "JOINABLE", {}).items():
            parts = [getattr(module, p, None) for p in part_names]
            if not all(isinstance(p, QuantLinear) for p in parts):
                continue
            kinds = [join_key(p) for p in parts]
            if len(set(kinds)) == len(kinds):  # nothing to join: as many passes either way
                continue
            setattr(module, name, JoinedQuantLinear(parts, path))
            for part in part_names:
                setattr(module, part, None)
    report.seconds += time.perf_counter() - began


def stored_kernel_linear(
    checkpoint, source: str, bias: nn.Parameter | None, path: str | None = None
) -> QuantLinear | None:
    """A dense layer on the kernels from a GGUF tensor as stored (repacked, never dequantised
    to float), or None where it has no stored form (MLA's kv_b joined from two tensors) or no
    kernel takes its width."""
    try:
        blocks, ggml_type = checkpoint.raw_tensor(source)
    except KeyError:
        return None
    if kernel_type(ggml_type, checkpoint.entries[source].shape[-1]) is None:
        return None
    return QuantLinear(repack(blocks, ggml_type), bias, path)


def converted_kernel_linear(
    weight: torch.Tensor, ggml_type: T, bias: nn.Parameter | None, path: str | None = None
) -> QuantLinear | None:
    """A dense layer on the kernels from a float weight converted to `ggml_type`, or None
    where no kernel takes its width."""
    if kernel_type(ggml_type, weight.shape[-1]) is None:
        return None
    return QuantLinear(matrix_from_weights([weight], ggml_type, stacked=False), bias, path)


def converted_kernel_experts(
    weights: list[dict[str, torch.Tensor]], ggml_type: T, path: str | None = None
) -> NumbaExperts:
    """Experts on the kernels from float weights converted to `ggml_type`:
    weights[e][projection] is expert e's [out, in] weight."""
    gate_up = [torch.cat([w["gate_proj"], w["up_proj"]]) for w in weights]
    down = [w["down_proj"] for w in weights]
    return NumbaExperts(
        matrix_from_weights(gate_up, ggml_type), matrix_from_weights(down, ggml_type), path
    )
