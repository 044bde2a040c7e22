"""Write a loaded model as a GGUF file that llama.cpp and hetero read: llama.cpp's tensor names
and layouts (stacked experts, permuted llama q/k, DeepSeek's k_b / v_b, llama3 rope scaling as
rope_freqs), its metadata keys and tokenizer, and its type mix for the chosen file type.
Tensors are converted one at a time and streamed to disk, so memory stays near one tensor beyond
the (memory-mapped) source model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_VERSION, GGUFWriter, Keys

from hetero.errors import InvalidRequestError, UnsupportedModelError
from hetero.formats.gguf_quantize import quantize
from hetero.formats.gguf_quants import FORMATS
from hetero.loading.gguf_config import ROPE_FREQS, gguf_metadata
from hetero.loading.gguf_names import rope_interleave, to_gguf
from hetero.loading.gguf_tokenizer import gguf_tokenizer_metadata
from hetero.loading.quant_mix import FILE_TYPES, tensor_types
from hetero.models.rope import llama3_frequency_factors
from hetero.progress import track


@dataclass
class PlannedTensor:
    """One GGUF tensor: its torch-order shape and how to make its float32 values."""

    shape: tuple[int, ...]
    values: Callable[[], np.ndarray]


def write_gguf(model: Any, out: Path, file_type: str, split_max_bytes: int = 0) -> list[Path]:
    """Write `model` (a hetero `Model`) to `out` as `file_type` ("q4_k_m", "q8_0", "f16", ...);
    with `split_max_bytes`, as `-0000i-of-0000N` parts. Returns the files written."""
    if file_type not in FILE_TYPES:
        raise InvalidRequestError(
            f"unknown GGUF type {file_type!r}; choose one of {', '.join(FILE_TYPES)}"
        )
    config = model.config
    arch, metadata = gguf_metadata(config)
    plan = plan_tensors(model.net, config, arch)
    if config.rope.type == "llama3":  # as llama.cpp's converter: per-dimension divisors
        rope_dim = metadata[Keys.Rope.DIMENSION_COUNT.format(arch=arch)]
        factors = llama3_frequency_factors(rope_dim, config.rope).float().numpy()
        plan = {ROPE_FREQS: PlannedTensor(factors.shape, lambda: factors), **plan}
    experts = metadata.get(Keys.LLM.EXPERT_COUNT.format(arch=arch), 0)
    shapes = {name: t.shape for name, t in plan.items()}
    types = tensor_types(shapes, file_type, experts, config.num_hidden_layers)

    writer = GGUFWriter(out, arch, split_max_size=split_max_bytes)
    writer.add_name(model.name.removesuffix(".gguf"))
    writer.add_file_type(int(FILE_TYPES[file_type].llama_file_type))
    writer.add_quantization_version(GGML_QUANT_VERSION)
    for key, value in {
        **metadata,
        **gguf_tokenizer_metadata(model.tokenizer, config.vocab_size),
    }.items():
        _add_value(writer, key, value)
    for name, tensor in plan.items():
        fmt = FORMATS[types[name]]
        nbytes = int(np.prod(tensor.shape[:-1], dtype=np.int64)) * fmt.row_bytes(tensor.shape[-1])
        byte_shape = (*tensor.shape[:-1], fmt.row_bytes(tensor.shape[-1]))
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=types[name])
    files = writer.format_shard_names(out)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, tensor in track(plan.items(), f"writing {file_type}", len(plan)):
        writer.write_tensor_data(quantize(tensor.values(), types[name]))
    writer.close()
    return files


def plan_tensors(net: torch.nn.Module, config: Any, arch: str) -> dict[str, PlannedTensor]:
    """GGUF name -> tensor, in hetero's parameter order with each layer's experts stacked."""
    params = dict(net.named_parameters())
    plan: dict[str, PlannedTensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for module_name, param in params.items():
        if module_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        try:
            name, expert = to_gguf(module_name)
        except KeyError:
            raise UnsupportedModelError(
                f"parameter {module_name!r} has no GGUF name; this model cannot be written"
            ) from None
        if expert is not None:
            if name not in experts:
                experts[name] = {}
                plan[name] = PlannedTensor((), _stack(experts[name]))
            experts[name][expert] = param
            continue
        if name.endswith("attn_kv_b.weight"):
            plan.update(_split_kv_b(name, param, config))
            continue
        rows = _rope_rows(name, config) if arch == "llama" else None
        plan[name] = PlannedTensor(tuple(param.shape), _values(param, rows))
    for name, by_expert in experts.items():
        first = by_expert[0]
        plan[name].shape = (len(by_expert), *first.shape)
    return plan


def _values(param: torch.Tensor, rows: np.ndarray | None = None) -> Callable[[], np.ndarray]:
    def values() -> np.ndarray:
        array = param.detach().float().numpy()
        return array[rows] if rows is not None else array

    return values


def _stack(by_expert: dict[int, torch.Tensor]) -> Callable[[], np.ndarray]:
    def values() -> np.ndarray:
        return np.stack([by_expert[e].detach().float().numpy() for e in sorted(by_expert)])

    return values


def _rope_rows(name: str, config: Any) -> np.ndarray | None:
    """llama.cpp's rope permutation for llama-arch q/k projections (weights and biases)."""
    if ".attn_q." in name:
        heads = config.num_attention_heads
    elif ".attn_k." in name:
        heads = config.num_key_value_heads
    else:
        return None
    return rope_interleave(config.head_dim * heads, heads)


def _split_kv_b(name: str, param: torch.Tensor, config: Any) -> dict[str, PlannedTensor]:
    # kv_b: [heads * (nope + v), rank] -> k_b [heads, rank, nope] (transposed), v_b [heads, v, rank]
    heads, nope, v_dim = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim
    rank = param.shape[1]
    prefix = name.removesuffix("attn_kv_b.weight")

    def part(keys: bool) -> Callable[[], np.ndarray]:
        def values() -> np.ndarray:
            kv = param.detach().float().numpy().reshape(heads, nope + v_dim, rank)
            return np.ascontiguousarray(kv[:, :nope].transpose(0, 2, 1) if keys else kv[:, nope:])

        return values

    return {
        prefix + "attn_k_b.weight": PlannedTensor((heads, rank, nope), part(True)),
        prefix + "attn_v_b.weight": PlannedTensor((heads, v_dim, rank), part(False)),
    }


def _add_value(writer: GGUFWriter, key: str, value: Any) -> None:
    # the GGUF types llama.cpp's loader expects: counts and ids u32, reals f32
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)
    else:
        raise TypeError(f"metadata {key!r}: cannot store {type(value).__name__}")
