"""Qwen-MoE family: Qwen3-MoE (q/k RMSNorm, top-k softmax with norm_topk_prob) and Qwen2-MoE
(q/k/v bias, a shared expert behind a sigmoid gate). `mlp_only_layers` and
`decoder_sparse_step` choose which layers are dense."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hetero.config import TransformerConfig
from hetero.models.attention import SelfAttention
from hetero.models.decoder import CausalLM, DecoderLayer
from hetero.models.experts import GatedMLP
from hetero.models.moe import SparseMoE

MODEL_TYPES = ("qwen3_moe", "qwen2_moe")


@dataclass(frozen=True)
class QwenMoeConfig(TransformerConfig):
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = field(default_factory=tuple)
    shared_expert_intermediate_size: int = 0
    qwen2: bool = False

    @classmethod
    def _extra(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        qwen2 = cfg["model_type"] == "qwen2_moe"
        return {
            # released configs say num_experts; transformers >= 5 writes num_local_experts
            "num_experts": int(cfg.get("num_experts") or cfg["num_local_experts"]),
            "num_experts_per_tok": int(cfg["num_experts_per_tok"]),
            "moe_intermediate_size": int(cfg["moe_intermediate_size"]),
            "norm_topk_prob": bool(cfg.get("norm_topk_prob", not qwen2)),
            "decoder_sparse_step": int(cfg.get("decoder_sparse_step", 1)),
            "mlp_only_layers": tuple(cfg.get("mlp_only_layers") or ()),
            "shared_expert_intermediate_size": int(
                cfg.get("shared_expert_intermediate_size", 0) if qwen2 else 0
            ),
            "qwen2": qwen2,
        }

    def is_sparse(self, layer: int) -> bool:
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )


def parse_config(cfg: dict[str, Any]) -> QwenMoeConfig:
    return QwenMoeConfig.from_hf(cfg)


def build(c: QwenMoeConfig) -> CausalLM:
    layers = []
    for i in range(c.num_hidden_layers):
        if c.is_sparse(i):
            mlp = SparseMoE(
                c.hidden_size,
                c.moe_intermediate_size,
                c.num_experts,
                c.num_experts_per_tok,
                c.norm_topk_prob,
                shared_expert_size=c.shared_expert_intermediate_size,
            )
        else:
            mlp = GatedMLP(c.hidden_size, c.intermediate_size)
        attn = SelfAttention(c, i, qkv_bias=c.qwen2, qk_norm=not c.qwen2)
        layers.append(DecoderLayer(attn, mlp, c.hidden_size, c.rms_norm_eps))
    return CausalLM(c.vocab_size, c.hidden_size, c.rms_norm_eps, layers)


def checkpoint_name(name: str) -> str:
    return name
