"""`hetero profile MODEL --prompts FILE --out PROFILE.json`: run prompts and record how often
each routed expert is chosen, for `hetero plan --profile`."""

from __future__ import annotations

import argparse
from pathlib import Path

from hetero.errors import InvalidRequestError


def add_profile_command(commands) -> None:
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
