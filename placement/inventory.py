"""Every tensor group of a model with its bytes, before a weight is read. The tensors and
their shapes are those of hetero's own model built on the meta device from the config (a
config.json, a checkpoint directory's, or a GGUF file's metadata); their weight types are the
GGUF file's, a llama.cpp mixture's (`--quant q4_k_m`, sized as `hetero quantize` writes it),
or those hetero loads a checkpoint in."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

from gguf import GGMLQuantizationType

from hetero.errors import ModelFormatError
from hetero.formats.gguf_quants import FORMATS
from hetero.loading.gguf_names import to_gguf
from hetero.loading.quant_mix import FILE_TYPES, tensor_types
from placement.errors import PlacementError
from placement.tensor_groups import classify

FLOAT_TYPES = {
    "f32": GGMLQuantizationType.F32,
    "bf16": GGMLQuantizationType.BF16,
    "f16": GGMLQuantizationType.F16,
}


@dataclass(frozen=True)
class TensorInfo:
    module_name: str  # hetero's: "layers.3.mlp.experts.17.gate_proj.weight"
    hf_name: str  # the Hugging Face checkpoint's
    gguf_name: str  # llama.cpp's; one stacked tensor holds all experts of a layer
    shape: tuple[int, ...]  # torch order; one expert's slice of a stacked expert tensor
    weight_type: str  # GGML type name in lower case: "q4_k", "bf16"
    nbytes: int


@dataclass
class TensorGroup:
    """Tensors placed together: a layer's attention, one routed expert, the lm_head."""

    name: str  # "layers.3.attention", "layers.3.experts.17", "lm_head"
    kind: str  # see placement/tensor_groups.py: "attention", "expert", ...
    layer: int | None
    expert: int | None
    tensors: list[TensorInfo] = field(default_factory=list)

    # computed once the group is complete: planning asks for them many times
    @cached_property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @cached_property
    def params(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors)


@dataclass
class ModelInventory:
    name: str
    source: str
    model_type: str
    weights: str  # "q4_k_m", "bf16 as loaded", "GGUF types"
    num_layers: int
    hidden_size: int
    vocab_size: int
    context_limit: int
    num_experts: int  # routed experts per MoE layer; 0 for a dense model
    top_k: int
    kv_values_per_token: int  # per layer: values cached per token (k and v, or MLA's latent)
    attention_flops_per_pair: int  # per layer: FLOPs per (query token, cached token)
    history_values_per_token: int  # a cached token's keys and values expanded to every head
    widest_activation: int  # the widest matmul output, for the workspace estimate
    groups: list[TensorGroup]

    @property
    def weight_bytes(self) -> int:
        return sum(g.nbytes for g in self.groups)

    def weight_type_bytes(self) -> dict[str, int]:
        """Bytes per weight type, largest first."""
        totals: dict[str, int] = {}
        for group in self.groups:
            for t in group.tensors:
                totals[t.weight_type] = totals.get(t.weight_type, 0) + t.nbytes
        return dict(sorted(totals.items(), key=lambda item: -item[1]))


# (module name, GGUF name, shape) -> (weight type, bytes)
Typer = Callable[[str, str, tuple[int, ...]], tuple[str, int]]


def open_model(model: str, quant: str | None = None) -> ModelInventory:
    """A MODEL argument of `hetero plan`: a checkpoint directory (weights or just its
    config.json, to plan a model not downloaded), a config.json, a .gguf file, or "demo".
    `quant` (a GGUF file type) sizes a directory or config.json in that type."""
    from hetero.config import read_config_json
    from hetero.demo import resolve_model_path

    path = resolve_model_path(model)
    if path.name == "config.json" and path.is_file():
        path = path.parent
    if path.is_dir():
        return inventory_from_config(read_config_json(path), path.name, str(path), quant)
    if not path.exists():
        raise ModelFormatError(f"model {path} does not exist")
    if path.suffix != ".gguf":
        raise ModelFormatError(
            f"{path} is neither a model directory, a config.json nor a .gguf file"
        )
    if quant is not None:
        raise PlacementError(
            f"{path.name} stores its own weight types; --quant applies to a checkpoint "
            f"directory or a config.json"
        )
    return inventory_from_gguf(path)


