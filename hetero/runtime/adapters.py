"""Adapters on disk as PEFT writes them: DIR/adapter_model.safetensors (keys
`base_model.model.<transformers module>.lora_{A,B}.weight`) and DIR/adapter_config.json, which
`peft.PeftModel.from_pretrained` loads onto the transformers model of the same checkpoint; and
an adapter read back onto a hetero model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hetero.errors import HeteroError
from hetero.runtime.lora import (
    ATTENTION_PROJECTIONS,
    SHARED_BLOCKS,
    LoraSettings,
    LowRank,
    adapt,
)

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


class AdapterError(HeteroError):
    """An adapter directory is missing, malformed, or made for another model."""


def adapter_tensors(updates: dict[str, LowRank]) -> dict[str, torch.Tensor]:
    """PEFT's keys and tensors (float32) of the updates, by transformers module path."""
    tensors = {}
    for path, update in updates.items():
        for name in ("lora_A", "lora_B"):
            tensors[f"base_model.model.{path}.{name}.weight"] = getattr(update, name).detach()
    return tensors


def adapter_config(settings: LoraSettings, updates: dict[str, LowRank], base_model: str) -> dict:
    """adapter_config.json: LoRA on the linears by leaf name (shared experts by block and
    leaf, so no attention or dense-MLP linear matches), on the experts by parameter."""
    modules = set()
    for path in updates:
        parts = path.split(".")
        if parts[-1] in ATTENTION_PROJECTIONS and parts[-2] == "self_attn":
            modules.add(parts[-1])
        elif parts[-2] in SHARED_BLOCKS:
            modules.add(".".join(parts[-2:]))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": sorted(modules),
        "target_parameters": EXPERT_PARAMETERS if "experts" in settings.targets else [],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def save_adapter(
    directory: Path, settings: LoraSettings, updates: dict[str, LowRank], base_model: str
) -> None:
    """Write the adapter into `directory`, each file atomically (a reader never sees half)."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in adapter_tensors(updates).items()}
    save_file(weights, directory / (WEIGHTS_FILE + ".tmp"), metadata={"format": "pt"})
    os.replace(directory / (WEIGHTS_FILE + ".tmp"), directory / WEIGHTS_FILE)
    config = json.dumps(adapter_config(settings, updates, base_model), indent=2)
    (directory / (CONFIG_FILE + ".tmp")).write_text(config + "\n")
    os.replace(directory / (CONFIG_FILE + ".tmp"), directory / CONFIG_FILE)


def read_settings(directory: Path) -> LoraSettings:
    """The LoRA settings of an adapter directory (PEFT's adapter_config.json)."""
    config_path = directory / CONFIG_FILE
    if not config_path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise AdapterError(
            f"{directory} is not a LoRA adapter: it needs {CONFIG_FILE} and {WEIGHTS_FILE} "
            f"(as `hetero train` and PEFT's save_pretrained write)"
        )
    try:
        config = json.loads(config_path.read_text())
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except (ValueError, KeyError, TypeError) as err:
        raise AdapterError(f"{config_path} is not a LoRA adapter config: {err}") from None
    if config.get("peft_type", "LORA") != "LORA" or config.get("rank_pattern"):
        raise AdapterError(
            f"{config_path}: only plain LoRA (one rank, no rank_pattern) is supported"
        )
    modules = config.get("target_modules") or []
    targets = []
    if any(m in ATTENTION_PROJECTIONS for m in modules):
        targets.append("attention")
    if config.get("target_parameters"):
        targets.append("experts")
    if any(m.split(".")[0] in SHARED_BLOCKS for m in modules):
        targets.append("shared")
    return LoraSettings(rank=rank, alpha=alpha, targets=tuple(targets))


def load_into(updates: dict[str, LowRank], directory: Path) -> None:
    """Fill the updates from the adapter's tensors; refuse an adapter for another model."""
    want = adapter_tensors(updates)
    got = load_file(directory / WEIGHTS_FILE)
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong_shape = [k for k in want if k in got and got[k].shape != want[k].shape]
    if missing or unexpected or wrong_shape:
        example = (missing or unexpected or wrong_shape)[0]
        raise AdapterError(
            f"the adapter {directory} was made for another model: {len(missing)} tensors "
            f"missing, {len(unexpected)} unexpected, {len(wrong_shape)} of another shape "
            f"(e.g. {example}); use an adapter trained on this model"
        )
    with torch.no_grad():
        for key, tensor in want.items():
            tensor.copy_(got[key])


def apply_adapter(
    net: torch.nn.Module, directory: str | Path, name: str = "default", default: bool = True
) -> dict[str, LowRank]:
    """Put the adapter at `directory` on `net` under `name` (for inference or to train on;
    `default`: it applies where a request names no adapter)."""
    directory = Path(directory).expanduser()
    updates = adapt(net, read_settings(directory), name, default)
    load_into(updates, directory)
    return updates
