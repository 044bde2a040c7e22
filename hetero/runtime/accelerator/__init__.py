"""Accelerator lanes: where the groups a plan puts on "gpu" run. `cuda` (a CUDA device with a
compute and a copy stream) and `sim` (a CPU thread with its own memory budget, the stand-in
that lets the hybrid engine be built and tested without a GPU) share one interface, `Lane`."""

from __future__ import annotations

from hetero.runtime.accelerator.lane import (
    AcceleratorOutOfMemoryError,
    AcceleratorUnavailableError,
    Lane,
)

ACCELERATORS = ("cuda", "sim", "none")

__all__ = [
    "ACCELERATORS",
    "AcceleratorOutOfMemoryError",
    "AcceleratorUnavailableError",
    "Lane",
    "default_accelerator",
    "open_lane",
]


def default_accelerator() -> str:
    """ "cuda" where a CUDA device is visible, else "none"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "none"


def open_lane(accelerator: str, vram_bytes: int, pcie_gbs: float | None = None) -> Lane | None:
    """The lane of `--accelerator` with a memory budget of `vram_bytes` (None for "none").
    `pcie_gbs`: the sim lane's copy rate (None: copies at memcpy speed)."""
    if accelerator == "none":
        return None
    if accelerator == "sim":
        from hetero.runtime.accelerator.sim import SimLane

        return SimLane(vram_bytes, pcie_gbs)
    if accelerator == "cuda":
        from hetero.runtime.accelerator.cuda import CudaLane

        return CudaLane(vram_bytes)
    raise AcceleratorUnavailableError(
        f"unknown accelerator {accelerator!r}; choose one of {', '.join(ACCELERATORS)}"
    )
