"""`hetero train MODEL --data FILE.jsonl --out DIR` and `hetero merge MODEL --adapter DIR OUT`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hetero.config import LORA_TARGETS
from hetero.errors import InvalidRequestError
from hetero.model_options import add_load_options
from hetero.train.data import TOO_LONG_CHOICES, DataError


def add_train_commands(commands) -> None:
    p = commands.add_parser("train", help="LoRA fine-tuning; writes a PEFT adapter to --out")
    p.add_argument("model", metavar="MODEL", help='model directory, .gguf file, or "demo"')
    add_load_options(p)
    p.add_argument(
        "--data",
        required=True,
        metavar="FILE.jsonl",
        help='JSON lines: {"messages": [...]} or {"text": ...}',
    )
    p.add_argument("--out", required=True, metavar="DIR", help="adapter, checkpoints and loss log")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument(
        "--targets",
        default=None,
        help=f"some of {','.join(LORA_TARGETS)} (default: all PEFT loads for the model)",
    )
    p.add_argument("--lr", type=float, default=2e-4)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=1)
    length.add_argument(
        "--steps", type=int, default=None, help="optimizer steps (instead of --epochs)"
    )
    p.add_argument("--seq-len", type=int, default=2048, help="longest example, in tokens")
    p.add_argument(
        "--too-long",
        choices=TOO_LONG_CHOICES,
        default="truncate",
        help="what to do with longer examples",
    )
    p.add_argument(
        "--batch-tokens", type=int, default=None, help="tokens per micro-batch (default: --seq-len)"
    )
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its checkpoint"
    )
    p.add_argument(
        "--recompute",
        choices=["auto", "on", "off"],
        default="auto",
        help="recompute layers in the backward (auto: when activations would not fit)",
    )
    p.set_defaults(run=run_train)

    merge = commands.add_parser(
        "merge", help="write MODEL with a LoRA adapter merged into its weights"
    )
    merge.add_argument("model", metavar="MODEL", help="model directory (safetensors)")
    merge.add_argument("--adapter", required=True, metavar="DIR")
    merge.add_argument("out", metavar="OUT", help="directory to write the merged model to")
    merge.set_defaults(run=run_merge)


def run_train(args: argparse.Namespace) -> int:
    from hetero.model_options import load_from_args, plan_from_args
    from hetero.runtime.lora import LoraSettings, default_targets
    from hetero.train.data import read_dataset
    from hetero.train.loop import TrainOptions, say, train

    options = TrainOptions(
        out=Path(args.out),
        lr=args.lr,
        epochs=args.epochs,
        steps=args.steps,
        batch_tokens=args.batch_tokens or args.seq_len,
        grad_accum=args.grad_accum,
        seed=args.seed,
        save_every=args.save_every,
        resume=args.resume,
        recompute=args.recompute,
    )
    options.check()
    targets = tuple(t.strip() for t in args.targets.split(",")) if args.targets else LORA_TARGETS
    LoraSettings(args.lora_rank, args.lora_alpha, args.lora_dropout, targets)  # fail before loading
    data = Path(args.data).expanduser()
    if not data.is_file():
        raise DataError(f"the data file {data} does not exist")
    if args.batch_tokens is not None and args.batch_tokens < args.seq_len:
        raise InvalidRequestError(
            f"--batch-tokens ({args.batch_tokens}) must hold one --seq-len ({args.seq_len}) example"
        )
    model = load_from_args(args, plan_from_args(args, args.seq_len, 1))
    dataset = read_dataset(data, model.tokenizer, args.seq_len, args.too_long)
    for line in dataset.summary():
        say(line)
    if not args.targets:
        targets = default_targets(model.net)
    settings = LoraSettings(args.lora_rank, args.lora_alpha, args.lora_dropout, targets)
    losses = train(model, dataset, data, settings, options)
    say(f"final loss {losses[-1]:.4f}; adapter written to {options.out}")
    print(options.out)
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from hetero.demo import resolve_model_path
    from hetero.train.merge import merge_adapter

    out = merge_adapter(resolve_model_path(args.model), Path(args.adapter), Path(args.out))
    print(out, file=sys.stdout)
    return 0
