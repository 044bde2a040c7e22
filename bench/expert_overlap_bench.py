"""Decode (and prefill) tokens/s with and without the expert overlap (routed experts on the
expert worker while the shared expert runs in the calling thread) on the bench model with a
shared expert added, from its Q8_0 GGUF file, in one process: the two modes alternate (ABBA)
over the repeats and each reports its median. Also one MoE layer's parts timed alone, for the
bound the overlap can reach: serial = routed + shared, ideal = max(routed, shared).

    .venv/bin/python bench/expert_overlap_bench.py --dir /tmp/bench-qwen3moe-shared --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numba
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_bench import prepare  # noqa: E402

import hetero  # noqa: E402
from hetero.runtime.cpu_experts import NumbaExperts  # noqa: E402


def set_overlap(model, overlap: bool) -> None:
    for module in model.net.modules():
        if isinstance(module, NumbaExperts):
            module.overlap = overlap


def decode(model, new_tokens: int) -> tuple[float, float]:
    """(decode tok/s, CPU ms of this process per token): on a loaded machine a mode can gain
    tok/s by taking more of the cores from other processes, which the CPU time shows."""
    began = time.process_time()
    result = model.generate([1], max_new_tokens=new_tokens, ignore_eos=True)
    return result.decode_tok_s, 1e3 * (time.process_time() - began) / new_tokens


def prefill(model, prompt: list[int]) -> tuple[float, float]:
    """(prefill tok/s, CPU ms per prompt token)."""
    began = time.process_time()
    result = model.generate(prompt, max_new_tokens=1, ignore_eos=True)
    return result.prefill_tok_s, 1e3 * (time.process_time() - began) / len(prompt)


def overlap_ab(model, measure: Callable[[], tuple[float, float]], repeats: int) -> str:
    """`measure` run `repeats` times per mode, the modes alternating ABBA: a markdown table of
    the medians, and the ratio."""
    runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for r in range(repeats):
        for overlap in (True, False) if r % 2 == 0 else (False, True):
            set_overlap(model, overlap)
            runs[overlap].append(measure())
    tok_s = {mode: statistics.median(t for t, _ in runs[mode]) for mode in runs}
    lines = ["| mode | tok/s (median) | CPU ms per token (median) | runs (tok/s) |"]
    lines.append("|---|---|---|---|")
    for overlap, label in ((False, "serial (HETERO_EXPERT_OVERLAP=0)"), (True, "overlap")):
        values = ", ".join(f"{t:.2f}" for t, _ in runs[overlap])
        cpu_ms = statistics.median(c for _, c in runs[overlap])
        lines.append(f"| {label} | {tok_s[overlap]:.2f} | {cpu_ms:.2f} | {values} |")
    lines.append(f"\noverlap / serial: {tok_s[True] / tok_s[False]:.3f}x")
    return "\n".join(lines)


def interleaved_median_ms(fns: dict[str, Callable[[], object]], calls: int) -> dict[str, float]:
    """Each function's median time over `calls` calls, the functions taken in turn (so that a
    change of load on the machine falls on all of them alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(calls):
        for name, fn in fns.items():
            began = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - began)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def layer_parts_ms(model, calls: int) -> dict[str, float]:
    """One MoE layer on one token, torch on the decode glue's threads: the routed experts alone
    (in this thread), the shared expert alone, the two overlapped (submit, shared expert, wait),
    and overlapped with one Numba thread on each side (the cores split, not shared)."""
    moe = model.net.layers[0].mlp
    experts: NumbaExperts = moe.experts
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, experts.gate_up.shape[2], generator=generator)
    ids = torch.randperm(experts.num_experts, generator=generator)[: moe.top_k][None]
    weights = torch.full((1, moe.top_k), 1.0 / moe.top_k)

    def shared() -> torch.Tensor:
        return torch.sigmoid(moe.shared_expert_gate(x)) * moe.shared_expert(x)

    def overlapped() -> torch.Tensor:
        routed = experts.submit(x, ids, weights)
        out = shared()
        return routed.wait() + out

    def overlapped_one_thread_each() -> torch.Tensor:
        threads = numba.get_num_threads()
        numba.set_num_threads(1)  # the worker takes the submitter's count
        try:
            return overlapped()
        finally:
            numba.set_num_threads(threads)

    experts.overlap = True
    threads = torch.get_num_threads()
    torch.set_num_threads(model.glue_threads or threads)
    try:
        with torch.inference_mode():
            for fn in (shared, overlapped):  # warm: first calls compile and fault pages in
                fn()
            parts = {
                "routed": lambda: experts(x, ids, weights),
                "shared": shared,
                "overlapped": overlapped,
                "overlapped 1+1": overlapped_one_thread_each,
            }
            return interleaved_median_ms(parts, calls)
    finally:
        torch.set_num_threads(threads)


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    flags = Path("/proc/cpuinfo").read_text()
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return f"{platform.machine()}, {os.cpu_count()} cores, {cpu} ({', '.join(isa)}); {load}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench-qwen3moe-shared"))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--shared-expert", type=int, default=2048, help="its width")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=6, help="decodes per mode")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--prefills", type=int, default=4, help="prefills per mode")
    parser.add_argument("--layer-calls", type=int, default=200, help="calls per layer part")
    args = parser.parse_args()

    files = prepare(args.dir, args.layers, args.experts, ("q8_0",), args.shared_expert)
    print(f"machine: {machine()}")
    model = hetero.load(files["q8_0"], threads=args.threads, progress=False)
    print(
        f"model: {files['q8_0'].name} ({args.layers} layers x {args.experts} experts top-8, "
        f"shared expert {args.shared_expert} wide), {args.threads} threads, decode "
        f"{args.new_tokens} tokens after a 1-token prompt, {args.repeats} per mode, ABBA order"
    )
    decode(model, 4)  # warm-up
    print(f"\ndecode:\n{overlap_ab(model, lambda: decode(model, args.new_tokens), args.repeats)}")
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (args.prompt_tokens,), generator=generator)
    measure = partial(prefill, model, prompt.tolist())
    print(f"\nprefill {args.prompt_tokens} tokens:\n{overlap_ab(model, measure, args.prefills)}\n")
    parts = layer_parts_ms(model, args.layer_calls)
    serial = parts["routed"] + parts["shared"]
    ideal = max(parts["routed"], parts["shared"])
    print(
        f"one MoE layer, one token, medians of {args.layer_calls} interleaved calls: routed "
        f"experts {parts['routed']:.3f} ms, shared expert {parts['shared']:.3f} ms, serial sum "
        f"{serial:.3f} ms, ideal overlap {ideal:.3f} ms, overlapped {parts['overlapped']:.3f} ms, "
        f"overlapped with one Numba thread each {parts['overlapped 1+1']:.3f} ms"
    )
    print(f"after: {machine()}")


if __name__ == "__main__":
    main()
