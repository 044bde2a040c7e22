"""Where the gpu_kernels tests run and in which dtypes: CUDA when present (or
HETERO_TEST_DEVICE=cuda), else Triton's interpreter on the CPU. conftest.py imports this first:
Triton reads TRITON_INTERPRET when a kernel is defined, so it must be set before any test module
imports gpu_kernels (nothing but Triton reads it)."""

import inspect
import os

import pytest
import torch

DEVICE = torch.device(
    os.environ.get("HETERO_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
)
if DEVICE.type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# the interpreter computes in numpy, which has no bfloat16: its bf16 loads come back wrong
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(INTERPRETED, reason="Triton's interpreter gets bf16 loads wrong"),
    ),
]

# unit roundoff: half the distance from 1 to the next number of the dtype
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def seeded_generator(request: pytest.FixtureRequest) -> torch.Generator:
    """A fresh random seed per test (HETERO_TEST_SEED replays one), printed with the test."""
    seed = int(os.environ.get("HETERO_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"{request.node.name}: seed {seed} (replay: HETERO_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype, generator: torch.Generator) -> torch.Tensor:
    """Standard normal values drawn on the CPU (reproducible from the seed), moved to DEVICE."""
    return torch.randn(shape, generator=generator).to(dtype=dtype, device=DEVICE)


def require_triton() -> None:
    """Skip the calling test module where Triton is missing (macOS), and under the interpreter
    mend its loop bounds: Triton 3.5's interpreter turns a loaded scalar (a one-value array)
    into a range bound with int(array), which numpy >= 2.4 refuses (triton-lang/triton#9171,
    fixed upstream by squeezing the array first)."""
    pytest.importorskip("triton", reason="gpu_kernels need Triton (Linux)")
    if not INTERPRETED:
        return
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor
    if getattr(patch_tensor, "squeezes_scalars", False):
        return
    if "squeeze()" in inspect.getsource(patch_tensor):  # a Triton with the fix (3.9 has it)
        return

    def patch_and_squeeze(tensor):
        patch_tensor(tensor)
        tensor.__index__ = lambda self: int(self.handle.data.squeeze())

    patch_and_squeeze.squeezes_scalars = True
    interpreter._patch_lang_tensor = patch_and_squeeze


def rounding_error(dtype: torch.dtype, values: torch.Tensor) -> torch.Tensor:
    """The most rounding `values` to dtype can change them: u |v|, or half a subnormal step
    (tiny * u) near zero."""
    unit = UNIT_ROUNDOFF[dtype]
    return unit * values.abs() + torch.finfo(dtype).tiny * unit
