"""The machine rates the cost model divides by: measured by `hetero probe` and cached as JSON
(under $HETERO_CACHE or ~/.cache/hetero), or the documented defaults below."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from hetero.cache import cache_root
from placement.errors import PlacementError

PROBE_FILE = "probe.json"


@dataclass(frozen=True)
class Hardware:
    source: str  # "defaults", or where and when a probe measured the figures
    host: str  # the machine the figures belong to (see `host_id`)
    cpu_threads: int
    dram_read_gbs: float  # parallel read loop over a buffer far larger than the caches
    cpu_gemv_gbs: float  # weight bytes per second a CPU matrix-vector product streams
    cpu_matmul_gflops: float  # CPU matmul at expert shapes (prefill)
    disk_read_gbs: float  # mmap'd weights paged in from the model file
    gpu_name: str  # "" without a GPU
    hbm_gbs: float  # GPU memory, device-to-device copy
    h2d_gbs: float  # pinned host -> device copy
    d2h_gbs: float  # device -> pinned host copy
    gpu_matmul_tflops: float  # bf16 matmul
    transfer_latency_us: float  # one small host<->device copy with its synchronisation
    gpu_layer_overhead_us: float  # launching one layer's kernels
    cpu_layer_overhead_us: float  # waking and joining the CPU threads once per layer
    # fixed GPU memory beside weights, KV cache and activations: cuBLAS workspaces, CUDA graph
    # pools, allocator slack (a probe written before this field existed gets the default)
    gpu_fixed_workspace_bytes: int = 512 * 2**20

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


# Defaults (no probe): a desktop with dual-channel DDR5 and a PCIe 4 NVMe SSD, and an
# RTX 4090-class GPU on PCIe 4 x16 for plans that have a GPU budget.
DEFAULT_RATES = dict(
    dram_read_gbs=50.0,
    cpu_gemv_gbs=35.0,  # 70% of DRAM: the target of hetero's quantised CPU expert kernels
    cpu_matmul_gflops=300.0,
    disk_read_gbs=3.0,
    hbm_gbs=900.0,
    h2d_gbs=25.0,
    d2h_gbs=25.0,
    gpu_matmul_tflops=80.0,
    transfer_latency_us=10.0,
    gpu_layer_overhead_us=30.0,
    cpu_layer_overhead_us=20.0,
)


def host_id() -> str:
    """Host name, CPU model and core count: a probe is valid for this machine only."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()} | {cpu} | {os.cpu_count()} cores"


def default_hardware() -> Hardware:
    return Hardware(
        source="defaults (run `hetero probe` to measure this machine)",
        host=host_id(),
        cpu_threads=os.cpu_count() or 1,
        gpu_name="",
        **DEFAULT_RATES,
    )


def sim_accelerator(hardware: Hardware, pcie_gbs: float | None = None) -> Hardware:
    """`hardware` with the GPU figures of the sim lane (hetero/runtime/accelerator/sim.py): one
    CPU core of this machine that runs the accelerator's groups, copies through a staging
    buffer at `pcie_gbs` (None: memcpy speed, about the DRAM rate), and has no fixed
    workspace (its budget is weights, KV cache and activations only)."""
    core_share = 1 / max(hardware.cpu_threads, 1)
    copy_gbs = pcie_gbs or hardware.dram_read_gbs
    return dataclasses.replace(
        hardware,
        gpu_name="sim (one CPU core)",
        hbm_gbs=hardware.cpu_gemv_gbs * core_share,
        gpu_matmul_tflops=hardware.cpu_matmul_gflops * core_share / 1000,
        h2d_gbs=copy_gbs,
        d2h_gbs=copy_gbs,
        transfer_latency_us=20.0,  # a hand-off to the lane's thread and back
        gpu_layer_overhead_us=hardware.cpu_layer_overhead_us,
        gpu_fixed_workspace_bytes=0,
    )


def read_hardware(path: Path) -> Hardware:
    try:
        data = json.loads(path.read_text())
        return Hardware(**data)
    except FileNotFoundError:
        raise PlacementError(f"hardware file {path} does not exist") from None
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as err:
        raise PlacementError(
            f"{path} is not a probe written by `hetero probe` ({err}); run it again"
        ) from None


def load_hardware(path: str | Path | None = None) -> Hardware:
    """`path` (a probe of any machine, to plan for it), else this machine's cached probe,
    else the defaults."""
    if path is not None:
        return read_hardware(Path(path))
    cached = cache_root() / PROBE_FILE
    if cached.is_file():
        try:
            hardware = read_hardware(cached)
        except PlacementError:
            return default_hardware()
        if hardware.host == host_id():
            return hardware
    return default_hardware()


def save_hardware(hardware: Hardware) -> Path:
    path = cache_root() / PROBE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(hardware.to_json() + "\n")
    return path
