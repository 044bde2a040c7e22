"""The dtype prefill multiplies dequantised weight tiles in (quantised experts and linears, and
weights on disk): bfloat16 where the CPU multiplies it natively (AVX-512 BF16; AMX, which torch's
oneDNN uses for bf16), float32 elsewhere. Set HETERO_PREFILL_DTYPE=f32 or bf16 to force one.

Why: at expert shapes torch's bf16 matmul ran 1.7x (Q8_0) to 4.4x (Q4_K) faster than float32
on a Zen 4 machine (bench/results/prefill-matmul.md); its rounding (relative error ~5e-3 per
layer) is that of llama.cpp's int8 activations, below a Q8_0 weight's own. Where autograd
records (training), tiles stay float32: gradients are checked against float references."""

from __future__ import annotations

import functools
import os

import torch

from hetero.errors import InvalidRequestError

DECODE_MAX_TOKENS = 16  # more tokens per call go to the prefill path (a guess, not yet tuned)
PREFILL_DTYPE_ENV = "HETERO_PREFILL_DTYPE"
PREFILL_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


@functools.cache
def host_prefill_dtype() -> torch.dtype:
    """This machine's choice (or the environment's), made once per process."""
    forced = os.environ.get(PREFILL_DTYPE_ENV)
    if forced is not None:
        if forced not in PREFILL_DTYPES:
            raise InvalidRequestError(
                f"{PREFILL_DTYPE_ENV}={forced!r}: choose {' or '.join(PREFILL_DTYPES)}"
            )
        return PREFILL_DTYPES[forced]
    from cpu_kernels.quant_matrix import native_bf16_matmul

    return torch.bfloat16 if native_bf16_matmul() else torch.float32


def prefill_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype to multiply `x` [tokens, in] and weight tiles in: float32 for decode-sized
    batches (weights on disk cost their reading, not their math) and where autograd records."""
    if x.shape[0] <= DECODE_MAX_TOKENS or (torch.is_grad_enabled() and x.requires_grad):
        return torch.float32
    return host_prefill_dtype()


def prefill_dtype_name() -> str:
    """For the load log: "bf16" or "f32"."""
    dtype = host_prefill_dtype()
    return next(name for name, value in PREFILL_DTYPES.items() if value == dtype)
