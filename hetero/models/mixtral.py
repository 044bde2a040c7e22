"""Mixtral: GQA attention and a softmax top-k MoE in every layer (experts named w1/w3/w2)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from hetero.config import TransformerConfig
from hetero.models.attention import SelfAttention
from hetero.models.decoder import CausalLM, DecoderLayer
from hetero.models.moe import SparseMoE

MODEL_TYPES = ("mixtral",)

# our module names -> Mixtral checkpoint names
_RENAMES = [
    (re.compile(r"\.mlp\."), ".block_sparse_moe."),
    (re.compile(r"\.gate_proj\."), ".w1."),
    (re.compile(r"\.down_proj\."), ".w2."),
    (re.compile(r"\.up_proj\."), ".w3."),
]


@dataclass(frozen=True)
class MixtralConfig(TransformerConfig):
    num_local_experts: int = 0
    num_experts_per_tok: int = 0

    @classmethod
    def _extra(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        return {
            "num_local_experts": int(cfg["num_local_experts"]),
            "num_experts_per_tok": int(cfg["num_experts_per_tok"]),
        }


def parse_config(cfg: dict[str, Any]) -> MixtralConfig:
    return MixtralConfig.from_hf(cfg)


def build(c: MixtralConfig) -> CausalLM:
    layers = [
        DecoderLayer(
            SelfAttention(c, i),
            SparseMoE(
                c.hidden_size,
                c.intermediate_size,
                c.num_local_experts,
                c.num_experts_per_tok,
                normalize_topk=True,  # softmax over the top-k logits == renormalised top-k probs
            ),
            c.hidden_size,
            c.rms_norm_eps,
        )
        for i in range(c.num_hidden_layers)
    ]
    return CausalLM(c.vocab_size, c.hidden_size, c.rms_norm_eps, layers)


def checkpoint_name(name: str) -> str:
    for pattern, replacement in _RENAMES:
        name = pattern.sub(replacement, name)
    return name
