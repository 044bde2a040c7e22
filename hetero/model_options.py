"""Command-line options that say how to load a model (threads, dtype, quantisation), shared by
every command that loads one, and the load that follows them."""

from __future__ import annotations

import argparse
import sys

from hetero.runtime.model import DTYPES, QUANT_CHOICES, Model


def add_load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
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


def load_from_args(args: argparse.Namespace) -> Model:
    import hetero

    model = hetero.load(
        args.model, dtype=args.dtype, threads=args.threads, quant=args.quant, progress=True
    )
    if model.quant_report is not None:
        print(f"hetero: {model.quant_report.summary()}", file=sys.stderr, flush=True)
    return model
