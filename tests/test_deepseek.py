"""DeepSeek-V2/V3 beyond the shared parity tests: V2's group-limited routing, V3's half-split RoPE
option, YaRN past the original context, the compressed (latent) KV cache, and config parsing
of the released config.json files."""

from __future__ import annotations

import math

import pytest
import torch
from test_parity import reference_logits, relative_error

import hetero
from cpu_kernels import mla_decode
from hetero.models import deepseek
from hetero.runtime.attention import NUMBA_DECODE
from hetero.runtime.batch import ForwardBatch, SequenceSlice

# DeepSeek's released YaRN settings, scaled down: trained on 64 positions, stretched 4x to 256.
YARN = dict(
    type="yarn", factor=4.0, mscale=0.707, mscale_all_dim=0.707, original_max_position_embeddings=64
)

VARIANTS = {
    "v2_group_limited_greedy": (
        "deepseek_v2",
        dict(
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=16.0,  # DeepSeek-V2's
            attention_bias=True,
        ),
    ),
    "v3_half_split_rope": ("deepseek_v3", dict(rope_interleave=False)),
    "v3_yarn": ("deepseek_v3", dict(rope_scaling=YARN, max_position_embeddings=256)),
    # mscale != mscale_all_dim: YaRN then also scales cos/sin, not only the softmax
    "v2_yarn": (
        "deepseek_v2",
        dict(rope_scaling=dict(YARN, mscale=1.0), max_position_embeddings=256),
    ),
}


def random_ids(count: int, vocab_size: int, seed: int) -> list[int]:
    return torch.randint(
        0, vocab_size, (count,), generator=torch.Generator().manual_seed(seed)
    ).tolist()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_logits_match_transformers_beyond_original_context(variant, checkpoint_factory):
    model_type, overrides = VARIANTS[variant]
    path, hf_model = checkpoint_factory(model_type, **overrides)
    model = hetero.load(path, dtype="float32", progress=False)
    ids = random_ids(150, model.config.vocab_size, seed=4)  # > 64 original positions
    assert relative_error(model.logits(ids), reference_logits(hf_model, ids)) < 1e-4


def test_kv_cache_holds_only_the_latent_per_token(checkpoint_factory):
    path, _ = checkpoint_factory("deepseek_v3")
    model = hetero.load(path, dtype="float32", progress=False)
    c = model.config
    kv = model.new_kv_cache(max_tokens=32)
    for layer in kv.storage:
        assert {name: store.shape[1:] for name, store in layer.items()} == {
            "latent": (c.kv_lora_rank,),
            "k_rope": (c.qk_rope_head_dim,),
        }
    per_token = sum(store[0].numel() for store in kv.storage[0].values())
    assert (
        per_token == c.kv_lora_rank + c.qk_rope_head_dim < 2 * c.num_attention_heads * c.v_head_dim
    )


def cached_decode_logits(model, ids: list[int], prompt_len: int, kv) -> torch.Tensor:
    """Logits of a prompt's last token and of each later token decoded one at a time over
    the KV cache `kv`: [len(ids) - prompt_len + 1, vocab]."""
    seq, _ = kv.new_sequence()
    kv.reserve(seq, len(ids))
    with torch.inference_mode():
        batch = ForwardBatch([SequenceSlice(seq, 0, prompt_len)], kv)
        cached = [model.net(torch.tensor(ids[:prompt_len]), batch)[-1]]
        for position in range(prompt_len, len(ids)):
            batch = ForwardBatch([SequenceSlice(seq, position, 1)], kv)
            cached.append(model.net(torch.tensor([ids[position]]), batch)[0])
    return torch.stack(cached)


def count_latent_kernel_calls(monkeypatch) -> list:
    """Each call of the MLA decode kernel appends to the returned list."""
    calls, real = [], mla_decode.latent_attention_decode

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(mla_decode, "latent_attention_decode", counted)
    return calls


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v2"])
def test_cached_decoding_equals_fresh_forward(model_type, checkpoint_factory):
    path, _ = checkpoint_factory(model_type, rope_scaling=YARN, max_position_embeddings=256)
    model = hetero.load(path, dtype="float32", progress=False)
    ids = random_ids(80, model.config.vocab_size, seed=5)
    prompt_len = 70
    kv = model.new_kv_cache(max_tokens=len(ids))
    cached = cached_decode_logits(model, ids, prompt_len, kv)
    fresh = model.logits(ids)[prompt_len - 1 :]
    assert relative_error(cached, fresh) < 1e-5


def released_v2_lite_config(**changes) -> dict:
    """DeepSeek-V2-Lite's config.json (the fields hetero reads)."""
    cfg = {
        "model_type": "deepseek_v2",
        "vocab_size": 102400,
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "n_shared_experts": 2,
        "n_routed_experts": 64,
        "routed_scaling_factor": 1.0,
        "kv_lora_rank": 512,
        "q_lora_rank": None,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "qk_nope_head_dim": 128,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "num_experts_per_tok": 6,
        "moe_layer_freq": 1,
        "first_k_dense_replace": 1,
        "norm_topk_prob": False,
        "scoring_func": "softmax",
        "max_position_embeddings": 163840,
        "rope_theta": 10000,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "rms_norm_eps": 1e-6,
        "bos_token_id": 100000,
        "eos_token_id": 100001,
    }
    cfg.update(changes)
    return cfg


