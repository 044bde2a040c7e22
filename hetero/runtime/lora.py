"""LoRA over a loaded model: low-rank updates beside frozen linears (attention, shared experts)
and routed experts, laid out and scaled exactly as PEFT lays them out, so an adapter trained
here is PEFT's (adapters.py names its tensors):
- a linear W [out, in]: y = W x + s * B (A x), A [r, in], B [out, r], s = alpha / r;
- a layer's experts, which transformers stores fused as gate_up_proj [E, 2I, H] and down_proj
  [E, H, I] and PEFT targets with `target_parameters` (peft/tuners/lora/layer.py, ParamWrapper:
  W_e + s * B_e A_e): A [r * E, in] holds expert e's A_e in rows e*r..e*r+r-1, B [out, r * E]
  holds its B_e in columns e, E + e, 2E + e, ... (PEFT reshapes B to [out, r, E])."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hetero.config import LORA_TARGETS
from hetero.errors import InvalidRequestError
from hetero.models.experts import (
    ExpertBackend,
    FinishedExperts,
    run_grouped_by_expert,
    swiglu,
)

ATTENTION_PROJECTIONS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
)
SHARED_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
SHARED_BLOCKS = ("shared_expert", "shared_experts")  # Qwen2-MoE's name, DeepSeek's
# PEFT loads an adapter onto DeepSeek (and Qwen3-MoE) after renaming every `gate_proj`/`up_proj`
# target to the routed experts' fused gate_up_proj (peft/utils/transformers_weight_conversion.py),
# so LoRA on DeepSeek's shared experts (`shared_experts.gate_proj`) would not load there
PEFT_UNLOADABLE_SHARED = "shared_experts"


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attention", "experts", "shared")

    def __post_init__(self):
        if self.rank < 1:
            raise InvalidRequestError(f"the LoRA rank must be >= 1, got {self.rank}")
        unknown = set(self.targets) - set(LORA_TARGETS)
        if unknown or not self.targets:
            raise InvalidRequestError(
                f"LoRA targets must be some of {', '.join(LORA_TARGETS)}; got "
                f"{','.join(self.targets) or 'none'}"
            )
        if not 0 <= self.dropout < 1:
            raise InvalidRequestError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.dropout and "experts" in self.targets:
            raise InvalidRequestError(
                "LoRA dropout cannot apply to experts (PEFT's parameter LoRA has none): use "
                "--lora-dropout 0, or --targets without experts"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LowRank(nn.Module):
    """The update s * B (A x) of one linear, or of each of `experts` stacked matrices (PEFT's
    layouts, see the module docstring). float32 whatever the model computes in."""

    def __init__(self, in_features: int, out_features: int, settings: LoraSettings, experts=1):
        super().__init__()
        rank = settings.rank
        self.rank, self.experts, self.scaling = rank, experts, settings.scaling
        # PEFT's initialisation: A as nn.Linear's default (Kaiming-uniform), B zero
        self.lora_A = nn.Parameter(torch.empty(rank * experts, in_features))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank * experts))
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout else nn.Identity()

    def forward(self, x: torch.Tensor, expert: int = 0) -> torch.Tensor:
        # x: [..., in] -> [..., out], float32
        a, b = self.lora_A, self.lora_B
        if self.experts > 1:
            a = a.view(self.experts, self.rank, -1)[expert]  # [r, in]
            b = b.view(b.shape[0], self.rank, self.experts)[:, :, expert]  # [out, r]
        # scaled at rank width, the narrowest point
        return ((self.dropout(x.float()) @ a.T) * self.scaling) @ b.T


def delta_weights(update: LowRank) -> torch.Tensor:
    """The update as weights, s * B_e A_e for each expert: [experts, out, in] float32."""
    a = update.lora_A.detach().view(update.experts, update.rank, -1)  # [E, r, in]
    b = update.lora_B.detach().view(-1, update.rank, update.experts)  # [out, r, E]
    return torch.einsum("ore,eri->eoi", b, a) * update.scaling


class AdapterRows:
    """Which rows (tokens) of a forward each of a model's adapters applies to; one object per
    model, shared by its LoRA modules. Unset (training, `Model.logits`): the default adapter
    (None: none) applies to every row. The engine sets it before each step from its requests'
    adapters (a request naming none gets the default)."""

    def __init__(self):
        self.names: list[str] = []
        self.default: str | None = None
        self.groups: list[tuple[str | None, torch.Tensor]] | None = None

    def active(self) -> list[tuple[str | None, torch.Tensor | None]]:
        """(adapter, rows) pairs; rows None: every row."""
        if self.groups is None:
            return [(self.default, None)]
        return self.groups

    def assign(self, names_and_counts: list[tuple[str | None, int]]) -> None:
        """Each sequence's adapter (None: the default) and token count, in batch order."""
        by_name: dict[str | None, list[int]] = {}
        start = 0
        for name, count in names_and_counts:
            by_name.setdefault(name or self.default, []).extend(range(start, start + count))
            start += count
        if len(by_name) == 1:  # one adapter (or none) for the whole batch: no row gathers
            self.groups = [(next(iter(by_name)), None)]
            return
        self.groups = [(name, torch.tensor(rows)) for name, rows in by_name.items()]

    def delta(self, x: torch.Tensor, updates: nn.ModuleDict) -> torch.Tensor | int:
        """The updates `updates` (by adapter name) give rows x: [rows, in] -> [rows, out]
        (0 where no row has an adapter here)."""
        out: torch.Tensor | int = 0
        for name, rows in self.active():
            if name not in updates:
                continue
            if rows is None:
                return updates[name](x).to(x.dtype)
            part = updates[name](x[rows]).to(x.dtype)
            if isinstance(out, int):
                out = x.new_zeros(x.shape[0], part.shape[1])
            out[rows] = part
        return out


