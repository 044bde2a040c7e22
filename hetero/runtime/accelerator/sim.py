"""The sim lane: the accelerator's share of a model run on this CPU, in the lane's own thread
(torch and Numba with one thread there: on two cores, one core per lane), within its own
memory budget, with copies through staging buffers that can be rate-limited to a "PCIe" rate.
It lets the hybrid engine's overlap, budgets and failures be built and tested without a GPU."""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch

from hetero.runtime.accelerator.lane import Lane
from hetero.runtime.expert_worker import WorkerHandle

DIRECTIONS = ("to_lane", "to_host")


def in_modes(modes: tuple[bool, bool], fn: Callable[..., Any], *args: Any) -> Any:
    grad, inference = modes
    with torch.inference_mode(inference), torch.set_grad_enabled(grad):
        return fn(*args)


class SimLane(Lane):
    kind = "sim"
    device = torch.device("cpu")

    def __init__(self, vram_bytes: int, pcie_gbs: float | None = None):
        super().__init__(vram_bytes)
        self.pcie_gbs = pcie_gbs  # None: copies run at memcpy speed, only accounted
        self.copied_bytes = {d: 0 for d in DIRECTIONS}
        self.copy_seconds = {d: 0.0 for d in DIRECTIONS}
        self._staging = {d: torch.empty(0, dtype=torch.uint8) for d in DIRECTIONS}
        self._staging_locks = {d: threading.Lock() for d in DIRECTIONS}
        self._jobs: queue.SimpleQueue[WorkerHandle] = queue.SimpleQueue()
        ready = threading.Event()
        host_threads = torch.get_num_threads()
        self.thread = threading.Thread(
            target=self._run, args=(ready,), name="hetero-sim-lane", daemon=True
        )
        self.thread.start()
        ready.wait()
        # torch's thread count is process-wide but each thread keeps the count it had set
        # (OpenMP): the lane keeps 1, the host gets its own back
        torch.set_num_threads(host_threads)

    def _run(self, ready: threading.Event) -> None:
        import numba

        torch.get_num_threads()  # torch's lazy per-thread setup first, or it undoes the next line
        torch.set_num_threads(1)
        numba.set_num_threads(1)
        ready.set()
        while True:
            self._jobs.get().run()

    def submit(self, fn: Callable[..., Any], *args: Any) -> WorkerHandle:
        # autograd's modes are per thread: the lane runs fn under the submitter's
        modes = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        handle = WorkerHandle(in_modes, (modes, fn, *args))
        self._jobs.put(handle)
        return handle

    def to_lane(self, x: torch.Tensor) -> torch.Tensor:
        nbytes = x.numel() * x.element_size()
        self.reserve(nbytes, f"an activation of {tuple(x.shape)}")
        out = self._copy(x, "to_lane")
        weakref.finalize(out, self.release, nbytes)
        return out

    def upload(self, x: torch.Tensor) -> torch.Tensor:
        return self._copy(x, "to_lane")

    def to_host(self, x: torch.Tensor) -> torch.Tensor:
        return self._copy(x, "to_host")

    def _copy(self, x: torch.Tensor, direction: str) -> torch.Tensor:
        """x through the direction's staging buffer (host memory, grown to the largest copy):
        the same two copies as a pinned-buffer copy."""
        began = time.perf_counter()
        raw = x.detach().contiguous().reshape(-1).view(torch.uint8)
        with self._staging_locks[direction]:
            staging = self._staging[direction]
            if raw.numel() > staging.numel():
                staging = self._staging[direction] = torch.empty(raw.numel(), dtype=torch.uint8)
            staging[: raw.numel()].copy_(raw)
            out = staging[: raw.numel()].clone()
        if self.pcie_gbs:
            left = raw.numel() / (self.pcie_gbs * 1e9) - (time.perf_counter() - began)
            if left > 0:
                time.sleep(left)
        self.copied_bytes[direction] += raw.numel()
        self.copy_seconds[direction] += time.perf_counter() - began
        return out.view(x.dtype).view(x.shape)