def released_v3_config(**changes) -> dict:
    """DeepSeek-V3's config.json fields that differ from V2-Lite's, minus its fp8 weights."""
    v3 = dict(
        model_type="deepseek_v3",
        q_lora_rank=1536,
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        first_k_dense_replace=3,
    )
    return released_v2_lite_config(**{**v3, **changes})


def test_released_v2_lite_config_parses_with_yarn_softmax_scale():
    c = deepseek.parse_config(released_v2_lite_config())
    assert c.q_lora_rank is None and c.rope_interleave
    assert (c.rope.type, c.rope.factor, c.rope.original_max_position_embeddings) == (
        "yarn",
        40,
        4096,
    )
    mscale = 0.1 * 0.707 * math.log(40) + 1
    assert c.softmax_scale == pytest.approx(192**-0.5 * mscale**2)
    assert [c.is_sparse(i) for i in range(3)] == [False, True, True]
    with torch.device("meta"):
        net = deepseek.build(c)
    attn = net.layers[0].self_attn
    assert attn.cache_entries() == {"latent": (512,), "k_rope": (64,)}
    assert not hasattr(attn, "q_a_proj") and attn.q_proj.weight.shape == (16 * 192, 2048)


def test_released_v3_config_routes_with_sigmoid_groups():
    c = deepseek.parse_config(released_v3_config())
    assert (c.scoring_func, c.topk_method, c.n_group, c.topk_group) == ("sigmoid", "noaux_tc", 8, 4)
    assert c.norm_topk_prob and c.routed_scaling_factor == 2.5 and c.q_lora_rank == 1536
    assert [c.is_sparse(i) for i in (2, 3)] == [False, True]


@pytest.mark.parametrize(
    "cfg, message",
    [
        (released_v3_config(scoring_func="softmax"), "scoring_func"),
        (released_v2_lite_config(topk_method="noaux_tc"), "topk_method"),
        (released_v2_lite_config(norm_topk_prob=True), "norm_topk_prob"),
    ],
)
def test_unsupported_routing_is_refused(cfg, message):
    with pytest.raises(hetero.UnsupportedModelError, match=message):
        deepseek.parse_config(cfg)


def test_v3_group_routing_keeps_experts_of_the_best_groups_and_unbiased_weights():
    # 4 experts in 2 groups; the bias lifts expert 3 (group 1) over expert 1 (group 0)
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.6])
    weights, ids = deepseek.sigmoid_noaux_topk(
        logits, bias, top_k=2, n_group=2, topk_group=1, normalize=False, scaling=2.0
    )
    assert sorted(ids[0].tolist()) == [0, 1]  # group 0 sums higher: 0.88+0.73 vs 0.27+1.22
    assert torch.allclose(weights.sort(dim=-1).values, 2.0 * logits[:, [1, 0]].sigmoid())
    weights, ids = deepseek.sigmoid_noaux_topk(
        logits, bias, top_k=2, n_group=1, topk_group=1, normalize=True, scaling=1.0
    )
    assert sorted(ids[0].tolist()) == [0, 3]
    assert torch.allclose(weights.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v2"])
def test_cpu_decode_runs_the_latent_kernel_with_the_torch_paths_tokens(
    model_type, checkpoint_factory, monkeypatch
):
    path, _ = checkpoint_factory(model_type)
    model = hetero.load(path, dtype="float32", progress=False)
    ids = random_ids(20, model.config.vocab_size, seed=6)
    calls = count_latent_kernel_calls(monkeypatch)
    kernel_tokens = model.generate(ids, max_new_tokens=8, ignore_eos=True).token_ids
    assert len(calls) == 7 * model.config.num_hidden_layers  # every decode step, every layer
    monkeypatch.setattr(NUMBA_DECODE, "applies", lambda *args: False)
    assert model.generate(ids, max_new_tokens=8, ignore_eos=True).token_ids == kernel_tokens


def test_a_bf16_latent_cache_decodes_within_its_rounding(checkpoint_factory):
    path, _ = checkpoint_factory("deepseek_v3")
    model = hetero.load(path, dtype="float32", progress=False)
    ids = random_ids(40, model.config.vocab_size, seed=7)
    prompt_len = 30
    kv = model.new_kv_cache(max_tokens=len(ids), kv_dtype="bf16")
    assert all(store.dtype == torch.bfloat16 for layer in kv.storage for store in layer.values())
    cached = cached_decode_logits(model, ids, prompt_len, kv)
    fresh = model.logits(ids)[prompt_len - 1 :]
    # each cached value is within 2^-8 of its float32 value, relative; the logits move by less
    # (4.5e-4 of the largest here)
    assert relative_error(cached, fresh) < 2.0**-8


def test_converted_weights_keep_kv_b_float_for_the_latent_kernel(checkpoint_factory, monkeypatch):
    path, _ = checkpoint_factory("deepseek_v3")
    model = hetero.load(path, quant="q8_0", progress=False)
    assert model.quant_report.modules > 0  # the kernels run the other linears and experts
    assert all(type(layer.self_attn.kv_b_proj) is torch.nn.Linear for layer in model.net.layers)
    calls = count_latent_kernel_calls(monkeypatch)
    model.generate(random_ids(8, model.config.vocab_size, seed=2), max_new_tokens=3)
    assert calls
