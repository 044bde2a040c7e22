"""End-to-end prefill and decode tokens/s on the bench model (Qwen3-30B-A3B geometry, scaled
down): hetero on the bf16 safetensors and on GGUF files (Q8_0 and Q4_K_M unless --gguf says
others), beside llama.cpp (llama-bench, same files, same threads) and HF transformers (bf16
safetensors), in one run.

    .venv/bin/python bench/e2e_bench.py --dir /tmp/bench-qwen3moe --threads 2

Each engine runs in its own process, one after another. llama.cpp comes from
../shared/tools/llama-cpp.sh (built once per machine); it is skipped when absent."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA_CPP_TOOL = ROOT.parent / "shared" / "tools" / "llama-cpp.sh"
GGUF_TYPES = ("q8_0", "q4_k_m")  # the default --gguf files; f16 and others on request


def run_hetero(
    model: str,
    quant: str,
    dtype: str,
    threads: int,
    prompt_tokens: int,
    new_tokens: int,
    repeat: int,
) -> dict:
    import torch

    import hetero

    began = time.perf_counter()
    net = hetero.load(model, quant=quant, dtype=dtype, threads=threads, progress=False)
    load_s = time.perf_counter() - began
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, net.config.vocab_size, (prompt_tokens,), generator=generator).tolist()
    net.generate(prompt[:2], max_new_tokens=2, ignore_eos=True)  # warm-up: JIT, page-in
    prefill = [
        net.generate(prompt, max_new_tokens=1, ignore_eos=True).prefill_tok_s for _ in range(repeat)
    ]
    decode = [
        net.generate(prompt[:1], max_new_tokens=new_tokens, ignore_eos=True).decode_tok_s
        for _ in range(repeat)
    ]
    report = net.quant_report
    return {
        "prefill": prefill,
        "decode": decode,
        "load_s": load_s,
        "repack_s": report.seconds if report else 0.0,
        "dtype": str(net.dtype).removeprefix("torch."),
    }


def run_transformers(
    model: str, threads: int, prompt_tokens: int, new_tokens: int, repeat: int
) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, net.config.vocab_size, (1, prompt_tokens), generator=generator)
    prefill_s, decode_s = [], []
    with torch.inference_mode():
        net(prompt[:, :2])  # warm-up
        for _ in range(repeat):
            began = time.perf_counter()
            net(prompt)
            prefill_s.append(time.perf_counter() - began)
            began = time.perf_counter()
            net.generate(
                prompt[:, :1],
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            decode_s.append(time.perf_counter() - began)
    return {
        "prefill": [prompt_tokens / t for t in prefill_s],
        "decode": [new_tokens / t for t in decode_s],
        "dtype": "bfloat16",
    }


def run_llama_bench(
    binary: Path, model: Path, threads: int, prompt_tokens: int, new_tokens: int, repeat: int
) -> dict:
    """llama-bench's per-run samples, as `hetero bench` reads them (retried with --repack 0
    where its repacking crashes, and said so)."""
    from hetero.bench.worker import Job, measure_llama_bench

    job = Job("llama.cpp", str(model), threads, prompt_tokens, new_tokens, [0], [1], repeat)
    row = measure_llama_bench(replace(job, binary=str(binary)))
    result = {"dtype": "ggml", "note": row["note"]}
    for test in row["tests"]:
        result["prefill" if test["kind"] == "pp" else "decode"] = test["samples"]
    return result


def measure(kind: str, *args: str, threads: int) -> dict:
    """One engine in a fresh process (its own memory, its own thread settings)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NUMBA_NUM_THREADS": str(threads)}
    out = subprocess.run(
        [sys.executable, __file__, "--worker", kind, *args],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def prepare(
    directory: Path,
    layers: int,
    experts: int,
    gguf_types: tuple[str, ...],
    shared_expert: int = 0,
) -> dict[str, Path]:
    """The bench model's bf16 safetensors in `directory` and its GGUF files beside it, each
    written unless it exists."""
    if not (directory / "model.safetensors").exists():
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "bench" / "make_bench_model.py"),
                str(directory),
                "--layers",
                str(layers),
                "--experts",
                str(experts),
                "--shared-expert",
                str(shared_expert),
            ],
            check=True,
        )
    files = {"bf16": directory}
    for ggml in gguf_types:
        target = directory.with_name(f"{directory.name}-{ggml}.gguf")
        if not target.exists():
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "hetero",
                    "quantize",
                    str(directory),
                    str(target),
                    "--type",
                    ggml,
                ],
                check=True,
                cwd=ROOT,
            )
        files[ggml] = target
    return files


