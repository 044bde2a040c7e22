"""Fixtures that make tiny random-weight checkpoints with transformers' own classes, so every
family is tested against the reference implementation without downloading anything."""

from __future__ import annotations

from pathlib import Path

# before any test module imports gpu_kernels: it picks their device and sets up Triton's interpreter
import gpu_kernel_device  # noqa: F401
import pytest
import torch

from hetero.demo_tokenizer import write_demo_tokenizer

# Small but not degenerate: GQA (4 q heads over 2 kv heads), 8 experts, top-2, sizes divisible
# by 4 (transformers' grouped_mm needs 16-byte strides, see shared/notes/reference-models.md).
TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)
TINY_MOE = dict(moe_intermediate_size=32, num_experts_per_tok=2)

FAMILY_CONFIGS: dict[str, dict] = {
    "llama": dict(TINY, attention_bias=False),
    "qwen2": dict(TINY),
    "qwen3": dict(TINY),
    "qwen3_moe": dict(
        TINY,
        **TINY_MOE,
        num_experts=8,
        norm_topk_prob=True,
        mlp_only_layers=[1],
        decoder_sparse_step=1,
    ),
    "qwen2_moe": dict(
        TINY,
        **TINY_MOE,
        num_experts=8,
        shared_expert_intermediate_size=48,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
    "mixtral": dict(TINY, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    # MLA has no GQA: as many kv heads as heads. v_head_dim differs from the qk head dim (16 + 8).
    "deepseek_v3": dict(
        TINY,
        **TINY_MOE,
        num_key_value_heads=4,
        head_dim=8,
        q_lora_rank=24,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        n_routed_experts=8,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    ),
    "deepseek_v2": dict(
        TINY,
        **TINY_MOE,
        num_key_value_heads=4,
        head_dim=8,
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        n_routed_experts=8,
        n_shared_experts=2,
        first_k_dense_replace=1,
        topk_method="greedy",
        routed_scaling_factor=1.0,
    ),
}

# families checkpoint_factory makes that the all-family tests leave out (GGUF has no Mistral
# mapping); test_sliding_window checks Mistral against transformers
OTHER_CONFIGS: dict[str, dict] = {"mistral": dict(TINY)}


def sharpen_routers(model: torch.nn.Module) -> None:
    """Random routers are nearly uniform, so top-k sits on near-ties that flip between two
    correct implementations; scale them so routing is decisive (a mismatch is then a bug)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                param.mul_(8.0)
            if name.endswith("e_score_correction_bias"):
                param.copy_(torch.rand_like(param) * 0.5)


def make_checkpoint(
    directory: Path, model_type: str, seed: int = 0, shards: bool = False, **overrides
):
    """Write a random-weight transformers model of `model_type` (plus the demo tokenizer) to
    `directory`; return the transformers model in float32 for reference outputs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    vocab_size = write_demo_tokenizer(directory)
    family = FAMILY_CONFIGS.get(model_type) or OTHER_CONFIGS[model_type]
    cfg = dict(family, vocab_size=vocab_size, **overrides)
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    sharpen_routers(model)
    model.eval()
    model.save_pretrained(directory, max_shard_size="200KB" if shards else "5GB")
    return model


@pytest.fixture
def checkpoint_factory(tmp_path):
    def make(model_type: str, **kwargs):
        directory = tmp_path / model_type
        directory.mkdir(exist_ok=True)
        return directory, make_checkpoint(directory, model_type, **kwargs)

    return make
