"""The interface every accelerator lane has: a memory budget that refuses what exceeds it (as
CUDA's allocator does), copies host -> lane and lane -> host through staging buffers, and
work submitted in order to the lane's compute queue, each with a handle to wait on."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from hetero.errors import CapacityError, HeteroError
from hetero.runtime.engine import SWITCH_INTERVAL_S
from placement.sizes import MIB


class AcceleratorUnavailableError(HeteroError):
    """An accelerator was asked for that this machine or build does not have."""


class AcceleratorOutOfMemoryError(CapacityError):
    """The accelerator's memory budget (or the device itself) cannot hold an allocation."""


class LaneHandle(Protocol):
    """Work under way on a lane: `wait()` blocks until it is done and returns its result (on
    the lane), or raises what it raised."""

    def wait(self) -> Any: ...


def tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


class Lane:
    """What the runtime asks of an accelerator. Subclasses give `device`, `kind` and the copy
    and compute primitives; the budget accounting is shared."""

    kind: str
    device: torch.device

    def __init__(self, vram_bytes: int):
        # three threads hand the GIL around in a hybrid step (the host, the expert worker, the
        # lane's); at the default 5 ms switch interval one waits out the others' Python glue
        # and the CPU and lane parts ran one after the other (engine_overlap_bench.py)
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        self.vram_bytes = vram_bytes
        self.used_bytes = 0
        self._budget_lock = threading.Lock()

    # ---- memory ----------------------------------------------------------------------------

    def reserve(self, nbytes: int, what: str) -> None:
        """Charge `nbytes` for `what` to the budget; refuses what does not fit."""
        with self._budget_lock:
            if self.used_bytes + nbytes > self.vram_bytes:
                free = self.vram_bytes - self.used_bytes
                raise AcceleratorOutOfMemoryError(
                    f"the {self.kind} accelerator is out of memory: {what} needs "
                    f"{nbytes / MIB:.2f} MiB but {free / MIB:.2f} MiB of its "
                    f"{self.vram_bytes / MIB:.2f} MiB budget are free; plan with a bigger "
                    f"--vram-budget, or a shorter prompt or context"
                )
            self.used_bytes += nbytes

    def release(self, nbytes: int) -> None:
        with self._budget_lock:
            self.used_bytes -= nbytes

    def place(self, module: nn.Module, what: str) -> nn.Module:
        """`module` with its tensors moved to the lane, charged to the budget. Tensors are
        copied, not moved in place: a weight tied to a host module stays on the host."""
        self.reserve(tensor_bytes(module), what)
        if module_on(module, self.device):
            return module
        for name, param in list(module.named_parameters(recurse=True)):
            owner, _, leaf = name.rpartition(".")
            target = module.get_submodule(owner) if owner else module
            moved = self.upload(param.detach())
            setattr(target, leaf, nn.Parameter(moved, requires_grad=False))
        for name, buffer in list(module.named_buffers(recurse=True)):
            owner, _, leaf = name.rpartition(".")
            target = module.get_submodule(owner) if owner else module
            setattr(target, leaf, self.upload(buffer))
        return module

    # ---- copies and compute (per lane) -----------------------------------------------------

    def to_lane(self, x: torch.Tensor) -> torch.Tensor:
        """A host tensor's copy on the lane, ordered before work submitted after it (an
        activation: its memory is the lane's while the copy lives)."""
        raise NotImplementedError

    def upload(self, x: torch.Tensor) -> torch.Tensor:
        """A weight's copy on the lane, at load (its caller charged the budget for it)."""
        return self.to_lane(x)

    def to_host(self, x: torch.Tensor) -> torch.Tensor:
        """A lane tensor's copy on the host, once the work that made it is done."""
        raise NotImplementedError

    def submit(self, fn: Callable[..., Any], *args: Any) -> LaneHandle:
        """Queue fn(*args) on the lane's compute queue, in submission order."""
        raise NotImplementedError

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.submit(fn, *args).wait()

    def describe(self) -> str:
        return f"{self.kind} accelerator, {self.vram_bytes / MIB:.1f} MiB budget"


def module_on(module: nn.Module, device: torch.device) -> bool:
    return all(t.device == device for t in (*module.parameters(), *module.buffers()))