def inventory_from_config(
    raw: dict[str, Any], name: str, source: str, quant: str | None
) -> ModelInventory:
    """The model of config.json `raw`, typed by the GGUF file type `quant`, or as hetero
    loads its checkpoint when None (the config's dtype; fp8 is dequantised to it)."""
    from hetero.config import dtype_name
    from hetero.models import family_for

    if quant is None:
        family = family_for(raw)
        loaded = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}[dtype_name("auto", raw)]
        float32 = tuple(getattr(family, "FLOAT32_PARAMETERS", ()))

        def as_loaded(module_name: str, gguf_name: str, shape: tuple[int, ...]):
            weight_type = "f32" if module_name.endswith(float32) else loaded
            return weight_type, _nbytes(FLOAT_TYPES[weight_type], shape)

        return build_inventory(raw, name, source, f"{loaded} as loaded", lambda *_: as_loaded)

    file_type = quant.lower()
    if file_type not in FILE_TYPES:
        raise PlacementError(
            f"unknown weight type {quant!r}; choose one of {', '.join(FILE_TYPES)}"
        )

    def mixture(cfg: Any, tensors: dict[str, tuple[int, ...]]) -> Typer:
        types = tensor_types(tensors, file_type, _num_experts(cfg), cfg.num_hidden_layers)
        return lambda _, gguf_name, shape: (
            types[gguf_name].name.lower(),
            _nbytes(types[gguf_name], shape),
        )

    return build_inventory(raw, name, source, file_type, mixture)


def inventory_from_gguf(path: Path) -> ModelInventory:
    """A GGUF file's model (all parts of a split one) with its stored weight types."""
    from hetero.loading.gguf_checkpoint import GGUFCheckpoint
    from hetero.loading.weights import file_name

    checkpoint = GGUFCheckpoint(path)

    def stored(module_name: str, gguf_name: str, shape: tuple[int, ...]) -> tuple[str, int]:
        entry = checkpoint.entries.get(file_name(module_name, checkpoint.checkpoint_name))
        if entry is None:
            raise ModelFormatError(f"{path} lacks the tensor {gguf_name} its metadata implies")
        return checkpoint.raw[entry.source].ggml_type.name.lower(), entry.nbytes

    name = str(checkpoint.metadata.get("general.name") or path.stem)
    return build_inventory(checkpoint.config, name, str(path), "GGUF types", lambda *_: stored)


def _num_experts(cfg: Any) -> int:
    return int(
        getattr(cfg, "n_routed_experts", 0)
        or getattr(cfg, "num_experts", 0)
        or getattr(cfg, "num_local_experts", 0)
    )


