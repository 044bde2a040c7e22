"""`hetero plan`'s tables: what each device holds, layer range by layer range; memory per
device against the budgets; the KV cache, the GPU experts' share of activations and the
predicted speed with what bounds it."""

from __future__ import annotations

from itertools import groupby

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from placement.cost_model import RESOURCE_NAMES
from placement.plan import DEVICE_ORDER, Plan
from placement.sizes import gib

KIND_LABELS = {
    "embed": "embeddings",
    "attention": "attention",
    "norms": "norms",
    "router": "router",
    "shared_experts": "shared experts",
    "dense_ffn": "dense FFN",
    "output_norm": "final norm",
    "lm_head": "lm_head",
}
DEVICE_TITLES = {"gpu": "GPU", "cpu": "CPU (DRAM)", "disk": "disk (mmap)"}


Cells = dict[str, tuple[tuple[str, ...], int]]  # device -> (kinds it holds, routed experts)


def _rows(plan: Plan) -> dict[str | int, Cells]:
    """Per row ("embed", a layer, "head"), per device: the kinds and routed experts held."""
    rows: dict[str | int, dict[str, tuple[list[str], int]]] = {}

    def row(key: str | int) -> dict[str, tuple[list[str], int]]:
        return rows.setdefault(key, {d: ([], 0) for d in DEVICE_ORDER})

    for group in plan.groups:
        key = (
            group.layer
            if group.layer is not None
            else ("embed" if group.kind == "embed" else "head")
        )
        row(key)[group.device][0].append(KIND_LABELS[group.kind])
    for experts in plan.experts:
        cells = row(experts.layer)
        for device in DEVICE_ORDER:
            cells[device] = (cells[device][0], experts.devices.count(device))
    return {
        key: {d: (tuple(kinds), n) for d, (kinds, n) in cells.items()}
        for key, cells in rows.items()
    }


def _describe(kinds: tuple[str, ...], expert_counts: list[int], total_experts: int) -> str:
    parts = list(kinds)
    low, high = min(expert_counts), max(expert_counts)
    if high:
        count = f"{low}" if low == high else f"{low}-{high}"
        parts.append(f"{count}/{total_experts} experts")
    return ", ".join(parts)


def placement_table(plan: Plan) -> Table:
    """One row per run of layers that hold the same kinds on the same devices."""
    table = Table(title="Placement", title_justify="left")
    table.add_column("layers")
    for device in DEVICE_ORDER:
        table.add_column(DEVICE_TITLES[device])
    rows = _rows(plan)
    layers = sorted(k for k in rows if isinstance(k, int))

    def shape(layer: int) -> tuple:
        return tuple((d, rows[layer][d][0], rows[layer][d][1] > 0) for d in DEVICE_ORDER)

    runs = [("embed", ["embed"])] if "embed" in rows else []
    for _, run in groupby(layers, key=shape):
        members = list(run)
        label = f"{members[0]}" if len(members) == 1 else f"{members[0]}-{members[-1]}"
        runs.append((label, members))
    if "head" in rows:
        runs.append(("head", ["head"]))
    for label, members in runs:
        first = rows[members[0]]
        table.add_row(
            label,
            *(
                _describe(first[d][0], [rows[k][d][1] for k in members], plan.model.experts)
                for d in DEVICE_ORDER
            ),
        )
    return table


def memory_table(plan: Plan) -> Table:
    table = Table(title="Memory", title_justify="left")
    for column in ("device", "weights", "KV cache", "workspace", "total", "budget"):
        table.add_column(column, justify="left" if column == "device" else "right")
    budgets = plan.budgets
    for device in DEVICE_ORDER:
        weights = plan.totals[device] - plan.kv_cache.nbytes[device] - plan.workspace.get(device, 0)
        if device == "gpu":
            per_gpu = f" x {budgets.gpus}" if budgets.gpus > 1 else ""
            budget = gib(budgets.vram_bytes) + per_gpu if budgets.gpus else "none"
        elif device == "cpu":
            budget = gib(budgets.dram_bytes)
        else:
            budget = "-"
        table.add_row(
            DEVICE_TITLES[device],
            gib(weights),
            gib(plan.kv_cache.nbytes[device]),
            gib(plan.workspace.get(device, 0)),
            gib(plan.totals[device]),
            budget,
        )
    return table


def summary_lines(plan: Plan) -> list[str]:
    m, w, kv, p = plan.model, plan.workload, plan.kv_cache, plan.predicted
    kv_where = ", ".join(f"{gib(n)} {DEVICE_TITLES[d]}" for d, n in kv.nbytes.items() if n)
    lines = [
        f"KV cache: {kv.tokens} tokens x {_plural(kv.sequences, 'sequence')}, "
        f"{kv.bytes_per_token / 1024:.1f} KiB/token ({kv.dtype}): {kv_where or 'none'}",
    ]
    if m.experts and plan.budgets.gpus:
        basis = (
            f"profile {plan.profile}"
            if plan.profile
            else "uniform routing; --profile FILE measures it"
        )
        lines.append(
            f"GPU experts serve {plan.expert_share_gpu:.1%} of routed-expert activations ({basis})"
        )
    lines.append(
        f"Predicted: decode {p.decode_tok_s:.1f} tok/s with {_plural(w.concurrency, 'sequence')}, "
        f"bound by {RESOURCE_NAMES[p.bound]}; prefill {p.prefill_tok_s:.1f} tok/s "
        f"({min(w.prefill_chunk, w.context)}-token chunks), bound by "
        f"{RESOURCE_NAMES[p.prefill_bound]}"
    )
    lines.append(f"Hardware: {p.hardware}")
    if plan.rules:
        lines.append("Override rules: " + "  ".join(plan.rules))
    return lines


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def print_plan(plan: Plan, console: Console | None = None) -> None:
    console = console or Console()
    m, b, w = plan.model, plan.budgets, plan.workload
    experts = f", {m.experts} experts top-{m.top_k}" if m.experts else ""
    gpus = f"{b.gpus} GPU x {gib(b.vram_bytes)}" if b.gpus else "no GPU"
    console.print(
        f"[bold]{escape(m.name)}[/bold] ({m.model_type}, {m.layers} layers{experts}), "
        f"weights {m.weights}: {gib(m.weight_bytes)}"
    )
    console.print(
        f"budgets: {gpus}, DRAM {gib(b.dram_bytes)}; context {w.context} x {w.concurrency}, "
        f"prefill chunk {w.prefill_chunk}"
    )
    console.print(placement_table(plan))
    console.print(memory_table(plan))
    for line in summary_lines(plan):
        console.print(line, markup=False, highlight=False)
    for warning in plan.warnings:
        console.print(f"[bold red]WARNING: {escape(warning)}[/bold red]")
