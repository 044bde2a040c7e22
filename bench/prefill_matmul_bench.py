"""Prefill of one MoE layer's routed experts on the CPU: dequantised tiles multiplied in float32
against bfloat16 (hetero/runtime/prefill_matmul.py), through `NumbaExperts` itself.

Shapes as Qwen3-30B-A3B's bench model: 64 experts of 768 over hidden 2048, top-8, a 512-token
prompt chunk (about 64 tokens per expert). Prints the median of the repeats (interleaved A/B),
tokens/s per layer, the bf16/f32 ratio and the relative difference of the outputs, with the
machine's CPU and whether it multiplies bf16 natively.
Run: .venv/bin/python bench/prefill_matmul_bench.py [--threads N] [--tokens 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from cpu_kernels.cpu_features import host_cpu_features
from cpu_kernels.quant_matrix import quantize_matrix
from hetero.bench.machine import machine_info
from hetero.runtime import prefill_matmul
from hetero.runtime.cpu_experts import NumbaExperts
from hetero.runtime.model import set_threads

EXPERTS, HIDDEN, EXPERT_SIZE, TOP_K = 64, 2048, 768, 8
FORMATS = (T.Q8_0, T.Q4_K)
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def layer_experts(ggml_type: T, rng: np.random.Generator) -> NumbaExperts:
    def weights(rows: int, cols: int) -> np.ndarray:
        return rng.standard_normal((EXPERTS, rows, cols), dtype=np.float32) * 0.02

    gate_up = quantize_matrix(weights(2 * EXPERT_SIZE, HIDDEN), ggml_type)
    experts = NumbaExperts(gate_up, quantize_matrix(weights(HIDDEN, EXPERT_SIZE), ggml_type))
    experts.overlap = False
    return experts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        set_threads(args.threads)
    machine = machine_info(None)
    print(f"CPU: {machine['cpu']}, {torch.get_num_threads()} threads")
    print(f"native bf16 matmul (avx512bf16): {bool(host_cpu_features().get('avx512bf16'))}")
    print(f"load average at start: {machine['load_average']}")
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, HIDDEN, generator=generator)
    ids = torch.stack([torch.randperm(EXPERTS, generator=generator)[:TOP_K] for _ in x])
    weights = torch.softmax(torch.randn(args.tokens, TOP_K, generator=generator), dim=-1)
    print("| format | f32 ms | bf16 ms | f32 tok/s | bf16 tok/s | bf16/f32 speed | rel. diff |")
    print("|---|---|---|---|---|---|---|")
    for ggml_type in FORMATS:
        experts = layer_experts(ggml_type, rng)
        seconds: dict[str, list[float]] = {name: [] for name in DTYPES}
        outputs = {}
        for _ in range(args.repeats + 1):  # the first round warms up and is not counted
            for name, dtype in DTYPES.items():
                prefill_matmul.host_prefill_dtype = lambda dtype=dtype: dtype
                began = time.perf_counter()
                with torch.inference_mode():
                    outputs[name] = experts(x, ids, weights)
                seconds[name].append(time.perf_counter() - began)
        median = {name: statistics.median(s[1:]) for name, s in seconds.items()}
        diff = (outputs["bf16"] - outputs["f32"]).norm() / outputs["f32"].norm()
        print(
            f"| {ggml_type.name} | {median['f32'] * 1e3:.0f} | {median['bf16'] * 1e3:.0f} | "
            f"{args.tokens / median['f32']:.0f} | {args.tokens / median['bf16']:.0f} | "
            f"{median['f32'] / median['bf16']:.2f}x | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
