"""`NumbaExperts`: a layer's routed experts held as quantised blocks and run by cpu_kernels.

Same interface as `TorchExperts`, so the runtime can swap a layer's `mlp.experts` for it; its
`submit` hands the work to the expert worker thread, so the MoE block's shared experts run
meanwhile. Decode (few tokens) runs the grouped GEMV over all (token, expert) pairs at once,
parallel over rows; prefill (many tokens) dequantises one expert at a time and uses torch's
matmul, except where the format's kernel is the faster GEMM too (`runs_many_rows`: the panel
formats on AVX2). Inputs that need a gradient (training a LoRA over frozen experts) run in
torch through `frozen_linear`, whose backward reads the same stored matrices."""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from torch import nn

from cpu_kernels.ffn_glue import silu_mul, weighted_pair_sum
from cpu_kernels.panel_gemv import BF16Matrix, F16Matrix, F32Matrix
from cpu_kernels.quant_matrix import (
    QuantMatrix,
    grouped_gemv,
    quantize_matrix,
    repack,
    runs_many_rows,
)
from hetero.formats.gguf_quants import dequantize
from hetero.models.experts import (
    ExpertBackend,
    ExpertsHandle,
    FinishedExperts,
    Projection,
    TorchExperts,
    run_grouped_by_expert,
    swiglu,
)
from hetero.runtime.disk import StoredMatrix
from hetero.runtime.expert_worker import expert_worker
from hetero.runtime.frozen import frozen_linear, needs_gradient
from hetero.runtime.prefill_matmul import DECODE_MAX_TOKENS, prefill_dtype


class RawTensorSource(Protocol):
    """What `from_checkpoint` needs of a checkpoint (hetero.loading's GGUF checkpoint has it)."""

    def raw_tensor(self, name: str) -> tuple[np.ndarray, T]: ...


PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# kernel formats whose prefill tiles multiply in float32 whatever the prefill dtype: a float32
# or float16 model's weights are not rounded further than its checkpoint did
FLOAT_PANELS = (F32Matrix, F16Matrix)
# "1" runs the routed experts on the expert worker while the shared experts run, "0" in the
# caller's thread before them (the A/B of bench/expert_overlap_bench.py); unset, the model
# assembler decides: overlap pays only where the shared experts run off the CPU (on the CPU
# alone both sides share the cores and the memory bus: 0.96x decode in expert-overlap.md)
OVERLAP_ENV = "HETERO_EXPERT_OVERLAP"


def overlap_by_default(shared_experts_on_cpu: bool = False) -> bool:
    setting = os.environ.get(OVERLAP_ENV)
    if setting is None:
        return not shared_experts_on_cpu
    return setting != "0"


def matrix_from_weights(
    weights: list[torch.Tensor], ggml_type: T, stacked: bool = True
) -> QuantMatrix:
    """Float [rows, cols] weights -> a kernel matrix, [experts, rows, cols] when `stacked`
    (one weight per expert), else [rows, cols] (one weight). bfloat16 weights become BF16 by
    their bits (nothing rounded); anything else is quantised from float32."""
    if ggml_type == T.BF16 and all(w.dtype == torch.bfloat16 for w in weights):
        arrays = [w.detach().view(torch.int16).numpy().view(np.uint16) for w in weights]
        return BF16Matrix.from_values(np.stack(arrays) if stacked else arrays[0])
    arrays = [w.detach().float().numpy() for w in weights]
    return quantize_matrix(np.stack(arrays) if stacked else arrays[0], ggml_type)


