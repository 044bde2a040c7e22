"""Fill a model built on the meta device with checkpoint tensors.

Tensors already in the target dtype stay zero-copy views of the memory-mapped file; others are
converted one at a time and their source pages released, so peak RSS stays near what is
materialised."""

from __future__ import annotations

from collections.abc import Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from hetero.errors import ModelFormatError
from hetero.loading.safetensors_checkpoint import SafetensorsCheckpoint


def load_weights(
    net: nn.Module,
    checkpoint: SafetensorsCheckpoint,
    checkpoint_name: Callable[[str], str],
    dtype: torch.dtype,
    tie_word_embeddings: bool,
    progress: bool = True,
) -> None:
    params = dict(net.named_parameters(remove_duplicate=False))
    names = {name: file_name(name, checkpoint_name) for name in params}
    if tie_word_embeddings or "lm_head.weight" not in checkpoint:
        # tied (or a checkpoint that stores only the embedding): the head reuses it
        names["lm_head.weight"] = names["embed_tokens.weight"]
    missing = [n for n in names.values() if n not in checkpoint]
    if missing:
        raise ModelFormatError(
            f"{checkpoint.model_dir} lacks {len(missing)} tensor(s) the config implies, "
            f"e.g. {missing[0]!r}; the checkpoint does not match its config.json"
        )
    total = sum(checkpoint.entries[n].nbytes for n in set(names.values()))
    bar = Progress(
        TextColumn("loading"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not progress,
    )
    loaded: dict[str, torch.Tensor] = {}
    with bar:
        task = bar.add_task("load", total=total)
        for name, param in params.items():
            source = names[name]
            if source not in loaded:
                loaded[source] = materialise(checkpoint, source, tuple(param.shape), dtype)
                bar.advance(task, checkpoint.entries[source].nbytes)
            set_parameter(net, name, loaded[source])


def file_name(module_name: str, checkpoint_name: Callable[[str], str]) -> str:
    name = checkpoint_name(module_name)
    return name if name.startswith("lm_head.") else "model." + name


def materialise(
    checkpoint: SafetensorsCheckpoint, name: str, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    tensor = checkpoint.tensor(name)
    if tuple(tensor.shape) != shape:
        raise ModelFormatError(
            f"tensor {name!r} has shape {tuple(tensor.shape)} but config.json implies {shape}"
        )
    if tensor.dtype == dtype:
        return tensor
    converted = tensor.to(dtype)
    checkpoint.release(name)
    return converted


def set_parameter(net: nn.Module, dotted: str, value: torch.Tensor) -> None:
    owner_name, _, attr = dotted.rpartition(".")
    owner = net.get_submodule(owner_name)
    owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
