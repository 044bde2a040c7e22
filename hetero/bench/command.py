"""`hetero bench MODEL --placements cpu,torch,disk-experts,...`: every placement's plan executed
and measured beside the planner's prediction, and the peers (llama-bench, HF transformers) on
the same model and threads, in one run. pp/tg/depth are named as llama-bench names them."""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from hetero.bench.placements import (
    PLACEMENTS,
    ROUTED_EXPERTS,
    BenchPlacementError,
    PlacementSpec,
    parse_placement,
    plan_placement,
    plan_uses_accelerator,
)
from hetero.bench.worker import Job, exit_reason, last_line
from hetero.errors import HeteroError, InvalidRequestError
from hetero.model_options import add_accelerator_option
from placement.budgets import Budgets, Workload
from placement.hardware import Hardware
from placement.inventory import ModelInventory
from placement.plan import Plan
from placement.routing_profile import RoutingProfile

PEERS = ("llama.cpp", "transformers")
PREFILL_CHUNK = 512  # the planner's default prompt tokens per forward
SIM_VRAM_BUDGET = "24GiB"  # the default hardware figures' GPU (placement/hardware.py)
SIMULATED = "accelerator groups ran on the sim lane (one CPU core), planned and predicted as such"


def add_bench_command(commands) -> None:
    bench = commands.add_parser(
        "bench",
        help="measure placements and peers side by side: prefill/decode tok/s against the plan",
        description=__doc__,
    )
    bench.add_argument(
        "model", metavar="MODEL", help='model directory, .gguf file, or "demo" (built in)'
    )
    bench.add_argument(
        "--placements",
        default="auto",
        help="comma-separated: " + "; ".join(f"{k}: {v}" for k, v in PLACEMENTS.items()),
    )
    add_accelerator_option(bench)
    bench.add_argument(
        "--vram-budget", default=None, help=f"accelerator budget (sim: {SIM_VRAM_BUDGET})"
    )
    bench.add_argument("--dram-budget", default=None, help="DRAM budget (default: available)")
    bench.add_argument(
        "--profile", default=None, help="routing profile (hetero profile): which experts are hot"
    )
    bench.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens (pp)")
    bench.add_argument("-n", "--n-gen", type=int, default=128, help="tokens decoded (tg)")
    bench.add_argument("-d", "--n-depth", default="0", help="KV depths before decoding: 0,4096")
    bench.add_argument("--repeat", type=int, default=3, help="measured runs after a warm-up")
    bench.add_argument("--threads", type=int, default=None, help="CPU threads (default: cores)")
    bench.add_argument("--concurrency", default="1", help="sequences decoding together: 1,16")
    bench.add_argument(
        "--peers",
        default=",".join(PEERS),
        help="comma-separated peers to run where installed, or none",
    )
    bench.add_argument(
        "--out", default=None, help="results folder (default bench/results/DATE-MACHINE)"
    )
    bench.set_defaults(run=run_bench)


def int_list(text: str, flag: str, least: int) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise InvalidRequestError(f"{flag} {text!r}: give comma-separated integers") from None
    if any(v < least for v in values):
        raise InvalidRequestError(f"{flag} {text!r}: every value must be >= {least}")
    return values


def check_args(args: argparse.Namespace) -> tuple[list[int], list[int], list[str], int]:
    """Depths, concurrencies, peers, threads; refuses what no row could run."""
    if args.n_prompt < 1 or args.n_gen < 2 or args.repeat < 1:
        raise InvalidRequestError("-p >= 1, -n >= 2 and --repeat >= 1")
    depths = int_list(args.n_depth, "-d", 0)
    concurrency = int_list(args.concurrency, "--concurrency", 1)
    peers = [] if args.peers == "none" else args.peers.split(",")
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise InvalidRequestError(
            f"--peers {unknown[0]!r}: choose from {', '.join(PEERS)}, or none"
        )
    threads = (os.cpu_count() or 1) if args.threads is None else args.threads
    if threads < 1:
        raise InvalidRequestError(f"--threads must be >= 1, got {threads}")
    if not args.placements.strip():
        raise InvalidRequestError("--placements is empty; e.g. --placements cpu,torch")
    return depths, concurrency, peers, threads


def accelerator_unavailable(accelerator: str) -> str | None:
    """Why the accelerator's groups cannot run where the plan puts them, or None."""
    if accelerator == "none":
        return "no accelerator (--accelerator none); --accelerator sim runs these groups on one"
    return None


