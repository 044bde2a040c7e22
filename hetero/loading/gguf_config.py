"""Model configuration in GGUF metadata (`{arch}.block_count`, `.attention.head_count`, ...)
and the `rope_freqs` tensor: read into the Hugging Face config.json dict that the family
`parse_config`s take, and written from hetero's typed configs in the keys llama.cpp reads."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import ExpertGatingFuncType, Keys

from hetero.config import RopeConfig, TransformerConfig
from hetero.errors import ModelFormatError, UnsupportedModelError
from hetero.formats.gguf_quants import dequantize
from hetero.models.rope import llama3_frequency_factors

if TYPE_CHECKING:
    from hetero.loading.gguf_checkpoint import RawTensor

# GGUF architecture -> hetero model types it can hold (llama also holds Mixtral)
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "llama": ("llama", "mixtral"),
    "qwen2": ("qwen2",),
    "qwen3": ("qwen3",),
    "qwen2moe": ("qwen2_moe",),
    "qwen3moe": ("qwen3_moe",),
    "deepseek2": ("deepseek_v2", "deepseek_v3"),
}
ARCH_OF_MODEL_TYPE = {kind: arch for arch, kinds in ARCHITECTURES.items() for kind in kinds}

# DeepSeek stores yarn's mscale_all_dim as 0.1 * mscale_all_dim (llama.cpp's yarn_log_multiplier)
YARN_LOG_MULTIPLIER_PER_MSCALE = 0.1
ROPE_FREQS = "rope_freqs.weight"
# llama3 scaling's original context when the file does not say (Llama 3.1's, and what
# llama.cpp's converter assumes)
LLAMA3_ORIGINAL_CONTEXT = 8192


class MetadataReader:
    """Typed access to `{arch}.*` keys with errors that name the file and the key."""

    def __init__(self, metadata: dict[str, Any], arch: str, source: str):
        self.metadata, self.arch, self.source = metadata, arch, source

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key.format(arch=self.arch), default)

    def require(self, key: str) -> Any:
        name = key.format(arch=self.arch)
        if name not in self.metadata:
            raise ModelFormatError(f"{self.source} lacks the metadata key {name!r}")
        return self.metadata[name]

    def uniform(self, key: str, default: Any = None) -> Any:
        """A per-layer value that hetero needs to be the same in every layer."""
        value = self.get(key, default)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise UnsupportedModelError(
                    f"{self.source}: {key.format(arch=self.arch)} differs between layers "
                    f"({sorted(set(value))}); hetero needs one value for all layers"
                )
            value = value[0]
        return value


def hf_config_from_gguf(
    metadata: dict[str, Any],
    tensors: Mapping[str, RawTensor],
    vocab_size: int,
    source: str,
) -> dict[str, Any]:
    """The config.json dict of a GGUF model. The tensor directory settles what metadata leaves
    open: biases, tied embeddings, which layers are dense, and llama3 rope scaling."""
    arch = metadata.get(Keys.General.ARCHITECTURE)
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{source} is a {arch!r} model; hetero reads the GGUF architectures "
            f"{', '.join(ARCHITECTURES)}"
        )
    names = set(tensors)
    m = MetadataReader(metadata, arch, source)
    layers = int(m.require(Keys.LLM.BLOCK_COUNT))
    heads = int(m.uniform(Keys.Attention.HEAD_COUNT))
    cfg: dict[str, Any] = {
        "vocab_size": int(m.get(Keys.LLM.VOCAB_SIZE) or vocab_size),
        "hidden_size": int(m.require(Keys.LLM.EMBEDDING_LENGTH)),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(m.uniform(Keys.Attention.HEAD_COUNT_KV) or heads),
        "intermediate_size": int(m.uniform(Keys.LLM.FEED_FORWARD_LENGTH, 0) or 0),
        "rms_norm_eps": float(m.get(Keys.Attention.LAYERNORM_RMS_EPS, 1e-6)),
        "max_position_embeddings": int(m.get(Keys.LLM.CONTEXT_LENGTH, 4096)),
        "rope_theta": float(m.get(Keys.Rope.FREQ_BASE, 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
    }
    if key_length := m.get(Keys.Attention.KEY_LENGTH):
        cfg["head_dim"] = int(key_length)
    rope_scaling = _rope_scaling(m)
    if ROPE_FREQS in tensors:
        if rope_scaling:
            raise UnsupportedModelError(
                f"{source} has both {rope_scaling['rope_type']} rope scaling and per-dimension "
                "rope factors (rope_freqs); hetero applies one or the other"
            )
        rope_dim = (
            m.get(Keys.Rope.DIMENSION_COUNT) or cfg.get("head_dim") or cfg["hidden_size"] // heads
        )
        factors = _tensor_values(tensors[ROPE_FREQS])
        rope_scaling = _llama3_scaling(factors, int(rope_dim), cfg["rope_theta"], m)
    if rope_scaling:
        cfg["rope_scaling"] = rope_scaling
    dense_layers = [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in names]
    experts = int(m.get(Keys.LLM.EXPERT_COUNT) or 0)
    top_k = int(m.get(Keys.LLM.EXPERT_USED_COUNT) or 0)
    if arch == "llama" and experts:
        cfg.update(model_type="mixtral", num_local_experts=experts, num_experts_per_tok=top_k)
    elif arch in ("llama", "qwen2", "qwen3"):
        cfg["model_type"] = arch
        cfg["attention_bias"] = "blk.0.attn_q.bias" in names
    elif arch in ("qwen2moe", "qwen3moe"):
        qwen2 = arch == "qwen2moe"
        cfg.update(
            model_type="qwen2_moe" if qwen2 else "qwen3_moe",
            num_experts=experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=int(m.require(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH)),
            # llama.cpp renormalises the top-k weights of Qwen3-MoE and never of Qwen2-MoE
            norm_topk_prob=bool(m.get(Keys.LLM.EXPERT_WEIGHTS_NORM, not qwen2)),
            decoder_sparse_step=1,
            mlp_only_layers=dense_layers,
            shared_expert_intermediate_size=int(
                m.get(Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH, 0) or 0
            ),
        )
    else:
        cfg.update(_deepseek_config(m, heads, dense_layers, experts, top_k))
    cfg.update(_special_token_ids(metadata))
    return cfg


def _rope_scaling(m: MetadataReader) -> dict[str, Any] | None:
    kind = m.get(Keys.Rope.SCALING_TYPE) or "none"
    factor = m.get(Keys.Rope.SCALING_FACTOR)
    if kind == "none" or (kind == "linear" and not factor):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind != "yarn":
        raise UnsupportedModelError(
            f"{m.source} uses rope scaling {kind!r}; hetero supports linear and yarn"
        )
    scaling: dict[str, Any] = {
        "rope_type": "yarn",
        "factor": float(factor),
        "original_max_position_embeddings": int(m.require(Keys.Rope.SCALING_ORIG_CTX_LEN)),
    }
    optional = {
        "beta_fast": Keys.Rope.SCALING_YARN_BETA_FAST,
        "beta_slow": Keys.Rope.SCALING_YARN_BETA_SLOW,
        "attention_factor": Keys.Rope.SCALING_YARN_ATTN_FACTOR,
    }
    scaling.update({k: float(v) for k, key in optional.items() if (v := m.get(key)) is not None})
    if log_mul := m.get(Keys.Rope.SCALING_YARN_LOG_MUL):
        mscale = float(log_mul) / YARN_LOG_MULTIPLIER_PER_MSCALE
        scaling.update(mscale=mscale, mscale_all_dim=mscale)
    return scaling


def _tensor_values(raw: RawTensor) -> np.ndarray:
    data = np.fromfile(raw.file, dtype=np.uint8, count=raw.nbytes, offset=raw.start)
    return dequantize(data.reshape(-1, raw.row_bytes), raw.ggml_type).reshape(raw.shape)


def _llama3_scaling(
    factors: np.ndarray, dim: int, theta: float, m: MetadataReader
) -> dict[str, Any] | None:
    """The llama3 `rope_scaling` whose per-dimension divisors are `rope_freqs` [dim/2], as
    llama.cpp's converter writes them for Llama 3.1+: 1 for short wavelengths, `factor` for
    long ones, a blend between. Checked to reproduce every divisor, else refused."""
    if factors.shape != (dim // 2,):
        raise ModelFormatError(
            f"{m.source}: {ROPE_FREQS} has shape {list(factors.shape)}, but the rope dimension "
            f"{dim} needs [{dim // 2}]; the file is inconsistent, convert the model again"
        )
    if np.all(factors == 1.0):
        return None
    factor = float(factors.max())
    # The original context only fixes a unit: the divisors depend on original / low_freq_factor
    # and original / high_freq_factor. x = original / wavelength falls with the dimension; the
    # blend weight is linear in x, 0 at x = low_freq_factor and 1 at x = high_freq_factor.
    original = int(m.get(Keys.Rope.SCALING_ORIG_CTX_LEN) or LLAMA3_ORIGINAL_CONTEXT)
    x = original / (2 * math.pi) * theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    kept, scaled = np.isclose(factors, 1.0, rtol=1e-6), np.isclose(factors, factor, rtol=1e-6)
    blended = ~kept & ~scaled
    rising = np.all(np.diff(factors) >= 0) and np.all(np.diff(factors[blended]) > 0)
    if factors[0] < 1 or not rising:
        raise _not_llama3(m.source)
    x_blend = x[blended]
    weight = (1 / factors[blended] - 1 / factor) / (1 - 1 / factor)
    above = x[kept].min() if kept.any() else 2 * x[0]
    below = x[scaled].max()
    if len(x_blend) >= 2:
        width = (x_blend[0] - x_blend[-1]) / (weight[0] - weight[-1])
        low = x_blend[0] - weight[0] * width
    elif len(x_blend) == 1:  # a line through the one blended point, crossing 0 and 1 in the gaps
        run = min(x_blend[0] - below, (above - x_blend[0]) * weight[0] / (1 - weight[0])) / 2
        low, width = x_blend[0] - run, run / weight[0]
    else:
        low, width = below + (above - below) / 3, (above - below) / 3
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": float(low),
        "high_freq_factor": float(low + width),
        "original_max_position_embeddings": original,
    }
    rope = RopeConfig.from_hf({"rope_theta": theta, "rope_scaling": scaling})
    if not np.allclose(llama3_frequency_factors(dim, rope).numpy(), factors, rtol=1e-4, atol=0):
        raise _not_llama3(m.source)
    return scaling


def _not_llama3(source: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{source}: its {ROPE_FREQS} factors do not follow llama3 rope scaling (1, then a rising "
        "blend, then one factor, across the dimensions), the only kind hetero reproduces"
    )


def _deepseek_config(
    m: MetadataReader, heads: int, dense_layers: list[int], experts: int, top_k: int
) -> dict[str, Any]:
    gating = int(m.get(Keys.LLM.EXPERT_GATING_FUNC) or ExpertGatingFuncType.SOFTMAX)
    sigmoid = gating == ExpertGatingFuncType.SIGMOID
    rope_dim = int(m.require(Keys.Rope.DIMENSION_COUNT))
    if m.get(Keys.Attention.KEY_LENGTH_MLA):  # newer converters: MLA written as MQA
        qk_dim = int(m.require(Keys.Attention.KEY_LENGTH_MLA))
        v_dim = int(m.require(Keys.Attention.VALUE_LENGTH_MLA))
    else:
        qk_dim = int(m.require(Keys.Attention.KEY_LENGTH))
        v_dim = int(m.require(Keys.Attention.VALUE_LENGTH))
    groups = int(m.get(Keys.LLM.EXPERT_GROUP_COUNT) or 1)
    first_dense = int(m.get(Keys.LLM.LEADING_DENSE_BLOCK_COUNT) or 0)
    if dense_layers != list(range(first_dense)) and experts:
        raise UnsupportedModelError(
            f"{m.source}: dense layers {dense_layers} are not the leading "
            f"{first_dense} layers; hetero runs DeepSeek models whose MoE layers follow them"
        )
    return {
        "model_type": "deepseek_v3" if sigmoid else "deepseek_v2",
        "num_key_value_heads": heads,  # MLA: every head has its own keys and values
        "q_lora_rank": m.get(Keys.Attention.Q_LORA_RANK),
        "kv_lora_rank": int(m.require(Keys.Attention.KV_LORA_RANK)),
        "qk_rope_head_dim": rope_dim,
        "qk_nope_head_dim": qk_dim - rope_dim,
        "v_head_dim": v_dim,
        "head_dim": rope_dim,
        "n_routed_experts": experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": int(m.get(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH) or 0),
        "n_shared_experts": int(m.get(Keys.LLM.EXPERT_SHARED_COUNT) or 0),
        "first_k_dense_replace": first_dense,
        "routed_scaling_factor": float(m.get(Keys.LLM.EXPERT_WEIGHTS_SCALE) or 1.0),
        "norm_topk_prob": bool(m.get(Keys.LLM.EXPERT_WEIGHTS_NORM, False)),
        "scoring_func": "sigmoid" if sigmoid else "softmax",
        "topk_method": "noaux_tc"
        if sigmoid
        else ("group_limited_greedy" if groups > 1 else "greedy"),
        "n_group": groups,
        "topk_group": int(m.get(Keys.LLM.EXPERT_GROUP_USED_COUNT) or 1),
    }


def _special_token_ids(metadata: dict[str, Any]) -> dict[str, Any]:
    out = {}
    if (bos := metadata.get(Keys.Tokenizer.BOS_ID)) is not None:
        out["bos_token_id"] = int(bos)
    if (eos := metadata.get(Keys.Tokenizer.EOS_ID)) is not None:
        out["eos_token_id"] = int(eos)
    return out


# ---- writing ----------------------------------------------------------------------------------


def gguf_metadata(config: TransformerConfig) -> tuple[str, dict[str, Any]]:
    """(GGUF architecture, {key: value}) for a typed config, in the keys llama.cpp's converter
    writes. Values are Python ints/floats/bools/strings/lists; the writer picks GGUF types."""
    c = config
    arch = ARCH_OF_MODEL_TYPE[c.model_type]
    out: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        out[key.format(arch=arch)] = value

    put(Keys.LLM.VOCAB_SIZE, c.vocab_size)
    put(Keys.LLM.CONTEXT_LENGTH, c.max_position_embeddings)
    put(Keys.LLM.EMBEDDING_LENGTH, c.hidden_size)
    put(Keys.LLM.BLOCK_COUNT, c.num_hidden_layers)
    put(Keys.LLM.FEED_FORWARD_LENGTH, c.intermediate_size)
    put(Keys.Attention.HEAD_COUNT, c.num_attention_heads)
    put(Keys.Attention.HEAD_COUNT_KV, c.num_key_value_heads)
    put(Keys.Attention.LAYERNORM_RMS_EPS, c.rms_norm_eps)
    put(Keys.Rope.FREQ_BASE, c.rope.theta)
    _put_rope_scaling(c, put)
    WRITERS[arch](c, put)
    return arch, out


def _put_rope_scaling(c: TransformerConfig, put: Callable[[str, Any], None]) -> None:
    rope = c.rope
    if rope.type == "default":
        return
    if rope.type == "llama3":
        # rope_freqs carries the scaling, and no scaling keys (llama.cpp would apply a factor
        # on top); the original context, which llama.cpp reads for yarn only, tells a reader
        put(
            Keys.Rope.SCALING_ORIG_CTX_LEN,
            rope.original_max_position_embeddings or LLAMA3_ORIGINAL_CONTEXT,
        )
        return
    put(Keys.Rope.SCALING_TYPE, rope.type)
    put(Keys.Rope.SCALING_FACTOR, rope.factor)
    if rope.type != "yarn":
        return
    put(Keys.Rope.SCALING_ORIG_CTX_LEN, rope.original_max_position_embeddings or 4096)
    put(Keys.Rope.SCALING_YARN_BETA_FAST, rope.beta_fast)
    put(Keys.Rope.SCALING_YARN_BETA_SLOW, rope.beta_slow)
    if rope.attention_factor is not None:
        put(Keys.Rope.SCALING_YARN_ATTN_FACTOR, float(rope.attention_factor))
    if rope.mscale_all_dim:
        if rope.mscale != rope.mscale_all_dim:
            raise UnsupportedModelError(
                f"yarn with mscale {rope.mscale} != mscale_all_dim {rope.mscale_all_dim} has "
                "no GGUF form"
            )
        put(Keys.Rope.SCALING_YARN_LOG_MUL, YARN_LOG_MULTIPLIER_PER_MSCALE * rope.mscale_all_dim)


def _write_dense(c: Any, put: Callable[[str, Any], None]) -> None:
    put(Keys.Rope.DIMENSION_COUNT, c.head_dim)
    put(Keys.Attention.KEY_LENGTH, c.head_dim)
    put(Keys.Attention.VALUE_LENGTH, c.head_dim)
    if c.model_type == "llama" and c.qkv_bias != c.out_bias:
        raise UnsupportedModelError("llama with q/k/v bias but no output bias has no GGUF form")
    if c.model_type == "mixtral":
        put(Keys.LLM.EXPERT_COUNT, c.num_local_experts)
        put(Keys.LLM.EXPERT_USED_COUNT, c.num_experts_per_tok)


def _write_qwen_moe(c: Any, put: Callable[[str, Any], None]) -> None:
    _write_dense(c, put)
    put(Keys.LLM.EXPERT_COUNT, c.num_experts)
    put(Keys.LLM.EXPERT_USED_COUNT, c.num_experts_per_tok)
    put(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, c.moe_intermediate_size)
    put(Keys.LLM.EXPERT_WEIGHTS_NORM, c.norm_topk_prob)
    if c.shared_expert_intermediate_size:
        put(Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH, c.shared_expert_intermediate_size)


def _write_deepseek(c: Any, put: Callable[[str, Any], None]) -> None:
    if c.moe_layer_freq != 1:
        raise UnsupportedModelError("DeepSeek with moe_layer_freq != 1 has no GGUF form")
    # MLA written as MQA over the latent, as llama.cpp's converter does (attn_k_b / attn_v_b)
    put(Keys.Attention.HEAD_COUNT_KV, 1)
    put(Keys.Attention.KEY_LENGTH, c.kv_lora_rank + c.qk_rope_head_dim)
    put(Keys.Attention.VALUE_LENGTH, c.kv_lora_rank)
    put(Keys.Attention.KEY_LENGTH_MLA, c.qk_nope_head_dim + c.qk_rope_head_dim)
    put(Keys.Attention.VALUE_LENGTH_MLA, c.v_head_dim)
    put(Keys.Attention.KV_LORA_RANK, c.kv_lora_rank)
    if c.q_lora_rank is not None:
        put(Keys.Attention.Q_LORA_RANK, c.q_lora_rank)
    put(Keys.Rope.DIMENSION_COUNT, c.qk_rope_head_dim)
    put(Keys.LLM.LEADING_DENSE_BLOCK_COUNT, c.first_k_dense_replace)
    put(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, c.moe_intermediate_size)
    put(Keys.LLM.EXPERT_COUNT, c.n_routed_experts)
    put(Keys.LLM.EXPERT_USED_COUNT, c.num_experts_per_tok)
    put(Keys.LLM.EXPERT_SHARED_COUNT, c.n_shared_experts)
    put(Keys.LLM.EXPERT_WEIGHTS_SCALE, c.routed_scaling_factor)
    put(Keys.LLM.EXPERT_WEIGHTS_NORM, c.norm_topk_prob)
    sigmoid = c.scoring_func == "sigmoid"
    gating = ExpertGatingFuncType.SIGMOID if sigmoid else ExpertGatingFuncType.SOFTMAX
    put(Keys.LLM.EXPERT_GATING_FUNC, int(gating))
    put(Keys.LLM.EXPERT_GROUP_COUNT, c.n_group)
    put(Keys.LLM.EXPERT_GROUP_USED_COUNT, c.topk_group)


WRITERS: dict[str, Callable[[Any, Callable[[str, Any], None]], None]] = {
    "llama": _write_dense,
    "qwen2": _write_dense,
    "qwen3": _write_dense,
    "qwen2moe": _write_qwen_moe,
    "qwen3moe": _write_qwen_moe,
    "deepseek2": _write_deepseek,
}
