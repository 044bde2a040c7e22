"""What every launcher checks before a kernel runs: tensor ranks, sizes, dtypes and devices,
each failure one line naming the argument and what was expected."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class KernelInputError(ValueError):
    """A launcher's argument has the wrong shape, dtype or device for its kernel."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise KernelInputError(message)


def require_shape(name: str, t: torch.Tensor, shape: tuple[int | None, ...], names: str) -> None:
    """t must have len(shape) dimensions, each equal to its entry where that is not None;
    `names` spells the dimensions for the message ("[tokens, heads, d]")."""
    sizes = tuple(t.shape)
    fits = len(sizes) == len(shape) and all(
        s is None or s == n for s, n in zip(shape, sizes, strict=True)
    )
    want = ", ".join("*" if s is None else str(s) for s in shape)
    require(fits, f"{name}: expected {names} = [{want}], got {list(sizes)}")


def require_float_rows(name: str, t: torch.Tensor) -> None:
    """A float tensor whose last dimension the kernels may index with unit stride."""
    require(
        t.dtype in FLOAT_DTYPES, f"{name}: expected float32, float16 or bfloat16, not {t.dtype}"
    )
    require(t.stride(-1) == 1, f"{name}: the last dimension must be contiguous (.contiguous())")


def require_int(name: str, t: torch.Tensor) -> None:
    require(
        t.dtype in (torch.int32, torch.int64), f"{name}: expected int32 or int64, not {t.dtype}"
    )


def require_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    require(
        len(set(devices.values())) == 1,
        "tensors on different devices: " + ", ".join(f"{n} on {d}" for n, d in devices.items()),
    )


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: float32 inputs are multiplied in full precision ("ieee"), where
    Triton's default (tf32) would round them to 10-bit mantissas; half types ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def next_power_of_2(n: int, least: int = 16) -> int:
    """Tile width covering n (tl.arange needs powers of two; tl.dot at least 16)."""
    return max(least, 1 << max(n - 1, 0).bit_length())
