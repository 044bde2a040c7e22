"""Training checkpoints: DIR/checkpoint holds the adapter, the optimizer state, the step (the
data position: the batch schedule is a function of the seed and the step) and the RNG state,
written to a temporary directory and renamed into place, so a run killed at any moment leaves
the last complete checkpoint (or, killed between the two renames, the one before it)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from hetero.errors import HeteroError
from hetero.runtime.adapters import load_into, save_adapter
from hetero.runtime.lora import LoraSettings, LowRank

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "training_state.pt"


class ResumeError(HeteroError):
    """--resume without a checkpoint, or with settings other than the checkpoint's."""


@dataclass
class Resumed:
    step: int
    optimizer_state: dict
    rng_state: torch.Tensor


def save_checkpoint(
    out: Path,
    settings: LoraSettings,
    updates: dict[str, LowRank],
    optimizer: torch.optim.Optimizer,
    step: int,
    run: dict,
    base_model: str,
) -> None:
    staging, final, previous = (
        out / ".checkpoint.tmp",
        out / CHECKPOINT_DIR,
        out / ".checkpoint.old",
    )
    shutil.rmtree(staging, ignore_errors=True)
    save_adapter(staging, settings, updates, base_model)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "run": run,
    }
    torch.save(state, staging / STATE_FILE)
    if final.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(final, previous)
    os.replace(staging, final)
    shutil.rmtree(previous, ignore_errors=True)


def has_checkpoint(out: Path) -> bool:
    return any((out / d / STATE_FILE).is_file() for d in (CHECKPOINT_DIR, ".checkpoint.old"))


def load_checkpoint(out: Path, updates: dict[str, LowRank], run: dict) -> Resumed:
    """Fill the updates from the last checkpoint in `out`; refuse one made with other settings."""
    for name in (CHECKPOINT_DIR, ".checkpoint.old"):
        directory = out / name
        if (directory / STATE_FILE).is_file():
            break
    else:
        raise ResumeError(f"--resume: {out} holds no checkpoint to resume from")
    state = torch.load(directory / STATE_FILE, weights_only=False)
    changed = [k for k in sorted(set(run) | set(state["run"])) if run.get(k) != state["run"].get(k)]
    if changed:
        key = changed[0]
        raise ResumeError(
            f"--resume: the checkpoint in {out} was made with {key}={state['run'].get(key)!r}, "
            f"this run has {run.get(key)!r}; resume with the same options"
        )
    load_into(updates, directory)
    return Resumed(state["step"], state["optimizer"], state["rng"])
