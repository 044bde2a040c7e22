"""Checkpoint loading: lazy memory-mapped reads, bounded peak RSS, shards, and clear errors for
missing, truncated or unsupported checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import hetero
from hetero.demo_tokenizer import write_demo_tokenizer
from hetero.loading.safetensors_checkpoint import SafetensorsCheckpoint

MIB = 1024 * 1024


def write_wide_llama(directory, vocab_size: int = 32768, hidden: int = 1024) -> int:
    """A one-layer Llama whose embeddings and head dominate: about 256 MiB of float32."""
    write_demo_tokenizer(directory)
    cfg = {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 256,
        "num_hidden_layers": 1,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "max_position_embeddings": 128,
        "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    tensors = {
        "model.embed_tokens.weight": w(vocab_size, hidden),
        "lm_head.weight": w(vocab_size, hidden),
        "model.norm.weight": torch.ones(hidden),
        "model.layers.0.input_layernorm.weight": torch.ones(hidden),
        "model.layers.0.post_attention_layernorm.weight": torch.ones(hidden),
        "model.layers.0.mlp.gate_proj.weight": w(256, hidden),
        "model.layers.0.mlp.up_proj.weight": w(256, hidden),
        "model.layers.0.mlp.down_proj.weight": w(hidden, 256),
    }
    for proj in ("q", "k", "v", "o"):
        tensors[f"model.layers.0.self_attn.{proj}_proj.weight"] = w(hidden, hidden)
    save_file(tensors, str(directory / "model.safetensors"))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def run_probe(code: str) -> dict:
    """Run `code` in a fresh interpreter (clean RSS accounting); it prints one JSON line."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


RSS_PROBE = """
    import json, psutil, torch, hetero
    def rss(): return psutil.Process().memory_info().rss
    def peak():  # VmHWM: this process's peak RSS (ru_maxrss would include the parent's)
        status = open("/proc/self/status").read()
        return int(status.split("VmHWM:")[1].split()[0]) * 1024
    torch.ones(1) @ torch.ones(1)
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
    before = rss()
    model = hetero.load({path!r}, dtype={dtype!r}, progress=False)
    after_load, load_peak = rss(), peak()
    model.logits([1, 2, 3])
    print(json.dumps(dict(before=before, after_load=after_load, load_peak=load_peak,
                          after_forward=rss())))
"""


def test_opening_a_model_reads_weights_lazily(tmp_path):
    file_bytes = write_wide_llama(tmp_path)
    r = run_probe(RSS_PROBE.format(path=str(tmp_path), dtype="float32"))
    # same dtype as the file: zero-copy views, nothing read until touched
    assert r["after_load"] - r["before"] < 0.1 * file_bytes
    # a forward touches the head (half the bytes): now they are resident
    assert r["after_forward"] - r["before"] > 0.3 * file_bytes


def test_converting_load_keeps_peak_rss_near_materialised_size(tmp_path):
    file_bytes = write_wide_llama(tmp_path)
    r = run_probe(RSS_PROBE.format(path=str(tmp_path), dtype="bfloat16"))
    materialised = file_bytes // 2
    assert r["after_load"] - r["before"] > 0.8 * materialised
    # source pages are released slice by slice: the peak is the result plus a slice, not
    # the result plus the whole float32 file
    assert r["load_peak"] - r["before"] < materialised + 96 * MIB


