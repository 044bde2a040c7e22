"""One entry point over the weight formats the CPU GEMVs run: repack GGUF blocks (or quantise
float weights) into a kernel matrix, multiply by it (one launcher for every format and kernel
path), dequantise it. Quantised formats without a kernel are requantised to Q8_0 at load, so
every quantised file runs on the kernels."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType as T

from cpu_kernels.cpu_features import host_cpu_features, host_kernel_path, kernel_of_path
from cpu_kernels.expert_pairs import check_pairs
from cpu_kernels.panel_gemv import (
    GROUPED_GEMV_PANELS,
    BF16Matrix,
    F16Matrix,
    F32Matrix,
    PanelMatrix,
)
from cpu_kernels.q4_k_gemv import GROUPED_GEMV_Q4_K, Q4KMatrix
from cpu_kernels.q6_k_gemv import GROUPED_GEMV_Q6_K, Q6KMatrix
from cpu_kernels.q8_0_gemv import GROUPED_GEMV_Q8_0, Q8Matrix
from hetero.formats.gguf_quantize import quantize
from hetero.formats.gguf_quants import FORMATS, dequantize

QuantMatrix = Q8Matrix | Q4KMatrix | Q6KMatrix | BF16Matrix | F16Matrix | F32Matrix

# GGML type -> (repacked matrix class, its grouped GEMV kernel per path). Every kernel takes
# (*w.arrays, *w.activations(x), order, group_start, group_expert, out).
KERNELS: dict[T, tuple[type, dict[str, Callable[..., None]]]] = {
    T.Q8_0: (Q8Matrix, GROUPED_GEMV_Q8_0),
    T.Q4_K: (Q4KMatrix, GROUPED_GEMV_Q4_K),
    T.Q6_K: (Q6KMatrix, GROUPED_GEMV_Q6_K),
    T.BF16: (BF16Matrix, GROUPED_GEMV_PANELS),
    T.F16: (F16Matrix, GROUPED_GEMV_PANELS),
    T.F32: (F32Matrix, GROUPED_GEMV_PANELS),
}
FALLBACK_TYPE = T.Q8_0  # what a type without a kernel is requantised to


def native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16): torch's bf16 matmul is then
    fast, and bf16 weights need no kernel of ours."""
    return bool(host_cpu_features().get("avx512bf16"))


def kernel_type(ggml_type: T, cols: int) -> T | None:
    """The kernel format that runs weights of `ggml_type` with `cols` columns: the type itself,
    Q8_0 for other quantised types (and K-quants whose rows are not whole 256-blocks), None
    when no kernel fits (cols not a multiple of 32)."""
    if ggml_type in KERNELS and cols % FORMATS[ggml_type].block_size == 0:
        return ggml_type
    block = FORMATS[FALLBACK_TYPE].block_size
    return FALLBACK_TYPE if cols % block == 0 else None


def _kernel_type_or_raise(ggml_type: T, cols: int) -> T:
    target = kernel_type(ggml_type, cols)
    if target is None:
        raise ValueError(f"no CPU kernel for {cols}-wide rows (not a multiple of 32)")
    return target


def _format_of(w: QuantMatrix) -> T:
    for ggml_type, (cls, _) in KERNELS.items():
        if isinstance(w, cls):
            return ggml_type
    raise TypeError(f"{type(w).__name__} is not a CPU kernel matrix")


def row_values(blocks: np.ndarray, ggml_type: T) -> int:
    """Values per row of GGUF blocks uint8 [..., row_bytes]."""
    fmt = FORMATS[ggml_type]
    return blocks.shape[-1] // fmt.type_size * fmt.block_size


def repack(blocks: np.ndarray, ggml_type: T) -> QuantMatrix:
    """blocks: uint8 [..., rows, row_bytes] of a GGUF tensor -> the kernel matrix."""
    target = _kernel_type_or_raise(ggml_type, row_values(blocks, ggml_type))
    if target != ggml_type:
        blocks = quantize(dequantize(blocks, ggml_type), target)
    return KERNELS[target][0].from_blocks(blocks)


