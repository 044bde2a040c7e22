"""Command-line options that say how to load a model (threads, dtype, quantisation, the
placement plan to execute), shared by every command that loads one, and the load that follows
them: the plan is read or made first, so a bad plan or budget fails before any weight loads."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from hetero.config import DTYPE_NAMES, KV_DTYPE_NAMES, QUANT_CHOICES
from hetero.errors import InvalidRequestError

if TYPE_CHECKING:
    from hetero.runtime.attention.page_selection import SparseAttention
    from hetero.runtime.model import Model
    from placement.plan import Plan


def add_load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPE_NAMES],
        help="compute dtype (default: the checkpoint's; float32 when CPU kernels run weights)",
    )
    p.add_argument(
        "--quant",
        default="auto",
        choices=QUANT_CHOICES,
        help="auto: a GGUF file's quantised/BF16 weights, and a bf16 checkpoint's on CPUs "
        "without native bf16, run on the CPU kernels; none: torch runs all in --dtype; "
        "q8_0/q4_k/bf16: convert float weights at load",
    )
    p.add_argument(
        "--plan", default=None, metavar="PLAN.json", help="placement plan to execute (hetero plan)"
    )
    p.add_argument(
        "--vram-budget", default=None, help="without --plan: GPU budget, e.g. 24GiB, 80%%"
    )
    p.add_argument(
        "--dram-budget",
        default=None,
        help="without --plan: DRAM budget, e.g. 64GiB, 80%% (what does not fit stays on disk)",
    )
    add_accelerator_option(p)
    p.add_argument(
        "--adapter", default=None, metavar="DIR", help="apply a LoRA adapter (hetero train, PEFT)"
    )
    p.add_argument(
        "--kv-dtype",
        default="auto",
        choices=KV_DTYPE_NAMES,
        help="KV cache dtype without --plan (default: the compute dtype); bf16 halves a float32 "
        "model's cache; a plan's own KV dtype wins",
    )
    p.add_argument(
        "--sparse-attention",
        default=None,
        metavar="BUDGET",
        help="sparse decode attention: each kv head reads the pages of 16 tokens whose bound "
        "of q.k is highest, plus the first and the last two; BUDGET is a fraction of the "
        "context (1/16) or tokens (2048); the first 2 layers stay dense",
    )


def add_accelerator_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--accelerator",
        default=None,
        choices=["cuda", "sim", "none"],
        help="what runs the plan's GPU groups: cuda; sim: a CPU thread with --vram-budget of "
        "its own (planned as a GPU of that size); none: the CPU (default: cuda when present)",
    )
    p.add_argument(
        "--expert-cache",
        default="score",
        choices=["score", "lru", "static"],
        help="the accelerator's experts of a layer: a pool filled by use, evicting the least "
        "used (score, default) or least recent (lru), seeded with the plan's; static: the plan's",
    )


def accelerator_of_run(args: argparse.Namespace) -> str:
    """--accelerator, or its default; refuses one that is absent, or sim without a budget."""
    from hetero.runtime.accelerator import AcceleratorUnavailableError, default_accelerator

    accelerator = getattr(args, "accelerator", None) or default_accelerator()
    if accelerator == "cuda" and default_accelerator() != "cuda":
        raise AcceleratorUnavailableError(
            "--accelerator cuda: no CUDA device is visible here; use --accelerator sim to "
            "simulate one (with --vram-budget), or none"
        )
    if accelerator == "sim" and not (args.plan or args.vram_budget):
        raise InvalidRequestError(
            "--accelerator sim needs the simulated accelerator's memory: give --vram-budget "
            "(e.g. 4MiB) or a --plan made with one"
        )
    return accelerator


def plan_from_args(args: argparse.Namespace, context: int | None, sequences: int) -> Plan:
    """The plan a run executes: `--plan FILE`, or one made now for the budgets (default: this
    machine's free VRAM and available DRAM), `context` tokens (None: the planner's default)
    for `sequences` sequences. An explicit --context-length the plan cannot hold (beyond the
    model's positions, or a saved plan's context) and an unusable --sparse-attention are
    refused here, before any weight loads."""
    from placement.hardware import load_hardware, sim_accelerator
    from placement.plan import load_plan
    from placement.policy import plan_for_model

    accelerator = accelerator_of_run(args)
    sparse = sparse_attention_of_run(args)
    if args.plan:
        if args.vram_budget or args.dram_budget:
            raise InvalidRequestError(
                "--plan and --vram-budget/--dram-budget exclude each other: the plan holds its "
                "budgets (make another with `hetero plan MODEL --vram-budget ... --save FILE`)"
            )
        plan = load_plan(args.plan)
    else:
        hardware = load_hardware(None)
        if accelerator == "sim":
            hardware = sim_accelerator(hardware)
        kv_dtype = kv_dtype_of_run(args)
        plan = plan_for_model(
            args.model, args.vram_budget, args.dram_budget, context, sequences, kv_dtype, hardware
        )
    check_context_length(args, plan)
    if sparse is not None:
        sparse.check_context(plan.workload.context)
    return plan


def check_context_length(args: argparse.Namespace, plan: Plan) -> None:
    """Refuse --context-length beyond what the plan holds: the planner cuts a context to the
    model's positions (max_position_embeddings, which a config's rope scaling extends)."""
    wanted, held = getattr(args, "context_length", None), plan.workload.context
    if wanted is None or wanted <= held:
        return
    if args.plan:
        raise InvalidRequestError(
            f"--context-length {wanted} exceeds the {held} tokens per sequence the plan "
            f"{args.plan} was made for; make one with `hetero plan MODEL --context {wanted}`"
        )
    raise InvalidRequestError(
        f"--context-length {wanted} exceeds the {held} positions {plan.model.name} supports "
        f"(max_position_embeddings, with its config's rope scaling if any); give at most "
        f"{held}, or use a checkpoint whose config.json sets rope_scaling (yarn) for more"
    )


def sparse_attention_of_run(args: argparse.Namespace) -> SparseAttention | None:
    """--sparse-attention as given (None: dense), refused at once if unusable."""
    text = getattr(args, "sparse_attention", None)
    if text is None:
        return None
    from hetero.runtime.attention.page_selection import parse_sparse_attention

    return parse_sparse_attention(text)


def kv_dtype_of_run(args: argparse.Namespace) -> str:
    """The KV cache dtype a run allocates: --kv-dtype, or "auto": its compute dtype."""
    if args.kv_dtype != "auto":
        return args.kv_dtype
    from hetero.demo import resolve_model_path
    from hetero.runtime.model import compute_dtype, kv_dtype_name

    dtype = compute_dtype(resolve_model_path(args.model), args.dtype, args.quant)
    return kv_dtype_name(dtype)


def load_from_args(args: argparse.Namespace, plan: Plan) -> Model:
    import hetero

    model = hetero.load(
        args.model,
        dtype=args.dtype,
        threads=args.threads,
        quant=args.quant,
        progress=True,
        plan=plan,
        accelerator=accelerator_of_run(args),
        expert_cache=getattr(args, "expert_cache", "score"),
        adapter=getattr(args, "adapter", None),
    )
    for line in model.placement.log_lines():
        print(f"hetero: {line}", file=sys.stderr, flush=True)
    model.kv_dtype = plan.kv_cache.dtype  # the plan sized the cache in it; a saved plan too
    model.sparse_attention = sparse_attention_of_run(args)
    if model.sparse_attention is not None:
        print(f"hetero: {model.sparse_attention.describe()}", file=sys.stderr, flush=True)
    if model.quant_report is not None:
        print(f"hetero: {model.quant_report.summary()}", file=sys.stderr, flush=True)
    return model
