"""Fill a model built on the meta device with checkpoint tensors.

Tensors already in the target dtype stay zero-copy views of the memory-mapped file; others are
converted one at a time and their source pages released, so peak RSS stays near what is
materialised."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hetero.errors import ModelFormatError
from hetero.loading.fp8 import SCALE_SUFFIX, dequantize_fp8_rows
from hetero.loading.safetensors_checkpoint import SafetensorsCheckpoint
from hetero.progress import progress_bar

CONVERT_SLICE_BYTES = 32 * 1024 * 1024


def load_weights(
    net: nn.Module,
    checkpoint: SafetensorsCheckpoint,
    checkpoint_name: Callable[[str], str],
    dtype: torch.dtype,
    tie_word_embeddings: bool,
    fp8_block: tuple[int, int] = (128, 128),
    keep_float32: tuple[str, ...] = (),
    progress: bool = True,
) -> None:
    """Assign every parameter of `net` from `checkpoint` in `dtype`, except those whose names
    end with a suffix in `keep_float32` (small tensors whose precision decides routing)."""
    params = dict(net.named_parameters(remove_duplicate=False))
    names = tensor_names(net, checkpoint, checkpoint_name, tie_word_embeddings)
    total = sum(checkpoint.entries[n].nbytes for n in set(names.values()))
    loaded: dict[str, torch.Tensor] = {}
    with progress_bar("loading", total, in_bytes=True, enabled=progress) as bar:
        for name, param in params.items():
            source = names[name]
            if source not in loaded:
                target = torch.float32 if name.endswith(keep_float32) else dtype
                loaded[source] = materialise(
                    checkpoint, source, tuple(param.shape), target, fp8_block
                )
                bar.advance(checkpoint.entries[source].nbytes)
            set_parameter(net, name, loaded[source])


def tensor_names(
    net: nn.Module,
    checkpoint: SafetensorsCheckpoint,
    checkpoint_name: Callable[[str], str],
    tie_word_embeddings: bool,
) -> dict[str, str]:
    """The checkpoint tensor of each parameter of `net`; refuses a checkpoint that lacks any."""
    names = {
        name: file_name(name, checkpoint_name)
        for name, _ in net.named_parameters(remove_duplicate=False)
    }
    if tie_word_embeddings or "lm_head.weight" not in checkpoint:
        # tied (or a checkpoint that stores only the embedding): the head reuses it
        names["lm_head.weight"] = names["embed_tokens.weight"]
    missing = [n for n in names.values() if n not in checkpoint]
    if missing:
        raise ModelFormatError(
            f"{checkpoint.model_dir} lacks {len(missing)} tensor(s) the config implies, "
            f"e.g. {missing[0]!r}; the checkpoint does not match its config.json"
        )
    return names


def file_name(module_name: str, checkpoint_name: Callable[[str], str]) -> str:
    name = checkpoint_name(module_name)
    return name if name.startswith("lm_head.") else "model." + name


def materialise(
    checkpoint: SafetensorsCheckpoint,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    fp8_block: tuple[int, int],
) -> torch.Tensor:
    tensor = checkpoint.tensor(name)
    if tuple(tensor.shape) != shape:
        raise ModelFormatError(
            f"tensor {name!r} has shape {tuple(tensor.shape)} but config.json implies {shape}"
        )
    if tensor.dtype == torch.float8_e4m3fn:
        return dequantize_fp8(checkpoint, name, tensor, dtype, fp8_block)
    if tensor.dtype == dtype:
        return tensor
    # convert in slices of rows, releasing each slice's source pages as soon as it is copied
    out = torch.empty(shape, dtype=dtype)
    rows = tensor.reshape(-1, shape[-1]) if tensor.dim() > 1 else tensor.reshape(1, -1)
    target = out.view(rows.shape)
    row_bytes = rows.shape[1] * tensor.element_size()
    step = max(1, CONVERT_SLICE_BYTES // max(row_bytes, 1))
    for begin in range(0, rows.shape[0], step):
        stop = min(begin + step, rows.shape[0])
        target[begin:stop] = rows[begin:stop]
        checkpoint.release(name, begin * row_bytes, stop * row_bytes)
    return out


def dequantize_fp8(
    checkpoint: SafetensorsCheckpoint,
    name: str,
    tensor: torch.Tensor,
    dtype: torch.dtype,
    block: tuple[int, int],
) -> torch.Tensor:
    scale_name = name + SCALE_SUFFIX
    if scale_name not in checkpoint or tensor.dim() != 2:
        raise ModelFormatError(f"float8 tensor {name!r} has no {scale_name!r} block scales")
    scale_inv = checkpoint.tensor(scale_name)
    out = torch.empty(tensor.shape, dtype=dtype)
    step = block[0] * max(1, CONVERT_SLICE_BYTES // (block[0] * tensor.shape[1] * 4))
    for begin in range(0, tensor.shape[0], step):
        rows = slice(begin, min(begin + step, tensor.shape[0]))
        out[rows] = dequantize_fp8_rows(tensor, scale_inv, block, rows, dtype)
        checkpoint.release(name, begin * tensor.shape[1], rows.stop * tensor.shape[1])
    return out


def set_parameter(net: nn.Module, dotted: str, value: torch.Tensor) -> None:
    owner_name, _, attr = dotted.rpartition(".")
    owner = net.get_submodule(owner_name)
    owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
