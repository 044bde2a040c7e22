"""The planner against published figures: Q4_K_M sizes of the test configs beside the GGUF
files people download, KTransformers' DeepSeek-V3 placement beside their published memory,
plans on a 24 GiB GPU, and (with --probe) this machine's measured rates.

    .venv/bin/python bench/placement_report.py --probe > bench/results/placement.md
"""

from __future__ import annotations

import argparse
import platform
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_placement_sizes import CONFIGS, PUBLISHED_Q4_K_M  # noqa: E402

from placement.budgets import Budgets, Workload  # noqa: E402
from placement.hardware import default_hardware  # noqa: E402
from placement.inventory import open_model  # noqa: E402
from placement.policy import make_plan  # noqa: E402
from placement.probe import probe_machine  # noqa: E402
from placement.rules import parse_rule  # noqa: E402
from placement.sizes import GIB  # noqa: E402

KTRANSFORMERS_RULES = [r"^model\.layers\..*\.mlp\.experts\.=cpu", r"^model\.embed_tokens=cpu"]


def sizes_table() -> None:
    print("## Q4_K_M weight bytes: planned from config.json vs published GGUF files\n")
    print("| model | planned GB | planned GiB | published GB | error |")
    print("|---|---|---|---|---|")
    for name, published in PUBLISHED_Q4_K_M.items():
        planned = open_model(str(CONFIGS / name), "q4_k_m").weight_bytes
        print(
            f"| {name} | {planned / 1e9:.2f} | {planned / GIB:.1f} | {published} | "
            f"{100 * (planned / 1e9 / published - 1):+.1f}% |"
        )
    print(
        "\nSources and the Mixtral note (a December 2023 file of 26.4 GB predates the MoE rules "
        "of today's mixture): tests/test_placement_sizes.py.\n"
    )


def ktransformers_table() -> None:
    inventory = open_model(str(CONFIGS / "DeepSeek-V3"), "q4_k_m")
    plan = make_plan(
        inventory,
        Budgets(24 * GIB, 1, 512 * GIB),
        Workload(4096),
        default_hardware(),
        [parse_rule(r) for r in KTRANSFORMERS_RULES],
    )
    print("## DeepSeek-V3 Q4_K_M with KTransformers' placement, 4K context\n")
    print("| | hetero plan | KTransformers (README, Feb 2025) |")
    print("|---|---|---|")
    print(f"| GPU | {plan.totals['gpu'] / 1e9:.1f} GB | 14 GB |")
    print(f"| DRAM | {plan.totals['cpu'] / 1e9:.1f} GB | 382 GB |")
    print(
        "\nThe GPU gap: KTransformers keeps kv_b_proj in bf16 (+1.3 GB) and nvidia-smi counts "
        "the CUDA context (about 0.5 GB); see tests/test_placement_policy.py.\n"
    )


def plans_table() -> None:
    print("## Plans with a 24 GiB GPU and 128 GiB of DRAM (Q4_K_M, 4K context, defaults)\n")
    print("| model | GPU | DRAM | disk | GPU expert share | decode tok/s | bound |")
    print("|---|---|---|---|---|---|---|")
    for name in PUBLISHED_Q4_K_M:
        inventory = open_model(str(CONFIGS / name), "q4_k_m")
        plan = make_plan(
            inventory, Budgets(24 * GIB, 1, 128 * GIB), Workload(4096), default_hardware()
        )
        t = plan.totals
        print(
            f"| {name} | {t['gpu'] / GIB:.1f} GiB | {t['cpu'] / GIB:.1f} GiB | "
            f"{t['disk'] / GIB:.1f} GiB | {plan.expert_share_gpu:.0%} | "
            f"{plan.predicted.decode_tok_s:.1f} | {plan.predicted.bound} |"
        )
    print()


def probe_table() -> None:
    hardware = probe_machine()
    threads = hardware.cpu_threads
    print(f"## This machine: `hetero probe` ({platform.machine()}, {threads} threads)\n")
    print("| rate | measured | default |")
    print("|---|---|---|")
    defaults = default_hardware()
    for key in ("dram_read_gbs", "cpu_gemv_gbs", "cpu_matmul_gflops"):
        print(f"| {key} | {getattr(hardware, key):.1f} | {getattr(defaults, key):.1f} |")
    print(f"\nHost: {hardware.host}. No GPU here: the GPU rates keep their defaults.\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", action="store_true", help="also measure this machine")
    args = parser.parse_args()
    print("# Placement planner vs published figures\n")
    print(
        f"Made by `bench/placement_report.py{' --probe' if args.probe else ''}`, {date.today()}.\n"
    )
    sizes_table()
    ktransformers_table()
    plans_table()
    if args.probe:
        probe_table()


if __name__ == "__main__":
    main()
