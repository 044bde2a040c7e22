"""The model assembler: from a placement plan, every tensor group of a model is built on its
device with its backend, in one pass over the groups before the remaining weights load:
- "cpu" (DRAM): the CPU kernels by weight format (a GGUF file's types as stored, or float
  weights converted at load), else torch;
- "disk": computed from the memory-mapped file (hetero/runtime/disk.py);
- "gpu": on the accelerator's lane (hetero/runtime/accelerator/): a layer's hot experts as
  `LaneExperts` beside the CPU's cold ones, the other groups wrapped by `OnLane` once loaded;
  without an accelerator (`--accelerator none`) on the CPU, and said so in the load log.
A plan made for another model is refused before anything loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from torch import nn

from hetero.config import QUANT_CHOICES
from hetero.errors import HeteroError
from hetero.loading.weights import file_name, materialise
from hetero.models.experts import ExpertBackend, ExpertsHandle, TorchExperts
from hetero.progress import track
from hetero.runtime.accelerator import Lane
from hetero.runtime.accelerator.placed import LaneExperts, OnLane
from hetero.runtime.disk import DiskLinear, DiskMLP, stored_matrix
from placement.hardware import Hardware
from placement.plan import Plan
from placement.tensor_groups import classify

# linears kept float: routers decide routing; MLA's kv_b is split into its key and value parts
# by the absorbed decode (a GGUF file stores it as two tensors, so it has no kernel form either)
FLOAT_SUFFIXES = (".mlp.gate", "shared_expert_gate", "self_attn.kv_b_proj")
DEVICES = ("gpu", "cpu", "disk")
# the GGML types float weights may be converted to for the CPU kernels at load, by `quant` name
CONVERT_TYPES = {name: T[name.upper()] for name in QUANT_CHOICES if name not in ("auto", "none")}


class PlanMismatchError(HeteroError):
    """A placement plan was made for another model than the one being loaded."""


class LanePlacementError(HeteroError):
    """A plan puts groups on the accelerator in a way this build cannot run."""


@dataclass
class Placement:
    """Where each tensor group runs, by group name ("layers.3.attention",
    "layers.3.experts.17"); groups the plan does not name run on the CPU. `lane`: the
    accelerator that runs the plan's "gpu" groups (None: the CPU runs them)."""

    devices: dict[str, str] = field(default_factory=dict)
    plan: Plan | None = None
    lane: Lane | None = None
    # how a layer's experts on the lane change: "static" (the plan's), "lru" or "score"
    # (a pool of as many slots, filled by use: hetero/runtime/expert_cache.py)
    expert_cache: str = "score"
    hardware: Hardware | None = None  # the rates the lane's prefill choices are made by

    @classmethod
    def from_plan(
        cls,
        plan: Plan | None,
        lane: Lane | None = None,
        expert_cache: str = "score",
        hardware: Hardware | None = None,
    ) -> Placement:
        if plan is None:
            return cls(lane=lane, expert_cache=expert_cache, hardware=hardware)
        devices = {g.name: g.device for g in plan.groups}
        for layer in plan.experts:
            for index, device in enumerate(layer.devices):
                devices[f"layers.{layer.layer}.experts.{index}"] = device
        return cls(devices, plan, lane, expert_cache, hardware)

    def device(self, group: str) -> str:
        return self.devices.get(group, "cpu")

    def executed_device(self, group: str) -> str:
        """Where a group runs: the plan's device, but the CPU for "gpu" without a lane."""
        device = self.device(group)
        return "cpu" if device == "gpu" and self.lane is None else device

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
        if counts["gpu"] and self.lane is not None:
            lines.append(
                f"{counts['gpu']} groups on the GPU run on the {self.lane.describe()} "
                f"({self.lane.used_bytes / 2**20:.2f} MiB used at load)"
            )
        elif counts["gpu"]:
            lines.append(
                f"{counts['gpu']} groups the plan puts on the GPU run on the CPU: no "
                f"accelerator (--accelerator cuda or sim runs them on one)"
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
    summary = plan.model
    ours = (
        inventory.model_type,
        inventory.num_layers,
        inventory.num_experts,
        inventory.top_k,
        inventory.weight_bytes,
        {g.name for g in inventory.groups if g.kind != "expert"},
    )
    theirs = (
        summary.model_type,
        summary.layers,
        summary.experts,
        summary.top_k,
        summary.weight_bytes,
        {g.name for g in plan.groups},
    )
    if ours != theirs:
        raise PlanMismatchError(
            f"the plan was made for {summary.name} ({summary.model_type}, {summary.layers} "
            f"layers, {summary.experts} experts, {summary.weight_bytes / 2**30:.2f} GiB) but "
            f"{model_path.name} is {inventory.model_type}, {inventory.num_layers} layers, "
            f"{inventory.num_experts} experts, {inventory.weight_bytes / 2**30:.2f} GiB; make a "
            f"plan for it with `hetero plan {model_path} --save PLAN.json`"
        )


def kernel_targets(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """Expert blocks and linears that may leave torch (kernels or disk), those of
    FLOAT_SUFFIXES excluded."""
    found, experts = [], []
    for name, module in net.named_modules():
        if any(name.startswith(prefix + ".") for prefix in experts):
            continue
        if isinstance(module, TorchExperts):
            experts.append(name)
            found.append((name, module))
        elif isinstance(module, nn.Linear) and not name.endswith(FLOAT_SUFFIXES):
            found.append((name, module))
    return found


@dataclass(frozen=True)
class Backends:
    """How the groups in DRAM run. `stored_kernels`: a GGUF file's tensors run on the CPU
    kernels as stored; `convert_to`: float weights are converted to this GGML type for the
    kernels at load; neither: torch runs them (load_weights fills the torch modules)."""

    stored_kernels: bool = False
    convert_to: T | None = None
    load_dtype: torch.dtype = torch.float32  # what float weights are read as
    fp8_block: tuple[int, int] = (128, 128)

    @property
    def kernels(self) -> bool:
        return self.stored_kernels or self.convert_to is not None


@dataclass
class Assembly:
    """What the assembler built, for the load log and `Model`."""

    disk_bytes: int = 0  # stored bytes of the groups computed from the file
    kernel_modules: list[nn.Module] = field(default_factory=list)


class Assembler:
    """Builds, for each linear and routed-expert block of a model built on the meta device,
    the module of its group's device and backend (see the module docstring). What it leaves
    in torch, `load_weights` fills afterwards."""

    def __init__(self, checkpoint, checkpoint_name, placement: Placement, backends: Backends):
        self.checkpoint, self.placement, self.backends = checkpoint, placement, backends
        self._checkpoint_name = checkpoint_name
        self.built = Assembly()

    def tensor_name(self, module_name: str) -> str:
        return file_name(module_name, self._checkpoint_name)

    def build(self, net: nn.Module) -> Assembly:
        targets = list(kernel_targets(net))
        for name, module in track(targets, "preparing weights", len(targets)):
            if isinstance(module, TorchExperts):
                new = self.experts(name, module)
            else:
                new = self.linear(name, module)
            if new is not None:
                net.set_submodule(name, new)
        return self.built

    def linear(self, name: str, module: nn.Linear) -> nn.Module | None:
        source = self.tensor_name(f"{name}.weight")
        if name == "lm_head" and source not in self.checkpoint:  # tied to the embedding
            source = self.tensor_name("embed_tokens.weight")
        device = self.placement.module_device(name)
        if device == "gpu" and self.placement.lane is not None:
            return None  # torch, loaded, then run on the lane (`run_groups_on_lane`)
        if device == "disk":
            weight = stored_matrix(self.checkpoint, source)
            if weight is not None:
                self.built.disk_bytes += self.checkpoint.entries[source].nbytes
                bias = None
                if module.bias is not None:
                    bias = self.checkpoint.tensor(self.tensor_name(f"{name}.bias")).float()
                return DiskLinear(weight, bias)
        if not self.backends.kernels:
            return None
        from hetero.runtime import quantized  # Numba loads only when kernels run weights

        new = None
        if self.backends.stored_kernels:
            new = quantized.stored_kernel_linear(self.checkpoint, source, module.bias)
        if new is None and self.backends.convert_to is not None:
            target = self.backends.convert_to
            if name == "lm_head":
                target = quantized.LM_HEAD_TYPE.get(target, target)
            weight = self.float_weight(source, tuple(module.weight.shape))
            new = quantized.converted_kernel_linear(weight, target, module.bias)
        if new is not None:
            self.built.kernel_modules.append(new)
        return new

    def experts(self, name: str, block: TorchExperts) -> nn.Module | None:
        projections = ("gate_proj", "up_proj", "down_proj")
        names = [
            {p: self.tensor_name(f"{name}.{e}.{p}.weight") for p in projections}
            for e in range(len(block))
        ]
        devices = self.placement.expert_devices(name, len(block))
        for e, device in enumerate(devices):
            if device != "disk":
                continue
            stored = [stored_matrix(self.checkpoint, names[e][p]) for p in projections]
            if None not in stored:
                block[e] = DiskMLP(*stored)
                self.built.disk_bytes += sum(
                    self.checkpoint.entries[n].nbytes for n in names[e].values()
                )
        lane = self.placement.lane
        on_lane = [e for e, d in enumerate(devices) if d == "gpu"] if lane is not None else []
        kept = [
            e for e, mlp in enumerate(block) if not isinstance(mlp, DiskMLP) and e not in on_lane
        ]
        if on_lane and kept and not self.backends.kernels:
            raise LanePlacementError(
                f"{name}: the plan splits its experts between the accelerator and the CPU, "
                f"which needs the CPU kernels for the CPU's share; load with --quant auto (or "
                f"a kernel type), or with --accelerator none"
            )
        if not on_lane and (not kept or not self.backends.kernels):
            return None  # torch runs the block; its disk experts are computed from the file
        on_disk = [e for e, mlp in enumerate(block) if isinstance(mlp, DiskMLP)]
        layer = name.split(".")[1]
        if on_lane and not on_disk and self.placement.expert_cache != "static":
            return self.cached_experts(name, names, on_lane, block, layer)
        parts: list[tuple[nn.Module, list[int]]] = []
        if kept:
            parts.append((self.kernel_experts(names, kept, block, layer), kept))
        if on_lane:
            parts.append((self.lane_experts(name, names, on_lane, block), on_lane))
        if on_disk:
            parts.append((TorchExperts.of([block[e] for e in on_disk]), on_disk))
        if len(parts) == 1:
            return parts[0][0]
        return SplitExperts(parts, len(block))

    def cached_experts(
        self,
        name: str,
        names: list[dict[str, str]],
        on_lane: list[int],
        block: TorchExperts,
        layer: str,
    ) -> nn.Module:
        """Every expert on the CPU kernels, and a pool of len(on_lane) slots on the lane
        seeded with them, changed by use under the placement's expert cache policy."""
        from hetero.runtime.accelerator.cached import CachedExperts
        from hetero.runtime.expert_cache import ExpertSlots

        held = list(range(len(block)))
        cpu = self.kernel_experts(names, held, block, layer)
        pool = self.lane_experts(name, names, on_lane, block)
        slots = ExpertSlots(len(block), len(on_lane), self.placement.expert_cache, on_lane)
        return CachedExperts(cpu, held, pool, slots, len(block), self.placement.hardware)

    def kernel_experts(
        self, names: list[dict[str, str]], kept: list[int], block: TorchExperts, layer: str
    ) -> nn.Module:
        """The CPU kernels' backend of experts `kept`."""
        from hetero.runtime import quantized
        from hetero.runtime.cpu_experts import NumbaExperts, overlap_by_default

        projections = ("gate_proj", "up_proj", "down_proj")
        if self.backends.stored_kernels:
            kernels = NumbaExperts.from_checkpoint(self.checkpoint, [names[e] for e in kept])
        else:
            shapes = {p: tuple(getattr(block[kept[0]], p).weight.shape) for p in projections}
            weights = [
                {p: self.float_weight(names[e][p], shapes[p]) for p in projections} for e in kept
            ]
            kernels = quantized.converted_kernel_experts(weights, self.backends.convert_to)
        shared = self.placement.executed_device(f"layers.{layer}.shared_experts")
        kernels.overlap = overlap_by_default(shared_experts_on_cpu=shared == "cpu")
        self.built.kernel_modules.append(kernels)
        return kernels

    def lane_experts(
        self, name: str, names: list[dict[str, str]], on_lane: list[int], block: TorchExperts
    ) -> LaneExperts:
        """Experts `on_lane` on the accelerator, float in the load dtype (dequantised where
        the file stores them quantised)."""
        shape = {p: tuple(getattr(block[0], p).weight.shape) for p in ("gate_proj", "down_proj")}

        def stacked(projections: tuple[str, ...], rows: tuple[int, ...]) -> torch.Tensor:
            return torch.stack(
                [
                    torch.cat([self.float_weight(names[e][p], rows) for p in projections])
                    for e in on_lane
                ]
            )

        gate_up = stacked(("gate_proj", "up_proj"), shape["gate_proj"])
        down = stacked(("down_proj",), shape["down_proj"])
        return LaneExperts(self.placement.lane, gate_up, down, f"{name}'s {len(on_lane)} experts")

    def float_weight(self, source: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A float weight as stored (zero-copy where its dtype is the load dtype)."""
        backends = self.backends
        return materialise(self.checkpoint, source, shape, backends.load_dtype, backends.fp8_block)


class SplitExperts(ExpertBackend, nn.Module):
    """A layer's routed experts held by several backends (some on the CPU kernels, some on
    disk): each (token, slot) pair runs on the backend holding its expert, as a one-slot
    routing, and the weighted outputs are summed per token. Every backend is submitted before
    any is waited for, so one on a worker runs while the others compute here."""

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

    def submit(
        self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor
    ) -> SummedParts:
        # x: [tokens, hidden]; expert_ids, expert_weights: [tokens, top_k]
        top_k = expert_ids.shape[1]
        ids = expert_ids.reshape(-1)
        weights = expert_weights.reshape(-1, 1)
        owner, local = self._owner[ids], self._local[ids]
        token = torch.arange(ids.numel()) // top_k  # pairs are token-major
        started = []
        for b, backend in enumerate(self.parts):
            pairs = (owner == b).nonzero().squeeze(1)
            if pairs.numel() == 0:
                continue
            rows = token[pairs]
            started.append((rows, backend.submit(x[rows], local[pairs, None], weights[pairs])))
        return SummedParts(torch.zeros_like(x), started)


class SummedParts:
    """`SplitExperts` under way: wait() adds each backend's pair outputs into their tokens'
    rows, in the order of the backends."""

    def __init__(self, out: torch.Tensor, started: list[tuple[torch.Tensor, ExpertsHandle]]):
        self.out, self.started = out, started

    def wait(self) -> torch.Tensor:
        # out: [tokens, hidden]; each part: (token of each pair [pairs], its [pairs, hidden])
        for rows, handle in self.started:
            self.out.index_add_(0, rows, handle.wait().to(self.out.dtype))
        return self.out


def group_of(module_name: str, parameter: str) -> tuple[str, str]:
    """(group, kind) of a parameter of a module, inside the runtime's wrappers too: the final
    norm's weight is "norm.torch_norm.weight" once the CPU glue wraps it."""
    try:
        return classify(f"{module_name}.{parameter}")[:2]
    except ValueError:
        return classify(f"{module_name}.{parameter.rsplit('.', 1)[-1]}")[:2]


def run_groups_on_lane(net: nn.Module, placement: Placement) -> None:
    """Wrap, in the loaded `net`, each module whose weights all belong to one group the plan
    puts on "gpu" (but routed experts: the assembler built those) in `OnLane`, its weights
    moved to the lane and charged to its budget. Modules of several groups (a layer, a MoE
    block with its experts) are entered, so the smallest whole groups are found."""
    lane = placement.lane
    if lane is None:
        return

    def visit(prefix: str, parent: nn.Module) -> None:
        for child_name, child in list(parent.named_children()):
            full = f"{prefix}{child_name}"
            groups = {group_of(full, p) for p, _ in child.named_parameters()}
            # expert backends (kernels, splits) hold weights torch does not see
            groups |= {
                (f"{full}.{n}", "expert")
                for n, m in child.named_modules()
                if isinstance(m, ExpertBackend)
            }
            if len(groups) > 1:
                visit(f"{full}.", child)
                continue
            if not groups:
                continue
            ((group, kind),) = groups
            if kind != "expert" and placement.device(group) == "gpu":
                setattr(parent, child_name, OnLane(lane, lane.place(child, group)))

    visit("", net)
