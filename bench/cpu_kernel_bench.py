"""Decode GEMV kernels against this machine's DRAM read bandwidth.

Measures a Numba prange sum over a large float32 array (the ceiling), then each Q8_0, Q4_K,
Q6_K, BF16, F16 and F32 GEMV path over several distinct weight matrices much larger than cache (1
and 4 tokens on one matrix), then the grouped GEMVs on 1 and 16 decode tokens routed to top-8
of 64 experts, and prints GB/s of weights read as a fraction of that ceiling. With BF16, torch's
`F.linear` at the same shapes in bfloat16 and float32, for scale, and the BF16 kernel on batches
(16 to 256 tokens: batched decode, a prefill) in GMAC/s against torch's float32 matmul on the
same weights widened (what a dequantise-then-matmul path would get at best).
Run: .venv/bin/python bench/cpu_kernel_bench.py [--threads N] [--dram-gib 1.5] [--kernels q6_k]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numba
import numpy as np
import torch
import torch.nn.functional as F

from cpu_kernels.cpu_features import available_kernel_paths, host_kernel_path
from cpu_kernels.expert_pairs import group_pairs_by_expert
from cpu_kernels.panel_gemv import BF16Matrix, F16Matrix, F32Matrix, PanelMatrix
from cpu_kernels.q4_k_gemv import Q4KMatrix
from cpu_kernels.q6_k_gemv import Q6KMatrix
from cpu_kernels.q8_0_gemv import Q8Matrix
from cpu_kernels.quant_matrix import grouped_gemv, grouped_gemv_kernel
from hetero.runtime.cpu_experts import NumbaExperts
from placement.probe import best_seconds, measure_dram_read_gbs

# Qwen3-30B-A3B expert shapes: gate+up [2 * 768, 2048], down [2048, 768]; GB/s count the
# repacked bytes each kernel reads (Q8_0: int8 + float16 scale per 32 values, 34 bytes as
# GGUF; Q4_K: nibbles + 6-bit scale and min in a byte each per 32 + float32 d and dmin per
# 256 values, 152 bytes per 256 against GGUF's 144; Q6_K: 6-bit codes + int8 scale per 16 +
# float32 d per 256 values, 212 bytes per 256 against GGUF's 210; BF16: 2 bytes per value, as
# stored)
SHAPES = ((1536, 2048), (2048, 768))


def random_q8(rows: int, cols: int, rng: np.random.Generator) -> Q8Matrix:
    values = rng.integers(-127, 128, (1, rows, cols), dtype=np.int8)
    return Q8Matrix(values, half_bits(rng.random((1, rows, cols // 32)) * 0.01))


def half_bits(scales: np.ndarray) -> np.ndarray:
    """Q8Matrix's scales: float16 bits."""
    return scales.astype(np.float16).view(np.uint16)


