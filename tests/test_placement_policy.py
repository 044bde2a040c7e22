"""The placement policy on real model shapes: budgets are never exceeded, the most used experts
get the GPU, override rules win, impossible budgets are refused with what would fix them, and
KTransformers' published DeepSeek-V3 placement comes out at their published memory."""

from __future__ import annotations

import math
import random

import pytest
from test_placement_sizes import PUBLISHED_Q4_K_M, inventory

from placement.budgets import Budgets, Workload
from placement.cost_model import LayerAttention, PlacedGroup, step_seconds
from placement.errors import PlacementError
from placement.hardware import default_hardware
from placement.policy import make_plan
from placement.routing_profile import RoutingProfile
from placement.rules import parse_rule
from placement.sizes import GIB

HARDWARE = default_hardware()
CONTEXT = Workload(context=4096)


def plan(name, vram_gib, dram_gib, quant="q4_k_m", gpus=1, rules=(), profile=None, **work):
    budgets = Budgets(int(vram_gib * GIB), gpus if vram_gib else 0, int(dram_gib * GIB))
    workload = Workload(**{"context": 4096, **work})
    return make_plan(
        inventory(name, quant), budgets, workload, HARDWARE, [parse_rule(r) for r in rules], profile
    )


def skewed_profile(name: str, seed: int = 0) -> RoutingProfile:
    """Zipf-like popularity, shuffled differently in every layer."""
    inv = inventory(name, "q8_0")
    rng = random.Random(seed)
    layers = sorted({g.layer for g in inv.groups if g.kind == "expert"})
    counts = {}
    for layer in layers:
        shares = [1000 // (rank + 1) for rank in range(inv.num_experts)]
        rng.shuffle(shares)
        counts[layer] = shares
    return RoutingProfile(name, {layer: 10_000 for layer in layers}, counts)


def expert_uses(p, device: str) -> list[float]:
    """Expected activations per token of the routed experts `p` puts on `device`."""
    return [
        use
        for e in p.experts
        for use, where in zip(e.use_per_token, e.devices, strict=True)
        if where == device
    ]


@pytest.mark.parametrize("name", sorted(PUBLISHED_Q4_K_M))
@pytest.mark.parametrize("vram_gib, dram_gib", [(8, 512), (24, 64), (0, 48)])
def test_budgets_are_never_exceeded(name, vram_gib, dram_gib):
    try:
        p = plan(name, vram_gib, dram_gib)
    except PlacementError as err:
        assert "short" in str(err)
        return
    assert all(used <= vram_gib * GIB for used in p.per_gpu)
    assert p.totals["gpu"] == sum(p.per_gpu) <= vram_gib * GIB
    assert p.totals["cpu"] <= dram_gib * GIB
    weights = sum(p.totals.values()) - sum(p.kv_cache.nbytes.values()) - sum(p.workspace.values())
    assert weights == p.model.weight_bytes


def test_plan_refuses_budget_below_what_every_token_uses():
    with pytest.raises(PlacementError) as refused:
        plan("DeepSeek-V3", vram_gib=4, dram_gib=512)
    message = str(refused.value)
    assert "GiB short" in message
    for fix in ("--quant", "--context", "--vram-budget"):
        assert fix in message


def test_plan_refuses_dram_below_the_cpu_share():
    with pytest.raises(PlacementError, match=r"DRAM budget is 8\.0 GiB: .* GiB short"):
        plan("DeepSeek-V3", vram_gib=0, dram_gib=8)


def test_without_a_gpu_everything_runs_on_the_cpu():
    p = plan("Qwen3-30B-A3B", vram_gib=0, dram_gib=64)
    assert p.totals["gpu"] == 0 and p.per_gpu == []
    assert {g.device for g in p.groups} == {"cpu"}
    assert {d for e in p.experts for d in e.devices} == {"cpu"}
    assert p.expert_share_gpu == 0
    assert p.predicted.bound == "dram"


def test_experts_spill_to_disk_when_dram_is_short_least_used_first():
    profile = skewed_profile("Qwen3-30B-A3B")
    p = plan("Qwen3-30B-A3B", vram_gib=0, dram_gib=12, quant="q8_0", profile=profile)
    assert p.totals["disk"] > 0
    assert p.warnings and "DRAM is short" in p.warnings[0]
    assert min(expert_uses(p, "cpu")) >= max(expert_uses(p, "disk"))


def test_gpu_experts_are_the_most_used():
    profile = skewed_profile("Qwen3-30B-A3B")
    p = plan("Qwen3-30B-A3B", vram_gib=16, dram_gib=64, quant="q8_0", profile=profile)
    on_gpu, on_cpu = expert_uses(p, "gpu"), expert_uses(p, "cpu")
    assert on_gpu and on_cpu
    assert min(on_gpu) >= max(on_cpu)
    # the popular ones carry far more than their number
    assert p.expert_share_gpu > len(on_gpu) / (len(on_gpu) + len(on_cpu)) + 0.2


def test_override_rules_win_over_the_policy():
    p = plan(
        "Qwen3-30B-A3B",
        vram_gib=24,
        dram_gib=64,
        rules=[
            r"blk\.5\.=cpu",  # GGUF names; first match wins over the next rule
            r"blk\.5\.attn_q=gpu",
            r"model\.layers\.7\.mlp\.experts\.(3|4)\.=disk",  # Hugging Face names
            r"^layers\.9\.experts\.\d+$=gpu",  # group names
        ],
    )
    assert p.device_of("layers.5.attention") == "cpu"
    assert p.device_of("layers.5.experts.0") == "cpu"
    assert p.kv_cache.nbytes["cpu"] > 0  # layer 5's KV cache follows its attention
    assert p.device_of("layers.7.experts.3") == p.device_of("layers.7.experts.4") == "disk"
    assert {p.device_of(f"layers.9.experts.{e}") for e in range(128)} == {"gpu"}
    assert next(g.rule for g in p.groups if g.name == "layers.5.attention") == r"blk\.5\.=cpu"


def test_override_beyond_the_gpu_budget_is_refused_naming_the_rule():
    with pytest.raises(PlacementError, match=r"override rules ffn_\.\*_exps=gpu.*GiB short"):
        plan("DeepSeek-V3", vram_gib=24, dram_gib=512, rules=[r"ffn_.*_exps=gpu"])


def test_override_to_a_gpu_without_a_gpu_budget_is_refused():
    with pytest.raises(PlacementError, match="no GPU budget"):
        plan("Qwen3-30B-A3B", vram_gib=0, dram_gib=64, rules=[r"blk\.0\.=gpu"])


def test_plans_are_deterministic():
    profile = skewed_profile("Qwen3-30B-A3B")
    first = plan("Qwen3-30B-A3B", 12, 64, profile=profile)
    assert plan("Qwen3-30B-A3B", 12, 64, profile=profile) == first


def test_two_gpus_split_the_layers_within_each_budget():
    p = plan("Qwen3-235B-A22B", vram_gib=12, dram_gib=256, gpus=2)
    assert len(p.per_gpu) == 2 and max(p.per_gpu) <= 12 * GIB
    layer_gpus = [g.gpu for g in p.groups if g.kind == "attention"]
    assert layer_gpus == sorted(layer_gpus) and set(layer_gpus) == {0, 1}


def test_a_profile_of_another_model_is_refused():
    with pytest.raises(PlacementError, match="128 experts"):
        plan("Mixtral-8x7B-v0.1", 24, 64, profile=skewed_profile("Qwen3-30B-A3B"))


def test_ktransformers_deepseek_v3_placement_needs_their_published_memory():
    """KTransformers runs DeepSeek-V3/R1 Q4_K_M "using only 14GB VRAM and 382GB DRAM"
    (github.com/kvcache-ai/ktransformers, README and doc/en/DeepseekR1_V3_tutorial.md, Feb
    2025; one 24 GB 4090D). Their rules (optimize_rules/DeepSeek-V3-Chat.yaml) keep routed
    experts (`model.layers.*.mlp.experts`) and the embeddings (`model.embed_tokens`) on the
    CPU and everything else on the GPU; written here as hetero override rules."""
    p = plan(
        "DeepSeek-V3",
        vram_gib=24,
        dram_gib=512,
        rules=[r"^model\.layers\..*\.mlp\.experts\.=cpu", r"^model\.embed_tokens=cpu"],
    )
    assert p.device_of("embed") == "cpu" and p.device_of("layers.60.experts.0") == "cpu"
    assert {g.device for g in p.groups if g.kind != "embed"} == {"gpu"}
    gpu, dram = p.totals["gpu"], p.totals["cpu"]
    assert gpu / 1e9 == pytest.approx(14, rel=0.25)  # 11.3 GB: weights, 4K KV, workspace
    assert dram / 1e9 == pytest.approx(382, rel=0.10)
    # What KTransformers holds on the GPU beyond hetero's plan: kv_b_proj unquantised
    # (their rule excludes it from the quantised linears, so it is bf16) and the CUDA
    # context, which nvidia-smi counts and a free-memory budget does not (about 0.5 GiB).
    kv_b = [t for g in p_inventory_groups() for t in g.tensors if "kv_b_proj" in t.module_name]
    kv_b_in_bf16 = sum(2 * math.prod(t.shape) - t.nbytes for t in kv_b)
    assert (gpu + kv_b_in_bf16 + 0.5 * GIB) / 1e9 == pytest.approx(14, rel=0.10)


def p_inventory_groups():
    return inventory("DeepSeek-V3", "q4_k_m").groups


def test_more_vram_never_predicts_slower_decoding():
    speeds = [plan("Qwen3-30B-A3B", v, 64).predicted.decode_tok_s for v in (0, 4, 8, 16)]
    assert speeds == sorted(speeds)


def test_gpu_and_cpu_experts_overlap_in_a_step():
    """One MoE layer: the step takes the slower side, not the sum."""
    hw = HARDWARE
    expert_bytes = int(hw.cpu_gemv_gbs * 1e9 * 0.01)  # 10 ms of CPU reading
    attention = {0: LayerAttention("gpu", 0, 0)}

    def seconds(devices):
        groups = [PlacedGroup(0, "expert", d, expert_bytes, 0, 1.0) for d in devices]
        return step_seconds(groups, attention, 64, 100, 1, 1, 1, hw, prefill=False)

    cpu_only = sum(seconds(["cpu"]).values())
    both = sum(seconds(["cpu", "gpu"]).values())
    assert cpu_only == pytest.approx(0.01, rel=0.05)
    assert both == pytest.approx(cpu_only, rel=1e-6)
    assert seconds(["cpu"])["dram"] == pytest.approx(0.01)
