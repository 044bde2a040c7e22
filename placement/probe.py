"""`hetero probe`: measure the rates the cost model needs on this machine: DRAM read
bandwidth (a Numba parallel read loop), a CPU matrix-vector and matmul rate (torch), and with
a GPU its memory bandwidth, pinned host<->device copy bandwidth and bf16 matmul rate."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numba
import numpy as np

from placement.hardware import DEFAULT_RATES, Hardware, host_id
from placement.sizes import MIB


@numba.njit(parallel=True, fastmath=True, cache=True)
def _sum_all(values: np.ndarray) -> float:
    # a long contiguous loop with a float accumulator: LLVM vectorises it, prange splits it
    total = 0.0
    for i in numba.prange(values.size):
        total += values[i]
    return total


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm up: JIT, page faults, caches
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def measure_dram_read_gbs(nbytes: int = 1024 * MIB, repeats: int = 5) -> float:
    values = np.ones(nbytes // 4, dtype=np.float32)
    return values.nbytes / best_seconds(lambda: _sum_all(values), repeats) / 1e9


def measure_cpu_gemv_gbs(nbytes: int = 256 * MIB, repeats: int = 5) -> float:
    """Weight bytes per second of a float32 matrix-vector product (the decode pattern)."""
    import torch

    cols = 4096
    weights = torch.ones(nbytes // (4 * cols), cols)
    x = torch.ones(cols)
    return weights.numel() * 4 / best_seconds(lambda: weights @ x, repeats) / 1e9


def cpu_has_bf16_matmul() -> bool:
    """AVX-512 BF16 or AMX: without them torch's bfloat16 matmul runs at a few GFLOP/s."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def measure_cpu_matmul_gflops(tokens: int = 512, repeats: int = 3) -> float:
    """Matmul rate at an expert's shape, [512 x 2048] @ [2048 x 1536], in float32 or, where
    the CPU has bf16 instructions and it is faster, bfloat16."""
    import torch

    rates = []
    for dtype in (torch.float32, torch.bfloat16) if cpu_has_bf16_matmul() else (torch.float32,):
        a = torch.ones(tokens, 2048, dtype=dtype)
        b = torch.ones(2048, 1536, dtype=dtype)
        rates.append(2 * tokens * 2048 * 1536 / best_seconds(lambda a=a, b=b: a @ b, repeats))
    return max(rates) / 1e9


def measure_gpu(nbytes: int = 1024 * MIB) -> dict[str, float | str]:
    """GPU 0: device copy (read + write), pinned copies both ways, bf16 matmul."""
    import torch

    def timed(run: Callable[[], object], repeats: int = 5) -> float:
        run()
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            run()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / 1e3 / repeats

    device = torch.device("cuda", 0)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    n = 8192
    a = torch.ones(n, n, dtype=torch.bfloat16, device=device)
    return {
        "gpu_name": torch.cuda.get_device_name(device),
        "hbm_gbs": 2 * nbytes / timed(lambda: dst.copy_(src)) / 1e9,
        "h2d_gbs": nbytes / timed(lambda: src.copy_(host, non_blocking=True)) / 1e9,
        "d2h_gbs": nbytes / timed(lambda: host.copy_(src, non_blocking=True)) / 1e9,
        "gpu_matmul_tflops": 2 * n**3 / timed(lambda: a @ a) / 1e12,
    }


def probe_machine(buffer_bytes: int = 1024 * MIB) -> Hardware:
    """Measure this machine (about ten seconds with the default 1 GiB DRAM buffer; the
    matrix-vector buffer is a quarter of it)."""
    import torch

    rates = dict(DEFAULT_RATES)
    rates["dram_read_gbs"] = measure_dram_read_gbs(buffer_bytes)
    rates["cpu_gemv_gbs"] = measure_cpu_gemv_gbs(max(buffer_bytes // 4, MIB))
    rates["cpu_matmul_gflops"] = measure_cpu_matmul_gflops()
    gpu_name = ""
    if torch.cuda.is_available():
        gpu = measure_gpu()
        gpu_name = str(gpu.pop("gpu_name"))
        rates.update(gpu)
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return Hardware(
        source=f"hetero probe, {now}",
        host=host_id(),
        cpu_threads=numba.get_num_threads() or os.cpu_count() or 1,
        gpu_name=gpu_name,
        **rates,
    )
