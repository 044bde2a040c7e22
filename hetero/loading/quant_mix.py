"""Which GGML type each tensor of a GGUF file gets, for a file type ("q4_k_m", "q8_0", ...):
the rules of llama.cpp's llama-quantize (src/llama-quant.cpp, llama_tensor_get_type) for the
file types hetero writes, so `hetero quantize --type q4_k_m` makes llama.cpp's Q4_K_M mix."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType

from hetero.formats.gguf_quants import FORMATS


@dataclass(frozen=True)
class FileType:
    name: str
    llama_file_type: LlamaFileType
    default: T  # the type of a quantisable tensor no rule moves


FILE_TYPES: dict[str, FileType] = {
    "f32": FileType("f32", LlamaFileType.ALL_F32, T.F32),
    "f16": FileType("f16", LlamaFileType.MOSTLY_F16, T.F16),
    "bf16": FileType("bf16", LlamaFileType.MOSTLY_BF16, T.BF16),
    "q8_0": FileType("q8_0", LlamaFileType.MOSTLY_Q8_0, T.Q8_0),
    "q6_k": FileType("q6_k", LlamaFileType.MOSTLY_Q6_K, T.Q6_K),
    "q5_k_m": FileType("q5_k_m", LlamaFileType.MOSTLY_Q5_K_M, T.Q5_K),
    "q4_k_m": FileType("q4_k_m", LlamaFileType.MOSTLY_Q4_K_M, T.Q4_K),
}
# a type whose block does not divide the row length falls back to a 32-value type
FALLBACKS = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
_LAYER = re.compile(r"blk\.(\d+)\.")


def ggml_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: dimensions up to the last (in ggml order) larger than 1."""
    ne = list(reversed(shape))
    return max((i + 1 for i, d in enumerate(ne) if d > 1), default=1)


def quantizable(name: str, shape: Sequence[int]) -> bool:
    """llama.cpp keeps these in float32: vectors, norms, biases and the MoE routers."""
    return (
        ggml_dims(shape) >= 2
        and name.endswith("weight")
        and "_norm.weight" not in name
        and "ffn_gate_inp.weight" not in name
    )


def is_attn_v_like(name: str) -> bool:
    return any(p in name for p in ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight"))


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    # llama.cpp: the first and last eighth of the layers, and every third one between
    return (
        i_layer < n_layers // 8
        or i_layer >= 7 * n_layers // 8
        or ((i_layer - n_layers // 8) % 3 == 2)
    )


def tensor_types(
    tensors: dict[str, tuple[int, ...]], file_type: str, n_expert: int, n_layer: int
) -> dict[str, T]:
    """{GGUF name: torch-order shape} -> {GGUF name: type}. Tensors are visited in
    llama.cpp's order (by layer, then name), which its per-layer counters depend on."""
    ft = FILE_TYPES[file_type]
    order = sorted(tensors, key=lambda n: (_layer(n), n))
    n_attention_wv = sum(is_attn_v_like(n) for n in order)
    tied = "output.weight" not in tensors
    i_attention_wv = 0
    out = {}
    for name in order:
        shape = tensors[name]
        if not quantizable(name, shape):
            out[name] = T.F32
            continue
        new = ft.default
        if FORMATS[new].quantized:
            new = _mix_rule(
                name, shape, new, ft, n_expert, n_layer, tied, i_attention_wv, n_attention_wv
            )
            i_attention_wv += is_attn_v_like(name)
            new = _fallback(new, shape[-1])
        out[name] = new
    return out


def _mix_rule(
    name: str,
    shape: Sequence[int],
    new: T,
    ft: FileType,
    n_expert: int,
    n_layer: int,
    tied: bool,
    i_attention_wv: int,
    n_attention_wv: int,
) -> T:
    q4_k_m = ft.name == "q4_k_m"
    k_m = ft.name in ("q4_k_m", "q5_k_m")  # more bits for attn_v and ffn_down in some layers
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if shape[-1] % FORMATS[new].block_size:
            return T.Q8_0
        return new if new == T.Q8_0 else T.Q6_K
    if name == "token_embd.weight":
        return new
    if is_attn_v_like(name):
        if k_m and use_more_bits(i_attention_wv, n_attention_wv):
            new = T.Q6_K
        return T.Q8_0 if n_expert == 8 else new  # "for the 8-expert model"
    if "attn_k.weight" in name:
        return T.Q8_0 if n_expert == 8 else new
    if "attn_output.weight" in name:
        return T.Q5_K if q4_k_m and n_expert == 8 else new
    if "ffn_down" in name and k_m and use_more_bits(_layer(name), n_layer):
        return T.Q6_K
    return new


def _fallback(new: T, columns: int) -> T:
    if columns % FORMATS[new].block_size:
        new = FALLBACKS.get(new, new)
    if columns % FORMATS[new].block_size:
        new = T.F16
    return new


def _layer(name: str) -> int:
    match = _LAYER.match(name)
    return int(match.group(1)) if match else -1
