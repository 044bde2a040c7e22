"""The placements `hetero bench --placements` names, each turned into a plan by the planner with
override rules (llama.cpp's `-ot` regexes where they fit), so a bench row executes exactly what
`hetero plan --override ... --save` would write."""

from __future__ import annotations

from dataclasses import dataclass

from placement.budgets import Budgets, Workload
from placement.hardware import Hardware
from placement.inventory import ModelInventory
from placement.plan import Plan, load_plan
from placement.policy import expert_use, make_plan
from placement.routing_profile import RoutingProfile
from placement.rules import Rule, parse_rule

# name -> (what it places, whether it takes an argument)
PLACEMENTS = {
    "cpu": "every group in DRAM on the CPU kernels",
    "torch": "every group in DRAM, all in torch (quant none)",
    "auto": "the planner's own choice for the budgets",
    "disk-experts": "every routed expert memory-mapped from the file",
    "hot-experts:N": "the N most used routed experts of each layer and what every token uses "
    "on the accelerator",
    "attn-accel": "attention (with its KV cache) on the accelerator",
    "layers-accel:K": "every group of the first K layers on the accelerator",
    "plan:FILE": "a plan saved by `hetero plan --save`",
}
ROUTED_EXPERTS = r"ffn_(up|down|gate)_exps"  # the GGUF names of a layer's stacked experts
EVERYTHING = "."


class BenchPlacementError(ValueError):
    """A placement that cannot be planned for this model: its row says why."""


@dataclass(frozen=True)
class PlacementSpec:
    name: str  # as given: "hot-experts:2"
    kind: str  # "hot-experts"
    count: int | None = None  # N or K
    path: str | None = None  # plan:FILE

    @property
    def quant(self) -> str:
        """The loader's `quant`: torch runs everything in torch, the rest use the kernels."""
        return "none" if self.kind == "torch" else "auto"

    @property
    def wants_accelerator(self) -> bool:
        return self.kind in ("hot-experts", "attn-accel", "layers-accel")


def parse_placement(text: str) -> PlacementSpec:
    """`cpu`, `hot-experts:4`, `plan:FILE`; refuses unknown names and bad counts."""
    kind, sep, arg = text.strip().partition(":")
    if kind == "plan":
        if not arg:
            raise BenchPlacementError("plan:FILE needs a file (hetero plan MODEL --save FILE)")
        return PlacementSpec(text, kind, path=arg)
    if kind in ("hot-experts", "layers-accel"):
        letter = "N" if kind == "hot-experts" else "K"
        if not arg.isdigit() or int(arg) < 1:
            raise BenchPlacementError(f"{kind}:{letter} needs a count >= 1, e.g. {kind}:2")
        return PlacementSpec(text, kind, count=int(arg))
    if kind in PLACEMENTS and not sep:
        return PlacementSpec(text, kind)
    raise BenchPlacementError(f"unknown placement {text!r}; choose from {', '.join(PLACEMENTS)}")


def placement_rules(
    spec: PlacementSpec, inventory: ModelInventory, profile: RoutingProfile | None = None
) -> list[Rule]:
    """The override rules that make `spec`'s placement, first match wins. Hot experts are
    the most used by `profile` (`hetero profile`), or the lowest indices without one."""
    if spec.kind == "disk-experts":
        if inventory.num_experts == 0:
            raise BenchPlacementError(f"{inventory.name} is a dense model: it has no experts")
        return [parse_rule(f"{ROUTED_EXPERTS}=disk")]
    if spec.kind == "hot-experts":
        if inventory.num_experts == 0:
            raise BenchPlacementError(f"{inventory.name} is a dense model: it has no experts")
        hot = []
        for layer, shares in expert_use(inventory, profile).items():
            ranked = sorted(range(len(shares)), key=lambda e: (-shares[e], e))
            hot += [rf"^layers\.{layer}\.experts\.{e}$=gpu" for e in ranked[: spec.count]]
        return [parse_rule(text) for text in (*hot, f"{ROUTED_EXPERTS}=cpu")]
    if spec.kind == "attn-accel":
        return [parse_rule(r"^layers\.\d+\.attention$=gpu"), parse_rule(f"{EVERYTHING}=cpu")]
    if spec.kind == "layers-accel":
        if spec.count > inventory.num_layers:
            raise BenchPlacementError(
                f"layers-accel:{spec.count} but {inventory.name} has {inventory.num_layers} layers"
            )
        layers = "|".join(str(i) for i in range(spec.count))
        return [parse_rule(rf"^layers\.({layers})\.=gpu"), parse_rule(f"{EVERYTHING}=cpu")]
    return []


def plan_placement(
    spec: PlacementSpec,
    inventory: ModelInventory,
    budgets: Budgets,
    workload: Workload,
    hardware: Hardware,
    profile: RoutingProfile | None = None,
    profile_path: str | None = None,
) -> Plan:
    """The plan of `spec` for `workload`. `budgets` carry the accelerator's VRAM; the CPU-only
    placements (cpu, torch, disk-experts) drop it."""
    if spec.kind == "plan":
        return load_plan(spec.path)
    if spec.kind in ("cpu", "torch", "disk-experts"):
        budgets = Budgets(vram_bytes=0, gpus=0, dram_bytes=budgets.dram_bytes)
    rules = placement_rules(spec, inventory, profile)
    return make_plan(inventory, budgets, workload, hardware, rules, profile, profile_path)


def plan_uses_accelerator(plan: Plan) -> bool:
    return any(g.device == "gpu" for g in plan.groups) or any(
        "gpu" in layer.devices for layer in plan.experts
    )
