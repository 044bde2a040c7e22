"""`hetero plan` and `hetero probe`. Registered by hetero/cli.py; heavy imports wait until a
command runs, so `hetero --help` stays fast. The planner runs no model: `hetero profile`, which
does, is a front end of the runtime (hetero/profile_command.py)."""

from __future__ import annotations

import argparse
import sys

from hetero.errors import InvalidRequestError
from placement.budgets import DEFAULT_CONTEXT


def add_placement_commands(commands) -> None:
    plan = commands.add_parser(
        "plan", help="plan what goes on the GPU, in DRAM and on disk, and predict the speed"
    )
    plan.add_argument(
        "model",
        metavar="MODEL",
        help='model directory, .gguf file, config.json (a model not downloaded), or "demo"',
    )
    plan.add_argument(
        "--quant",
        default=None,
        help="weight types of a directory or config.json: a GGUF file type as `hetero "
        "quantize --type` writes it (q4_k_m, q8_0, bf16, ...; default: as hetero loads it)",
    )
    plan.add_argument(
        "--vram-budget", default=None, help="per GPU: 24GiB, 80%% (default: free VRAM - reserve)"
    )
    plan.add_argument(
        "--dram-budget", default=None, help="64GiB, 80%% (default: available RAM - reserve)"
    )
    plan.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all)")
    plan.add_argument(
        "--context", type=int, default=None, help=f"tokens per sequence (default {DEFAULT_CONTEXT})"
    )
    plan.add_argument("--concurrency", type=int, default=1, help="sequences in the KV cache")
    plan.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per forward")
    plan.add_argument("--kv-dtype", default="bf16", choices=["bf16", "f16", "f32"])
    plan.add_argument("--profile", default=None, help="expert routing profile (hetero profile)")
    plan.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="REGEX=DEVICE",
        help="place matching tensors on gpu, cpu or disk; first match wins (repeatable)",
    )
    plan.add_argument("--rules", default=None, help="YAML/JSON file of {match, device} rules")
    plan.add_argument("--hardware", default=None, help="a probe JSON (default: this machine's)")
    plan.add_argument(
        "--accelerator",
        default=None,
        choices=["cuda", "sim", "none"],
        help="sim: plan for the simulated accelerator (a CPU core, no fixed workspace) of "
        "--vram-budget; cuda, none: the hardware's GPU figures, if the budget has one",
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--save", default=None, metavar="FILE", help="write the plan as JSON")
    plan.set_defaults(run=run_plan)

    probe = commands.add_parser(
        "probe", help="measure this machine's bandwidths and compute rates for `hetero plan`"
    )
    probe.add_argument("--buffer-mib", type=int, default=1024, help="DRAM test buffer size")
    probe.add_argument("--json", action="store_true", help="print the figures as JSON")
    probe.set_defaults(run=run_probe)


def run_plan(args: argparse.Namespace) -> int:
    from placement.budgets import Workload, machine_memory, resolve_budgets
    from placement.hardware import load_hardware, sim_accelerator
    from placement.inventory import open_model
    from placement.policy import make_plan
    from placement.report import print_plan
    from placement.routing_profile import RoutingProfile
    from placement.rules import load_rules, parse_rule

    rules = [parse_rule(text) for text in args.override]
    if args.rules:
        rules += load_rules(args.rules)
    inventory = open_model(args.model, args.quant)
    budgets = resolve_budgets(args.vram_budget, args.dram_budget, args.gpus, machine_memory())
    context = (
        min(DEFAULT_CONTEXT, inventory.context_limit) if args.context is None else args.context
    )
    workload = Workload(context, args.concurrency, args.prefill_chunk, args.kv_dtype)
    profile = RoutingProfile.load(args.profile) if args.profile else None
    hardware = load_hardware(args.hardware)
    if args.accelerator == "sim":
        hardware = sim_accelerator(hardware)
    plan = make_plan(inventory, budgets, workload, hardware, rules, profile, args.profile)
    if args.save:
        plan.save(args.save)
    if args.json:
        print(plan.to_json())
        for warning in plan.warnings:
            print(f"hetero: warning: {warning}", file=sys.stderr)
    else:
        print_plan(plan)
        if args.save:
            print(f"plan written to {args.save}")
    return 0


def run_probe(args: argparse.Namespace) -> int:
    from placement.hardware import save_hardware
    from placement.probe import probe_machine
    from placement.sizes import MIB

    if args.buffer_mib < 1:
        raise InvalidRequestError(f"--buffer-mib must be >= 1, got {args.buffer_mib}")
    hardware = probe_machine(args.buffer_mib * MIB)
    path = save_hardware(hardware)
    if args.json:
        print(hardware.to_json())
        return 0
    print(f"{'cpu_threads':22s} {hardware.cpu_threads}")
    for key in ("dram_read_gbs", "cpu_gemv_gbs", "cpu_matmul_gflops"):
        print(f"{key:22s} {getattr(hardware, key):.1f}")
    if hardware.gpu_name:
        print(f"{'gpu':22s} {hardware.gpu_name}")
        for key in ("hbm_gbs", "h2d_gbs", "d2h_gbs", "gpu_matmul_tflops"):
            print(f"{key:22s} {getattr(hardware, key):.1f}")
    else:
        print("no GPU visible: GPU figures keep their defaults for plans with a VRAM budget")
    print(f"saved to {path}; `hetero plan` uses it on this machine")
    return 0
