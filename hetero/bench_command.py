"""`hetero bench MODEL [--plan PLAN.json]`: measure prefill and decode tokens/s on this machine
and set them beside what the placement plan predicts."""

from __future__ import annotations

import argparse
import platform

from hetero.errors import InvalidRequestError
from hetero.model_options import load_from_args, plan_from_args


def add_bench_command(commands, add_model_options) -> None:
    bench = commands.add_parser(
        "bench", help="measure prefill and decode tok/s against the plan's prediction"
    )
    add_model_options(bench)
    bench.add_argument("--prompt-tokens", type=int, default=512)
    bench.add_argument("--new-tokens", type=int, default=32)
    bench.add_argument("--repeat", type=int, default=2, help="runs; the best is reported")
    bench.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    import psutil  # here, not at the top: `hetero --help` runs without torch
    import torch

    if args.prompt_tokens < 1 or args.new_tokens < 2 or args.repeat < 1:
        raise InvalidRequestError("--prompt-tokens >= 1, --new-tokens >= 2 and --repeat >= 1")
    context = args.prompt_tokens + args.new_tokens
    plan = plan_from_args(args, context, 1)
    model = load_from_args(args, plan)
    if context >= model.config.context_limit:
        raise InvalidRequestError(
            f"prompt plus new tokens ({context}) exceed the context ({model.config.context_limit})"
        )
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (args.prompt_tokens,), generator=generator)
    runs = [
        model.generate(prompt.tolist(), max_new_tokens=args.new_tokens, ignore_eos=True)
        for _ in range(args.repeat)
    ]
    prefill = max(r.prefill_tok_s for r in runs)
    decode = max(r.decode_tok_s for r in runs)
    predicted = plan.predicted
    print(
        f"hetero bench {args.model}: {args.prompt_tokens}-token prompt, {args.new_tokens} "
        f"new tokens, best of {args.repeat}, {torch.get_num_threads()} threads"
    )
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, "
        f"{psutil.cpu_count(logical=False)} cores; {model.placement.log_lines()[0]}"
    )
    print(f"{'':8}{'measured':>12}{'predicted':>12}{'ratio':>8}")
    for name, measured, expected in (
        ("prefill", prefill, predicted.prefill_tok_s),
        ("decode", decode, predicted.decode_tok_s),
    ):
        ratio = measured / expected if expected else float("nan")
        print(f"{name:8}{measured:>9.1f} t/s{expected:>9.1f} t/s{ratio:>8.2f}")
    print(f"plan bound: decode by {predicted.bound}, prefill by {predicted.prefill_bound}")
    return 0
