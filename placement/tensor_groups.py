"""The tensor group each of hetero's parameters belongs to: the unit the planner places.
A layer's attention (with its q/k/kv norms), its two norms, its router, its shared experts, its
dense FFN, and each routed expert are groups; so are the embeddings, final norm and lm_head."""

from __future__ import annotations

import re

_TOP = {"embed_tokens.weight": "embed", "norm.weight": "output_norm", "lm_head.weight": "lm_head"}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.")


def classify(module_name: str) -> tuple[str, str, int | None, int | None]:
    """(group name, kind, layer, expert) of a parameter of hetero's model:
    "layers.3.mlp.experts.17.up_proj.weight" -> ("layers.3.experts.17", "expert", 3, 17)."""
    if module_name in _TOP:
        kind = _TOP[module_name]
        return kind, kind, None, None
    match = _LAYER.match(module_name)
    if match is None:
        raise ValueError(f"parameter {module_name!r} is in no tensor group")
    layer, path = int(match.group(1)), match.group(2)
    if expert := _EXPERT.match(path):
        index = int(expert.group(1))
        return f"layers.{layer}.experts.{index}", "expert", layer, index
    if path.startswith("self_attn."):
        kind = "attention"
    elif path.startswith(("input_layernorm.", "post_attention_layernorm.")):
        kind = "norms"
    elif path.startswith("mlp.gate."):
        kind = "router"
    elif path.startswith("mlp.shared_expert"):
        kind = "shared_experts"
    elif path.startswith("mlp."):
        kind = "dense_ffn"
    else:
        raise ValueError(f"parameter {module_name!r} is in no tensor group")
    return f"layers.{layer}.{kind}", kind, layer, None