def run_bench(args: argparse.Namespace) -> int:
    from hetero.bench.machine import accelerator_name, machine_info, machine_slug
    from hetero.bench.report import print_table, write_results
    from hetero.demo import resolve_model_path
    from placement.budgets import machine_memory, resolve_budgets
    from placement.hardware import load_hardware
    from placement.inventory import open_model

    depths, concurrency, peers, threads = check_args(args)
    inventory = open_model(args.model)
    longest = max(args.n_prompt, *depths) + args.n_gen
    if longest >= inventory.context_limit:
        raise InvalidRequestError(
            f"-p/-d plus -n reach {longest} tokens but {inventory.name} holds "
            f"{inventory.context_limit}; lower them"
        )
    from hetero.runtime.accelerator import AcceleratorUnavailableError, default_accelerator
    from placement.hardware import sim_accelerator

    accelerator = args.accelerator or default_accelerator()
    if accelerator == "cuda" and default_accelerator() != "cuda":
        raise AcceleratorUnavailableError(
            "--accelerator cuda: no CUDA device is visible here; --accelerator sim runs the "
            "accelerator's groups on a simulated one"
        )
    vram = args.vram_budget or (SIM_VRAM_BUDGET if accelerator == "sim" else None)
    budgets = resolve_budgets(vram, args.dram_budget, None, machine_memory())
    hardware = load_hardware(None)
    if accelerator == "sim":
        hardware = sim_accelerator(hardware)
    # the KV dtype is each placement's own (Planning.plan)
    workload = Workload(longest, max(concurrency), PREFILL_CHUNK)
    llama_bench = shutil.which("llama-bench")
    settings = {
        "prompt_tokens": args.n_prompt,
        "new_tokens": args.n_gen,
        "depths": depths,
        "concurrency": concurrency,
        "repeat": args.repeat,
        "threads": threads,
        "accelerator": accelerator,
    }
    job = Job(
        "hetero", args.model, threads, args.n_prompt, args.n_gen, depths, concurrency, args.repeat
    )
    blocked = accelerator_unavailable(accelerator)
    cuda = accelerator == "cuda" and accelerator_name() is not None
    profile = RoutingProfile.load(args.profile) if args.profile else None
    machine = machine_info(llama_bench)  # the load average as the run starts
    planning = Planning(
        inventory,
        budgets,
        workload,
        hardware,
        blocked,
        accelerator,
        profile,
        args.profile,
        resolve_model_path(args.model),
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="hetero-bench-") as scratch:
        for text in args.placements.split(","):
            rows.append(placement_row(text, job, planning, Path(scratch)))
        for peer in peers:
            vram = budgets.vram_bytes if cuda else None
            rows.append(peer_row(peer, job, vram, llama_bench, Path(scratch)))
    machine["load_average_end"] = list(os.getloadavg())
    results = {
        "model": str(planning.model_path),
        "command": "hetero " + " ".join(sys.argv[1:]),
        "settings": settings,
        "machine": machine,
        "hardware": hardware.source,
        "rows": rows,
    }
    print_table(results)
    day = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else Path("bench/results") / f"{day}-{machine_slug(machine)}"
    write_results(results, out)
    print(f"results written to {out}/ (results.md, results.json, charts)")
    return 0


@dataclass(frozen=True)
class Planning:
    """What every placement is planned with: the model, the budgets (the accelerator's VRAM
    included), the workload of the longest test, the machine's rates, and why accelerator
    groups cannot run (None: they can, or are simulated)."""

    inventory: ModelInventory
    budgets: Budgets
    workload: Workload
    hardware: Hardware
    blocked: str | None
    accelerator: str = "none"  # what runs the plans' "gpu" groups
    profile: RoutingProfile | None = None
    profile_path: str | None = None
    model_path: Path | None = None  # to size each placement's KV cache in its compute dtype

    def plan(self, spec: PlacementSpec, workload: Workload | None = None) -> Plan:
        workload = workload or self.workload
        if self.model_path is not None:
            workload = replace(workload, kv_dtype=kv_dtype_of(self.model_path, spec.quant))
        return plan_placement(
            spec,
            self.inventory,
            self.budgets,
            workload,
            self.hardware,
            self.profile,
            self.profile_path,
        )


def kv_dtype_of(model_path: Path, quant: str) -> str:
    """The KV dtype `hetero generate` allocates by default: the run's compute dtype."""
    from hetero.runtime.model import KV_DTYPES, compute_dtype

    dtype = compute_dtype(model_path, "auto", quant)
    return next(name for name, value in KV_DTYPES.items() if value == dtype)


