"""LoRA on routed experts held by the CPU kernels: a few tokens at inference take the grouped
GEMV with each pair's update added between the projections, and give what the differentiable
path (training's) gives; rows the batch assigns no adapter get the bare experts."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T

from hetero.models.experts import TorchExperts
from hetero.runtime.cpu_experts import NumbaExperts
from hetero.runtime.lora import AdapterRows, LoraExperts, LoraSettings

SEED = 0
HIDDEN, SIZE, EXPERTS = 256, 64, 6


def adapted_experts() -> LoraExperts:
    torch.manual_seed(SEED)
    base = NumbaExperts.from_torch(TorchExperts(EXPERTS, HIDDEN, SIZE), T.Q8_0)
    experts = LoraExperts(base, AdapterRows())
    gate_up, down = experts.add("a", LoraSettings(rank=4, alpha=8.0))
    experts.rows.default = "a"
    with torch.no_grad():
        for p in (gate_up.lora_B, down.lora_B):
            p.copy_(torch.randn(p.shape) * 0.1)
    return experts


@pytest.mark.parametrize("tokens", [1, 3])
def test_decode_path_matches_the_differentiable_path(tokens):
    experts = adapted_experts()
    ids = torch.tensor([[0, 5], [5, 2], [1, 0]])[:tokens]  # experts 3 and 4 get no pair
    weights = torch.rand(tokens, 2)
    x = torch.randn(tokens, HIDDEN)
    with torch.no_grad():
        got = experts(x, ids, weights)
    want = experts(x.clone().requires_grad_(), ids, weights).detach()
    # the GEMV rounds its input to Q8 blocks, the differentiable path does not: the budget is
    # that rounding's effect on the bare experts (twice: it enters both projections)
    bare = experts.base(x, ids, weights)
    kernel_error = (bare - experts.base(x.clone().requires_grad_(), ids, weights)).norm()
    assert (got - want).norm() <= 2 * kernel_error + 1e-6 * want.norm()
    assert (got - bare).norm() > 0.05 * bare.norm()  # the update is there


def test_decode_path_without_an_update_is_the_bare_kernel():
    experts = adapted_experts()
    with torch.no_grad():
        experts.gate_up["a"].lora_B.zero_()
        experts.down["a"].lora_B.zero_()
        ids, weights, x = torch.tensor([[0, 5], [5, 2]]), torch.rand(2, 2), torch.randn(2, HIDDEN)
        torch.testing.assert_close(experts(x, ids, weights), experts.base(x, ids, weights))


def test_rows_without_an_adapter_get_the_bare_experts():
    experts = adapted_experts()
    experts.rows.default = None  # a row naming no adapter gets none
    experts.rows.assign([("a", 2), (None, 1)])
    ids, weights = torch.tensor([[0, 5], [5, 2], [1, 0]]), torch.rand(3, 2)
    x = torch.randn(3, HIDDEN)
    with torch.no_grad():
        got = experts(x, ids, weights)
        experts.rows.groups = [("a", None)]
        adapted = experts(x, ids, weights)
    torch.testing.assert_close(got[:2], adapted[:2])
    torch.testing.assert_close(got[2:], experts.base(x[2:], ids[2:], weights[2:]))
