"""Expert popularity recorded while a model runs: every MoE layer's expert backend is wrapped
at the seam (`experts.submit(x, expert_ids, expert_weights)`) to count the ids it is asked to run;
the counts become a `RoutingProfile` for the planner (`hetero profile`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hetero.models.experts import ExpertBackend, ExpertsHandle
from placement.routing_profile import RoutingProfile


class RecordingExperts(ExpertBackend, nn.Module):
    """An expert backend that counts the expert ids it is asked to run, then delegates."""

    def __init__(self, inner: nn.Module, num_experts: int):
        super().__init__()
        self.inner = inner
        self.counts = np.zeros(num_experts, dtype=np.int64)
        self.tokens = 0
        self.steps: list[np.ndarray] = []  # each call's expert ids [tokens, top_k], in order

    def submit(
        self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor
    ) -> ExpertsHandle:
        # expert_ids: [tokens, top_k]
        self.steps.append(expert_ids.cpu().numpy())
        ids = expert_ids.reshape(-1).cpu().numpy()
        self.counts += np.bincount(ids, minlength=len(self.counts))[: len(self.counts)]
        self.tokens += int(x.shape[0])
        return self.inner.submit(x, expert_ids, expert_weights)


def num_experts_of(backend: nn.Module) -> int:
    """Routed experts a backend holds: `num_experts` where a backend declares it, else its
    length (TorchExperts is a list of experts)."""
    return int(getattr(backend, "num_experts", 0) or len(backend))


@dataclass
class ProfileRecorder:
    model: str
    layers: dict[int, RecordingExperts]

    def profile(self) -> RoutingProfile:
        return RoutingProfile(
            model=self.model,
            tokens={i: r.tokens for i, r in self.layers.items()},
            counts={i: r.counts.tolist() for i, r in self.layers.items()},
        )


@contextmanager
def record_routing(net: nn.Module, model_name: str) -> Iterator[ProfileRecorder]:
    """Wrap the expert backend of every MoE layer of `net` (a CausalLM) for the duration of
    the block; the yielded recorder's `profile()` gives the counts so far."""
    wrapped: dict[int, RecordingExperts] = {}
    for i, layer in enumerate(net.layers):
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            wrapped[i] = RecordingExperts(experts, num_experts_of(experts))
            layer.mlp.experts = wrapped[i]
    try:
        yield ProfileRecorder(model_name, wrapped)
    finally:
        for i, recorder in wrapped.items():
            net.layers[i].mlp.experts = recorder.inner
