"""Tensor names: hetero's module parameter names <-> llama.cpp's GGUF names, one table for both
directions, plus the layout changes llama.cpp's converter makes (stacked experts, the rope
permutation of llama q/k rows, DeepSeek's kv_b split into k_b / v_b)."""

from __future__ import annotations

import re

import numpy as np

# module path inside `layers.N.` -> GGUF base name inside `blk.N.`; the parameter suffix
# (.weight / .bias) carries over. Shared experts are `shared_expert` in Qwen2-MoE and
# `shared_experts` in DeepSeek; both are llama.cpp's `_shexp`.
LAYER_MODULES: dict[str, str] = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "self_attn.q_a_proj": "attn_q_a",
    "self_attn.q_a_layernorm": "attn_q_a_norm",
    "self_attn.q_b_proj": "attn_q_b",
    "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
    "self_attn.kv_a_layernorm": "attn_kv_a_norm",
    "self_attn.kv_b_proj": "attn_kv_b",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
SHARED_EXPERT_MODULES = ("mlp.shared_expert", "mlp.shared_experts")
PROJECTIONS = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
GLOBAL_NAMES: dict[str, str] = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# DeepSeek-V3's routing bias is a parameter of the gate, a tensor of its own in GGUF
ROUTER_BIAS = ("mlp.gate.e_score_correction_bias", "exp_probs_b.bias")

_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias|e_score_correction_bias)$")
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)\.(weight|bias)$")
_LEGACY_EXPERT = re.compile(r"ffn_(gate|up|down)\.(\d+)$")


def to_gguf(module_name: str) -> tuple[str, int | None]:
    """hetero parameter name -> (GGUF tensor name, expert index within a stacked tensor)."""
    if module_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[module_name], None
    match = _LAYER.match(module_name)
    if match is None:
        raise KeyError(module_name)
    layer, module, param = match.groups()
    if f"{module}.{param}" == ROUTER_BIAS[0]:
        return f"blk.{layer}.{ROUTER_BIAS[1]}", None
    if expert := _EXPERT.match(module):
        return f"blk.{layer}.ffn_{PROJECTIONS[expert.group(2)]}_exps.{param}", int(expert.group(1))
    for shared in SHARED_EXPERT_MODULES:
        proj = module.removeprefix(shared + ".")
        if proj != module and proj in PROJECTIONS:
            return f"blk.{layer}.ffn_{PROJECTIONS[proj]}_shexp.{param}", None
    if module not in LAYER_MODULES:
        raise KeyError(module_name)
    return f"blk.{layer}.{LAYER_MODULES[module]}.{param}", None


def from_gguf(gguf_name: str, shared_expert_module: str) -> tuple[str, bool] | None:
    """GGUF tensor name -> (hetero parameter name, True if stacked experts whose name has
    `{expert}` to fill in), or None for a tensor hetero does not use."""
    if gguf_name in _GLOBAL_REVERSE:
        return _GLOBAL_REVERSE[gguf_name], False
    match = _BLOCK.match(gguf_name)
    if match is None:
        return None
    layer, base, param = match.groups()
    prefix = f"layers.{layer}."
    if f"{base}.{param}" == ROUTER_BIAS[1]:
        return prefix + ROUTER_BIAS[0], False
    for proj, short in PROJECTIONS.items():
        if base == f"ffn_{short}_exps":
            return f"{prefix}mlp.experts.{{expert}}.{proj}.{param}", True
        if base == f"ffn_{short}_shexp":
            return f"{prefix}{shared_expert_module}.{proj}.{param}", False
    if legacy := _LEGACY_EXPERT.match(base):  # old Mixtral files: one tensor per expert
        proj = {v: k for k, v in PROJECTIONS.items()}[legacy.group(1)]
        return f"{prefix}mlp.experts.{legacy.group(2)}.{proj}.{param}", False
    if base in _LAYER_REVERSE:
        return f"{prefix}{_LAYER_REVERSE[base]}.{param}", False
    return None


_GLOBAL_REVERSE = {v: k for k, v in GLOBAL_NAMES.items()}
_LAYER_REVERSE = {v: k for k, v in LAYER_MODULES.items()}


def rope_permutation(rows: int, heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation for `llama`-arch models.

    The converter stores each head's rotary pairs interleaved ((x0, x_d/2), (x1, x_d/2+1)...)
    for its rope kernel: w_gguf = w.reshape(heads, 2, d/2, ...).swapaxes(1, 2). Taking the rows
    of w_gguf in this order gives w back."""
    half = rows // heads // 2
    return np.arange(rows).reshape(heads, half, 2).swapaxes(1, 2).reshape(-1)


def rope_interleave(rows: int, heads: int) -> np.ndarray:
    """The converter's permutation as a row order: w_gguf = w[rope_interleave(...)]."""
    return np.argsort(rope_permutation(rows, heads))