def llama_bench_binary() -> Path | None:
    try:
        out = subprocess.run(
            ["bash", str(LLAMA_CPP_TOOL)], check=True, capture_output=True, text=True, timeout=5
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    binary = Path(out.strip().splitlines()[-1]) / "llama-bench"
    return binary if binary.exists() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench-qwen3moe"))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2, help="runs per engine per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all engines")
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        help="skip an engine (hetero, llama.cpp, transformers) or hetero's bf16 runs (bf16)",
    )
    parser.add_argument(
        "--gguf",
        default=",".join(GGUF_TYPES),
        help="GGUF file types to write and run (hetero quantize --type), comma-separated",
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = (args.prompt_tokens, args.new_tokens, args.repeat)
    if args.worker:
        kind, *rest = args.worker
        if kind == "hetero":
            result = run_hetero(rest[0], rest[1], rest[2], args.threads, *sizes)
        else:
            result = run_transformers(rest[0], args.threads, *sizes)
        print(json.dumps(result))
        return

    from placement.probe import measure_dram_read_gbs

    gguf_types = tuple(args.gguf.split(",")) if args.gguf else ()
    files = prepare(args.dir, args.layers, args.experts, gguf_types)
    load = os.getloadavg()[0]
    ceiling = measure_dram_read_gbs()
    common = [
        "--threads",
        str(args.threads),
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--new-tokens",
        str(args.new_tokens),
        "--repeat",
        str(args.repeat),
    ]
    binary = llama_bench_binary() if "llama.cpp" not in args.skip else None
    jobs: list[tuple[str, str, Callable[[], dict]]] = []
    for ggml in gguf_types:
        if "hetero" not in args.skip:
            jobs.append(
                (
                    ggml,
                    "hetero",
                    partial(
                        measure,
                        "hetero",
                        str(files[ggml]),
                        "auto",
                        "auto",
                        *common,
                        threads=args.threads,
                    ),
                )
            )
        if binary is not None:
            jobs.append(
                (
                    ggml,
                    "llama.cpp",
                    partial(run_llama_bench, binary, files[ggml], args.threads, *sizes),
                )
            )
    if "hetero" not in args.skip and "bf16" not in args.skip:
        for quant, dtype in (("auto", "auto"), ("none", "bfloat16")):
            jobs.append(
                (
                    f"bf16 safetensors (--quant {quant} --dtype {dtype})",
                    "hetero",
                    partial(
                        measure,
                        "hetero",
                        str(files["bf16"]),
                        quant,
                        dtype,
                        *common,
                        threads=args.threads,
                    ),
                )
            )
    if "transformers" not in args.skip:
        jobs.append(
            (
                "bf16 safetensors",
                "transformers",
                partial(measure, "transformers", str(files["bf16"]), *common, threads=args.threads),
            )
        )
    # rounds over all engines in turn: this machine's speed drifts by tens of percent over
    # minutes, and interleaving gives every engine the same chances. Every engine's figure is
    # the median of all its runs (and their range): the same statistic for every row
    samples: dict[tuple[str, str], dict] = {}
    for _ in range(args.rounds):
        for file, engine, job in jobs:
            result = job()
            kept = samples.setdefault((file, engine), {**result, "prefill": [], "decode": []})
            for key in ("prefill", "decode"):
                kept[key] += result[key]
    rows = [(file, engine, samples[file, engine]) for file, engine, _ in jobs]

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"

    def ratio(ours: dict, theirs: dict, key: str) -> float:
        return statistics.median(ours[key]) / statistics.median(theirs[key])

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, "
        f"DRAM read ceiling {ceiling:.1f} GB/s, load average {load:.2f} at start"
    )
    print(
        f"model: {args.dir} ({args.layers} layers x {args.experts} experts), prompt "
        f"{args.prompt_tokens} tokens, decode {args.new_tokens} tokens, median (range) of "
        f"{args.repeat} runs in each of {args.rounds} interleaved rounds, for every engine"
    )
    print()
    print("| file | engine | compute | prefill tok/s | decode tok/s | load s (repack s) | note |")
    print("|---|---|---|---|---|---|---|")
    for file, engine, r in rows:
        load_cell = f"{r['load_s']:.1f} ({r['repack_s']:.1f})" if "load_s" in r else ""
        print(
            f"| {file} | {engine} | {r['dtype']} | {cell(r['prefill'])} | {cell(r['decode'])} "
            f"| {load_cell} | {r.get('note', '')} |"
        )
    print()
    for ggml in gguf_types:
        ours = [r for f, e, r in rows if f == ggml and e == "hetero"]
        peer = [r for f, e, r in rows if f == ggml and e == "llama.cpp"]
        if ours and peer:
            prefill, decode = (ratio(ours[0], peer[0], key) for key in ("prefill", "decode"))
            print(f"{ggml}: hetero / llama.cpp: prefill {prefill:.2f}x, decode {decode:.2f}x")
    hf = [r for f, e, r in rows if e == "transformers"]
    for file, _, r in rows:
        if hf and file.startswith("bf16 safetensors (--quant"):
            print(
                f"{file} / transformers bf16: prefill {ratio(r, hf[0], 'prefill'):.2f}x, "
                f"decode {ratio(r, hf[0], 'decode'):.2f}x"
            )


if __name__ == "__main__":
    main()