class LoraLinear(nn.Module):
    """A frozen linear (torch, kernel or disk) plus the low-rank update of each adapter."""

    def __init__(self, base: nn.Module, rows: AdapterRows):
        super().__init__()
        self.base, self.rows = base, rows
        self.adapters = nn.ModuleDict()

    def add(self, name: str, settings: LoraSettings) -> LowRank:
        update = LowRank(self.base.in_features, self.base.out_features, settings)
        self.adapters[name] = update
        return update

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.rows.delta(x, self.adapters)


class LoraJoined(nn.Module):
    """Frozen linears joined into one pass (`JoinedQuantLinear`: q/k/v, gate/up), each part
    with the updates of the adapters that adapt it."""

    def __init__(self, base: nn.Module, rows: AdapterRows):
        super().__init__()
        self.base, self.rows = base, rows
        self.parts = nn.ModuleList(nn.ModuleDict() for _ in base.sizes)

    def add(self, name: str, part: int, settings: LoraSettings) -> LowRank:
        update = LowRank(self.base.passes[0].in_features, self.base.sizes[part], settings)
        self.parts[part][name] = update
        return update

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self.base(x)
        return tuple(
            out + self.rows.delta(x, updates) for out, updates in zip(outs, self.parts, strict=True)
        )


class LoraExperts(ExpertBackend, nn.Module):
    """A layer's frozen routed experts (`TorchExperts` or `NumbaExperts`) with each adapter's
    updates to every expert's fused gate/up and down projections, computed in torch (autograd
    records through it; the frozen projections' backward reads the stored weights). Rows
    without an adapter run on the base backend as they would without LoRA."""

    def __init__(self, base: nn.Module, rows: AdapterRows):
        super().__init__()
        self.base, self.rows = base, rows
        self.num_experts = expert_shape(base)[0]
        self.gate_up, self.down = nn.ModuleDict(), nn.ModuleDict()

    def add(self, name: str, settings: LoraSettings) -> tuple[LowRank, LowRank]:
        experts, hidden, size = expert_shape(self.base)
        self.gate_up[name] = LowRank(hidden, 2 * size, settings, experts)
        self.down[name] = LowRank(size, hidden, settings, experts)
        return self.gate_up[name], self.down[name]

    def submit(self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor):
        # x: [tokens, hidden]; expert_ids, expert_weights: [tokens, top_k]
        groups = self.rows.active()
        if groups[0][1] is None:
            return FinishedExperts(self._adapted(groups[0][0], x, expert_ids, expert_weights))
        out = torch.zeros_like(x)
        for name, rows in groups:
            out[rows] = self._adapted(name, x[rows], expert_ids[rows], expert_weights[rows])
        return FinishedExperts(out)

    def _adapted(
        self,
        name: str | None,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        expert_weights: torch.Tensor,
    ) -> torch.Tensor:
        if name not in self.gate_up:
            return self.base.submit(x, expert_ids, expert_weights).wait()
        gate_up_update, down_update = self.gate_up[name], self.down[name]
        inference = not (torch.is_grad_enabled() and x.requires_grad)
        if inference and hasattr(self.base, "runs_pairs") and self.base.runs_pairs(x.shape[0]):
            return self._decode(name, x, expert_ids, expert_weights)

        def run_expert(expert: int, xs: torch.Tensor) -> torch.Tensor:
            gate_up, down = self.base.expert_projections(expert)
            hidden = swiglu(gate_up(xs) + gate_up_update(xs, expert))
            return down(hidden) + down_update(hidden, expert)

        out = run_grouped_by_expert(
            x.float(), expert_ids, expert_weights, self.num_experts, run_expert
        )
        return out.to(x.dtype)

    def _decode(
        self, name: str, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor
    ) -> torch.Tensor:
        # a few tokens on the kernels' grouped GEMV over (token, expert) pairs, each pair's
        # update added between the two projections, as in `_adapted`
        tokens, top_k = expert_ids.shape
        pair_expert = expert_ids.reshape(-1).numpy().astype(np.int64)
        xs = x.detach().float().repeat_interleave(top_k, dim=0)  # pairs are token-major
        gate_up = torch.from_numpy(self.base.pair_matmul("gate_up", xs.numpy(), pair_expert))
        self._add_pair_updates(gate_up, self.gate_up[name], xs, pair_expert)
        hidden = swiglu(gate_up).contiguous()
        y = torch.from_numpy(self.base.pair_matmul("down", hidden.numpy(), pair_expert))
        self._add_pair_updates(y, self.down[name], hidden, pair_expert)
        weights = expert_weights.float().unsqueeze(-1)
        return (y.view(tokens, top_k, -1) * weights).sum(dim=1).to(x.dtype)

    @staticmethod
    def _add_pair_updates(
        out: torch.Tensor, update: LowRank, rows: torch.Tensor, pair_expert: np.ndarray
    ) -> None:
        # out, rows: [pairs, ...]; each expert's update on its pairs' rows
        for expert in np.unique(pair_expert).tolist():
            pairs = torch.from_numpy(np.flatnonzero(pair_expert == expert))
            out[pairs] += update(rows[pairs], expert)


