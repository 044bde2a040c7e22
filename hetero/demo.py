"""The built-in demo model: a few-MB Qwen3-MoE checkpoint with a real BPE tokenizer and chat
template, written on first use so every command works offline with MODEL=demo.

Its weights are random (seeded): it exercises every part of the runtime, not language."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from hetero.cache import cache_root
from hetero.demo_tokenizer import write_demo_tokenizer
from hetero.loading.weights import file_name
from hetero.models import qwen_moe

DEMO_NAME = "demo"
DEMO_VERSION = 1  # bump when the demo checkpoint changes, so caches are rewritten
DEMO_SEED = 1234


def demo_config(vocab_size: int, eos_ids: list[int]) -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 256,
        "moe_intermediate_size": 64,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "eos_token_id": eos_ids[0],
    }


def write_demo(out_dir: str | Path) -> Path:
    """Write the demo checkpoint to `out_dir` (config, safetensors, tokenizer, templates)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = write_demo_tokenizer(out)
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    vocab = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocab}
    eos_ids = [ids[tokenizer_config["eos_token"]], ids["<|endoftext|>"]]
    raw = demo_config(vocab_size, eos_ids)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos_ids, "temperature": 0.7, "top_p": 0.9}, indent=2) + "\n"
    )
    net = qwen_moe.build(qwen_moe.parse_config(raw))
    tensors = random_weights(net, DEMO_SEED)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def random_weights(
    net: torch.nn.Module, seed: int, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Seeded random weights for a Qwen-MoE module tree, by checkpoint name: norms at one,
    matrices scaled by fan-in so activations keep their size through the layers."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, param in net.named_parameters():
        if name.endswith("norm.weight"):
            value = torch.ones(param.shape)
        else:
            value = torch.randn(param.shape, generator=generator) * param.shape[-1] ** -0.5
        tensors[file_name(name, qwen_moe.checkpoint_name)] = value.to(dtype)
    return tensors


def demo_cache_dir() -> Path:
    return cache_root() / f"demo-v{DEMO_VERSION}"


def ensure_demo() -> Path:
    """The cached demo checkpoint, written atomically on first use."""
    target = demo_cache_dir()
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        write_demo(staging)
        # another process may have won the race; its copy is identical
        with contextlib.suppress(OSError):
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(model: str | Path) -> Path:
    """A model argument as a path: "demo" is the built-in demo model."""
    return ensure_demo() if str(model) == DEMO_NAME else Path(model).expanduser()