def random_q4_k(rows: int, cols: int, rng: np.random.Generator) -> Q4KMatrix:
    scales_mins = rng.integers(0, 64, (2, 1, rows, cols // 32), dtype=np.uint8)
    d_dmin = rng.random((2, 1, rows, cols // 256), dtype=np.float32) * 0.01
    nibbles = rng.integers(0, 256, (1, rows, cols // 2), dtype=np.uint8)
    return Q4KMatrix(nibbles, *scales_mins, *d_dmin)


def random_q6_k(rows: int, cols: int, rng: np.random.Generator) -> Q6KMatrix:
    return Q6KMatrix(
        rng.integers(0, 256, (1, rows, cols * 3 // 4), dtype=np.uint8),
        rng.integers(-128, 128, (1, rows, cols // 16), dtype=np.int8),
        rng.random((1, rows, cols // 256), dtype=np.float32) * 0.01,
    )


def random_bf16(rows: int, cols: int, rng: np.random.Generator) -> BF16Matrix:
    # the top halves of float32 weights: finite, no subnormals
    weights = rng.standard_normal((1, rows, cols), dtype=np.float32) * np.float32(0.02)
    return BF16Matrix.from_values((weights.view(np.uint32) >> 16).astype(np.uint16))


def random_f32(rows: int, cols: int, rng: np.random.Generator) -> F32Matrix:
    return F32Matrix.from_values(rng.standard_normal((1, rows, cols), dtype=np.float32) * 0.02)


def random_f16(rows: int, cols: int, rng: np.random.Generator) -> F16Matrix:
    weights = rng.standard_normal((1, rows, cols), dtype=np.float32) * np.float32(0.02)
    return F16Matrix.from_values(weights.astype(np.float16).view(np.int16))


def kernel_runner(path: str, ws: list, x: np.ndarray):
    """One grouped GEMV kernel of `path` over each of `ws` in turn, all pairs on one expert
    (activations prepared once, outside the timing)."""
    activations = ws[0].activations(x)
    groups = group_pairs_by_expert(np.zeros(x.shape[0], np.int64), 1)
    out = np.empty((x.shape[0], ws[0].out_rows), np.float32)
    kernel = grouped_gemv_kernel(ws[0], path)

    def run():
        for w in ws:
            kernel(*w.arrays, *activations, *groups, out)

    return run


KERNELS = {
    "q8_0": random_q8,
    "q4_k": random_q4_k,
    "q6_k": random_q6_k,
    "bf16": random_bf16,
    "f16": random_f16,
    "f32": random_f32,
}


def gemv_gb_s(kernel: str, path: str, shape: tuple[int, int], matrices: int, tokens: int):
    rng = np.random.default_rng(0)
    ws = [KERNELS[kernel](*shape, rng) for _ in range(matrices)]
    run = kernel_runner(path, ws, rng.standard_normal((tokens, shape[1]), np.float32))
    return sum(w.nbytes for w in ws) / best_seconds(run, 5) / 1e9


def torch_linear_gb_s(dtype: torch.dtype, shape: tuple[int, int], matrices: int, tokens: int):
    """torch's `F.linear` (what transformers runs) over the same number of distinct weights."""
    ws = [torch.randn(shape).mul_(0.02).to(dtype) for _ in range(matrices)]
    x = torch.randn(tokens, shape[1]).to(dtype)

    def run():
        for w in ws:
            F.linear(x, w)

    with torch.inference_mode():
        return sum(w.nbytes for w in ws) / best_seconds(run, 5) / 1e9


ROUTED = ("q8_0", "q4_k", "bf16", "f16", "f32")
TORCH_DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}


def routed_weights(kernel: str, experts: int = 64):
    """Random weights of `kernel`'s format, [experts, gate+up rows, hidden]."""
    rng = np.random.default_rng(0)
    rows, cols = SHAPES[0]
    flat = KERNELS[kernel](experts * rows, cols, rng)
    if isinstance(flat, PanelMatrix):  # rows sit in panels: repack them by expert
        return type(flat).from_values(flat.values().reshape(experts, rows, cols))
    return dataclasses.replace(
        flat,
        **{
            f.name: getattr(flat, f.name).reshape(experts, rows, -1)
            for f in dataclasses.fields(flat)
        },
    )


def routed_gb_s(w, path: str, tokens: int, top_k: int = 8):
    """`tokens` decode tokens, each routed to top_k of w's experts at random, through one grouped
    GEMV of the gate+up shape (activation quantisation and pair grouping included): GB/s of the
    distinct experts' weights read, best of 24 calls with fresh routings, each after a 64 MiB
    read that evicts the last call's weights from the 32 MiB L3."""
    rng = np.random.default_rng(0)
    experts, _, cols = w.shape
    x = rng.standard_normal((tokens * top_k, cols), np.float32)
    evict = np.ones(2**24, np.float32)
    grouped_gemv(w, x, np.zeros(len(x), np.int64), path)  # compile
    best = 0.0
    for _ in range(24):
        pair_expert = np.concatenate([rng.permutation(experts)[:top_k] for _ in range(tokens)])
        evict.sum()
        start = time.perf_counter()
        grouped_gemv(w, x, pair_expert, path)
        seconds = time.perf_counter() - start
        best = max(best, len(np.unique(pair_expert)) * w.nbytes / experts / seconds / 1e9)
    return best


def interleaved_ab(kernel: str, paths: list[str], matrices: int, repeats: int) -> list[tuple]:
    """Each case measured on each path in turn, `repeats` rounds, on the same weights (other
    processes on a shared machine disturb single runs alike) -> rows (case, tokens, {path:
    [GB/s per round]})."""
    rng = np.random.default_rng(0)
    rows = []
    for shape in SHAPES:
        ws = [KERNELS[kernel](*shape, rng) for _ in range(matrices)]
        nbytes = sum(w.nbytes for w in ws)
        for tokens in (1, 4):
            x = rng.standard_normal((tokens, shape[1]), np.float32)
            runs = {path: kernel_runner(path, ws, x) for path in paths}
            gb_s = {path: [] for path in paths}
            for _ in range(repeats):
                for path in paths:
                    gb_s[path].append(nbytes / best_seconds(runs[path], 5) / 1e9)
            rows.append((f"{kernel} gemv {shape[0]}x{shape[1]}", tokens, gb_s))
    if kernel in ROUTED:
        w = routed_weights(kernel)
        for tokens in (1, 16):
            gb_s = {path: [] for path in paths}
            for _ in range(repeats):
                for path in paths:
                    gb_s[path].append(routed_gb_s(w, path, tokens))
            rows.append((f"{kernel} grouped, top-8 of 64 experts", tokens, gb_s))
    return rows


def print_ab(rows: list[tuple], paths: list[str], ceiling: float) -> None:
    print(f"| case | tokens | {' | '.join(f'{p} GB/s (min-max)' for p in paths)} | ", end="")
    print(f"{' | '.join(f'{p} / DRAM' for p in paths)} | {paths[1]} / {paths[0]} |")
    print("|---|---|" + "---|" * (2 * len(paths) + 1))
    for case, tokens, gb_s in rows:
        medians = {p: float(np.median(v)) for p, v in gb_s.items()}
        spreads = " | ".join(
            f"{medians[p]:.1f} ({min(gb_s[p]):.1f}-{max(gb_s[p]):.1f})" for p in paths
        )
        fractions = " | ".join(f"{medians[p] / ceiling:.2f}" for p in paths)
        ratio = medians[paths[1]] / medians[paths[0]]
        print(f"| {case} | {tokens} | {spreads} | {fractions} | {ratio:.2f}x |")


GEMM_SHAPE = (16384, 2048)  # 64 MiB of BF16 (a slice of a 151936-wide lm_head)


def bf16_gemm_gmac_s(tokens: int) -> tuple[float, float]:
    """(BF16 kernel, torch float32 matmul) GMAC/s: `tokens` rows times GEMM_SHAPE, best of 5."""
    rng = np.random.default_rng(0)
    w = random_bf16(*GEMM_SHAPE, rng)
    x = rng.standard_normal((tokens, GEMM_SHAPE[1]), np.float32)
    wide, xt = torch.from_numpy(w.dequantize(0)), torch.from_numpy(x)
    macs = tokens * GEMM_SHAPE[0] * GEMM_SHAPE[1] / 1e9
    ours = best_seconds(lambda: grouped_gemv(w, x, np.zeros(tokens, np.int64)), 5)
    with torch.inference_mode():
        theirs = best_seconds(lambda: F.linear(xt, wide), 5)
    return macs / ours, macs / theirs


def experts_step_gb_s(experts: int = 64, top_k: int = 8, hidden: int = 2048, size: int = 768):
    """One decode token through `NumbaExperts` (Qwen3-30B-A3B geometry): GB/s of the selected
    experts' weights, Python overhead included."""
    rng = np.random.default_rng(0)
    gate_up = Q8Matrix(
        rng.integers(-127, 128, (experts, 2 * size, hidden), dtype=np.int8),
        half_bits(rng.random((experts, 2 * size, hidden // 32)) * 0.01),
    )
    down = Q8Matrix(
        rng.integers(-127, 128, (experts, hidden, size), dtype=np.int8),
        half_bits(rng.random((experts, hidden, size // 32)) * 0.01),
    )
    layer = NumbaExperts(gate_up, down)
    x = torch.randn(1, hidden)
    weights = torch.softmax(torch.randn(1, top_k), dim=-1)

    def step():
        layer(x, torch.randperm(experts)[:top_k].reshape(1, top_k), weights)

    return top_k * (gate_up.nbytes + down.nbytes) / experts / best_seconds(step, 50) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--dram-gib", type=float, default=1.5)
    parser.add_argument("--matrices", type=int, default=64, help="distinct weights per shape")
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    parser.add_argument(
        "--ab",
        nargs=2,
        metavar="PATH",
        help="only an interleaved A/B of two kernel paths (e.g. avx2 avx512), medians of rounds",
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the A/B")
    args = parser.parse_args()
    numba.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, host path {host_kernel_path()}, load {os.getloadavg()}")
    ceiling = measure_dram_read_gbs(int(args.dram_gib * 2**30))
    print(f"DRAM read (prange float32 sum, {args.dram_gib} GiB): {ceiling:.1f} GB/s")
    if args.ab:
        rows = [
            row
            for kernel in args.kernels
            for row in interleaved_ab(kernel, args.ab, args.matrices, args.rounds)
        ]
        ceiling = max(ceiling, measure_dram_read_gbs(int(args.dram_gib * 2**30)))
        print(f"DRAM read, best before/after: {ceiling:.1f} GB/s; load now {os.getloadavg()}")
        print_ab(rows, args.ab, ceiling)
        return
    rows = []
    for kernel in args.kernels:
        for path in available_kernel_paths():
            for shape in SHAPES:
                for tokens in (1, 4):
                    gb_s = gemv_gb_s(kernel, path, shape, args.matrices, tokens)
                    rows.append((f"{kernel} gemv", path, shape, tokens, gb_s))
    if "bf16" in args.kernels:
        for name, dtype in TORCH_DTYPES.items():
            for shape in SHAPES:
                for tokens in (1, 4):
                    gb_s = torch_linear_gb_s(dtype, shape, args.matrices, tokens)
                    rows.append((f"torch F.linear {name}", "torch", shape, tokens, gb_s))
    for kernel in (k for k in args.kernels if k in ROUTED):
        w = routed_weights(kernel)
        for tokens in (1, 16):
            gb_s = routed_gb_s(w, host_kernel_path(), tokens)
            label = f"{kernel} grouped, top-8 of 64 experts"
            rows.append((label, host_kernel_path(), SHAPES[0], tokens, gb_s))
    experts_gb_s = experts_step_gb_s()
    gemm = (
        {tokens: bf16_gemm_gmac_s(tokens) for tokens in (16, 64, 256)}
        if "bf16" in args.kernels
        else {}
    )
    # other processes on a shared machine disturb single runs: the ceiling is the best of a
    # measurement before and after the kernels
    ceiling = max(ceiling, measure_dram_read_gbs(int(args.dram_gib * 2**30)))
    print(f"DRAM read, best before/after: {ceiling:.1f} GB/s; load now {os.getloadavg()}")
    print("| kernel | path | shape | tokens | GB/s of weights | fraction of DRAM |")
    print("|---|---|---|---|---|---|")
    for label, path, shape, tokens, gb_s in rows:
        print(
            f"| {label} | {path} | {shape[0]}x{shape[1]} | {tokens} | "
            f"{gb_s:.1f} | {gb_s / ceiling:.2f} |"
        )
    print(
        f"| NumbaExperts q8_0, 1 token, top-8 of 64 | {host_kernel_path()} | 2048/768 | 1 | "
        f"{experts_gb_s:.1f} | {experts_gb_s / ceiling:.2f} |"
    )
    if gemm:
        print(f"\nBF16 kernel on batches, {GEMM_SHAPE[0]}x{GEMM_SHAPE[1]} ({host_kernel_path()})")
        print("| tokens | BF16 kernel GMAC/s | torch float32 matmul GMAC/s | ratio |")
        print("|---|---|---|---|")
        for tokens, (ours, theirs) in gemm.items():
            print(f"| {tokens} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x |")


if __name__ == "__main__":
    main()