def expert_shape(block: nn.Module) -> tuple[int, int, int]:
    """(experts, hidden, expert size) of a routed-experts backend that LoRA adapts."""
    if hasattr(block, "gate_up"):  # NumbaExperts: gate_up [experts, 2 * size, hidden]
        experts, double_size, hidden = block.gate_up.shape
        return experts, hidden, double_size // 2
    first = block[0]  # TorchExperts: GatedMLPs
    return len(block), first.gate_proj.in_features, first.gate_proj.out_features


def default_targets(net: nn.Module) -> tuple[str, ...]:
    """Every target of `net` whose adapter PEFT loads."""
    names = {name.rpartition(".")[2] for name, _ in net.named_modules()}
    if PEFT_UNLOADABLE_SHARED in names:
        return ("attention", "experts")
    return LORA_TARGETS


def is_linear(module: nn.Module | None) -> bool:
    """A frozen linear LoRA wraps: nn.Linear, QuantLinear, DiskLinear (all say their widths)."""
    return module is not None and hasattr(module, "in_features") and hasattr(module, "out_features")


def adapt(
    net: nn.Module, settings: LoraSettings, name: str = "default", default: bool = True
) -> dict[str, LowRank]:
    """Put adapter `name`'s LoRA updates on `net`'s targets (frozen; only the updates train;
    a model may hold several adapters, see `AdapterRows`; `default`: the one rows that name
    no adapter get). Returns each update by the transformers module path PEFT keys it under
    (adapters.py)."""
    rows = adapter_rows(net)
    if name in rows.names:
        raise InvalidRequestError(f"the model already has an adapter named {name!r}")
    updates: dict[str, LowRank] = {}
    for module_name, module in list(net.named_modules()):
        path = "model." + module_name
        leaf = module_name.rpartition(".")[2]
        if "experts" in settings.targets and leaf == "experts":
            if not isinstance(module, LoraExperts):
                if not hasattr(module, "expert_projections"):
                    raise InvalidRequestError(
                        f"{module_name} runs {type(module).__name__}, which LoRA cannot adapt "
                        f"(experts split between DRAM and disk): train with every expert in DRAM"
                    )
                module = LoraExperts(module, rows)
                net.set_submodule(module_name, module)
            # PEFT nests its two parameter wrappers: gate_up_proj's is the inner (base_layer)
            updates[f"{path}.base_layer"], updates[path] = module.add(name, settings)
        elif "attention" in settings.targets and leaf == "self_attn":
            updates.update(adapt_linears(module, path, ATTENTION_PROJECTIONS, settings, name, rows))
        elif "shared" in settings.targets and leaf == PEFT_UNLOADABLE_SHARED:
            raise InvalidRequestError(
                "LoRA on DeepSeek's shared experts would not load in PEFT (it renames their "
                "gate_proj/up_proj targets to the routed experts' gate_up_proj): use --targets "
                "attention,experts"
            )
        elif "shared" in settings.targets and leaf in SHARED_BLOCKS:
            updates.update(adapt_linears(module, path, SHARED_PROJECTIONS, settings, name, rows))
    if not updates:
        raise InvalidRequestError(
            f"the model has nothing to adapt for --targets {','.join(settings.targets)}"
        )
    if not default and any(path.endswith(".kv_b_proj") for path in updates):
        # MLA runs kv_b on the cached latents of each history too, whose rows are not the
        # batch's tokens that AdapterRows names
        raise InvalidRequestError(
            "several adapters in one batch cannot adapt MLA's kv_b_proj; serve this adapter "
            "alone (--adapter)"
        )
    rows.names.append(name)
    if default:
        rows.default = name
    return updates


