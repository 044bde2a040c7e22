"""Sparse MoE block with softmax top-k routing (Qwen2/3-MoE, Mixtral), optionally with a
sigmoid-gated shared expert (Qwen2-MoE), which runs while the expert backend computes the
routed experts."""

from __future__ import annotations

import torch
from torch import nn

from hetero.models.experts import GatedMLP, TorchExperts


def softmax_topk(
    logits: torch.Tensor, top_k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [tokens, experts] -> (weights [tokens, k] float32, ids [tokens, k])."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class SparseMoE(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        expert_size: int,
        num_experts: int,
        top_k: int,
        normalize_topk: bool,
        shared_expert_size: int = 0,
    ):
        super().__init__()
        self.top_k = top_k
        self.normalize_topk = normalize_topk
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = TorchExperts(num_experts, hidden_size, expert_size)
        if shared_expert_size:
            self.shared_expert = GatedMLP(hidden_size, shared_expert_size)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        self.has_shared_expert = bool(shared_expert_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [tokens, hidden]
        weights, ids = softmax_topk(self.gate(x), self.top_k, self.normalize_topk)
        if not self.has_shared_expert:
            return self.experts(x, ids, weights)
        # the routed experts start (on a CPU worker, say) while the shared expert runs here
        routed = self.experts.submit(x, ids, weights)
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return routed.wait() + shared
