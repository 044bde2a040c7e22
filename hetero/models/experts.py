"""The expert-backend interface: "these tokens go to these experts with these weights".

A MoE block calls `experts.submit(x, expert_ids, expert_weights)`, runs its shared experts while
the routed ones compute, then `handle.wait()`s for their output; it knows nothing else.
`TorchExperts` is the reference backend (plain torch, autograd-capable); the runtime may swap a
layer's backend for another that holds the same experts (CPU kernels, GPU, a split) without
touching model code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers, experts, shared experts."""

    # the runtime may join these into one module returning (gate, up): one pass over x
    JOINABLE = {"gate_up_proj": ("gate_proj", "up_proj")}

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """[tokens, 2 * size] (gate, then up) -> silu(gate) * up, [tokens, size]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


Projection = Callable[[torch.Tensor], torch.Tensor]


class ExpertsHandle(Protocol):
    """Routed experts under way: `wait()` blocks until their output is ready and returns it,
    [tokens, hidden], or raises what the computation raised."""

    def wait(self) -> torch.Tensor: ...


class FinishedExperts:
    """The handle of experts computed at submit (the reference backend, inline fallbacks)."""

    def __init__(self, out: torch.Tensor):
        self.out = out

    def wait(self) -> torch.Tensor:
        return self.out


class ExpertBackend:
    """What every expert backend is (mixed into an `nn.Module`): `submit` starts the routed
    experts and returns a handle; calling the module is submit-then-wait, for callers that have
    nothing to run meanwhile."""

    def submit(
        self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor
    ) -> ExpertsHandle:
        # x: [tokens, hidden]; expert_ids, expert_weights: [tokens, top_k]
        raise NotImplementedError

    @classmethod
    def of(cls, experts: list[nn.Module]) -> TorchExperts:
        """A block over given expert modules (the runtime's, e.g. experts computed from disk):
        each takes [tokens, hidden] to [tokens, hidden]."""
        block = cls.__new__(cls)
        nn.ModuleList.__init__(block, experts)
        return block

    def forward(
        self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor
    ) -> torch.Tensor:
        return self.submit(x, expert_ids, expert_weights).wait()


class TorchExperts(ExpertBackend, nn.ModuleList):
    """Routed experts of one layer as a list of `GatedMLP` (checkpoint names `experts.N.*`),
    computed at submit: autograd records through them like through any torch module."""

    def __init__(self, num_experts: int, hidden_size: int, expert_size: int):
        super().__init__(GatedMLP(hidden_size, expert_size) for _ in range(num_experts))

    def submit(
        self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor
    ) -> FinishedExperts:
        # x: [tokens, hidden]; expert_ids, expert_weights: [tokens, top_k] -> [tokens, hidden]
        out = run_grouped_by_expert(
            x, expert_ids, expert_weights, len(self), lambda e, xs: self[e](xs)
        )
        return FinishedExperts(out)

    def expert_projections(self, expert: int) -> tuple[Projection, Projection]:
        """Expert `expert`'s gate/up projection ([n, hidden] -> [n, 2 * size], gate first, as
        transformers' fused gate_up_proj) and its down projection ([n, size] -> [n, hidden]),
        for adapters that change them (LoRA)."""
        mlp = self[expert]
        return lambda xs: torch.cat([mlp.gate_proj(xs), mlp.up_proj(xs)], dim=-1), mlp.down_proj


def run_grouped_by_expert(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    num_experts: int,
    run_expert: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Group (token, slot) pairs by expert so each expert runs once over all its tokens:
    run_expert(e, x[its tokens]) -> their outputs. Sums outputs with the routing weights."""
    tokens, top_k = expert_ids.shape
    if tokens == 0:
        return x.new_zeros(x.shape)
    flat_ids = expert_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    # the pairs' inputs gathered once in expert order; each expert takes a slice (a view) and
    # the outputs, concatenated in the same order, go back to pair order in one index. Each
    # pair's output has its own row: no scatter-add (torch's index_add_ is slow on CPU under
    # load), and the sum over slots has a fixed order per token.
    sorted_x = x[order // top_k]
    outputs, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            outputs.append(run_expert(expert, sorted_x[start : start + count]))
            start += count
    by_pair = x.new_empty(tokens * top_k, x.shape[1])
    by_pair[order] = torch.cat(outputs)
    weights = expert_weights.to(x.dtype).unsqueeze(-1)
    return (by_pair.view(tokens, top_k, -1) * weights).sum(dim=1)