def quantize_matrix(values: np.ndarray, ggml_type: T) -> QuantMatrix:
    """float32 [..., rows, cols] -> the kernel matrix of `ggml_type` (or its fallback)."""
    target = _kernel_type_or_raise(ggml_type, values.shape[-1])
    return KERNELS[target][0].from_blocks(quantize(np.ascontiguousarray(values), target))


def grouped_gemv(
    w: QuantMatrix, x: np.ndarray, pair_expert: np.ndarray, path: str | None = None
) -> np.ndarray:
    """w: [experts, rows, cols]; x: float32 [pairs, cols]; pair_expert: int [pairs] -> float32
    [pairs, rows], row p = W[pair_expert[p]] @ x[p]; on the kernel of `path` (None: the
    host's)."""
    groups = check_pairs(w.shape, x, pair_expert)  # order, group_start, group_expert
    out = np.empty((x.shape[0], w.out_rows), np.float32)
    grouped_gemv_kernel(w, path)(*w.arrays, *w.activations(x), *groups, out)
    return np.ascontiguousarray(out[:, : w.shape[-2]])  # no copy unless rows pad a panel


def grouped_gemv_kernel(w: QuantMatrix, path: str | None = None) -> Callable[..., None]:
    """The Numba kernel of w's format for `path` (None: the host's; a format without a kernel
    of that path runs the next path's), called as in KERNELS."""
    return kernel_of_path(KERNELS[_format_of(w)][1], path or host_kernel_path())


def gemv(w: QuantMatrix, x: np.ndarray, path: str | None = None) -> np.ndarray:
    """w: [rows, cols]; x: float32 [tokens, cols] -> [tokens, rows] = x @ W.T."""
    return grouped_gemv(one_expert(w), x, np.zeros(x.shape[0], np.int64), path)


def runs_many_rows(w: QuantMatrix, path: str | None = None) -> bool:
    """Whether the kernel also beats dequantising for torch's matmul on many rows at once (a
    prefill): the float formats' AVX2 panel tiles do (~90 GMAC/s on two Zen 3 cores, where
    torch's float32 GEMM reaches 55-80 and a dequantised copy costs a pass over memory), on
    every path above plain."""
    return isinstance(w, PanelMatrix) and (path or host_kernel_path()) != "plain"


def one_expert(w: QuantMatrix) -> QuantMatrix:
    """A 2-D matrix as a [1, rows, cols] view (the form the grouped GEMV takes)."""
    return _map_fields(w, lambda a: a[None])


def join_rows(matrices: list[QuantMatrix]) -> QuantMatrix:
    """2-D kernel matrices of one format and width stacked by rows (one GEMV reads them all)."""
    first = matrices[0]
    if any(type(m) is not type(first) or m.shape[1:] != first.shape[1:] for m in matrices):
        raise ValueError("only matrices of one format and width join")
    if isinstance(first, PanelMatrix):  # rows sit in panels of 16: repack them together
        return type(first).from_values(np.concatenate([m.values() for m in matrices]))
    return dataclasses.replace(
        first,
        **{
            f.name: np.concatenate([getattr(m, f.name) for m in matrices])
            for f in dataclasses.fields(first)
        },
    )


def row_slice(w: QuantMatrix, start: int, stop: int) -> QuantMatrix:
    """Rows [start, stop) of a 2-D kernel matrix, as views (panels: repacked)."""
    if isinstance(w, PanelMatrix):
        return type(w).from_values(w.values()[start:stop])
    return _map_fields(w, lambda a: a[start:stop])


def _map_fields(w: QuantMatrix, fn: Callable[[np.ndarray], np.ndarray]) -> QuantMatrix:
    # every array field of a kernel matrix has leading axes [..., rows] ([..., panels] in the
    # panel formats; their row count is an int field, left as it is)
    arrays = {f.name: getattr(w, f.name) for f in dataclasses.fields(w)}
    return dataclasses.replace(
        w, **{name: fn(a) for name, a in arrays.items() if isinstance(a, np.ndarray)}
    )
