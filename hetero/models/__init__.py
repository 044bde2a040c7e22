"""Model families, one file each, chosen by config.json's model_type.

A family module provides MODEL_TYPES, parse_config(dict) -> config dataclass, build(config) ->
CausalLM, and checkpoint_name(module name) -> tensor name in the family's checkpoints; optionally
FLOAT32_PARAMETERS, name suffixes of parameters kept in float32 whatever the model dtype."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from hetero.errors import UnsupportedModelError
from hetero.models import deepseek, llama, mixtral, qwen_moe

FAMILIES: dict[str, ModuleType] = {
    model_type: family
    for family in (llama, qwen_moe, mixtral, deepseek)
    for model_type in family.MODEL_TYPES
}


def family_for(cfg: dict[str, Any]) -> ModuleType:
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; hetero runs: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]
