"""What a plan must fit: memory budgets per device (`24GiB`, `80%`, or this machine's free
memory minus a reserve) and the workload that sizes the KV cache and workspace."""

from __future__ import annotations

from dataclasses import dataclass

from placement.errors import PlacementError
from placement.sizes import GIB, MIB, parse_size

DEFAULT_CONTEXT = 4096  # tokens per sequence a plan sizes the KV cache for, unless told

KV_BYTES = {"f32": 4, "f16": 2, "bf16": 2}


@dataclass(frozen=True)
class Budgets:
    vram_bytes: int  # per GPU
    gpus: int
    dram_bytes: int


@dataclass(frozen=True)
class Workload:
    context: int  # tokens per sequence (prompt and completion)
    concurrency: int = 1  # sequences held in the KV cache at once
    prefill_chunk: int = 512  # prompt tokens per forward
    kv_dtype: str = "bf16"


@dataclass(frozen=True)
class MachineMemory:
    vram_total: list[int]  # per GPU
    vram_free: list[int]
    dram_total: int
    dram_available: int


def machine_memory() -> MachineMemory:
    import psutil
    import torch

    total, free = [], []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free_bytes, total_bytes = torch.cuda.mem_get_info(i)
            free.append(int(free_bytes))
            total.append(int(total_bytes))
    memory = psutil.virtual_memory()
    return MachineMemory(total, free, int(memory.total), int(memory.available))


def vram_reserve(total: int) -> int:
    """Left free on a GPU by the default budget: fragmentation and other processes."""
    return max(512 * MIB, total // 20)


def dram_reserve(total: int) -> int:
    """Left free in DRAM by the default budget: the OS, page cache for the model file."""
    return max(GIB, total // 20)


def resolve_budgets(
    vram: str | None, dram: str | None, gpus: int | None, machine: MachineMemory
) -> Budgets:
    """Budgets from `--vram-budget`, `--dram-budget` and `--gpus`; what is not given comes
    from `machine`. A VRAM size without a GPU here plans for one (another machine)."""
    detected = len(machine.vram_total)
    if gpus is None:
        gpus = detected if detected or vram is None else 1
    if gpus < 0:
        raise PlacementError(f"--gpus must be >= 0, got {gpus}")
    if gpus == 0:
        vram_bytes = 0
    elif vram is None:
        free = machine.vram_free[:gpus]
        vram_bytes = max(0, min(free) - vram_reserve(max(machine.vram_total))) if free else 0
    elif vram.strip().endswith("%") and not detected:
        raise PlacementError(
            f"--vram-budget {vram}: no GPU is visible here to take a share of; give a size "
            f"such as 24GiB"
        )
    else:
        total = min(machine.vram_total) if detected else None
        vram_bytes = parse_size(vram, total, "--vram-budget")
    if dram is None:
        dram_bytes = max(0, machine.dram_available - dram_reserve(machine.dram_total))
    else:
        dram_bytes = parse_size(dram, machine.dram_total, "--dram-budget")
    return Budgets(vram_bytes=vram_bytes, gpus=gpus if vram_bytes else 0, dram_bytes=dram_bytes)


def check_workload(workload: Workload, context_limit: int, model_name: str) -> None:
    if workload.kv_dtype not in KV_BYTES:
        raise PlacementError(
            f"unknown KV cache type {workload.kv_dtype!r}; choose {', '.join(KV_BYTES)}"
        )
    for name, value in (
        ("--context", workload.context),
        ("--concurrency", workload.concurrency),
        ("--prefill-chunk", workload.prefill_chunk),
    ):
        if value < 1:
            raise PlacementError(f"{name} must be >= 1, got {value}")
    if workload.context > context_limit:
        raise PlacementError(
            f"--context {workload.context} exceeds the {context_limit} positions "
            f"{model_name} supports"
        )
