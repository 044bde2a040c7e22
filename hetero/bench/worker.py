"""One bench row in a process of its own (`python -m hetero.bench.worker JOB.json`), so each
row has its own peak RSS and threads, and a crashing engine takes only its row down. Prints the
row's measurements as one JSON line; an error a user can act on as {"error": ...}.

Every engine is measured the same way: a warm-up run that is not counted, then `repeat` runs
of each test, pp (a prompt of P tokens, one token out: prefill tok/s and time to first token)
and tg at each depth D and concurrency C (C sequences with D-token prompts decode N tokens
each: decode tok/s of them all together)."""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hetero.errors import HeteroError


@dataclass(frozen=True)
class Job:
    engine: str  # "hetero", "transformers", "llama.cpp"
    model: str
    threads: int
    prompt_tokens: int
    new_tokens: int
    depths: list[int]
    concurrency: list[int]
    repeat: int
    plan: str | None = None  # hetero: the plan's JSON file
    quant: str = "auto"  # hetero: the loader's quant
    accelerator: str = "none"  # hetero: what runs the plan's "gpu" groups (cuda, sim, none)
    expert_cache: str = "score"  # hetero: how the accelerator's experts change by use
    binary: str | None = None  # llama.cpp: llama-bench; None: llama-cpp-python
    llama_args: list[str] | None = None  # llama.cpp: extra arguments (-ngl, -ot)
    gpu_layers: int = 0  # llama-cpp-python: layers on the GPU
    offload_vram_bytes: int | None = None  # transformers: accelerate offload at this budget


def median_and_range(samples: list[float]) -> dict:
    """The statistic of every row: median of the repeats, and their range."""
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "samples": samples,
    }


def prompt_ids(vocab_size: int, tokens: int, seed: int) -> list[int]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (max(tokens, 1),), generator=generator).tolist()


def measure_hetero(job: Job) -> dict:
    import torch

    import hetero
    from placement.plan import load_plan

    plan = load_plan(job.plan) if job.plan else None
    model = hetero.load(
        job.model,
        quant=job.quant,
        threads=job.threads,
        progress=False,
        plan=plan,
        accelerator=job.accelerator,
        expert_cache=job.expert_cache,
    )
    if plan is not None:
        model.kv_dtype = plan.kv_cache.dtype  # the plan sized the cache in it
    vocab = model.config.vocab_size
    prompt = prompt_ids(vocab, job.prompt_tokens, 0)
    model.generate(prompt, max_new_tokens=2, ignore_eos=True)  # warm-up: JIT, page-in
    prefill, ttft = [], []
    for _ in range(job.repeat):
        began = time.perf_counter()
        result = model.generate(prompt, max_new_tokens=1, ignore_eos=True)
        ttft.append(time.perf_counter() - began)
        prefill.append(result.prefill_tok_s)
    tests = [pp_test(job.prompt_tokens, prefill)]
    for depth in job.depths:
        for sequences in job.concurrency:
            rates = [
                decode_together(model, depth, sequences, job.new_tokens, seed)
                for seed in range(job.repeat)
            ]
            tests.append(tg_test(job.new_tokens, depth, sequences, rates))
    accelerator = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {
        "tests": tests,
        "ttft_s": median_and_range(ttft),
        "peak_accel_bytes": accelerator,
        "expert_cache_hit_rate": model.expert_cache_hit_rate(),
    }


def decode_together(model, depth: int, sequences: int, new_tokens: int, seed: int) -> float:
    """Decode tok/s of `sequences` sequences with `depth`-token prompts (1 for depth 0), all
    run by one engine: the sum of their rates (prompt chunks admitted while others decode
    slow the early ones a little)."""
    from hetero.runtime.engine import Engine, Request

    if sequences == 1:
        prompt = prompt_ids(model.config.vocab_size, depth, seed + 1)
        return model.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True).decode_tok_s
    kv = model.new_kv_cache(max(depth, 1) + new_tokens, sequences)
    engine = Engine(
        model.net, model.tokenizer, kv, max_running=sequences, glue_threads=model.glue_threads
    )
    results = []

    def keep_result(event) -> None:
        if event.result is not None:
            results.append(event.result)

    for i in range(sequences):
        # distinct prompts: the prefix cache must not share their KV blocks
        prompt = prompt_ids(model.config.vocab_size, depth, 1000 * (seed + 1) + i)
        engine.submit(Request(prompt_ids=prompt, max_new_tokens=new_tokens), keep_result)
    while len(results) < sequences:
        engine.step()
    return sum(r.decode_tok_s for r in results)


