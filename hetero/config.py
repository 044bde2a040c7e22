"""Typed model configuration, read once from a Hugging Face config.json at the edge.

Families extend `TransformerConfig` with their own fields; everything inside hetero takes
these dataclasses, never raw dicts."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from hetero.errors import InvalidRequestError, ModelFormatError, UnsupportedModelError

# The dtypes and quantisations a model loads with, named here (no torch import) so the command
# line's parser and --help run without loading torch. "auto": a GGUF file's quantised and BF16
# tensors run on the CPU kernels, and so do float checkpoints where `auto_kernel_type` says so;
# "none": torch runs everything in the model dtype; a type: quantise float weights at load
# (hetero.runtime.assembler.CONVERT_TYPES)
DTYPE_NAMES = ("float32", "bfloat16", "float16")
QUANT_CHOICES = ("auto", "none", "q8_0", "q4_k", "bf16", "f16", "f32")
KV_DTYPE_NAMES = ("auto", "bf16", "f16", "f32")  # hetero.runtime.model.KV_DTYPES' keys
LORA_TARGETS = ("attention", "experts", "shared")  # what hetero.runtime.lora adapts

ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# the KV cache is allocated in blocks of this many tokens; the planner sizes it in whole blocks
KV_BLOCK_TOKENS = 16


def dtype_name(dtype: str, raw_config: dict[str, Any]) -> str:
    """'auto' names the checkpoint's dtype (zero-copy loading); otherwise one of DTYPE_NAMES."""
    if dtype == "auto":
        dtype = raw_config.get("torch_dtype") or raw_config.get("dtype") or "float32"
    if dtype not in DTYPE_NAMES:
        raise InvalidRequestError(
            f"dtype must be one of auto, {', '.join(DTYPE_NAMES)}; got {dtype!r}"
        )
    return dtype


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, from `rope_scaling` (older configs) or `rope_parameters`
    (transformers >= 5)."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> RopeConfig:
        params = dict(cfg.get("rope_scaling") or {})
        params.update(cfg.get("rope_parameters") or {})
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        if rope_type not in ROPE_TYPES:
            raise_unsupported(cfg, f"rope type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        factor = params.get("factor")
        original = params.get("original_max_position_embeddings")
        if rope_type == "yarn" and factor is None and original:
            factor = cfg["max_position_embeddings"] / original
        return cls(
            theta=float(theta),
            type=rope_type,
            factor=float(factor if factor is not None else 1.0),
            original_max_position_embeddings=original,
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            attention_factor=params.get("attention_factor"),
            truncate=bool(params.get("truncate", True)),
        )


@dataclass(frozen=True)
class TransformerConfig:
    """Fields every decoder-only family shares."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeConfig
    hidden_act: str = "silu"
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    bos_token_id: int | None = None
    attention_windows: tuple[int | None, ...] = ()  # per layer: sliding window, None: full

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> Self:
        """Build from a config.json dict; subclasses add their fields through `_extra`."""
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            act = cfg.get("hidden_act", "silu")
            if act not in ("silu", "swish"):
                raise_unsupported(cfg, f"activation {act!r} (only silu is supported)")
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
            return cls(
                model_type=cfg["model_type"],
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                intermediate_size=int(cfg.get("intermediate_size") or 0),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                rope=RopeConfig.from_hf(cfg),
                hidden_act="silu",
                eos_token_ids=eos_ids,
                bos_token_id=cfg.get("bos_token_id"),
                attention_windows=sliding_windows(cfg),
                **cls._extra(cfg),
            )
        except KeyError as missing:
            raise ModelFormatError(
                f"config.json of model_type {cfg.get('model_type')!r} lacks the field {missing}"
            ) from None

    @classmethod
    def _extra(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        return {}

    @property
    def context_limit(self) -> int:
        """Longest sequence (prompt + completion) the model runs correctly."""
        return self.max_position_embeddings

    def attention_window(self, layer: int) -> int | None:
        return self.attention_windows[layer] if self.attention_windows else None


def sliding_windows(cfg: dict[str, Any]) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: full attention), read as transformers reads the
    config: its `layer_types` where it has them, else the family's rule (Qwen2/Qwen3: layers
    from max_window_layers on; Qwen2-MoE: even layers below it; Qwen3-MoE: every layer, all
    three only with use_sliding_window; Mixtral and Mistral: every layer)."""
    layers = range(int(cfg["num_hidden_layers"]))
    window = cfg.get("sliding_window") or None
    kind = cfg["model_type"]
    if kind.startswith("qwen") and not cfg.get("use_sliding_window"):
        window = None
    if window is None:
        return ()
    if cfg.get("layer_types"):
        slides = [t == "sliding_attention" for t in cfg["layer_types"]]
    elif kind in ("qwen2", "qwen3"):
        slides = [i >= cfg.get("max_window_layers", 28) for i in layers]
    elif kind == "qwen2_moe":
        slides = [(i + 1) % 2 == 1 and i < cfg.get("max_window_layers", 28) for i in layers]
    elif kind in ("qwen3_moe", "mixtral", "mistral"):
        slides = [True for _ in layers]
    else:
        return ()
    return tuple(int(window) if slide else None for slide in slides)


def raise_unsupported(cfg: dict[str, Any], what: str) -> None:
    raise UnsupportedModelError(f"model_type {cfg.get('model_type')!r} uses {what}")


def read_config_json(model_dir: Path) -> dict[str, Any]:
    """Read and minimally validate config.json."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelFormatError(
            f"{model_dir} has no config.json; is it a Hugging Face model directory?"
        )
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFormatError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ModelFormatError(f"{path} has no model_type field")
    return cfg
