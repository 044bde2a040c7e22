"""GGUF models: every family written by gguf.GGUFWriter (through `write_gguf`) from a tiny random
transformers model loads with the same logits as its safetensors checkpoint; split files,
llama.cpp's tensor names and layouts, and quantised files (exactly the dequantised weights, and
within each type's error budget of the float model)."""

from __future__ import annotations

import math
from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch
from conftest import FAMILY_CONFIGS, make_checkpoint
from gguf import GGMLQuantizationType as T

import hetero
from hetero.errors import ModelFormatError, UnsupportedModelError
from hetero.formats.gguf_quantize import quantize
from hetero.formats.gguf_quants import dequantize
from hetero.loading.gguf_checkpoint import GGUFCheckpoint, read_gguf
from hetero.loading.gguf_config import ARCH_OF_MODEL_TYPE
from hetero.loading.gguf_writer import write_gguf
from hetero.loading.quant_mix import tensor_types

# Relative RMS error of the logits against the float model (64 tokens, the wide Qwen3-MoE
# below); measured 0.028 (q8_0), 0.047 (q6_k), 0.144 (q4_k_m). Weight-level error is ~3x
# smaller: it grows through the layers.
LOGIT_BUDGETS = {"q8_0": 0.05, "q6_k": 0.1, "q4_k_m": 0.3}
# rows a multiple of 256, so K-quants apply without fallback
WIDE = dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=256, head_dim=64)
# Llama 3.1's scaling on a small original context. Head dim 16, theta 1e4: the wavelengths are
# 6.3 (kept, < 64/8), 19.9 and 62.8 (blended), then 199 ... (divided by 8, > 64)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 8.0,
    "original_max_position_embeddings": 64,
}


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


def relative_rms(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt())


def some_ids(model, n: int = 29) -> list[int]:
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def wide_qwen3_moe(tmp_path_factory):
    directory = tmp_path_factory.mktemp("wide_qwen3_moe")
    make_checkpoint(directory, "qwen3_moe", **WIDE)
    return directory, hetero.load(directory, dtype="float32", progress=False)


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_float32_gguf_matches_safetensors(family, checkpoint_factory, tmp_path):
    path, hf_model = checkpoint_factory(family)
    source = hetero.load(path, dtype="float32", progress=False)
    (gguf_file,) = write_gguf(source, tmp_path / "model.gguf", "f32")
    model = hetero.load(gguf_file, progress=False)
    assert model.dtype == torch.float32  # "auto" keeps an all-F32 file in float32
    # GGUF keeps eps in float32 and one eos id (the tokenizer's)
    assert model.config.rms_norm_eps == pytest.approx(source.config.rms_norm_eps, rel=1e-6)
    same = dict(rms_norm_eps=0.0, eos_token_ids=(), bos_token_id=None)
    assert replace(model.config, **same) == replace(source.config, **same)
    ids = some_ids(model)
    assert relative_error(model.logits(ids), source.logits(ids)) < 1e-5
    stored = {t.name: t for t in gguf.GGUFReader(gguf_file).tensors}
    assert_llama_cpp_names(family, hf_model.state_dict(), set(stored), source.config)
    if family in ("llama", "mixtral"):
        assert_llama_cpp_rope_permutation(hf_model.state_dict(), stored, source.config)


def assert_llama_cpp_names(family, hf_tensors, written, config) -> None:
    """gguf's TensorNameMap (what llama.cpp's converter uses) names each HF tensor; stacked
    experts and DeepSeek's kv_b (split into k_b / v_b) are the converter's own layout changes."""
    arch = ARCH_OF_MODEL_TYPE[family]
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    for hf_name in hf_tensors:
        if ".experts." in hf_name or "kv_b_proj" in hf_name:
            continue
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        converted = hf_name.replace("e_score_correction_bias", "e_score_correction.bias")
        expected = names.get_name(converted, try_suffixes=(".weight", ".bias"))
        if expected is None and family == "qwen3_moe" and ".mlp." in hf_name:
            continue  # a dense layer (mlp_only_layers): llama.cpp's qwen3moe has none
        assert expected in written, hf_name
    if family in ("qwen3_moe", "qwen2_moe", "mixtral"):
        assert "blk.0.ffn_gate_exps.weight" in written
    if arch == "deepseek2":
        assert {"blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_shexp.weight"} <= written
        assert {"blk.0.attn_k_b.weight", "blk.0.attn_v_b.weight"} <= written


def assert_llama_cpp_rope_permutation(hf_tensors, stored, config) -> None:
    for proj, heads in (("q", config.num_attention_heads), ("k", config.num_key_value_heads)):
        w = hf_tensors[f"model.layers.1.self_attn.{proj}_proj.weight"].numpy()
        # convert_hf_to_gguf.py's LlamaModel.permute
        permuted = w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2)
        data = np.array(stored[f"blk.1.attn_{proj}.weight"].data)
        assert np.array_equal(data, permuted.reshape(w.shape))


