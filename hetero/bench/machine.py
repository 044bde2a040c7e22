"""What a bench result was measured on: CPU model and the instruction sets the kernels pick
from, cores, RAM, accelerator, load, and the versions of everything that ran."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

# the CPU flags hetero's kernels and llama.cpp choose their paths by
KERNEL_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "sve",
)
VERSIONED = ("hetero", "torch", "numpy", "numba", "transformers", "gguf")


def cpu_model_and_flags() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine()):
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model, [f for f in KERNEL_FLAGS if f in flags]


def accelerator_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def machine_info(llama_bench: str | None) -> dict:
    import psutil

    model, flags = cpu_model_and_flags()
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    if llama_bench:
        versions["llama-bench"] = llama_bench_version(llama_bench)
    return {
        "cpu": model,
        "cpu_flags": flags,
        "cores": psutil.cpu_count(logical=False),
        "threads": os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "accelerator": accelerator_name(),
        "load_average": list(os.getloadavg()),
        "os": platform.platform(),
        "versions": versions,
    }


def llama_bench_version(binary: str) -> str:
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def machine_slug(info: dict) -> str:
    """A folder name for the machine kind: "amd-epyc-9r14-2c", plus the accelerator."""
    words = [info["cpu"], f"{info['threads']}c"]
    if info["accelerator"]:
        words.append(info["accelerator"])
    text = "-".join(words).lower()
    text = re.sub(r"\(r\)|\(tm\)|processor|cpu|\d+-core", "", text)
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")