def placement_row(text: str, job: Job, planning: Planning, scratch: Path) -> dict:
    """One placement planned, executed in a worker, and set beside its predictions."""
    row: dict = {"name": text.strip(), "engine": "hetero", "simulated": False}
    p = planning
    try:
        spec = parse_placement(text)
        if spec.wants_accelerator and p.blocked:
            return {**row, "error": p.blocked}
        plan = p.plan(spec)
    except (BenchPlacementError, HeteroError) as err:
        return {**row, "error": str(err)}
    row["plan"] = {"rules": plan.rules, "totals": plan.totals, "kv_dtype": plan.kv_cache.dtype}
    notes = []
    accelerated = plan_uses_accelerator(plan)
    if accelerated:
        if p.blocked:
            return {**row, "error": p.blocked}
        row["simulated"] = p.accelerator == "sim"
        if row["simulated"]:
            notes.append(SIMULATED)
    if spec.kind == "plan":
        notes.append(f"predicted at the plan's context ({plan.workload.context})")
    row["note"] = "; ".join(notes) or None
    plan_file = scratch / f"plan-{len(list(scratch.iterdir()))}.json"
    plan.save(plan_file)
    job = replace(
        job,
        plan=str(plan_file),
        quant=spec.quant,
        accelerator=p.accelerator if accelerated else "none",
    )
    measured = run_worker(job, scratch, text)
    if "error" in measured:
        return {**row, "error": measured["error"]}
    if measured.get("expert_cache_hit_rate") is not None:
        notes.append(f"expert cache hit rate {measured['expert_cache_hit_rate']:.0%}")
        row["note"] = "; ".join(notes)
    for test in measured["tests"]:
        if test["kind"] == "pp":
            predicted, bound = plan.predicted.prefill_tok_s, plan.predicted.prefill_bound
        else:
            predicted, bound = decode_prediction(
                spec, plan, p, test["depth"], job.new_tokens, test["concurrency"]
            )
        test["predicted_tok_s"] = predicted
        test["bound"] = bound
        test["ratio"] = test["median"] / predicted if predicted else None
    return {**row, **measured}


def decode_prediction(
    spec: PlacementSpec, plan: Plan, p: Planning, depth: int, new_tokens: int, sequences: int
) -> tuple[float | None, str | None]:
    """Predicted decode tok/s and its bound for a tg test: the placement planned again for its
    depth and sequences (the planner predicts decode at half the context: the middle of the
    run); a plan file keeps its own prediction."""
    if spec.kind == "plan":
        return plan.predicted.decode_tok_s, plan.predicted.bound
    context = min(2 * depth + new_tokens, p.inventory.context_limit)
    workload = Workload(context, sequences, p.workload.prefill_chunk, p.workload.kv_dtype)
    try:
        again = p.plan(spec, workload)
    except HeteroError:  # e.g. the KV cache of this test does not fit the budgets
        return None, None
    return again.predicted.decode_tok_s, again.predicted.bound


def peer_row(
    peer: str, job: Job, vram_bytes: int | None, llama_bench: str | None, scratch: Path
) -> dict:
    """A peer's row on the same file and threads; `vram_bytes`: a CUDA device is used, at this
    budget (whether or not this build of hetero can): llama.cpp keeps the routed experts on the
    CPU, transformers offloads with accelerate."""
    row: dict = {"name": peer, "engine": peer, "simulated": False}
    if peer == "transformers":
        transformers = replace(
            job, engine="transformers", concurrency=[1], offload_vram_bytes=vram_bytes
        )
        return {**row, **run_worker(transformers, scratch, peer)}
    python_binding = importlib.util.find_spec("llama_cpp") is not None
    if llama_bench is None and not python_binding:
        return {
            **row,
            "error": "llama-bench is not on PATH (build llama.cpp and add its bin/) and "
            "llama-cpp-python is not installed",
        }
    from hetero.demo import resolve_model_path

    path = resolve_model_path(job.model)
    if path.suffix != ".gguf":
        return {
            **row,
            "error": f"llama.cpp runs GGUF files; write one with `hetero quantize "
            f"{job.model} OUT.gguf --type q8_0` and bench that",
        }
    llama = replace(job, engine="llama.cpp", model=str(path), binary=llama_bench)
    if llama_bench is None:
        # llama-cpp-python has no tensor override, so no experts-on-the-CPU split: CPU only
        note = "CPU only" + (
            " (llama-cpp-python cannot keep experts on the CPU)" if vram_bytes else ""
        )
    elif vram_bytes is not None:
        # the expert-to-CPU override: the same split as hetero's hot path on the GPU
        llama = replace(llama, llama_args=["-ngl", "99", "-ot", f"{ROUTED_EXPERTS}=CPU"])
        note = "experts on the CPU (-ot)"
    else:
        llama, note = replace(llama, llama_args=["-ngl", "0"]), "CPU only"
    measured = run_worker(llama, scratch, peer)
    return {**row, **measured, "note": "; ".join(filter(None, (note, measured.get("note"))))}


def run_worker(job: Job, scratch: Path, name: str) -> dict:
    """`job` in a fresh process with its thread count; a crash becomes the row's error."""
    print(f"hetero bench: running {name}", file=sys.stderr, flush=True)
    job_file = scratch / f"job-{len(list(scratch.iterdir()))}.json"
    job_file.write_text(json.dumps(asdict(job)))
    env = dict(os.environ, NUMBA_NUM_THREADS=str(job.threads), OMP_NUM_THREADS=str(job.threads))
    done = subprocess.run(
        [sys.executable, "-m", "hetero.bench.worker", str(job_file)],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        return {"error": f"{job.engine} {exit_reason(done.returncode)}: {last_line(done.stderr)}"}
    return json.loads(done.stdout.strip().splitlines()[-1])