def test_split_gguf_loads_from_its_first_part(checkpoint_factory, tmp_path):
    path, _ = checkpoint_factory("qwen2_moe")
    source = hetero.load(path, dtype="float32", progress=False)
    files = write_gguf(source, tmp_path / "model.gguf", "f32", split_max_bytes=300_000)
    assert len(files) >= 3 and files[0].name.endswith(f"-00001-of-{len(files):05d}.gguf")
    model = hetero.load(files[0], progress=False)
    ids = some_ids(model)
    assert relative_error(model.logits(ids), source.logits(ids)) < 1e-5
    files[1].unlink()
    with pytest.raises(ModelFormatError, match="missing; download every part"):
        hetero.load(files[0], progress=False)


@pytest.mark.parametrize(
    "family, rope_scaling",
    [
        ("llama", {"rope_type": "linear", "factor": 2.0}),
        ("qwen3", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
        ("llama", LLAMA3_ROPE),
        # one blended dimension (wavelength 19.9 in [8, 32]), which leaves the factors' line open
        ("llama", dict(LLAMA3_ROPE, high_freq_factor=4.0, original_max_position_embeddings=32)),
        (
            "deepseek_v3",
            {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "mscale": 0.707,
                "mscale_all_dim": 0.707,
                "beta_fast": 32,
                "beta_slow": 1,
            },
        ),
    ],
)
def test_rope_scaling_survives_gguf(family, rope_scaling, checkpoint_factory, tmp_path):
    path, _ = checkpoint_factory(family, rope_scaling=rope_scaling)
    source = hetero.load(path, dtype="float32", progress=False)
    assert source.config.rope.type == rope_scaling["rope_type"]
    (gguf_file,) = write_gguf(source, tmp_path / "model.gguf", "f32")
    model = hetero.load(gguf_file, progress=False)
    assert model.config.rope.type == rope_scaling["rope_type"]
    ids = some_ids(model, 120)
    assert relative_error(model.logits(ids), source.logits(ids)) < 1e-5


def test_llama3_rope_is_stored_as_llama_cpp_rope_freqs(checkpoint_factory, tmp_path):
    path, _ = checkpoint_factory("llama", rope_scaling=LLAMA3_ROPE)
    source = hetero.load(path, dtype="float32", progress=False)
    (gguf_file,) = write_gguf(source, tmp_path / "model.gguf", "q8_0")
    stored = {t.name: t for t in gguf.GGUFReader(gguf_file).tensors}
    rope_freqs = stored["rope_freqs.weight"]
    assert rope_freqs.tensor_type == T.F32
    head_dim, theta = source.config.head_dim, source.config.rope.theta
    expected = llama_cpp_rope_freqs(head_dim, theta, **LLAMA3_ROPE)
    assert np.allclose(np.array(rope_freqs.data), expected, rtol=1e-6)
    assert 1.0 in expected and LLAMA3_ROPE["factor"] in expected  # all three bands present
    rope = hetero.load(gguf_file, progress=False).config.rope
    assert rope.type == "llama3"
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        assert getattr(rope, key) == pytest.approx(LLAMA3_ROPE[key], rel=1e-5), key
    assert rope.original_max_position_embeddings == 64


def llama_cpp_rope_freqs(dim, theta, factor, low_freq_factor, high_freq_factor, **rest):
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors for llama3 rope scaling."""
    old_context_len = rest["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, dim, 2) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (
                high_freq_factor - low_freq_factor
            )
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def test_rope_freqs_other_than_llama3_are_refused(checkpoint_factory, tmp_path):
    path, _ = checkpoint_factory("llama", rope_scaling=LLAMA3_ROPE)
    source = hetero.load(path, dtype="float32", progress=False)
    (gguf_file,) = write_gguf(source, tmp_path / "model.gguf", "f32")
    _, tensors = read_gguf(gguf_file)
    rope_freqs = next(t for t in tensors if t.name == "rope_freqs.weight")
    with open(gguf_file, "r+b") as f:  # a longrope-like profile: rising, then falling
        f.seek(rope_freqs.start)
        f.write(np.array([1, 2, 4, 8, 4, 2, 1, 1], dtype=np.float32).tobytes())
    with pytest.raises(UnsupportedModelError, match="do not follow llama3 rope scaling"):
        hetero.load(gguf_file, progress=False)


@pytest.mark.parametrize("file_type", ["q8_0", "q4_k_m"])
def test_quantised_gguf_holds_exactly_the_dequantised_weights(wide_qwen3_moe, tmp_path, file_type):
    _, source = wide_qwen3_moe
    (gguf_file,) = write_gguf(source, tmp_path / "model.gguf", file_type)
    checkpoint = GGUFCheckpoint(gguf_file)
    model = hetero.load(gguf_file, dtype="float32", quant="none", progress=False)
    loaded = dict(model.net.named_parameters())
    seen_types = set()
    for name, param in source.net.named_parameters():
        if "q_proj" in name or "k_proj" in name or name == "lm_head.weight":
            continue  # same bytes, covered by the logits tests
        blocks, ggml_type = checkpoint.raw_tensor(
            ("" if name.startswith("lm_head") else "model.") + name
        )
        seen_types.add(ggml_type)
        expected = dequantize(quantize(param.detach().numpy(), ggml_type), ggml_type)
        assert np.array_equal(loaded[name].numpy(), expected.reshape(param.shape)), name
        assert np.array_equal(dequantize(blocks, ggml_type).reshape(param.shape), expected)
    wanted = {T.Q8_0, T.F32} if file_type == "q8_0" else {T.Q4_K, T.Q6_K, T.F32}
    assert wanted <= seen_types


@pytest.mark.parametrize("file_type", sorted(LOGIT_BUDGETS))
def test_quantised_logits_within_budget(wide_qwen3_moe, tmp_path, file_type):
    _, source = wide_qwen3_moe
    (gguf_file,) = write_gguf(source, tmp_path / "model.gguf", file_type)
    model = hetero.load(gguf_file, quant="none", progress=False)
    assert model.dtype == torch.bfloat16  # "auto" for a quantised file dequantised at load
    model = hetero.load(gguf_file, dtype="float32", quant="none", progress=False)
    ids = some_ids(model, 64)
    assert relative_rms(model.logits(ids), source.logits(ids)) < LOGIT_BUDGETS[file_type]


@pytest.mark.parametrize("file_type", ["f16", "bf16"])
def test_float_gguf_runs_its_weights_on_the_panel_kernels(wide_qwen3_moe, tmp_path, file_type):
    _, source = wide_qwen3_moe
    (gguf_file,) = write_gguf(source, tmp_path / "model.gguf", file_type)
    model = hetero.load(gguf_file, progress=False)
    kinds = set(model.quant_report.types)
    assert kinds == {"F16Matrix" if file_type == "f16" else "BF16Matrix"}
    # the reference: the same weights widened for torch in float32
    reference = hetero.load(gguf_file, dtype="float32", quant="none", progress=False)
    ids = some_ids(model, 64)
    assert relative_rms(model.logits(ids), reference.logits(ids)) < 1e-5


def test_deepseek_kv_b_is_rejoined_from_k_b_and_v_b(tmp_path):
    make_checkpoint(tmp_path / "src", "deepseek_v2", **{k: WIDE[k] for k in ("hidden_size",)})
    source = hetero.load(tmp_path / "src", dtype="float32", progress=False)
    (gguf_file,) = write_gguf(source, tmp_path / "model.gguf", "q8_0")
    model = hetero.load(gguf_file, dtype="float32", progress=False)
    ours = dict(model.net.named_parameters())["layers.1.self_attn.kv_b_proj.weight"]
    reference = dict(source.net.named_parameters())["layers.1.self_attn.kv_b_proj.weight"]
    assert ours.shape == reference.shape
    assert relative_rms(ours, reference) < 0.01
    with pytest.raises(KeyError):
        GGUFCheckpoint(gguf_file).raw_tensor("model.layers.1.self_attn.kv_b_proj.weight")


def test_q4_k_m_mix_follows_llama_cpp():
    # a Mixtral-like model (8 experts: llama.cpp bumps attn_k/attn_v to Q8_0, attn_output to
    # Q5_K) with 16 layers, hidden 4096, and a 64-wide tensor that needs a fallback
    shapes = {"token_embd.weight": (1000, 4096), "output.weight": (1000, 4096)}
    shapes["output_norm.weight"] = (4096,)
    for i in range(16):
        shapes |= {
            f"blk.{i}.attn_v.weight": (1024, 4096),
            f"blk.{i}.attn_k.weight": (1024, 4096),
            f"blk.{i}.attn_output.weight": (4096, 4096),
            f"blk.{i}.ffn_down_exps.weight": (8, 4096, 14336),
            f"blk.{i}.ffn_gate_exps.weight": (8, 14336, 4096),
            f"blk.{i}.ffn_gate_inp.weight": (8, 4096),
            f"blk.{i}.attn_norm.weight": (4096,),
        }
    types = tensor_types(shapes, "q4_k_m", n_expert=8, n_layer=16)
    assert types["output.weight"] == T.Q6_K and types["token_embd.weight"] == T.Q4_K
    assert types["blk.3.attn_v.weight"] == types["blk.3.attn_k.weight"] == T.Q8_0
    assert types["blk.3.attn_output.weight"] == T.Q5_K
    assert types["blk.3.ffn_gate_exps.weight"] == T.Q4_K
    assert types["blk.3.ffn_gate_inp.weight"] == types["blk.3.attn_norm.weight"] == T.F32
    # use_more_bits: layers 0-1, 14-15 and every third from 4
    more = [i for i in range(16) if types[f"blk.{i}.ffn_down_exps.weight"] == T.Q6_K]
    assert more == [0, 1, 4, 7, 10, 13, 14, 15]
    dense = tensor_types(
        {f"blk.{i}.attn_v.weight": (64, 64) for i in range(16)}, "q4_k_m", n_expert=0, n_layer=16
    )
    assert dense["blk.0.attn_v.weight"] == T.Q8_0  # Q6_K's fallback for 64-wide rows
    assert dense["blk.2.attn_v.weight"] == T.Q5_0  # Q4_K's fallback