def test_tensor_view_is_zero_copy_and_correct(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    save_file({"a": t, "b": t.to(torch.bfloat16)}, str(tmp_path / "x.safetensors"))
    ckpt = SafetensorsCheckpoint(tmp_path)
    assert torch.equal(ckpt.tensor("a"), t)
    assert ckpt.tensor("b").dtype == torch.bfloat16
    assert torch.equal(ckpt.tensor("b").float(), t)


def test_missing_directory_raises_model_format_error(tmp_path):
    with pytest.raises(hetero.ModelFormatError, match="does not exist"):
        hetero.load(tmp_path / "nope")


def test_directory_without_weights_raises_model_format_error(checkpoint_factory):
    path, _ = checkpoint_factory("qwen3")
    (path / "model.safetensors").unlink()
    with pytest.raises(hetero.ModelFormatError, match="safetensors"):
        hetero.load(path, progress=False)


def test_incomplete_config_raises_model_format_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(hetero.ModelFormatError, match="num_attention_heads"):
        hetero.load(tmp_path)


def test_truncated_safetensors_raises_model_format_error(checkpoint_factory):
    path, _ = checkpoint_factory("qwen3")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(hetero.ModelFormatError, match="truncated"):
        hetero.load(path, progress=False)


def test_missing_shard_raises_model_format_error(checkpoint_factory):
    path, _ = checkpoint_factory("qwen3_moe", shards=True)
    next(path.glob("model-0000*.safetensors")).unlink()
    with pytest.raises(hetero.ModelFormatError, match="missing shard"):
        hetero.load(path, progress=False)


def test_unsupported_model_type_raises_unsupported_model_error(checkpoint_factory):
    path, _ = checkpoint_factory("qwen3")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hetero.UnsupportedModelError, match="mamba"):
        hetero.load(path, progress=False)


def test_config_that_disagrees_with_weights_raises(checkpoint_factory):
    path, _ = checkpoint_factory("qwen3")
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hetero.ModelFormatError, match="lacks"):
        hetero.load(path, progress=False)


def quantize_fp8_blocks(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference block quantisation: one scale per block so its max maps to 448 (e4m3 max)."""
    rows, cols = w.shape
    nr, nc = -(-rows // block), -(-cols // block)
    scale = torch.empty(nr, nc)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(nr):
        for j in range(nc):
            tile = w[i * block : (i + 1) * block, j * block : (j + 1) * block]
            scale[i, j] = tile.abs().max().clamp(min=1e-12) / 448.0
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (tile / scale[i, j]).to(
                torch.float8_e4m3fn
            )
    return q, scale


def test_fp8_block_scaled_weights_are_dequantised(checkpoint_factory):
    from safetensors.torch import load_file

    path, hf_model = checkpoint_factory("qwen3")
    block = 32
    tensors = load_file(str(path / "model.safetensors"))
    quantised = {}
    for name in list(tensors):
        if name.endswith("_proj.weight"):
            q, scale = quantize_fp8_blocks(tensors[name], block)
            tensors[name], quantised[name] = q, (q, scale)
            tensors[name + "_scale_inv"] = scale
    save_file(tensors, str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [block, block]}
    (path / "config.json").write_text(json.dumps(cfg))

    model = hetero.load(path, dtype="float32", progress=False)
    q, scale = quantised["model.layers.1.mlp.down_proj.weight"]
    rows = torch.arange(q.shape[0])[:, None] // block
    cols = torch.arange(q.shape[1])[None, :] // block
    expected = q.float() * scale[rows, cols]
    assert torch.equal(model.net.layers[1].mlp.down_proj.weight, expected)
    ids = list(range(3, 40))
    with torch.no_grad():
        reference = hf_model(torch.tensor([ids])).logits[0]
    error = (model.logits(ids) - reference).abs().max() / reference.abs().max()
    assert error < 0.1  # e4m3 keeps 3 mantissa bits


def test_other_quantised_safetensors_are_refused(checkpoint_factory):
    path, _ = checkpoint_factory("qwen3")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hetero.UnsupportedModelError, match="gptq"):
        hetero.load(path, progress=False)


def test_deepseek_v3_bias_stays_float32_in_bfloat16_models(checkpoint_factory):
    path, hf_model = checkpoint_factory("deepseek_v3")
    model = hetero.load(path, dtype="bfloat16", progress=False)
    bias = model.net.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32
    assert torch.equal(bias, hf_model.model.layers[1].mlp.gate.e_score_correction_bias)
