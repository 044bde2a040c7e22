"""Numba kernels for the CPU side: quantised expert FFN (GEMV/GEMM) and CPU attention."""
