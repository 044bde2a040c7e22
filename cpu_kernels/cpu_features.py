"""The host CPU's features and the kernel path they choose: every grouped GEMV has a kernel per
path, and a process runs the fastest path this CPU has unless HETERO_CPU_KERNEL_PATH names one."""

from __future__ import annotations

import functools
import os

import llvmlite.binding as llvm_binding

KERNEL_PATHS = ("avx2", "plain")  # fastest first
PATH_ENV = "HETERO_CPU_KERNEL_PATH"  # force a path, e.g. "plain" on a machine with AVX2


@functools.cache  # asking LLVM for the host's features costs ~0.15 ms, more than a small GEMV
def host_cpu_features() -> dict[str, bool]:
    """This CPU's features as LLVM names them ("avx2", "avx512bf16", ...)."""
    return dict(llvm_binding.get_host_cpu_features())


def available_kernel_paths() -> tuple[str, ...]:
    """The paths this CPU can run (the plain one always). The AVX2 kernels also use FMA and
    F16C, which every AVX2 CPU of either vendor has; checked all the same."""
    features = host_cpu_features()
    avx2 = all(features.get(f) for f in ("avx2", "fma", "f16c"))
    return KERNEL_PATHS if avx2 else ("plain",)


def host_kernel_path() -> str:
    """The fastest path this CPU runs, unless HETERO_CPU_KERNEL_PATH names one."""
    return _kernel_path(os.environ.get(PATH_ENV))


@functools.cache  # every GEMV call asks: resolved once per setting
def _kernel_path(forced: str | None) -> str:
    available = available_kernel_paths()
    if forced:
        if forced not in available:
            raise ValueError(
                f"{PATH_ENV}={forced!r}: this CPU runs {', '.join(available)}; "
                f"unset it or pick one of those"
            )
        return forced
    return available[0]
