"""DeepSeek-V2 and -V3: multi-head latent attention (MLA), whose KV cache holds one compressed
latent per token instead of per-head keys and values, and MoE layers with shared experts behind
softmax (V2) or sigmoid, bias-corrected, group-limited (V3) routing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hetero.config import TransformerConfig, raise_unsupported
from hetero.errors import ModelFormatError
from hetero.models.batch import Batch, LatentStep
from hetero.models.decoder import CausalLM, DecoderLayer, RMSNorm
from hetero.models.experts import GatedMLP, TorchExperts
from hetero.models.rope import RotaryEmbedding, yarn_mscale

MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
# the load-balancing bias decides expert choice; bf16 rounding would change it
FLOAT32_PARAMETERS = ("e_score_correction_bias",)

# What transformers assumes when config.json omits a routing field (its config class defaults).
_ROUTING_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": dict(
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        n_group=8,
        topk_group=4,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        n_shared_experts=1,
        first_k_dense_replace=3,
    ),
    "deepseek_v2": dict(
        scoring_func="softmax",
        topk_method="greedy",
        n_group=None,
        topk_group=None,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        n_shared_experts=2,
        first_k_dense_replace=0,
    ),
}
# scoring function -> the top-k methods hetero (and transformers) run with it
_TOPK_METHODS = {"sigmoid": ("noaux_tc",), "softmax": ("greedy", "group_limited_greedy")}

# DeepSeek builds q_a_layernorm / kv_a_layernorm without passing rms_norm_eps.
_LATENT_NORM_EPS = 1e-6


@dataclass(frozen=True)
class DeepseekConfig(TransformerConfig):
    # attention (MLA)
    q_lora_rank: int | None = None  # None: a plain q_proj (DeepSeek-V2-Lite)
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    attention_bias: bool = False
    rope_interleave: bool = True
    # MoE
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    n_shared_experts: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0

    @classmethod
    def _extra(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        kind = cfg["model_type"]
        defaults = _ROUTING_DEFAULTS[kind]

        def get(key: str) -> Any:
            return cfg.get(key, defaults[key])

        if cfg.get("mlp_bias"):
            raise_unsupported(cfg, "mlp_bias=true")
        scoring, method = get("scoring_func"), get("topk_method")
        if kind == "deepseek_v3" and scoring != "sigmoid":
            raise_unsupported(cfg, f"scoring_func {scoring!r} (deepseek_v3 routes with sigmoid)")
        if kind == "deepseek_v2" and scoring != "softmax":
            raise_unsupported(cfg, f"scoring_func {scoring!r} (deepseek_v2 routes with softmax)")
        if method not in _TOPK_METHODS[scoring]:
            raise_unsupported(
                cfg,
                f"topk_method {method!r} with {scoring} scores "
                f"(supported: {', '.join(_TOPK_METHODS[scoring])})",
            )
        top_k = int(cfg["num_experts_per_tok"])
        if kind == "deepseek_v2" and get("norm_topk_prob") and top_k > 1:
            # DeepSeek's released V2 code then renormalises and skips routed_scaling_factor;
            # transformers ignores the flag. No released V2 checkpoint sets it.
            raise_unsupported(cfg, "norm_topk_prob=true (its meaning differs between references)")
        experts = int(cfg.get("n_routed_experts") or cfg.get("num_local_experts") or 0)
        grouped = method != "greedy"
        n_group = int(get("n_group") or 1) if grouped else 1
        topk_group = int(get("topk_group") or 1) if grouped else 1
        if experts and (experts % n_group or topk_group > n_group):
            raise ModelFormatError(
                f"config.json of {kind}: {experts} routed experts cannot form n_group={n_group} "
                f"equal groups of which topk_group={topk_group} are kept"
            )
        q_lora_rank = cfg.get("q_lora_rank")
        return {
            "q_lora_rank": int(q_lora_rank) if q_lora_rank else None,
            "kv_lora_rank": int(cfg["kv_lora_rank"]),
            "qk_nope_head_dim": int(cfg["qk_nope_head_dim"]),
            "qk_rope_head_dim": int(cfg["qk_rope_head_dim"]),
            "v_head_dim": int(cfg["v_head_dim"]),
            "attention_bias": bool(cfg.get("attention_bias", False)),
            # transformers' V2 always rotates interleaved pairs; V3 makes it a config flag
            "rope_interleave": kind == "deepseek_v2" or bool(cfg.get("rope_interleave", True)),
            "n_routed_experts": experts,
            "num_experts_per_tok": top_k,
            "moe_intermediate_size": int(cfg["moe_intermediate_size"]),
            "n_shared_experts": int(get("n_shared_experts") or 0),
            "first_k_dense_replace": int(get("first_k_dense_replace") or 0),
            "moe_layer_freq": int(cfg.get("moe_layer_freq") or 1),
            "scoring_func": scoring,
            "topk_method": method,
            "n_group": n_group,
            "topk_group": topk_group,
            "norm_topk_prob": bool(get("norm_topk_prob")),
            "routed_scaling_factor": float(get("routed_scaling_factor")),
        }

    def is_sparse(self, layer: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @property
    def softmax_scale(self) -> float:
        # With YaRN, DeepSeek also scales the logits by mscale(factor, mscale_all_dim)^2; the
        # cos/sin carry mscale(factor, mscale) / mscale(factor, mscale_all_dim), 1 when equal.
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        if self.rope.type != "default" and self.rope.mscale_all_dim:
            scale *= yarn_mscale(self.rope.factor, self.rope.mscale_all_dim) ** 2
        return scale


class LatentAttention(nn.Module):
    """MLA. Per token the cache holds the normalised KV latent [kv_lora_rank] and the roped key
    part [qk_rope_head_dim] that all heads share; kv_b_proj expands the history to per-head
    keys (no-rope part) and values: over the whole history (the torch path), or absorbed into
    the queries and the output (decoding on the CPU kernels)."""

    def __init__(self, c: DeepseekConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads = c.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = (
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
        )
        self.kv_lora_rank = c.kv_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        self.q_lora = c.q_lora_rank is not None
        if self.q_lora:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, _LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(c.q_lora_rank, self.heads * qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(c.hidden_size, self.heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            c.hidden_size, c.kv_lora_rank + self.rope_dim, bias=c.attention_bias
        )
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, _LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(
            c.kv_lora_rank, self.heads * (self.nope_dim + self.v_dim), bias=False
        )
        self.o_proj = nn.Linear(self.heads * self.v_dim, c.hidden_size, bias=c.attention_bias)
        self.rotary = RotaryEmbedding(self.rope_dim, c.rope, interleaved=c.rope_interleave)
        self.scale = c.softmax_scale

    def cache_entries(self) -> dict[str, tuple[int, ...]]:
        return {"latent": (self.kv_lora_rank,), "k_rope": (self.rope_dim,)}

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        # x: [tokens, hidden]
        t = x.shape[0]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q_nope, q_rope = q.view(t, self.heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split(
            [self.kv_lora_rank, self.rope_dim], dim=-1
        )
        latent = self.kv_a_layernorm(latent)  # [tokens, kv_lora_rank]
        cos, sin = self.rotary.batch_cos_sin(batch, x.dtype)
        q_rope = self.rotary.apply(q_rope, cos, sin)
        k_rope = self.rotary.apply(k_rope[:, None, :], cos, sin)[:, 0]  # [tokens, rope_dim]
        step = LatentStep(q_nope, q_rope, latent, k_rope, self.kv_b_proj, self.v_dim, self.scale)
        out = batch.attention(self.layer_idx, step)
        return self.o_proj(out.reshape(t, self.heads * self.v_dim))


def group_limited_mask(
    choice_scores: torch.Tensor, n_group: int, topk_group: int, best_per_group: int
) -> torch.Tensor:
    """choice_scores: [tokens, experts] -> bool [tokens, experts], True for experts of the
    `topk_group` groups whose best `best_per_group` scores sum highest."""
    tokens, experts = choice_scores.shape
    grouped = choice_scores.view(tokens, n_group, experts // n_group)
    group_scores = grouped.topk(best_per_group, dim=-1).values.sum(dim=-1)  # [tokens, n_group]
    kept = torch.topk(group_scores, topk_group, dim=-1, sorted=False).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
    return (
        group_mask[:, :, None].expand(tokens, n_group, experts // n_group).reshape(tokens, experts)
    )


def sigmoid_noaux_topk(
    logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    normalize: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing. logits: [tokens, experts] float32, correction_bias: [experts]
    -> (weights [tokens, k] float32, ids [tokens, k]). The bias steers only which experts are
    chosen; the weights are their unbiased sigmoid scores."""
    scores = logits.sigmoid()
    choice = scores + correction_bias.float()
    in_groups = group_limited_mask(choice, n_group, topk_group, best_per_group=2)
    choice = choice.masked_fill(~in_groups, float("-inf"))
    ids = torch.topk(choice, top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


def softmax_limited_topk(
    logits: torch.Tensor, top_k: int, n_group: int, topk_group: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2 routing ("greedy" is the one-group case of "group_limited_greedy", whose
    group score is its best expert). logits: [tokens, experts] float32 -> (weights [tokens, k]
    float32, ids [tokens, k])."""
    scores = logits.softmax(dim=-1)
    if n_group > 1:
        in_groups = group_limited_mask(scores, n_group, topk_group, best_per_group=1)
        scores = scores.masked_fill(~in_groups, 0.0)
    weights, ids = torch.topk(scores, top_k, dim=-1, sorted=False)
    return weights * scaling, ids


class Router(nn.Module):
    """The gate: a bias-free linear map to expert logits, computed in float32, plus (V3) the
    e_score_correction_bias that balances expert load."""

    def __init__(self, c: DeepseekConfig):
        super().__init__()
        self.c = c
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size))
        if c.scoring_func == "sigmoid":
            self.e_score_correction_bias = nn.Parameter(torch.empty(c.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [tokens, hidden] -> (weights [tokens, k] float32, ids [tokens, k])
        c = self.c
        logits = F.linear(x.float(), self.weight.float())
        if c.scoring_func == "sigmoid":
            return sigmoid_noaux_topk(
                logits,
                self.e_score_correction_bias,
                c.num_experts_per_tok,
                c.n_group,
                c.topk_group,
                c.norm_topk_prob,
                c.routed_scaling_factor,
            )
        return softmax_limited_topk(
            logits, c.num_experts_per_tok, c.n_group, c.topk_group, c.routed_scaling_factor
        )


class DeepseekMoE(nn.Module):
    def __init__(self, c: DeepseekConfig):
        super().__init__()
        self.gate = Router(c)
        self.experts = TorchExperts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size)
        if c.n_shared_experts:
            self.shared_experts = GatedMLP(
                c.hidden_size, c.moe_intermediate_size * c.n_shared_experts
            )
        self.has_shared_experts = bool(c.n_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [tokens, hidden]
        weights, ids = self.gate(x)
        if not self.has_shared_experts:
            return self.experts(x, ids, weights)
        # the routed experts start (on a CPU worker, say) while the shared experts run here
        routed = self.experts.submit(x, ids, weights)
        shared = self.shared_experts(x)
        return routed.wait() + shared


def parse_config(cfg: dict[str, Any]) -> DeepseekConfig:
    return DeepseekConfig.from_hf(cfg)


def build(c: DeepseekConfig) -> CausalLM:
    layers = [
        DecoderLayer(
            LatentAttention(c, i),
            DeepseekMoE(c) if c.is_sparse(i) else GatedMLP(c.hidden_size, c.intermediate_size),
            c.hidden_size,
            c.rms_norm_eps,
        )
        for i in range(c.num_hidden_layers)
    ]
    return CausalLM(c.vocab_size, c.hidden_size, c.rms_norm_eps, layers)


def checkpoint_name(name: str) -> str:
    return name