def adapter_rows(net: nn.Module) -> AdapterRows:
    """The model's `AdapterRows` (made on its first adapter)."""
    if not hasattr(net, "adapter_rows"):
        net.adapter_rows = AdapterRows()
    return net.adapter_rows


def adapt_linears(
    parent: nn.Module,
    path: str,
    names: tuple[str, ...],
    settings: LoraSettings,
    adapter: str,
    rows: AdapterRows,
) -> dict[str, LowRank]:
    """Add the adapter's updates to `parent`'s linears named in `names` (and to the parts of
    its joined ones), wrapping each on its first adapter."""
    updates = {}
    for joined_name, parts in getattr(parent, "JOINABLE", {}).items():
        joined = getattr(parent, joined_name, None)
        if joined is None:
            continue
        if not isinstance(joined, LoraJoined):
            joined = LoraJoined(joined, rows)
            setattr(parent, joined_name, joined)
        for i, part in enumerate(parts):
            if part in names:
                updates[f"{path}.{part}"] = joined.add(adapter, i, settings)
    for name in names:
        linear = getattr(parent, name, None)
        if is_linear(linear) and not isinstance(linear, LoraLinear):
            linear = LoraLinear(linear, rows)
            setattr(parent, name, linear)
        if isinstance(linear, LoraLinear):
            updates[f"{path}.{name}"] = linear.add(adapter, settings)
    return updates