class NumbaExperts(ExpertBackend, nn.Module):
    """Routed experts of one layer: gate and up stacked as one [experts, 2 * size, hidden]
    matrix (one GEMV pass reads both), down as [experts, hidden, size]. `overlap`: whether
    `submit` runs them on the expert worker (else at once, in the caller's thread)."""

    def __init__(self, gate_up: QuantMatrix, down: QuantMatrix, path: str | None = None):
        super().__init__()
        experts, double_size, hidden = gate_up.shape
        if down.shape != (experts, hidden, double_size // 2):
            raise ValueError(
                f"down weights {down.shape} do not fit gate/up {gate_up.shape}: expected "
                f"{(experts, hidden, double_size // 2)}"
            )
        self.gate_up, self.down, self.path = gate_up, down, path
        self.num_experts, self.expert_size = experts, double_size // 2
        self.overlap = overlap_by_default()

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes

    @property
    def matrices(self) -> tuple[QuantMatrix, ...]:
        return self.gate_up, self.down

    @classmethod
    def from_gguf_blocks(
        cls,
        gate: tuple[np.ndarray, T],
        up: tuple[np.ndarray, T],
        down: tuple[np.ndarray, T],
        path: str | None = None,
    ) -> NumbaExperts:
        """Raw tensors `ffn_{gate,up,down}_exps` as (uint8 [experts, rows, row_bytes], type)."""
        (gate_blocks, gate_type), (up_blocks, up_type) = gate, up
        if gate_type == up_type:
            gate_up = repack(np.concatenate([gate_blocks, up_blocks], axis=1), gate_type)
        else:  # one GEMV pass needs one format: requantise both halves to gate's
            values = [dequantize(b, t) for b, t in (gate, up)]
            gate_up = quantize_matrix(np.concatenate(values, axis=1), gate_type)
        return cls(gate_up, repack(*down), path)

    @classmethod
    def from_checkpoint(
        cls, checkpoint: RawTensorSource, names: list[dict[str, str]], path: str | None = None
    ) -> NumbaExperts:
        """Quantised experts straight from a checkpoint's `raw_tensor` (a GGUF file), without
        dequantising them: names[e][projection] is expert e's tensor name."""

        def stacked(projection: str) -> tuple[np.ndarray, T]:
            raw = [checkpoint.raw_tensor(expert[projection]) for expert in names]
            types = {t for _, t in raw}
            if len(types) > 1:
                raise ValueError(f"the experts' {projection} tensors mix types {types}")
            return np.stack([blocks for blocks, _ in raw]), raw[0][1]

        return cls.from_gguf_blocks(*(stacked(p) for p in PROJECTIONS), path)

    @classmethod
    def from_torch(
        cls, experts: TorchExperts, ggml_type: T = T.Q8_0, path: str | None = None
    ) -> NumbaExperts:
        """Quantise a float `TorchExperts` to `ggml_type` (Q8_0, Q4_K, Q6_K, BF16)."""
        gate_up = [torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]) for mlp in experts]
        down = [mlp.down_proj.weight for mlp in experts]
        return cls(
            matrix_from_weights(gate_up, ggml_type), matrix_from_weights(down, ggml_type), path
        )

    def extra_repr(self) -> str:
        experts, hidden = self.num_experts, self.gate_up.shape[2]
        name = type(self.gate_up).__name__
        return f"experts={experts}, hidden={hidden}, expert_size={self.expert_size}, {name}"

    def submit(
        self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor
    ) -> ExpertsHandle:
        # x: [tokens, hidden]; expert_ids, expert_weights: [tokens, top_k]
        if needs_gradient(x, expert_weights):  # training: autograd records here, in torch
            return FinishedExperts(self._differentiable(x, expert_ids, expert_weights))
        worker = expert_worker() if self.overlap else None
        if worker is None:
            return FinishedExperts(self._compute(x, expert_ids, expert_weights))
        return worker.submit(self._compute, x, expert_ids, expert_weights)

    def forward(
        self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor
    ) -> torch.Tensor:
        # nothing runs meanwhile: computed in the caller's thread, without a worker handoff
        if needs_gradient(x, expert_weights):
            return self._differentiable(x, expert_ids, expert_weights)
        return self._compute(x, expert_ids, expert_weights)

    def expert_projections(self, expert: int) -> tuple[Projection, Projection]:
        """As `TorchExperts.expert_projections`: from the stored matrices, a row tile at a time
        (an expert's matrix is dequantised once per tile, forward and backward alike)."""

        def stored(matrix: QuantMatrix) -> StoredMatrix:
            rows, cols = matrix.shape[1:]
            return StoredMatrix(
                (rows, cols),
                lambda start, stop: torch.from_numpy(matrix.dequantize(expert)[start:stop]),
            )

        gate_up, down = stored(self.gate_up), stored(self.down)
        return lambda xs: frozen_linear(xs, gate_up), lambda hs: frozen_linear(hs, down)

    def runs_pairs(self, tokens: int) -> bool:
        """Whether `tokens` tokens take the grouped GEMV over (token, expert) pairs (decode)."""
        return tokens <= DECODE_MAX_TOKENS or runs_many_rows(self.gate_up, self.path)

    def pair_matmul(self, which: str, rows: np.ndarray, pair_expert: np.ndarray) -> np.ndarray:
        """Row i of rows [pairs, in] (float32) through expert pair_expert[i]'s `which` matrix
        ("gate_up" or "down") -> [pairs, out]: the grouped GEMV, for adapters that change
        what runs between the two (LoRA)."""
        return grouped_gemv(getattr(self, which), rows, pair_expert, self.path)

    def _differentiable(
        self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor
    ) -> torch.Tensor:
        # the frozen experts' backward to x and to the routing weights (the path to the router)
        def run_expert(expert: int, xs: torch.Tensor) -> torch.Tensor:
            gate_up, down = self.expert_projections(expert)
            return down(swiglu(gate_up(xs)))

        experts = self.num_experts
        return run_grouped_by_expert(x.float(), expert_ids, expert_weights, experts, run_expert)

    def _compute(
        self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor
    ) -> torch.Tensor:
        # x: [tokens, hidden]; expert_ids, expert_weights: [tokens, top_k] -> [tokens, hidden].
        # detach(): inputs that need a gradient took `_differentiable` (submit, forward)
        if x.shape[0] > DECODE_MAX_TOKENS and not runs_many_rows(self.gate_up, self.path):
            return self._prefill(x, expert_ids, expert_weights)
        top_k = expert_ids.shape[1]
        pair_expert = expert_ids.reshape(-1).numpy().astype(np.int64)
        # pairs are token-major: each token's top_k pairs are adjacent rows
        xs = np.repeat(x.detach().float().numpy(), top_k, axis=0)
        gate_up = grouped_gemv(self.gate_up, xs, pair_expert, self.path)
        hidden = silu_mul(gate_up, self.expert_size)
        y = grouped_gemv(self.down, hidden, pair_expert, self.path)
        weights = np.ascontiguousarray(expert_weights.detach().float().numpy())
        return torch.from_numpy(weighted_pair_sum(y, weights, top_k)).to(x.dtype)

    def _prefill(
        self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor
    ) -> torch.Tensor:
        # tokens grouped by expert; each expert's weights dequantised once for all its tokens
        # and multiplied in the prefill dtype (hetero/runtime/prefill_matmul.py)
        dtype = torch.float32 if isinstance(self.gate_up, FLOAT_PANELS) else prefill_dtype(x)

        def weight(matrix: QuantMatrix, expert: int) -> torch.Tensor:
            return torch.from_numpy(matrix.dequantize(expert)).to(dtype)

        def run_expert(expert: int, xs: torch.Tensor) -> torch.Tensor:
            # xs: float32 [expert's tokens, hidden]; the weighted sum stays float32
            gate_up = xs.to(dtype) @ weight(self.gate_up, expert).T
            return (swiglu(gate_up) @ weight(self.down, expert).T).float()

        out = run_grouped_by_expert(
            x.detach().float(), expert_ids, expert_weights, self.num_experts, run_expert
        )
        return out.to(x.dtype)
