"""hetero: run huge Mixture-of-Experts LLMs on one machine, GPU for the hot path and CPU for
the cold experts. `hetero.load(path)` returns a `Model`; `hetero --help` lists the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hetero.errors import (
    HeteroError,
    InvalidRequestError,
    ModelFormatError,
    PromptTooLongError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

__all__ = [
    "HeteroError",
    "InvalidRequestError",
    "ModelFormatError",
    "PromptTooLongError",
    "UnsupportedModelError",
    "load",
    "__version__",
]


def load(path: str | Path, **options: Any):
    """Load a model directory (or "demo", the built-in demo model) and return a `Model`.

    Options: dtype ("auto", "float32", "bfloat16", "float16"), threads (CPU threads), quant
    ("auto", "none", "q8_0", "q4_k", "bf16", "f16", "f32": which weights run on the CPU kernels; see
    `Model.load`), progress (show a load progress bar), adapter (a LoRA adapter directory, as
    `hetero train` or PEFT writes it, applied to the model)."""
    from hetero.demo import resolve_model_path
    from hetero.runtime.model import Model

    return Model.load(resolve_model_path(path), **options)
