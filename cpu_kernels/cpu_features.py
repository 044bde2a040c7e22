"""The host CPU's features and the kernel path they choose. Paths form a chain, fastest first:
amx -> avx512 -> avx2 -> plain. A process runs the first path whose features this CPU has, unless
HETERO_CPU_KERNEL_PATH names one; a format without a kernel of that path runs the next one's."""

from __future__ import annotations

import ctypes
import functools
import logging
import os

import llvmlite.binding as llvm_binding

from hetero.errors import HeteroError

log = logging.getLogger(__name__)

# Each path and the CPU features (as LLVM names them) its kernels may use, fastest first. The
# AVX2 kernels also use FMA and F16C, which every AVX2 CPU of either vendor has; the AVX-512
# ones VNNI (vpdpbusd) and BF16 (vdpbf16ps), which Zen 4 and Sapphire Rapids have and Skylake
# servers lack; the AMX ones everything before them too.
AVX2_FEATURES = ("avx2", "fma", "f16c")
AVX512_FEATURES = (*AVX2_FEATURES, "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512bf16")
PATH_FEATURES: dict[str, tuple[str, ...]] = {
    "amx": (*AVX512_FEATURES, "amx-tile", "amx-int8", "amx-bf16"),
    "avx512": AVX512_FEATURES,
    "avx2": AVX2_FEATURES,
    "plain": (),
}
KERNEL_PATHS = tuple(PATH_FEATURES)
PATH_ENV = "HETERO_CPU_KERNEL_PATH"  # force a path, e.g. "plain" on a machine with AVX2

# Linux keeps AMX tile data off until a process asks for it (arch_prctl; see the kernel's
# Documentation/arch/x86/xstate.rst); a tile instruction before that kills the process.
SYS_ARCH_PRCTL = 158  # x86-64
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18


class KernelPathError(HeteroError):
    """HETERO_CPU_KERNEL_PATH names a path that does not exist or that this CPU cannot run (the
    CLI prints it as one line and exits 2)."""


@functools.cache  # asking LLVM for the host's features costs ~0.15 ms, more than a small GEMV
def host_cpu_features() -> dict[str, bool]:
    """This CPU's features as LLVM names them ("avx2", "avx512bf16", "amx-tile", ...)."""
    return dict(llvm_binding.get_host_cpu_features())


@functools.cache  # the request holds for the whole process: made once
def amx_permitted() -> bool:
    """Ask Linux for AMX tile data in this process; False (with the reason logged) if refused."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0:
        return True
    errno = ctypes.get_errno()
    log.warning(
        "AMX: Linux refused tile data to this process (arch_prctl: %s); the CPU kernels run "
        "the avx512 path instead",
        os.strerror(errno),
    )
    return False


def available_kernel_paths() -> tuple[str, ...]:
    """The paths this CPU can run, fastest first (the plain one always)."""
    features = host_cpu_features()
    return tuple(
        path
        for path, needs in PATH_FEATURES.items()
        if all(features.get(f) for f in needs) and (path != "amx" or amx_permitted())
    )


def host_kernel_path() -> str:
    """The fastest path this CPU runs, unless HETERO_CPU_KERNEL_PATH names one."""
    return _kernel_path(os.environ.get(PATH_ENV))


@functools.cache  # every GEMV call asks: resolved once per setting
def _kernel_path(forced: str | None) -> str:
    available = available_kernel_paths()
    if forced and forced not in available:
        why = "this CPU lacks it" if forced in KERNEL_PATHS else "no such path"
        raise KernelPathError(
            f"{PATH_ENV}={forced!r}: {why}; this CPU runs {', '.join(available)} (unset it or "
            f"pick one of those)"
        )
    return forced or available[0]


def kernel_of_path(kernels: dict, path: str):
    """The kernel of `path` in `kernels` (path -> kernel, one format's), or of the first path
    after it in the chain that has one: every format has a plain kernel."""
    if path not in KERNEL_PATHS:
        raise KernelPathError(f"no kernel path {path!r}: the paths are {', '.join(KERNEL_PATHS)}")
    return next(kernels[p] for p in KERNEL_PATHS[KERNEL_PATHS.index(path) :] if p in kernels)
