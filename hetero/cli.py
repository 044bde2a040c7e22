"""The `hetero` command. Errors a user can act on print one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from hetero import __version__
from hetero.bench.command import add_bench_command
from hetero.errors import HeteroError, InvalidRequestError
from hetero.model_options import add_load_options
from hetero.profile_command import add_profile_command
from hetero.train.command import add_train_commands
from placement.cli import add_placement_commands
from server.cli import add_serve_command

EXIT_USAGE = 2


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", metavar="MODEL", help='model directory, .gguf file, or "demo" (built in)'
    )
    p.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="tokens per sequence the plan sizes the KV cache for (default: the planner's, "
        "at most the model's)",
    )
    add_load_options(p)


def add_sampling_options(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("-n", "--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
    )


def check_sampling_args(args: argparse.Namespace) -> None:
    """The sampling flags' values, checked before the model loads (a typo fails at once)."""
    from hetero.runtime.sampling import SamplingParams

    if args.max_new_tokens < 0:
        raise InvalidRequestError(f"max_new_tokens must be >= 0, got {args.max_new_tokens}")
    SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hetero",
        description="Run huge Mixture-of-Experts LLMs split between GPU and CPU.",
    )
    parser.add_argument("--version", action="version", version=f"hetero {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = commands.add_parser("generate", help="complete a prompt and print the result")
    add_model_options(gen)
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--system", default=None, help="system message (with --chat)")
    add_sampling_options(gen, max_new_tokens=128)
    gen.set_defaults(run=run_generate)

    chat = commands.add_parser("chat", help="interactive chat (/reset, /system TEXT, /exit)")
    add_model_options(chat)
    chat.add_argument("--system", default=None, help="initial system message")
    add_sampling_options(chat, max_new_tokens=512)
    chat.set_defaults(run=run_chat)

    add_serve_command(commands)
    add_bench_command(commands)
    add_placement_commands(commands)
    add_profile_command(commands)
    add_train_commands(commands)

    quant = commands.add_parser("quantize", help="write MODEL as a GGUF file (llama.cpp's mixes)")
    quant.add_argument("model", metavar="SRC", help='model directory, .gguf file, or "demo"')
    quant.add_argument("out", metavar="OUT.gguf", help="the GGUF file to write")
    quant.add_argument(
        "--type",
        required=True,
        choices=["q4_k_m", "q5_k_m", "q6_k", "q8_0", "bf16", "f16", "f32"],
        help="q4_k_m: llama.cpp's Q4_K_M mix (Q4_K, Q6_K/Q5_K/Q8_0 where it chooses them)",
    )
    quant.set_defaults(run=run_quantize)

    demo = commands.add_parser("demo", help="write the built-in demo model to DIR")
    demo.add_argument("dir", nargs="?", default=None, help="target (default: the cache folder)")
    demo.set_defaults(run=run_demo)
    return parser


EXTRA_PROMPT_TOKENS = 256  # special tokens and a chat template's text around a prompt


def load_model(args: argparse.Namespace, context: int | None = None):
    """The model of `args`, its plan made for --context-length tokens where given, else
    `context` (None: the planner's default)."""
    from hetero.model_options import load_from_args, plan_from_args
    from placement.report import summary_lines

    if args.context_length is not None:
        if args.context_length < 2:
            raise InvalidRequestError("--context-length must be at least 2")
        context = args.context_length
    plan = plan_from_args(args, context, 1)
    print(f"hetero: plan: {summary_lines(plan)[0]}", file=sys.stderr, flush=True)
    return load_from_args(args, plan)


def generate_context(args: argparse.Namespace) -> int:
    """Tokens a `generate` run can hold at most: its prompt's bytes (no tokenizer makes more
    tokens than bytes but for its special ones), the template's, and -n."""
    text = args.prompt + (args.system or "" if args.chat else "")
    extra = EXTRA_PROMPT_TOKENS if args.chat else 16
    return len(text.encode()) + extra + args.max_new_tokens


def print_stats(result) -> None:
    print(
        f"[{result.prompt_tokens} prompt tokens, {len(result.token_ids)} generated, "
        f"prefill {result.prefill_tok_s:.1f} tok/s, decode {result.decode_tok_s:.1f} tok/s, "
        f"finish: {result.finish_reason}]",
        file=sys.stderr,
    )


def stream_to_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_generate(args: argparse.Namespace) -> int:
    check_sampling_args(args)
    model = load_model(args, generate_context(args))
    prompt: str | list[int] = args.prompt
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt = model.encode_chat([*messages, {"role": "user", "content": args.prompt}])
    result = model.generate(prompt, on_text=stream_to_stdout, **sampling_kwargs(args))
    print()
    print_stats(result)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from hetero.reasoning import prompt_opens_reasoning, split_reasoning

    check_sampling_args(args)
    model = load_model(args)
    system = args.system
    history: list[dict] = []
    print(f"hetero chat with {model.name}: /reset, /system TEXT, /exit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        command, _, rest = line.strip().partition(" ")
        if command == "/exit":
            return 0
        if command == "/reset":
            history.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if command == "/system":
            system = rest.strip() or None
            history.clear()
            print("(system message set; conversation cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        try:
            prompt_text = model.apply_chat_template(messages)
            prompt_ids = model.tokenizer.encode(prompt_text)
            result = model.generate(prompt_ids, on_text=stream_to_stdout, **sampling_kwargs(args))
        except HeteroError as err:
            history.pop()
            print(f"hetero: error: {err}", file=sys.stderr)
            continue
        print()
        print_stats(result)
        # history keeps the answer only: chat templates drop earlier turns' reasoning
        _, answer = split_reasoning(result.text, prompt_opens_reasoning(prompt_text))
        history.append({"role": "assistant", "content": answer})


def run_quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

    import hetero
    from hetero.loading.gguf_writer import write_gguf

    model = hetero.load(args.model, progress=True, quant="none")  # the float weights, as loaded
    for path in write_gguf(model, Path(args.out).expanduser(), args.type):
        print(path)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from hetero.demo import ensure_demo, write_demo

    path = write_demo(args.dir) if args.dir else ensure_demo()
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except HeteroError as err:
        print(f"hetero: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:
        print(
            f"hetero: error: {err.strerror or err}: {err.filename or ''}".rstrip(": "),
            file=sys.stderr,
        )
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
