"""The placement policy: value per byte. What every token uses (attention, norms, routers,
shared experts, dense FFNs, embeddings, lm_head) goes to the GPU first, then the KV cache,
then routed experts in order of expected activations per byte; the rest stays in DRAM, and
only when DRAM is short too do the least used experts stay on disk (mmap). Override rules win
over all of it. Budgets are never exceeded: what cannot fit is refused with the shortfall."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from hetero.config import KV_BLOCK_TOKENS
from placement.budgets import (
    DEFAULT_CONTEXT,
    KV_BYTES,
    Budgets,
    Workload,
    check_workload,
    machine_memory,
    resolve_budgets,
)
from placement.cost_model import LayerAttention, PlacedGroup, Prediction, predict
from placement.errors import PlacementError
from placement.hardware import Hardware, load_hardware
from placement.inventory import ModelInventory, TensorGroup, open_model
from placement.plan import (
    PLAN_VERSION,
    ExpertPlacement,
    GroupPlacement,
    KVCachePlacement,
    ModelSummary,
    Plan,
)
from placement.routing_profile import RoutingProfile
from placement.rules import Rule, first_match
from placement.sizes import MIB, gib

CPU_FIXED_WORKSPACE = 512 * MIB  # the process itself: Python, torch, tokenizer


def expert_use(inventory: ModelInventory, profile: RoutingProfile | None) -> dict[int, list[float]]:
    """Expected activations per token of every routed expert, by layer: measured by a
    routing profile, or uniform (top_k / experts) without one."""
    layers = sorted({g.layer for g in inventory.groups if g.kind == "expert"})
    if profile is None:
        share = inventory.top_k / max(inventory.num_experts, 1)
        return {layer: [share] * inventory.num_experts for layer in layers}
    missing = [layer for layer in layers if layer not in profile.counts]
    if missing:
        raise PlacementError(
            f"the routing profile of {profile.model!r} has no counts for MoE layer "
            f"{missing[0]} of {inventory.name}; record it on this model"
        )
    use = {layer: profile.use_per_token(layer) for layer in layers}
    for layer, shares in use.items():
        if len(shares) != inventory.num_experts:
            raise PlacementError(
                f"the routing profile counts {len(shares)} experts in layer {layer} but "
                f"{inventory.name} has {inventory.num_experts}; record it on this model"
            )
    return use


def workspace_bytes(
    inventory: ModelInventory, workload: Workload, gpu_fixed_bytes: int
) -> tuple[int, int]:
    """(GPU, CPU) scratch memory, activations in the KV cache's type: a prefill chunk's
    hidden states and widest matmul output, each sequence's logits, and one layer's attention
    history expanded to every head (hetero's attention repeats GQA keys and expands MLA
    latents), plus fixed costs (the GPU's: `gpu_fixed_bytes`). An estimate: buffers are
    reused from layer to layer."""
    values = (
        workload.prefill_chunk * (4 * inventory.hidden_size + 2 * inventory.widest_activation)
        + workload.concurrency * inventory.vocab_size
        + workload.context * inventory.history_values_per_token
    )
    activations = values * KV_BYTES[workload.kv_dtype]
    return gpu_fixed_bytes + activations, CPU_FIXED_WORKSPACE + activations


@dataclass
class _Assignment:
    """Where the policy put things, by group name and by layer."""

    device: dict[str, str] = field(default_factory=dict)  # group -> gpu / cpu / disk
    rule_of: dict[str, str] = field(default_factory=dict)  # group -> the rule that placed it
    gpu_of_layer: dict[int, int] = field(default_factory=dict)
    attention_device: dict[int, str] = field(default_factory=dict)  # its KV cache follows


def make_plan(
    inventory: ModelInventory,
    budgets: Budgets,
    workload: Workload,
    hardware: Hardware,
    rules: list[Rule] | None = None,
    profile: RoutingProfile | None = None,
    profile_source: str | None = None,
) -> Plan:
    """Place every tensor group of `inventory` within `budgets`. Deterministic."""
    check_workload(workload, inventory.context_limit, inventory.name)
    rules = rules or []
    use = expert_use(inventory, profile)
    has_gpu = budgets.gpus > 0 and budgets.vram_bytes > 0
    workspace_gpu, workspace_cpu = workspace_bytes(
        inventory, workload, hardware.gpu_fixed_workspace_bytes
    )
    kv_tokens = -(-workload.context // KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS
    kv_layer_bytes = (
        inventory.kv_values_per_token * KV_BYTES[workload.kv_dtype] * kv_tokens
    ) * workload.concurrency
    a = _Assignment()

    # 1. override rules
    for group in inventory.groups:
        rule = first_match(rules, group)
        if rule is not None:
            if rule.device == "gpu" and not has_gpu:
                raise PlacementError(
                    f"override rule {rule.text!r} sends {group.name} to the GPU, but the plan "
                    f"has no GPU budget; give --vram-budget (and --gpus)"
                )
            a.device[group.name] = rule.device
            a.rule_of[group.name] = rule.text

    # 2. what every token uses, with the KV cache of the layers whose attention is on a GPU
    for group in inventory.groups:
        if group.kind != "expert" and group.name not in a.device:
            a.device[group.name] = "gpu" if has_gpu else "cpu"
        if group.kind == "attention":
            a.attention_device[group.layer] = a.device[group.name]
    gpu_used = (
        _split_layers_over_gpus(inventory, a, kv_layer_bytes, budgets, workspace_gpu)
        if has_gpu
        else []
    )

    # 3. routed experts by expected activations per byte, while the GPUs have room
    by_value = sorted(
        (g for g in inventory.groups if g.kind == "expert" and g.name not in a.device),
        key=lambda g: (-use[g.layer][g.expert] / max(g.nbytes, 1), g.layer, g.expert),
    )
    free = [budgets.vram_bytes - used for used in gpu_used]
    host = []
    for group in by_value:
        # a layer's GPU experts live on the GPU of its attention
        gpu = a.gpu_of_layer.get(group.layer)
        if gpu is None and free:
            gpu = max(range(len(free)), key=free.__getitem__)
        if gpu is not None and free[gpu] >= group.nbytes:
            a.device[group.name] = "gpu"
            free[gpu] -= group.nbytes
            a.gpu_of_layer.setdefault(group.layer, gpu)
        else:
            host.append(group)

    # 4. the rest in DRAM, most used first; disk when DRAM is short
    kv_gpu = kv_layer_bytes * list(a.attention_device.values()).count("gpu")
    kv_cpu = kv_layer_bytes * len(a.attention_device) - kv_gpu
    dram_needed = (
        workspace_cpu
        + kv_cpu
        + sum(g.nbytes for g in inventory.groups if a.device.get(g.name) == "cpu")
    )
    if dram_needed > budgets.dram_bytes:
        raise PlacementError(_dram_shortfall(inventory, workload, budgets, dram_needed, kv_cpu))
    dram_free = budgets.dram_bytes - dram_needed
    on_disk = 0
    for group in host:
        if group.nbytes <= dram_free:
            a.device[group.name] = "cpu"
            dram_free -= group.nbytes
        else:
            a.device[group.name] = "disk"
            on_disk += group.nbytes
    warnings = []
    if on_disk:
        warnings.append(
            f"DRAM is short: {gib(on_disk)} of the least used routed experts stay on disk "
            f"(mmap) and are read at disk speed, which slows decoding; a smaller weight type "
            f"or a bigger --dram-budget keeps them in memory"
        )

    groups, experts = _placements(inventory, use, a, head_gpu=len(gpu_used) - 1)
    kv_cache = KVCachePlacement(
        tokens=kv_tokens,
        sequences=workload.concurrency,
        dtype=workload.kv_dtype,
        bytes_per_token=inventory.kv_values_per_token
        * KV_BYTES[workload.kv_dtype]
        * inventory.num_layers,
        nbytes={"gpu": kv_gpu, "cpu": kv_cpu, "disk": 0},
    )
    workspace = {"gpu": workspace_gpu * len(gpu_used), "cpu": workspace_cpu, "disk": 0}
    totals = dict(workspace)
    for device, nbytes in kv_cache.nbytes.items():
        totals[device] += nbytes
    for group in inventory.groups:
        totals[a.device[group.name]] += group.nbytes
    total_use = sum(sum(shares) for shares in use.values())
    gpu_use = sum(
        share
        for e in experts
        for share, d in zip(e.use_per_token, e.devices, strict=True)
        if d == "gpu"
    )
    return Plan(
        version=PLAN_VERSION,
        model=ModelSummary(
            name=inventory.name,
            source=inventory.source,
            model_type=inventory.model_type,
            weights=inventory.weights,
            layers=inventory.num_layers,
            experts=inventory.num_experts,
            top_k=inventory.top_k,
            weight_bytes=inventory.weight_bytes,
        ),
        budgets=budgets,
        workload=workload,
        rules=[r.text for r in rules],
        profile=profile_source,
        groups=groups,
        experts=experts,
        kv_cache=kv_cache,
        workspace=workspace,
        totals=totals,
        per_gpu=[budgets.vram_bytes - f for f in free],
        expert_share_gpu=gpu_use / total_use if total_use else 0.0,
        predicted=_predict(inventory, workload, hardware, use, a),
        warnings=warnings,
    )


def _split_layers_over_gpus(
    inventory: ModelInventory,
    a: _Assignment,
    kv_layer_bytes: int,
    budgets: Budgets,
    workspace_gpu: int,
) -> list[int]:
    """Give each GPU a contiguous range of layers of about equal bytes (a pipeline split:
    embeddings on the first GPU, the head on the last) and fill `a.gpu_of_layer`. Returns
    the bytes used per GPU; refuses what does not fit."""
    need: dict[int, int] = defaultdict(int)
    embed = head = 0
    for group in inventory.groups:
        if a.device.get(group.name) != "gpu":
            continue
        if group.layer is not None:
            need[group.layer] += group.nbytes
        elif group.kind == "embed":
            embed += group.nbytes
        else:
            head += group.nbytes
    for layer, where in a.attention_device.items():
        if where == "gpu":
            need[layer] += kv_layer_bytes
    used = [workspace_gpu] * budgets.gpus
    used[0] += embed
    used[-1] += head
    share = (embed + head + sum(need.values())) / budgets.gpus
    done = embed
    for layer in sorted(need):
        gpu = min(int((done + need[layer] / 2) // max(share, 1)), budgets.gpus - 1)
        used[gpu] += need[layer]
        a.gpu_of_layer[layer] = gpu
        done += need[layer]
    if max(used) > budgets.vram_bytes:
        forced = sorted({r for name, r in a.rule_of.items() if a.device.get(name) == "gpu"})
        short = max(sum(used) - budgets.vram_bytes * budgets.gpus, max(used) - budgets.vram_bytes)
        raise PlacementError(
            _gpu_shortfall(inventory, budgets, sum(used), short, kv_layer_bytes, forced)
        )
    return used


def _gpu_shortfall(
    inventory: ModelInventory,
    budgets: Budgets,
    need: int,
    short: int,
    kv_layer_bytes: int,
    forced_rules: list[str],
) -> str:
    kv = kv_layer_bytes * inventory.num_layers
    what = f"override rules {', '.join(forced_rules)} and " if forced_rules else ""
    gpus = f" x {budgets.gpus} GPUs" if budgets.gpus > 1 else ""
    return (
        f"{inventory.name} ({inventory.weights}) needs {gib(need)} of GPU memory for "
        f"{what}what every token uses (attention, norms, routers, shared experts, embeddings, "
        f"lm_head, a {gib(kv)} KV cache and workspace) but the VRAM budget is "
        f"{gib(budgets.vram_bytes)}{gpus}: {gib(short)} short. Fix: a smaller weight type "
        f"(e.g. --quant q4_k_m), a shorter --context or --concurrency, a bigger --vram-budget, "
        f"or --vram-budget 0 to run on the CPU alone"
    )


def _dram_shortfall(
    inventory: ModelInventory, workload: Workload, budgets: Budgets, need: int, kv_cpu: int
) -> str:
    return (
        f"{inventory.name} ({inventory.weights}) needs {gib(need)} of DRAM for the parts that "
        f"must stay in memory (the CPU's share of the weights but its routed experts, a "
        f"{gib(kv_cpu)} KV cache for {workload.context} tokens x {workload.concurrency}, and "
        f"workspace) but the DRAM budget is {gib(budgets.dram_bytes)}: "
        f"{gib(need - budgets.dram_bytes)} short. Fix: a smaller weight type (e.g. --quant "
        f"q4_k_m), a shorter --context, a bigger --dram-budget, or more of the model on a GPU"
    )


def _placements(
    inventory: ModelInventory, use: dict[int, list[float]], a: _Assignment, head_gpu: int
) -> tuple[list[GroupPlacement], list[ExpertPlacement]]:
    """The plan's records: one per group but the routed experts, one per MoE layer of them.
    The final norm and lm_head, when on a GPU, are on `head_gpu`."""
    groups = []
    experts_of: dict[int, list[TensorGroup]] = defaultdict(list)
    for g in inventory.groups:
        if g.kind == "expert":
            experts_of[g.layer].append(g)
            continue
        if a.device[g.name] != "gpu":
            gpu = None
        elif g.layer is not None:
            gpu = a.gpu_of_layer[g.layer]
        else:
            gpu = 0 if g.kind == "embed" else head_gpu
        groups.append(
            GroupPlacement(
                g.name, g.kind, g.layer, g.nbytes, a.device[g.name], gpu, a.rule_of.get(g.name)
            )
        )
    experts = []
    for layer, members in sorted(experts_of.items()):
        devices = [a.device[g.name] for g in sorted(members, key=lambda g: g.expert)]
        experts.append(
            ExpertPlacement(
                layer=layer,
                nbytes_each=members[0].nbytes,
                devices=devices,
                use_per_token=use[layer],
                gpu=a.gpu_of_layer.get(layer) if "gpu" in devices else None,
            )
        )
    return groups, experts


def _predict(
    inventory: ModelInventory,
    workload: Workload,
    hardware: Hardware,
    use: dict[int, list[float]],
    a: _Assignment,
) -> Prediction:
    placed = [
        PlacedGroup(
            g.layer,
            g.kind,
            a.device[g.name],
            g.nbytes,
            g.params,
            use[g.layer][g.expert] if g.kind == "expert" else 1.0,
        )
        for g in inventory.groups
    ]
    attention = {
        layer: LayerAttention(
            "gpu" if where == "gpu" else "cpu",
            inventory.kv_values_per_token * KV_BYTES[workload.kv_dtype],
            inventory.attention_flops_per_pair,
        )
        for layer, where in a.attention_device.items()
    }
    return predict(
        placed,
        attention,
        inventory.hidden_size,
        inventory.vocab_size,
        workload.context,
        workload.concurrency,
        workload.prefill_chunk,
        hardware,
    )


def plan_for_model(
    model_arg: str,
    vram_budget: str | None,
    dram_budget: str | None,
    context: int | None,
    concurrency: int,
    kv_dtype: str = "bf16",
    hardware: Hardware | None = None,
) -> Plan:
    """The plan a run without `--plan` executes, made now for the budgets given (defaults: this
    machine's free VRAM and available DRAM) and `context` tokens per sequence (None: the
    default, at most the model's limit), the KV cache in `kv_dtype` (bf16, f16, f32), for
    `hardware` (None: this machine's probe or the defaults)."""
    inventory = open_model(model_arg, None)
    budgets = resolve_budgets(vram_budget, dram_budget, None, machine_memory())
    tokens = min(DEFAULT_CONTEXT if context is None else context, inventory.context_limit)
    # a prompt of a short run is one chunk of at most its context
    workload = Workload(tokens, concurrency, min(512, tokens), kv_dtype)
    hardware = hardware or load_hardware(None)
    return make_plan(inventory, budgets, workload, hardware, [], None, None)
