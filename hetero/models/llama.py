"""Dense decoder family: Llama, Mistral (a sliding window), Qwen2 (q/k/v bias) and Qwen3 (q/k
RMSNorm). The degenerate, expert-free case of the MoE families, useful for small tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hetero.config import TransformerConfig, raise_unsupported
from hetero.models.attention import SelfAttention
from hetero.models.decoder import CausalLM, DecoderLayer
from hetero.models.experts import GatedMLP

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class LlamaConfig(TransformerConfig):
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: bool = False

    @classmethod
    def _extra(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        if cfg.get("mlp_bias"):
            raise_unsupported(cfg, "mlp_bias=true")
        kind = cfg["model_type"]
        bias = bool(cfg.get("attention_bias", False))
        return {
            "qkv_bias": True if kind == "qwen2" else bias,
            "out_bias": bias if kind in ("llama", "qwen3") else False,
            "qk_norm": kind == "qwen3",
        }


def parse_config(cfg: dict[str, Any]) -> LlamaConfig:
    return LlamaConfig.from_hf(cfg)


def build(c: LlamaConfig) -> CausalLM:
    layers = [
        DecoderLayer(
            SelfAttention(c, i, qkv_bias=c.qkv_bias, out_bias=c.out_bias, qk_norm=c.qk_norm),
            GatedMLP(c.hidden_size, c.intermediate_size),
            c.hidden_size,
            c.rms_norm_eps,
        )
        for i in range(c.num_hidden_layers)
    ]
    return CausalLM(c.vocab_size, c.hidden_size, c.rms_norm_eps, layers)


def checkpoint_name(name: str) -> str:
    return name
