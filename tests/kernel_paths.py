"""The kernel paths a format's tests run on: each path of the chain that has a kernel of the
format's own and that this CPU runs; the others are skipped with the reason."""

import pytest

from cpu_kernels.cpu_features import KERNEL_PATHS, available_kernel_paths


def runnable_paths(kernels: dict) -> list[str]:
    """The paths of `kernels` (path -> a format's kernel) that this CPU runs."""
    return [path for path in available_kernel_paths() if path in kernels]


def path_params(kernels: dict) -> list:
    """pytest params of every path in the chain, skipped where the format has no kernel of its
    own for it (it runs the next path's) or this CPU lacks it."""
    available = available_kernel_paths()
    params = []
    for path in KERNEL_PATHS:
        if path not in kernels:
            reason = f"no {path} kernel of this format (it runs the next path's)"
        elif path not in available:
            reason = f"this CPU has no {path} path"
        else:
            reason = None
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(path, marks=marks, id=path))
    return params
