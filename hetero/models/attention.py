"""Grouped-query self-attention (Llama, Qwen2/3, Mixtral, Qwen-MoE), with the options those
families differ in: q/k/v bias, output bias, per-head q/k RMSNorm (Qwen3)."""

from __future__ import annotations

import torch
from torch import nn

from hetero.config import TransformerConfig
from hetero.models.batch import Batch, GroupedQueryStep
from hetero.models.decoder import RMSNorm
from hetero.models.rope import RotaryEmbedding


class SelfAttention(nn.Module):
    # the runtime may join these into one module returning (q, k, v): one pass over x
    JOINABLE = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}

    def __init__(
        self,
        config: TransformerConfig,
        layer_idx: int,
        qkv_bias: bool = False,
        out_bias: bool = False,
        qk_norm: bool = False,
    ):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        )
        self.q_proj = nn.Linear(c.hidden_size, self.heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, c.hidden_size, bias=out_bias)
        self.qkv_proj: nn.Module | None = None
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
        self.qk_norm = qk_norm
        self.rotary = RotaryEmbedding(self.head_dim, c.rope)
        self.window = c.attention_window(layer_idx)

    def cache_entries(self) -> dict[str, tuple[int, ...]]:
        return {"k": (self.kv_heads, self.head_dim), "v": (self.kv_heads, self.head_dim)}

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        # x: [tokens, hidden]
        t = x.shape[0]
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(t, self.heads, self.head_dim)
        k = k.view(t, self.kv_heads, self.head_dim)
        v = v.view(t, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = self.rotary.batch_cos_sin(batch, x.dtype)
        q, k = self.rotary.apply(q, cos, sin), self.rotary.apply(k, cos, sin)
        step = GroupedQueryStep(q, k, v, self.head_dim**-0.5, self.window)
        out = batch.attention(self.layer_idx, step)
        return self.o_proj(out.reshape(t, self.heads * self.head_dim))
