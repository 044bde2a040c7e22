"""A bf16 checkpoint on the CPU: the BF16 kernel (quant=bf16: weights read as bf16, float32 math,
Numba attention) against torch's bf16 path (quant=none), both loaded in one process and run
interleaved: prefill of a 256-token prompt and 16 decoded tokens, median of the repeats.
Run: .venv/bin/python bench/make_bench_model.py /tmp/bench-qwen3moe --layers 4 --experts 32
     .venv/bin/python bench/bf16_checkpoint_bench.py /tmp/bench-qwen3moe 5
"""

import os
import statistics
import sys

import torch

import hetero
from hetero.bench.machine import machine_info

path, reps = sys.argv[1], int(sys.argv[2])
machine = machine_info(None)
print(f"CPU: {machine['cpu']}, {torch.get_num_threads()} threads")
variants = {
    "BF16 kernel (quant=bf16)": hetero.load(path, quant="bf16", progress=False),
    "torch bf16 (quant=none)": hetero.load(path, quant="none", progress=False),
}
g = torch.Generator().manual_seed(0)
prompt = torch.randint(0, 150000, (256,), generator=g).tolist()
for m in variants.values():
    m.generate(prompt[:20], max_new_tokens=3, ignore_eos=True)
print("load at start", os.getloadavg())
res = {v: {"pp": [], "tg": []} for v in variants}
for _ in range(reps):
    for v, m in variants.items():
        out = m.generate(prompt, max_new_tokens=17, ignore_eos=True)
        res[v]["pp"].append(out.prefill_tok_s)
        res[v]["tg"].append(out.decode_tok_s)
print("load at end", os.getloadavg())
print("| path | pp256 tok/s median (range) | tg16 tok/s median (range) |\n|---|---|---|")
for v in variants:
    print(
        f"| {v} | "
        + " | ".join(
            f"{statistics.median(x):.1f} ({min(x):.1f}-{max(x):.1f})" for x in res[v].values()
        )
        + " |"
    )
a, b = res.values()
for k in ("pp", "tg"):
    print(f"{k}: kernel / torch = {statistics.median(a[k]) / statistics.median(b[k]):.2f}x")