def pp_test(prompt_tokens: int, rates: list[float], depth: int = 0) -> dict:
    name = f"pp{prompt_tokens}" + (f" @ d{depth}" if depth else "")
    return {"test": name, "kind": "pp", "depth": depth, "concurrency": 1, **median_and_range(rates)}


def tg_test(new_tokens: int, depth: int, sequences: int, rates: list[float]) -> dict:
    name = (
        f"tg{new_tokens}"
        + (f" @ d{depth}" if depth else "")
        + (f" x{sequences}" if sequences > 1 else "")
    )
    return {
        "test": name,
        "kind": "tg",
        "depth": depth,
        "concurrency": sequences,
        **median_and_range(rates),
    }


def measure_transformers(job: Job) -> dict:
    """HF transformers, the checkpoint's dtype, its own KV cache, one sequence: on the CPU, or
    with `offload_vram_bytes` on the GPU, what does not fit offloaded to the CPU by accelerate
    (`device_map="auto"` with `max_memory`), the way its users run a model too big for VRAM."""
    import torch
    from transformers import AutoModelForCausalLM

    from hetero.demo import resolve_model_path

    path = resolve_model_path(job.model)
    if not path.is_dir():
        raise HeteroError(f"the transformers peer runs checkpoint directories, not {path.name}")
    torch.set_num_threads(job.threads)
    note = "one sequence: no batched decode"
    if job.offload_vram_bytes is None:
        net = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
        device = torch.device("cpu")
    else:
        import psutil

        budget = {0: job.offload_vram_bytes, "cpu": psutil.virtual_memory().available}
        net = AutoModelForCausalLM.from_pretrained(
            path, dtype="auto", device_map="auto", max_memory=budget
        ).eval()
        device = torch.device("cuda", 0)
        gib = job.offload_vram_bytes / 2**30
        note = f"accelerate offload at {gib:.2f} GiB of VRAM; " + note
    vocab = net.config.vocab_size

    def ids(tokens: int, seed: int) -> torch.Tensor:
        return torch.tensor([prompt_ids(vocab, tokens, seed)], device=device)

    prompt = ids(job.prompt_tokens, 0)

    def decode_rate(depth: int, seed: int) -> float:
        out = net(ids(depth, seed + 1), use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        began = time.perf_counter()
        for _ in range(job.new_tokens - 1):
            out = net(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        token.item()  # waits for the device
        return (job.new_tokens - 1) / (time.perf_counter() - began)

    with torch.inference_mode():
        net(prompt[:, :2])  # warm-up
        ttft = []
        for _ in range(job.repeat):
            began = time.perf_counter()
            net(prompt).logits[:, -1].argmax(-1).item()
            ttft.append(time.perf_counter() - began)
        tests = [pp_test(job.prompt_tokens, [job.prompt_tokens / s for s in ttft])]
        for depth in job.depths:
            rates = [decode_rate(depth, seed) for seed in range(job.repeat)]
            tests.append(tg_test(job.new_tokens, depth, 1, rates))
    row = {"tests": tests, "ttft_s": median_and_range(ttft), "note": note}
    if device.type == "cuda":
        row["peak_accel_bytes"] = torch.cuda.max_memory_allocated()
    return row


def measure_llama_bench(job: Job) -> dict:
    """llama-bench on the same file and threads; its own warm-up run, its per-run samples.
    Where it is killed by a signal (its AMX repacking segfaults on some Intel CPUs), it runs
    again with repacking off (`--repack 0`), and the row says so."""
    depths = ",".join(str(d) for d in job.depths)
    command = [
        job.binary,
        "-m",
        job.model,
        "-t",
        str(job.threads),
        "-p",
        str(job.prompt_tokens),
        "-n",
        str(job.new_tokens),
        "-d",
        depths,
        "-r",
        str(job.repeat),
        "-o",
        "json",
        *(job.llama_args or []),
    ]
    note = "one sequence: llama-bench has no batched decode"
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode < 0:
        crash = f"{exit_reason(done.returncode)} with its default repacking"
        done = subprocess.run([*command, "--repack", "0"], capture_output=True, text=True)
        note = f"--repack 0 (it {crash}); " + note
    if done.returncode != 0:
        raise HeteroError(f"llama-bench {exit_reason(done.returncode)}: {last_line(done.stderr)}")
    tests = []
    for run in json.loads(done.stdout):
        samples = run.get("samples_ts") or [run["avg_ts"]]
        depth = run.get("n_depth", 0)
        if run["n_gen"]:
            tests.append(tg_test(run["n_gen"], depth, 1, samples))
        elif depth == job.depths[0]:  # one pp, as the other engines run it: at depth 0 if asked
            tests.append(pp_test(run["n_prompt"], samples, depth))
    return {"tests": tests, "note": note}


def measure_llama_cpp_python(job: Job) -> dict:
    """llama.cpp through llama-cpp-python, where llama-bench is not on PATH: the same tests
    timed here as the other engines are (a warm-up, then `repeat` runs of each; greedy
    tokens), on the same file and threads."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise HeteroError(
            "neither llama-bench (on PATH) nor llama-cpp-python (pip install llama-cpp-python) "
            "is installed"
        ) from None
    longest = max(job.prompt_tokens, *job.depths) + job.new_tokens
    llm = Llama(
        model_path=job.model,
        n_threads=job.threads,
        n_threads_batch=job.threads,
        n_gpu_layers=job.gpu_layers,
        n_ctx=longest + 1,
        n_batch=512,
        verbose=False,
    )
    vocab = llm.n_vocab()
    prompt = prompt_ids(vocab, job.prompt_tokens, 0)
    llm.reset()
    llm.eval(prompt[:2])  # warm-up
    prefill = []
    for _ in range(job.repeat):
        llm.reset()
        began = time.perf_counter()
        llm.eval(prompt)
        prefill.append(job.prompt_tokens / (time.perf_counter() - began))

    def decode_rate(depth: int, seed: int) -> float:
        llm.reset()
        llm.eval(prompt_ids(vocab, depth, seed + 1))
        began = time.perf_counter()
        for _ in range(job.new_tokens - 1):
            llm.eval([llm.sample(temp=0.0)])
        return (job.new_tokens - 1) / (time.perf_counter() - began)

    tests = [pp_test(job.prompt_tokens, prefill)]
    for depth in job.depths:
        rates = [decode_rate(depth, seed) for seed in range(job.repeat)]
        tests.append(tg_test(job.new_tokens, depth, 1, rates))
    return {"tests": tests, "note": "llama-cpp-python; one sequence: no batched decode"}


def measure_llama_cpp(job: Job) -> dict:
    return measure_llama_bench(job) if job.binary else measure_llama_cpp_python(job)


def exit_reason(returncode: int) -> str:
    import signal

    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


ENGINES = {
    "hetero": measure_hetero,
    "transformers": measure_transformers,
    "llama.cpp": measure_llama_cpp,
}


def run_job(job: Job) -> dict:
    try:
        row = ENGINES[job.engine](job)
    except HeteroError as err:
        return {"error": str(err)}
    except OSError as err:
        return {"error": f"{err.strerror or err}: {err.filename or ''}".rstrip(": ")}
    row["peak_rss_bytes"] = 1024 * max(  # ru_maxrss is in KiB on Linux
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    return row


if __name__ == "__main__":
    result = run_job(Job(**json.loads(Path(sys.argv[1]).read_text())))
    print(json.dumps(result))
