"""`hetero plan`, `hetero profile` and `hetero probe`. Registered by hetero/cli.py; heavy
imports wait until a command runs, so `hetero --help` stays fast."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hetero.errors import InvalidRequestError

DEFAULT_CONTEXT = 4096


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
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--save", default=None, metavar="FILE", help="write the plan as JSON")
    plan.set_defaults(run=run_plan)

    profile = commands.add_parser(
        "profile", help="run prompts and record how often each routed expert is chosen"
    )
    profile.add_argument("model", metavar="MODEL", help='model directory, or "demo"')
    profile.add_argument("--prompts", required=True, help="text file, one prompt per line")
    profile.add_argument("--out", required=True, help="profile JSON to write")
    profile.add_argument("-n", "--max-new-tokens", type=int, default=16)
    profile.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    profile.add_argument("--threads", type=int, default=None)
    profile.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"]
    )
    profile.set_defaults(run=run_profile)

    probe = commands.add_parser(
        "probe", help="measure this machine's bandwidths and compute rates for `hetero plan`"
    )
    probe.add_argument("--buffer-mib", type=int, default=1024, help="DRAM test buffer size")
    probe.add_argument("--json", action="store_true", help="print the figures as JSON")
    probe.set_defaults(run=run_probe)


def run_plan(args: argparse.Namespace) -> int:
    from placement.budgets import Workload, machine_memory, resolve_budgets
    from placement.hardware import load_hardware
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
    context = args.context or min(DEFAULT_CONTEXT, inventory.context_limit)
    workload = Workload(context, args.concurrency, args.prefill_chunk, args.kv_dtype)
    profile = RoutingProfile.load(args.profile) if args.profile else None
    plan = make_plan(
        inventory, budgets, workload, load_hardware(args.hardware), rules, profile, args.profile
    )
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


def read_prompts(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise InvalidRequestError(f"prompts file {file} does not exist")
    prompts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise InvalidRequestError(f"prompts file {file} holds no prompt (one per line)")
    return prompts


def run_profile(args: argparse.Namespace) -> int:
    import hetero
    from hetero.runtime.routing_recorder import record_routing

    prompts = read_prompts(args.prompts)
    model = hetero.load(args.model, dtype=args.dtype, threads=args.threads, progress=True)
    with record_routing(model.net, model.name) as recorder:
        if not recorder.layers:
            raise InvalidRequestError(f"{model.name} has no MoE layers: nothing to profile")
        for text in prompts:
            prompt = model.encode_chat([{"role": "user", "content": text}]) if args.chat else text
            model.generate(prompt, max_new_tokens=args.max_new_tokens)
    profile = recorder.profile()
    profile.save(args.out)
    print(
        f"{max(profile.tokens.values())} tokens routed through {len(profile.counts)} MoE "
        f"layers; the busiest 10% of experts took {profile.hottest_share(0.1):.0%} of the "
        f"activations; wrote {args.out}"
    )
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
