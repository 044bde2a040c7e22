"""`hetero serve`: load a model, start the engine thread, and serve the app with uvicorn."""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from hetero.errors import InvalidRequestError
from hetero.model_options import add_load_options, load_from_args, plan_from_args

if TYPE_CHECKING:
    from placement import Plan

DEFAULT_CONTEXT = 8192


def add_serve_command(commands) -> None:
    p = commands.add_parser("serve", help="OpenAI/Ollama-compatible server with a web chat page")
    p.add_argument(
        "model",
        nargs="?",
        default="demo",
        metavar="MODEL",
        help='model directory, or "demo" (default)',
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="model name clients use")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=16,
        help="sequences in the running batch (default 16)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="requests waiting beyond those; more are answered 429",
    )
    p.add_argument(
        "--context-length",
        type=int,
        default=None,
        help=f"tokens per sequence (default: the model's, at most {DEFAULT_CONTEXT})",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="Jinja chat template to use instead of the model's",
    )
    p.add_argument(
        "--lora-modules",
        nargs="+",
        default=[],
        metavar="NAME=DIR",
        help="LoRA adapters served beside the model, each chosen by requests naming NAME",
    )
    add_load_options(p)
    p.set_defaults(run=run_serve)


def log(message: str) -> None:
    print(f"hetero: {message}", file=sys.stderr, flush=True)


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise InvalidRequestError(f"cannot listen on {host}:{port}: {err.strerror}") from None


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from hetero.runtime.engine import Engine
    from server.app import create_app
    from server.state import ServerState

    if args.max_concurrency < 1 or args.max_queue < 0:
        raise InvalidRequestError("--max-concurrency must be >= 1 and --max-queue >= 0")
    check_port_free(args.host, args.port)
    if args.context_length is not None and args.context_length < 2:
        raise InvalidRequestError("--context-length must be at least 2")
    template = None
    if args.chat_template:
        if not Path(args.chat_template).is_file():
            raise InvalidRequestError(f"chat template file {args.chat_template} does not exist")
        template = Path(args.chat_template).read_text(encoding="utf-8")
    # the plan sizes the KV cache: its tokens per sequence and sequences are what is allocated
    plan = plan_from_args(args, args.context_length or DEFAULT_CONTEXT, args.max_concurrency)
    adapters = parse_lora_modules(args.lora_modules)
    model = load_from_args(args, plan)
    if adapters:
        from hetero.runtime.adapters import apply_adapter

        for adapter_name, directory in adapters.items():
            apply_adapter(model.net, directory, adapter_name, default=False)
    if template is not None:
        model.tokenizer.chat_templates["default"] = template
    context = min(plan.workload.context, model.config.context_limit)
    args.max_concurrency = plan.kv_cache.sequences
    kv = model.new_kv_cache(context, args.max_concurrency)
    engine = Engine(
        model.net,
        model.tokenizer,
        kv,
        args.max_concurrency,
        args.max_queue,
        glue_threads=model.glue_threads,
    )
    name = args.served_model_name or ("demo" if args.model == "demo" else model.name)
    if name in adapters:
        raise InvalidRequestError(f"the adapter name {name!r} is the model's served name")
    state = ServerState(
        model, engine, name, context, api_key=args.api_key, adapters=tuple(adapters)
    )
    # built now rather than by the first request that needs them, on the event loop's thread:
    # the grammar tokenizer takes about a second on a 150k vocabulary, a GGUF header a moment
    state.grammars, state.info  # noqa: B018

    weights = model.weight_bytes
    tokens = kv.num_blocks * kv.block_size
    log(
        f"model {name}: {model.config.model_type}, {weights / 2**30:.2f} GiB of weights in "
        f"memory, {model.disk_bytes / 2**30:.2f} GiB read from disk "
        f"({str(model.dtype).removeprefix('torch.')})"
    )
    log_plan(plan)
    log(
        f"KV cache: {tokens} tokens in {kv.num_blocks} blocks of {kv.block_size}, "
        f"{kv_dtype_names(kv)} ({tokens * kv.bytes_per_token / 2**20:.1f} MiB reserved, "
        f"committed as used)"
    )
    log(
        f"maximum concurrency at {context} tokens per request: {tokens // context} "
        f"(running batch {args.max_concurrency}, queue {args.max_queue})"
    )
    log(f"serving on http://{args.host}:{args.port} (OpenAI /v1, Ollama /api, web chat /)")
    engine.start()
    try:
        uvicorn.run(create_app(state), host=args.host, port=args.port, log_level="warning")
    finally:
        engine.shutdown()
    return 0


def parse_lora_modules(specs: list[str]) -> dict[str, str]:
    """--lora-modules NAME=DIR ... as {name: directory}."""
    adapters = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise InvalidRequestError(f"--lora-modules takes NAME=DIR; got {spec!r}")
        if name in adapters:
            raise InvalidRequestError(f"--lora-modules names {name!r} twice")
        adapters[name] = directory
    return adapters


def kv_dtype_names(kv) -> str:
    """The allocated cache's dtype(s) and device(s), as the plan names them."""
    from hetero.runtime.model import kv_dtype_name

    kinds = sorted({f"{kv_dtype_name(s.dtype)} on {s.device.type}" for s in kv.layers})
    return ", ".join(kinds)


def log_plan(plan: Plan) -> None:
    from placement.report import summary_lines

    totals = ", ".join(f"{device} {size / 2**30:.2f} GiB" for device, size in plan.totals.items())
    log(f"plan: {totals}")
    for line in summary_lines(plan):
        log(f"plan: {line}")
    for warning in plan.warnings:
        log(f"warning: {warning}")
