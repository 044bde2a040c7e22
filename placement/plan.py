"""A placement plan: where every tensor group of a model lives (gpu, cpu = pinned DRAM,
disk = mmap of the model file), the KV cache and workspace per device, the totals and the
predicted speed. Versioned JSON, so `hetero plan --save` output feeds `serve`/`bench --plan`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from placement.budgets import Budgets, Workload
from placement.cost_model import Prediction
from placement.errors import PlacementError

PLAN_VERSION = 1
DEVICE_ORDER = ("gpu", "cpu", "disk")


@dataclass(frozen=True)
class ModelSummary:
    name: str
    source: str
    model_type: str
    weights: str  # weight types: a mixture name ("q4_k_m"), "bf16 as loaded", "GGUF types"
    layers: int
    experts: int  # routed experts per MoE layer
    top_k: int
    weight_bytes: int


@dataclass(frozen=True)
class GroupPlacement:
    """Every tensor group but the routed experts: embeddings, a layer's attention, ..."""

    name: str
    kind: str
    layer: int | None
    nbytes: int
    device: str
    gpu: int | None = None  # which GPU, for device "gpu"
    rule: str | None = None  # the override rule that placed it, if one did


@dataclass(frozen=True)
class ExpertPlacement:
    """The routed experts of one MoE layer, by expert index."""

    layer: int
    nbytes_each: int
    devices: list[str]
    use_per_token: list[float]  # expected activations per token (profile, or uniform)
    gpu: int | None = None  # the GPU holding this layer's GPU experts


@dataclass(frozen=True)
class KVCachePlacement:
    tokens: int  # per sequence, rounded up to whole KV blocks
    sequences: int
    dtype: str
    bytes_per_token: int  # all layers together
    nbytes: dict[str, int]  # per device: layers follow their attention


@dataclass(frozen=True)
class Plan:
    version: int
    model: ModelSummary
    budgets: Budgets
    workload: Workload
    rules: list[str]
    profile: str | None
    groups: list[GroupPlacement]
    experts: list[ExpertPlacement]
    kv_cache: KVCachePlacement
    workspace: dict[str, int]  # per device (all GPUs together)
    totals: dict[str, int]  # per device: weights + KV cache + workspace
    per_gpu: list[int]  # the gpu total, GPU by GPU
    expert_share_gpu: float  # of expected expert activations, the share GPU experts serve
    predicted: Prediction
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(
            version=data["version"],
            model=ModelSummary(**data["model"]),
            budgets=Budgets(**data["budgets"]),
            workload=Workload(**data["workload"]),
            rules=list(data["rules"]),
            profile=data["profile"],
            groups=[GroupPlacement(**g) for g in data["groups"]],
            experts=[ExpertPlacement(**e) for e in data["experts"]],
            kv_cache=KVCachePlacement(**data["kv_cache"]),
            workspace=dict(data["workspace"]),
            totals=dict(data["totals"]),
            per_gpu=list(data["per_gpu"]),
            expert_share_gpu=data["expert_share_gpu"],
            predicted=Prediction(**data["predicted"]),
            warnings=list(data["warnings"]),
        )

    def device_of(self, group_name: str) -> str:
        """The device of a group by name, routed experts ("layers.3.experts.17") included."""
        head, _, index = group_name.rpartition(".experts.")
        if head:
            layer = int(head.removeprefix("layers."))
            for experts in self.experts:
                if experts.layer == layer:
                    return experts.devices[int(index)]
        for group in self.groups:
            if group.name == group_name:
                return group.device
        raise KeyError(group_name)


def load_plan(path: str | Path) -> Plan:
    """A plan saved by `hetero plan --save`; refuses other versions and malformed files."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlacementError(f"plan {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PlacementError(f"plan {path} is not valid JSON: {err}") from None
    version = data.get("version") if isinstance(data, dict) else None
    if version != PLAN_VERSION:
        raise PlacementError(
            f"plan {path} has format version {version!r} but this hetero reads version "
            f"{PLAN_VERSION}; make it again with `hetero plan MODEL ... --save {path.name}`"
        )
    try:
        return Plan.from_dict(data)
    except (KeyError, TypeError) as err:
        raise PlacementError(f"plan {path} is malformed ({err!r}); make it again") from None
