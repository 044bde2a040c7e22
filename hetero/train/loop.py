"""The training loop: a frozen model with LoRA updates, AdamW on the updates (float32), steps of
--grad-accum micro-batches of at most --batch-tokens tokens, a checkpoint every --save-every
steps, the loss of each step logged (DIR/loss.jsonl, DIR/loss.png) and shown on a progress bar."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from hetero.errors import InvalidRequestError
from hetero.runtime.adapters import save_adapter
from hetero.runtime.lora import LoraSettings, adapt
from hetero.train.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from hetero.train.data import Dataset
from hetero.train.loss import Example, batch_loss

LOSS_LOG = "loss.jsonl"
LOSS_PLOT = "loss.png"
# bytes kept per token, layer and hidden unit when every layer's activations are stored for
# the backward (residual, norms, q/k/v, attention output, MLP inputs and hidden: ~24 floats
# per hidden unit, a measured order of magnitude, not a bound)
ACTIVATION_BYTES_PER_TOKEN_HIDDEN = 24 * 4
# store activations only while they take under this share of the available memory
ACTIVATION_MEMORY_SHARE = 0.25
Step = list[list[Example]]  # a step's micro-batches


@dataclass(frozen=True)
class TrainOptions:
    out: Path
    lr: float = 2e-4
    epochs: int = 1
    steps: int | None = None
    batch_tokens: int = 2048
    grad_accum: int = 1
    seed: int = 0
    save_every: int = 50
    resume: bool = False
    recompute: str = "auto"  # "auto" (by memory), "on", "off"

    def check(self) -> None:
        for name in ("epochs", "batch_tokens", "grad_accum", "save_every"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"--{name.replace('_', '-')} must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise InvalidRequestError(f"--steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise InvalidRequestError(f"--lr must be > 0, got {self.lr}")
        if has_checkpoint(self.out.expanduser()) and not self.resume:
            raise InvalidRequestError(
                f"{self.out} holds a training run: pass --resume to continue it, or choose "
                f"another --out"
            )


def epoch_steps(examples: list[Example], options: TrainOptions, epoch: int) -> list[Step]:
    """Epoch `epoch`'s steps: its examples in a seeded order, packed into micro-batches of at
    most batch_tokens tokens (one example at least), grad_accum micro-batches a step."""
    order = torch.randperm(
        len(examples), generator=torch.Generator().manual_seed(options.seed + epoch)
    )
    micro: list[list[Example]] = [[]]
    tokens = 0
    for i in order.tolist():
        e = examples[i]
        if micro[-1] and tokens + len(e.ids) > options.batch_tokens:
            micro.append([])
            tokens = 0
        micro[-1].append(e)
        tokens += len(e.ids)
    k = options.grad_accum
    return [micro[i : i + k] for i in range(0, len(micro), k)]


def schedule(examples: list[Example], options: TrainOptions) -> tuple[int, Iterator]:
    """(total steps, the steps in order): --steps cycles through epochs, else --epochs."""

    def steps() -> Iterator[Step]:
        epoch = 0
        while True:
            yield from epoch_steps(examples, options, epoch)
            epoch += 1

    if options.steps is not None:
        return options.steps, steps()
    total = sum(len(epoch_steps(examples, options, e)) for e in range(options.epochs))
    return total, steps()


def choose_recompute(net: torch.nn.Module, options: TrainOptions, hidden: int) -> bool:
    """Recompute each layer in the backward when storing every layer's activations for a
    micro-batch would take more than ACTIVATION_MEMORY_SHARE of the available memory."""
    if options.recompute != "auto":
        return options.recompute == "on"
    stored = options.batch_tokens * len(net.layers) * hidden * ACTIVATION_BYTES_PER_TOKEN_HIDDEN
    return stored > ACTIVATION_MEMORY_SHARE * psutil.virtual_memory().available


def run_key(options: TrainOptions, settings: LoraSettings, model_name: str, data: Path) -> dict:
    """What a resumed run must share with the checkpoint for its loss curve to continue."""
    key = {k: v for k, v in asdict(options).items() if k not in ("out", "resume", "save_every")}
    key.update(asdict(settings), model=model_name, data=str(data.resolve()))
    key["targets"] = list(settings.targets)
    return key


def train(
    model, dataset: Dataset, data_path: Path, settings: LoraSettings, options: TrainOptions
) -> list[float]:
    """Train LoRA updates on `model` (frozen, as loaded) and write the adapter to options.out.
    Returns each step's loss (mean over the step's target tokens)."""
    options.check()
    out = options.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(options.seed)  # the updates' initial values
    updates = adapt(model.net, settings)
    params = [p for u in updates.values() for p in (u.lora_A, u.lora_B)]
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)
    run = run_key(options, settings, model.name, data_path)
    start = 0
    if options.resume:
        resumed = load_checkpoint(out, updates, run)
        optimizer.load_state_dict(resumed.optimizer_state)
        torch.set_rng_state(resumed.rng_state)
        start = resumed.step
    losses = read_losses(out / LOSS_LOG, start)
    total, steps = schedule(dataset.examples, options)
    recompute = choose_recompute(model.net, options, model.config.hidden_size)
    say(
        f"{total} steps, {sum(p.numel() for p in params):,} LoRA parameters, "
        f"{'recomputing' if recompute else 'storing'} layer activations"
        + (f"; resuming after step {start}" if start else "")
    )
    model.net.train()
    with training_progress(total, start) as (progress, task), (out / LOSS_LOG).open("a") as log:
        for step, micro_batches in enumerate(steps):
            if step >= total:
                break
            if step < start:
                continue
            began = time.perf_counter()
            targets = sum(e.target_count for batch in micro_batches for e in batch)
            tokens = sum(len(e.ids) for batch in micro_batches for e in batch)
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for batch in micro_batches:
                loss = batch_loss(model.net, batch, recompute) / targets
                loss.backward()
                loss_sum += loss.item()
            optimizer.step()
            tok_s = tokens / (time.perf_counter() - began)
            losses.append(loss_sum)
            record = {"step": step + 1, "loss": loss_sum, "tokens": tokens, "tokens_per_s": tok_s}
            log.write(json.dumps(record) + "\n")
            log.flush()
            progress.update(task, advance=1, loss=f"{loss_sum:.4f}", speed=f"{tok_s:.0f}")
            if (step + 1) % options.save_every == 0 or step + 1 == total:
                save_checkpoint(out, settings, updates, optimizer, step + 1, run, str(model.path))
                plot_losses(losses, out / LOSS_PLOT)
    model.net.eval()
    save_adapter(out, settings, updates, str(model.path))
    return losses


def read_losses(log_path: Path, step: int) -> list[float]:
    """The logged losses of steps 1..step, the log cut back to them (a resumed run rewrites
    the steps after its checkpoint)."""
    if not log_path.exists():
        return []
    kept = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    kept = [r for r in kept if r["step"] <= step]
    log_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return [r["loss"] for r in kept]


def plot_losses(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean per target token)")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".tmp.png"))
    plt.close(fig)
    path.with_suffix(".tmp.png").replace(path)


@contextmanager
def training_progress(total: int, done: int):
    """A bar over the steps with the last step's loss and tokens/s, and the time left."""
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[speed]} tok/s"),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    with progress:
        yield progress, progress.add_task("train", total=total, completed=done, loss="-", speed="-")


def say(line: str) -> None:
    print(f"hetero: {line}", file=sys.stderr, flush=True)