def _nbytes(ggml_type: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    return math.prod(shape[:-1]) * FORMATS[ggml_type].row_bytes(shape[-1])


def build_inventory(
    raw: dict[str, Any],
    name: str,
    source: str,
    weights: str,
    make_typer: Callable[[Any, dict[str, tuple[int, ...]]], Typer],
) -> ModelInventory:
    """Group the tensors of the model hetero builds from `raw`. `make_typer` gets the parsed
    config and every GGUF tensor name with a shape (llama.cpp's mixtures depend on the whole
    set) and returns the function that types each tensor."""
    import torch

    from hetero.models import family_for

    family = family_for(raw)
    cfg = family.parse_config(raw)
    # Building DeepSeek-V3's 45k expert modules takes seconds even on the meta device, so one
    # layer of each shape (dense or MoE) is built and its tensors repeated for the others.
    is_sparse = getattr(cfg, "is_sparse", lambda layer: True)
    keys = [bool(is_sparse(i)) for i in range(cfg.num_hidden_layers)]
    first_of_key = {key: keys.index(key) for key in set(keys)}
    with torch.device("meta"):
        net = family.build(
            dataclasses.replace(cfg, num_hidden_layers=max(first_of_key.values()) + 1)
        )
    params = {n: tuple(p.shape) for n, p in net.named_parameters()}
    tensors = list(
        _tensors(params, keys, first_of_key, family.checkpoint_name, cfg.tie_word_embeddings)
    )
    typer = make_typer(cfg, {t.gguf_name: t.shape for t in tensors})

    groups: dict[str, TensorGroup] = {}
    for t in tensors:
        weight_type, nbytes = typer(t.module_name, t.gguf_name, t.shape)
        group = groups.get(t.group)
        if group is None:
            group = groups[t.group] = TensorGroup(t.group, t.kind, t.layer, t.expert)
        group.tensors.append(
            TensorInfo(t.module_name, t.hf_name, t.gguf_name, t.shape, weight_type, nbytes)
        )

    attention = net.layers[0].self_attn
    kv_values = sum(math.prod(shape) for shape in attention.cache_entries().values())
    heads = cfg.num_attention_heads
    if kv_lora_rank := getattr(cfg, "kv_lora_rank", 0):
        # MLA with kv_b_proj absorbed into the query and output (how GPU kernels run it):
        # each head scores the latent and the roped key, then sums latents
        flops_per_pair = 2 * heads * (2 * kv_lora_rank + cfg.qk_rope_head_dim)
        head_values = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
    else:
        flops_per_pair = 4 * heads * cfg.head_dim
        head_values = 2 * cfg.head_dim
    num_experts = _num_experts(cfg)
    return ModelInventory(
        name=name,
        source=source,
        model_type=cfg.model_type,
        weights=weights,
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        context_limit=cfg.context_limit,
        num_experts=num_experts,
        top_k=int(getattr(cfg, "num_experts_per_tok", 0) or 0) if num_experts else 0,
        kv_values_per_token=kv_values,
        attention_flops_per_pair=flops_per_pair,
        history_values_per_token=heads * head_values,
        widest_activation=max(
            t.shape[0] for t in tensors if t.layer is not None and len(t.shape) == 2
        ),
        groups=list(groups.values()),
    )


class _Tensor(NamedTuple):
    module_name: str
    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]
    group: str
    kind: str
    layer: int | None
    expert: int | None


def _tensors(
    params: dict[str, tuple[int, ...]],
    keys: list[bool],
    first_of_key: dict[bool, int],
    rename: Callable[[str], str],
    tied: bool,
) -> Iterator[_Tensor]:
    """Every tensor with its names and group: embeddings, the layers in order, the head. A
    tied head is the embedding tensor."""
    from hetero.loading.weights import file_name

    def named(module_name: str) -> _Tensor:
        gguf_name, hf_name = to_gguf(module_name)[0], file_name(module_name, rename)
        if tied and module_name == "lm_head.weight":  # one tensor serves both
            gguf_name, hf_name = "token_embd.weight", file_name("embed_tokens.weight", rename)
        return _Tensor(module_name, gguf_name, hf_name, params[module_name], *classify(module_name))

    if not tied:
        yield named("embed_tokens.weight")
    # the first layer of each shape names its tensors; the others swap the layer number in
    templates = {
        key: [named(n) for n in params if n.startswith(f"layers.{first}.")]
        for key, first in first_of_key.items()
    }
    for layer, key in enumerate(keys):
        first = first_of_key[key]
        for t in templates[key]:
            yield (
                t
                if layer == first
                else _Tensor(
                    f"layers.{layer}." + t.module_name.removeprefix(f"layers.{first}."),
                    f"blk.{layer}." + t.gguf_name.removeprefix(f"blk.{first}."),
                    f"model.layers.{layer}." + t.hf_name.removeprefix(f"model.layers.{first}."),
                    t.shape,
                    f"layers.{layer}." + t.group.removeprefix(f"layers.{first}."),
                    t.kind,
                    layer,
                    t.expert,
                )
            )
    yield named("norm.weight")
    yield named("lm_head.weight")
