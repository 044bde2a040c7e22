"""The model assembler: from a placement plan, every tensor group of a model is built on its
device with its backend, in one pass over the groups before the remaining weights load:
- "cpu" (DRAM): the CPU kernels by weight format (a GGUF file's types as stored, or float
  weights converted at load), else torch;
- "disk": computed from the memory-mapped file (hetero/runtime/disk.py);
- "gpu": run on the CPU by this build, and said so in the load log.
A plan made for another model is refused before anything loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hetero.errors import HeteroError
from hetero.loading.weights import file_name
from hetero.models.experts import TorchExperts
from hetero.runtime.disk import DiskLinear, DiskMLP, stored_matrix
from placement.plan import Plan
from placement.tensor_groups import classify

ROUTER_SUFFIXES = (".mlp.gate", "shared_expert_gate")  # kept float: they decide routing
DEVICES = ("gpu", "cpu", "disk")


class PlanMismatchError(HeteroError):
    """A placement plan was made for another model than the one being loaded."""


@dataclass
class Placement:
    """Where each tensor group runs, by group name ("layers.3.attention",
    "layers.3.experts.17"); groups the plan does not name run on the CPU."""

    devices: dict[str, str] = field(default_factory=dict)
    plan: Plan | None = None

    @classmethod
    def from_plan(cls, plan: Plan | None) -> Placement:
        if plan is None:
            return cls()
        devices = {g.name: g.device for g in plan.groups}
        for layer in plan.experts:
            for index, device in enumerate(layer.devices):
                devices[f"layers.{layer.layer}.experts.{index}"] = device
        return cls(devices, plan)

    def device(self, group: str) -> str:
        return self.devices.get(group, "cpu")

    def module_device(self, module_name: str) -> str:
        """The device of a linear's group: "layers.3.self_attn.q_proj" -> its attention's."""
        return self.device(classify(f"{module_name}.weight")[0])

    def expert_devices(self, experts_name: str, count: int) -> list[str]:
        """Each routed expert's device for the experts block "layers.3.mlp.experts"."""
        layer = experts_name.split(".")[1]
        return [self.device(f"layers.{layer}.experts.{e}") for e in range(count)]

    def group_bytes(self, device: str) -> int:
        """Weight bytes the plan puts on `device` (0 without a plan)."""
        if self.plan is None:
            return 0
        total = sum(g.nbytes for g in self.plan.groups if g.device == device)
        for layer in self.plan.experts:
            total += layer.nbytes_each * layer.devices.count(device)
        return total

    def log_lines(self) -> list[str]:
        """What the plan puts where, as this build executes it."""
        if self.plan is None:
            return ["no plan: every group runs on the CPU"]
        counts = {d: 0 for d in DEVICES}
        for device in self.devices.values():
            counts[device] = counts.get(device, 0) + 1
        placed = ", ".join(
            f"{counts[d]} groups ({self.group_bytes(d) / 2**30:.2f} GiB) on {d}"
            for d in DEVICES
            if counts[d]
        )
        lines = [f"executing the plan: {placed}"]
        if counts["gpu"]:
            lines.append(
                f"{counts['gpu']} groups the plan puts on the GPU run on the CPU: this build "
                f"has no GPU backend yet"
            )
        if counts["disk"]:
            lines.append(
                "groups on disk are computed from the memory-mapped file: slower, and they "
                "take no DRAM of their own"
            )
        return lines


def check_plan_fits(plan: Plan, model_path: Path) -> None:
    """Refuse a plan made for another model: architecture, layers, experts, top-k and weight
    bytes (in the plan's own weight typing) must match the model at `model_path`, and so must
    the tensor groups' names."""
    from placement.inventory import open_model

    typing = plan.model.weights
    quant = None if typing.endswith(" as loaded") or typing == "GGUF types" else typing
    try:
        inventory = open_model(str(model_path), quant)
    except HeteroError as err:
        raise PlanMismatchError(f"cannot check the plan against {model_path}: {err}") from None
    ours = (
        inventory.model_type,
        inventory.num_layers,
        inventory.num_experts,
        inventory.top_k,
        inventory.weight_bytes,
    )
    summary = plan.model
    theirs = (summary.model_type, summary.layers, summary.experts, summary.top_k)
    groups = {g.name for g in inventory.groups if g.kind != "expert"}
    planned = {g.name for g in plan.groups}
    if ours != (*theirs, summary.weight_bytes) or groups != planned:
        raise PlanMismatchError(
            f"the plan was made for {summary.name} ({summary.model_type}, {summary.layers} "
            f"layers, {summary.experts} experts, {summary.weight_bytes / 2**30:.2f} GiB) but "
            f"{model_path.name} is {inventory.model_type}, {inventory.num_layers} layers, "
            f"{inventory.num_experts} experts, {inventory.weight_bytes / 2**30:.2f} GiB; make a "
            f"plan for it with `hetero plan {model_path} --save PLAN.json`"
        )


