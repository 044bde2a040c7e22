"""Training tokens/s of `hetero train`'s step (LoRA rank 8 on attention and routed experts,
Q8_0 frozen base on the CPU kernels) against transformers + PEFT on the same model (float32,
the same targets), in one run; each side in its own process, so its peak RSS is its own.

    .venv/bin/python bench/make_bench_model.py /tmp/bench-train --layers 2 --experts 16
    .venv/bin/python bench/train_bench.py /tmp/bench-train --seq-len 512 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def hetero_steps(model_dir: str, seq_len: int, steps: int, rank: int) -> list[float]:
    import hetero
    from hetero.runtime.lora import LoraSettings, adapt
    from hetero.train.loss import Example, batch_loss

    model = hetero.load(model_dir, quant="q8_0", progress=False)
    updates = adapt(model.net, LoraSettings(rank, 2.0 * rank, targets=("attention", "experts")))
    params = [p for u in updates.values() for p in (u.lora_A, u.lora_B)]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    e = Example(token_ids(seq_len, model.config.vocab_size), [True] * seq_len)
    times = []
    for _ in range(steps + 1):  # the first step warms the kernels up
        began = time.perf_counter()
        optimizer.zero_grad()
        (batch_loss(model.net, [e], recompute=False) / seq_len).backward()
        optimizer.step()
        times.append(time.perf_counter() - began)
    return times[1:]


def peft_steps(model_dir: str, seq_len: int, steps: int, rank: int) -> list[float]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.tensor([token_ids(seq_len, model.config.vocab_size)])
    times = []
    for _ in range(steps + 1):
        began = time.perf_counter()
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - began)
    return times[1:]


def token_ids(n: int, vocab: int) -> list[int]:
    return torch.randint(
        0, min(vocab, 1000), (n,), generator=torch.Generator().manual_seed(0)
    ).tolist()


def run_side(side: str, args) -> dict:
    """One side in a child process: its step times and its peak RSS."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            args.model,
            "--side",
            side,
            "--seq-len",
            str(args.seq_len),
            "--steps",
            str(args.steps),
            "--rank",
            str(args.rank),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two sides")
    parser.add_argument("--side", choices=["hetero", "peft"], default=None)
    args = parser.parse_args()
    if args.side:
        run = hetero_steps if args.side == "hetero" else peft_steps
        times = run(args.model, args.seq_len, args.steps, args.rank)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"step_s": statistics.median(times), "peak_rss": peak}))
        return
    stored = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors"))
    load_before = os.getloadavg()[0]
    # the sides alternate, round after round, and each keeps its median: the machine's load
    # drifts alike for both
    sides = ("hetero", "peft")
    rounds = [{side: run_side(side, args) for side in sides} for _ in range(args.rounds)]
    results = {
        side: {
            "step_s": statistics.median(r[side]["step_s"] for r in rounds),
            "peak_rss": max(r[side]["peak_rss"] for r in rounds),
        }
        for side in sides
    }
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads; "
        f"model {Path(args.model).name}: {stored / 2**30:.2f} GiB stored (bf16)"
    )
    print("| side | step (s) | tokens/s | peak RSS (GiB) | RSS / stored |")
    print("|---|---|---|---|---|")
    for side, r in results.items():
        print(
            f"| {side} | {r['step_s']:.2f} | {args.seq_len / r['step_s']:.1f} | "
            f"{r['peak_rss'] / 2**30:.2f} | {r['peak_rss'] / stored:.2f} |"
        )
    ratio = results["peft"]["step_s"] / results["hetero"]["step_s"]
    print(f"hetero / transformers+PEFT tokens/s: {ratio:.2f}x")
    print(
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; "
        f"seq {args.seq_len}, rank {args.rank}, median of {args.rounds} rounds of "
        f"{args.steps} steps"
    )


if __name__ == "__main__":
    main()
