"""What a kernel matrix (weights of one format, repacked for its GEMV kernels) offers the one
launcher in quant_matrix: its arrays in the kernels' order, the activations its kernels take and
the rows they write."""

from __future__ import annotations

import numpy as np


class KernelMatrix:
    """Weights [..., rows, cols]: one matrix, or one per expert."""

    @property
    def shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def arrays(self) -> tuple[np.ndarray, ...]:
        """The kernels' weight arguments, in their order."""
        raise NotImplementedError

    @staticmethod
    def activations(x: np.ndarray) -> tuple[np.ndarray, ...]:
        """x: float32 [pairs, cols] -> the kernels' activation arguments, in their order."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    @property
    def out_rows(self) -> int:
        """Rows of the kernels' output per pair (the panel formats write whole panels)."""
        return self.shape[-2]


def expert_slice(array: np.ndarray, index: int | None, matrix_ndim: int = 2) -> np.ndarray:
    """One expert's slice of a [experts, ...] array, or one matrix's array (`matrix_ndim` axes:
    [rows, cols], or [panels, cols, 16] for the panel formats) as it is."""
    if index is None and array.ndim != matrix_ndim:
        raise ValueError(f"a matrix of {len(array)} experts needs an expert index")
    if index is not None and array.ndim != matrix_ndim + 1:
        raise ValueError("a single [rows, cols] matrix takes no expert index")
    return array if index is None else array[index]