def kernel_targets(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """Expert blocks and linears that may leave torch (kernels or disk), routers excluded."""
    found, experts = [], []
    for name, module in net.named_modules():
        if any(name.startswith(prefix + ".") for prefix in experts):
            continue
        if isinstance(module, TorchExperts):
            experts.append(name)
            found.append((name, module))
        elif isinstance(module, nn.Linear) and not name.endswith(ROUTER_SUFFIXES):
            found.append((name, module))
    return found


def place_on_disk(net: nn.Module, checkpoint, checkpoint_name, placement: Placement) -> int:
    """Before any weight loads: linears and routed experts the plan puts on disk become
    modules computed from the file (a disk expert replaces its `GatedMLP` inside the layer's
    `TorchExperts`). Returns the stored bytes they read."""
    on_disk = 0

    def stored(module_name: str):
        return stored_matrix(checkpoint, file_name(f"{module_name}.weight", checkpoint_name))

    for name, module in kernel_targets(net):
        if isinstance(module, TorchExperts):
            devices = placement.expert_devices(name, len(module))
            for e, device in enumerate(devices):
                if device != "disk":
                    continue
                parts = [stored(f"{name}.{e}.{p}") for p in ("gate_proj", "up_proj", "down_proj")]
                if None in parts:
                    continue
                module[e] = DiskMLP(*parts)
                on_disk += sum(_stored_bytes(checkpoint, name, e, checkpoint_name))
        elif placement.module_device(name) == "disk":
            weight = stored(name)
            if weight is None:
                continue
            bias = None
            if module.bias is not None:
                tensor = file_name(f"{name}.bias", checkpoint_name)
                bias = checkpoint.tensor(tensor).float()
            net.set_submodule(name, DiskLinear(weight, bias))
            on_disk += checkpoint.entries[file_name(f"{name}.weight", checkpoint_name)].nbytes
    return on_disk


def _stored_bytes(checkpoint, experts_name: str, expert: int, checkpoint_name) -> list[int]:
    names = [f"{experts_name}.{expert}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
    return [checkpoint.entries[file_name(n, checkpoint_name)].nbytes for n in names]


def kernel_experts(experts: TorchExperts) -> list[int]:
    """Indices of the experts of a block that are not computed from disk."""
    return [e for e, mlp in enumerate(experts) if not isinstance(mlp, DiskMLP)]


class SplitExperts(nn.Module):
    """A layer's routed experts held by several backends (some on the CPU kernels, some on
    disk): each (token, slot) pair runs on the backend holding its expert, as a one-slot
    routing, and the weighted outputs are summed per token."""

    def __init__(self, parts: list[tuple[nn.Module, list[int]]], num_experts: int):
        super().__init__()
        self.parts = nn.ModuleList(backend for backend, _ in parts)
        self.num_experts = num_experts
        owner = np.full(num_experts, -1, np.int64)
        local = np.zeros(num_experts, np.int64)
        for b, (_, experts) in enumerate(parts):
            owner[experts] = b
            local[experts] = np.arange(len(experts))
        if (owner < 0).any():
            raise ValueError(f"experts {np.flatnonzero(owner < 0).tolist()} have no backend")
        self._owner, self._local = torch.from_numpy(owner), torch.from_numpy(local)

    def forward(
        self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor
    ) -> torch.Tensor:
        # x: [tokens, hidden]; expert_ids, expert_weights: [tokens, top_k] -> [tokens, hidden]
        top_k = expert_ids.shape[1]
        ids = expert_ids.reshape(-1)
        weights = expert_weights.reshape(-1, 1)
        owner, local = self._owner[ids], self._local[ids]
        token = torch.arange(ids.numel()) // top_k  # pairs are token-major
        out = torch.zeros_like(x)
        for b, backend in enumerate(self.parts):
            pairs = (owner == b).nonzero().squeeze(1)
            if pairs.numel() == 0:
                continue
            y = backend(x[token[pairs]], local[pairs, None], weights[pairs])
            out.index_add_(0, token[pairs], y.to(out.dtype))
        return out


def split_layer(kernel_backend: nn.Module, kept: list[int], experts: TorchExperts) -> nn.Module:
    """The backend of a layer whose experts `kept` run on `kernel_backend` (built from just
    them) and whose others are computed from disk."""
    on_disk = [e for e in range(len(experts)) if e not in set(kept)]
    if not on_disk:
        return kernel_backend
    disk = TorchExperts.of([experts[e] for e in on_disk])
    return SplitExperts([(kernel_backend, kept), (disk, on_disk)], len(experts))
