"""Modules of the groups a plan puts on the accelerator, run on its lane: `OnLane` wraps a
torch module (attention, norms, router, shared experts, dense FFN, embeddings, lm_head) so its
inputs go up and its output comes down through the lane's copies; `LaneExperts` is the
expert backend of a layer's hot experts, computed on the lane while the CPU runs the cold."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hetero.models.batch import Batch
from hetero.models.experts import ExpertBackend, run_grouped_by_expert
from hetero.runtime.accelerator.lane import Lane, LaneHandle
from hetero.runtime.batch import ForwardBatch


def lane_argument(lane: Lane, value):
    """An argument of a module on the lane, on the lane: a tensor copied up; a batch rebuilt
    there once per forward (its positions and history indices feed the attention's math)."""
    if isinstance(value, torch.Tensor):
        return lane.to_lane(value)
    if isinstance(value, ForwardBatch) and lane.device.type != "cpu":
        return value.memo(
            ("on", str(lane.device)), lambda: ForwardBatch(value.slices, value.kv, lane.device)
        )
    return value


class OnLane(nn.Module):
    """`inner`, with its weights on `lane`, called from the host: tensor arguments go up, the
    call runs on the lane's compute queue, tensor results come down. Other arguments (the
    attention's `Batch`) pass as they are; a layer's KV cache lives on its attention's device."""

    def __init__(self, lane: Lane, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self._lane = lane  # not a submodule: one lane serves every wrapped module

    def __getattr__(self, name: str):
        # what else callers read of the module (an attention's `cache_entries()`) is inner's
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "inner":
                raise
            return getattr(self.inner, name)

    def forward(self, *args: torch.Tensor | Batch) -> torch.Tensor | tuple[torch.Tensor, ...]:
        lane = self._lane
        out = lane.run(self.inner, *(lane_argument(lane, a) for a in args))
        if isinstance(out, tuple):  # a router's (weights, ids)
            return tuple(lane.to_host(t) for t in out)
        return lane.to_host(out)


class LaneExperts(ExpertBackend, nn.Module):
    """Routed experts of one layer held on a lane: gate and up stacked as [experts, 2 * size,
    hidden], down as [experts, hidden, size], float (dequantised at load where stored
    quantised). `submit` queues them on the lane and returns at once, so the CPU's experts,
    submitted before, and the host thread go on meanwhile."""

    def __init__(self, lane: Lane, gate_up: torch.Tensor, down: torch.Tensor, what: str):
        super().__init__()
        experts, double_size, hidden = gate_up.shape
        if down.shape != (experts, hidden, double_size // 2):
            raise ValueError(
                f"down weights {tuple(down.shape)} do not fit gate/up {tuple(gate_up.shape)}"
            )
        lane.reserve(sum(t.numel() * t.element_size() for t in (gate_up, down)), what)
        # plain attributes, not parameters: the checkpoint loader has filled them already
        self.lane, self.expert_size = lane, double_size // 2
        self.gate_up, self.down = lane.upload(gate_up), lane.upload(down)
        self.num_experts = experts
        # on a GPU the whole block is one Triton kernel pair (gpu_kernels/fused_moe.py); the
        # sim lane runs torch, one matmul pair per expert
        self.fused = lane.device.type == "cuda"

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate_up, self.down))

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, on the {self.lane.kind} lane"

    def load_slot(self, slot: int, source: nn.Module, expert: int) -> None:
        """Replace slot `slot` by expert `expert` of the CPU kernels' `source`, dequantised
        (run on the lane's queue: ordered after the work that read the slot's old expert)."""
        for pool, matrix in ((self.gate_up, source.gate_up), (self.down, source.down)):
            pool[slot].copy_(self.lane.upload(torch.from_numpy(matrix.dequantize(expert))))

    def submit(
        self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor
    ) -> LaneResult:
        # x: [tokens, hidden]; expert_ids, expert_weights: [tokens, top_k]
        lane = self.lane
        up = [lane.to_lane(t) for t in (x, expert_ids, expert_weights)]
        return LaneResult(lane, lane.submit(self._compute, *up))

    def submit_streamed(
        self,
        source: nn.Module,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        expert_weights: torch.Tensor,
    ) -> LaneResult:
        """Experts of the CPU kernels' `source` (ids into it) run here, their weights copied
        up for this call only: a prefill's choice where that beats computing them on the CPU
        (placement.cost_model.streaming_is_faster)."""
        lane = self.lane
        up = [lane.to_lane(t) for t in (x, expert_ids, expert_weights)]
        return LaneResult(lane, lane.submit(self._streamed, source, *up))

    def _compute(
        self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor
    ) -> torch.Tensor:
        if self.fused:
            from gpu_kernels.fused_moe import fused_moe

            xw = x.to(self.gate_up.dtype)
            return fused_moe(xw, self.gate_up, self.down, expert_ids, expert_weights).to(x.dtype)

        def run_expert(expert: int, xs: torch.Tensor) -> torch.Tensor:
            return self._ffn(xs, self.gate_up[expert], self.down[expert])

        return self._grouped(x, expert_ids, expert_weights, self.num_experts, run_expert)

    def _streamed(
        self,
        source: nn.Module,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        expert_weights: torch.Tensor,
    ) -> torch.Tensor:
        def run_expert(expert: int, xs: torch.Tensor) -> torch.Tensor:
            gate_up, down = (
                self.lane.upload(torch.from_numpy(m.dequantize(expert))).to(self.gate_up.dtype)
                for m in (source.gate_up, source.down)
            )
            return self._ffn(xs, gate_up, down)

        return self._grouped(x, expert_ids, expert_weights, source.num_experts, run_expert)

    def _ffn(self, xs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        # xs: [tokens, hidden]; gate_up: [2 * size, hidden]; down: [hidden, size]
        gate, up = (xs @ gate_up.T).split(self.expert_size, -1)
        return (F.silu(gate) * up) @ down.T

    def _grouped(self, x, expert_ids, expert_weights, num_experts, run_expert) -> torch.Tensor:
        # computed in the weights' dtype (bf16 weights are not widened per call)
        xw = x.to(self.gate_up.dtype)
        out = run_grouped_by_expert(xw, expert_ids, expert_weights, num_experts, run_expert)
        return out.to(x.dtype)


class LaneResult:
    """`LaneExperts` under way: wait() brings the output down to the host."""

    def __init__(self, lane: Lane, handle: LaneHandle):
        self.lane, self.handle = lane, handle

    def wait(self) -> torch.Tensor:
        return self.lane.to_host(self.handle.wait())
