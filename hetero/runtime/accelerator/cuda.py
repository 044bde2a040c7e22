"""The cuda lane: a CUDA device with a compute stream and a copy stream. Host -> device copies
go through pinned staging buffers on the copy stream, and the compute stream waits on their
event; results come back the same way. An out-of-memory of the device is the lane's
`AcceleratorOutOfMemoryError`, like the budget's own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hetero.runtime.accelerator.lane import (
    AcceleratorOutOfMemoryError,
    AcceleratorUnavailableError,
    Lane,
)


class CudaHandle:
    """Work enqueued on the compute stream: wait() blocks on its event."""

    def __init__(self, result: Any, done: torch.cuda.Event):
        self.result, self.done = result, done

    def wait(self) -> Any:
        self.done.synchronize()
        return self.result


class CudaLane(Lane):
    kind = "cuda"

    def __init__(self, vram_bytes: int, index: int = 0):
        if not torch.cuda.is_available():
            raise AcceleratorUnavailableError(
                "--accelerator cuda: no CUDA device is visible (torch "
                f"{torch.__version__} sees none); use --accelerator sim to simulate one, or none"
            )
        super().__init__(vram_bytes)
        self.device = torch.device("cuda", index)
        self.compute = torch.cuda.Stream(self.device)
        self.copy = torch.cuda.Stream(self.device)
        self._pinned: dict[str, torch.Tensor] = {}

    def _staging(self, direction: str, nbytes: int) -> torch.Tensor:
        buffer = self._pinned.get(direction)
        if buffer is None or buffer.numel() < nbytes:
            buffer = self._pinned[direction] = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        return buffer[:nbytes]

    def to_lane(self, x: torch.Tensor) -> torch.Tensor:
        if x.device == self.device:
            return x
        raw = x.detach().contiguous().reshape(-1).view(torch.uint8)
        staging = self._staging("to_lane", raw.numel())
        staging.copy_(raw)
        with torch.cuda.stream(self.copy), out_of_memory_as_lane_error():
            out = torch.empty(raw.numel(), dtype=torch.uint8, device=self.device)
            out.copy_(staging, non_blocking=True)
            arrived = torch.cuda.Event()
            arrived.record(self.copy)
        self.compute.wait_event(arrived)
        arrived.synchronize()  # the staging buffer is reused by the next copy
        # activations are charged by CUDA's allocator itself (its out-of-memory is the lane's)
        return out.view(x.dtype).view(x.shape)

    def to_host(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return x
        raw = x.detach().contiguous().reshape(-1).view(torch.uint8)
        staging = self._staging("to_host", raw.numel())
        self.copy.wait_stream(self.compute)
        with torch.cuda.stream(self.copy):
            staging.copy_(raw, non_blocking=True)
        self.copy.synchronize()
        return staging.clone().view(x.dtype).view(x.shape)

    def submit(self, fn: Callable[..., Any], *args: Any) -> CudaHandle:
        with torch.cuda.stream(self.compute), out_of_memory_as_lane_error():
            result = fn(*args)
            done = torch.cuda.Event()
            done.record(self.compute)
        return CudaHandle(result, done)


class out_of_memory_as_lane_error:
    """CUDA's out-of-memory as the lane's error, so the CLI and server report it as one."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if isinstance(error, torch.cuda.OutOfMemoryError):
            raise AcceleratorOutOfMemoryError(
                f"the CUDA device is out of memory ({str(error).splitlines()[0]}); plan with a "
                f"smaller --vram-budget"
            ) from None
        return False
