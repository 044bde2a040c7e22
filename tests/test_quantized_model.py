"""Quantised weights on the CPU kernels inside a model: `QuantLinear` against torch's linear on
the same dequantised weights, GGUF files whose quantised tensors run on the kernels as stored,
and float checkpoints quantised at load (`quant="q8_0" / "q4_k"`).

Budgets: the kernels see exactly the dequantised weights, so the only extra error is the int8
quantisation of activations (at most 1/254 of each 32-block's largest value per input), which
stays below 2e-2 relative to a layer's output; through a whole tiny model it stays within 5e-2
(relative RMS of the logits), far below the weight quantisation error itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_checkpoint
from gemv_error_bounds import prefill_error_budget
from gguf import GGMLQuantizationType as T

import hetero
from cpu_kernels.cpu_features import available_kernel_paths
from cpu_kernels.quant_matrix import quantize_matrix
from hetero.errors import InvalidRequestError
from hetero.loading.gguf_writer import write_gguf
from hetero.models.experts import TorchExperts
from hetero.runtime import prefill_matmul
from hetero.runtime.cpu_experts import NumbaExperts
from hetero.runtime.model import set_threads
from hetero.runtime.prefill_matmul import DECODE_MAX_TOKENS, PREFILL_DTYPES
from hetero.runtime.quantized import JoinedQuantLinear, QuantLinear

WIDE = dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=256, head_dim=64)
KERNEL_LOGIT_BUDGET = 5e-2


def relative_rms(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt())


def some_ids(vocab: int, n: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(3)).tolist()


@pytest.mark.parametrize("ggml_type", [T.Q8_0, T.Q4_K, T.Q6_K, T.BF16])
@pytest.mark.parametrize("tokens", [1, 5, DECODE_MAX_TOKENS + 3])
@pytest.mark.parametrize("dtype", PREFILL_DTYPES.values(), ids=PREFILL_DTYPES.keys())
def test_quant_linear_matches_torch_linear_on_dequantised_weights(
    ggml_type, tokens, dtype, monkeypatch
):
    monkeypatch.setattr(prefill_matmul, "host_prefill_dtype", lambda: dtype)
    rng = np.random.default_rng()
    weight = quantize_matrix(rng.standard_normal((96, 512), dtype=np.float32), ggml_type)
    bias = torch.nn.Parameter(torch.randn(96), requires_grad=False)
    layer = QuantLinear(weight, bias)
    x = torch.randn(2, tokens, 512)
    want = F.linear(x, torch.from_numpy(weight.dequantize()), bias)
    got = layer(x)
    assert got.shape == want.shape and got.dtype == x.dtype
    if tokens > DECODE_MAX_TOKENS:  # prefill: dequantised tiles in the prefill dtype
        assert relative_rms(got, want) < prefill_error_budget(dtype, 1)
    else:  # BF16 keeps float32 activations: float32 rounding only
        assert relative_rms(got, want) < (1e-5 if ggml_type == T.BF16 else 2e-2)


JOINED_FORMATS = {
    "Q8_0": [T.Q8_0] * 3,
    "Q4_K": [T.Q4_K] * 3,
    "Q6_K": [T.Q6_K] * 3,
    "BF16": [T.BF16] * 3,
    "Q4_K q/k, Q6_K v": [T.Q4_K, T.Q4_K, T.Q6_K],
    "Q6_K between Q4_K": [T.Q4_K, T.Q6_K, T.Q4_K],
}


@pytest.mark.parametrize("formats", JOINED_FORMATS.values(), ids=JOINED_FORMATS.keys())
@pytest.mark.parametrize("tokens", [1, DECODE_MAX_TOKENS + 3])
def test_joined_projections_equal_the_separate_ones(formats, tokens):
    rng = np.random.default_rng()
    parts = [
        QuantLinear(
            quantize_matrix(rng.standard_normal((rows, 256), dtype=np.float32), ggml_type),
            torch.nn.Parameter(torch.randn(rows), requires_grad=False),
        )
        for rows, ggml_type in zip((128, 32, 32), formats, strict=True)
    ]
    joined = JoinedQuantLinear(parts)
    assert len(joined.passes) == len(set(formats))
    x = torch.randn(tokens, 256)
    got = joined(x)
    assert [g.shape for g in got] == [(tokens, 128), (tokens, 32), (tokens, 32)]
    for part, out in zip(parts, got, strict=True):
        # the same kernel on the same activations: the same rows
        torch.testing.assert_close(out, part(x), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("wide_qwen3_moe")
    make_checkpoint(directory, "qwen3_moe", **WIDE)
    return directory, hetero.load(directory, dtype="float32", progress=False)


def expected_kernel_modules(source) -> tuple[int, int]:
    """Every expert block, and every dense layer except the routers (which stay float)."""
    names = dict(source.net.named_modules())
    experts = sum(isinstance(m, TorchExperts) for m in names.values())
    linears = sum(
        isinstance(m, torch.nn.Linear) and ".experts." not in n and not n.endswith(".mlp.gate")
        for n, m in names.items()
    )
    return experts, linears


def kernel_modules(model) -> tuple[int, int]:
    """(expert blocks, dense layers) on the kernels; a joined module counts its parts (not
    the passes it runs them in)."""
    modules = list(model.net.modules())
    joined = [m for m in modules if isinstance(m, JoinedQuantLinear)]
    linears = sum(isinstance(m, QuantLinear) for m in modules)
    linears += sum(len(m.sizes) - len(m.passes) for m in joined)
    return sum(isinstance(m, NumbaExperts) for m in modules), linears


@pytest.mark.parametrize("file_type", ["q8_0", "q4_k_m"])
def test_gguf_quantised_tensors_run_on_the_kernels(wide_model, tmp_path, file_type):
    _, source = wide_model
    (gguf_file,) = write_gguf(source, tmp_path / "model.gguf", file_type)
    kernels = hetero.load(gguf_file, progress=False)
    dequantised = hetero.load(gguf_file, quant="none", dtype="float32", progress=False)
    experts, linears = kernel_modules(kernels)
    assert (experts, linears) == expected_kernel_modules(source)
    assert kernel_modules(dequantised) == (0, 0)
    # q/k/v read the input once per format among them (Q4_K_M: Q4_K q/k, maybe a Q6_K v)
    attention = kernels.net.layers[0].self_attn
    assert attention.qkv_proj is not None
    formats = {type(p.qweight) for p in attention.qkv_proj.passes}
    assert len(attention.qkv_proj.passes) == len(formats)
    assert not any(isinstance(m, TorchExperts) for m in kernels.net.modules())
    assert kernels.dtype == torch.float32
    assert kernels.quant_report.modules == experts + linears
    ids = some_ids(source.config.vocab_size, 40)
    assert relative_rms(kernels.logits(ids), dequantised.logits(ids)) < KERNEL_LOGIT_BUDGET
    # decode steps (the GEMV path) agree with the dequantised model's too
    ours = kernels.generate(ids[:8], max_new_tokens=6, logprobs=0, ignore_eos=True)
    reference = dequantised.logits(ids[:8] + ours.token_ids[:-1])[7:]
    chosen = reference.log_softmax(-1).gather(1, torch.tensor(ours.token_ids)[:, None])[:, 0]
    logprobs = torch.tensor([entry.logprob for entry in ours.logprobs])
    assert torch.allclose(logprobs, chosen, atol=0.1)


@pytest.mark.parametrize("quant", ["q8_0", "q4_k"])
def test_float_checkpoint_quantised_at_load(wide_model, quant):
    directory, source = wide_model
    model = hetero.load(directory, quant=quant, progress=False)
    assert kernel_modules(model) == expected_kernel_modules(source)
    assert model.dtype == torch.float32
    head = model.net.lm_head.qweight
    assert type(head).__name__ == ("Q6KMatrix" if quant == "q4_k" else "Q8Matrix")
    ids = some_ids(source.config.vocab_size, 40)
    budget = {"q8_0": 0.05, "q4_k": 0.3}[quant]  # test_gguf_loading's budgets for the files
    assert relative_rms(model.logits(ids), source.logits(ids)) < budget


def test_bad_quant_and_threads_are_refused(wide_model):
    directory, _ = wide_model
    with pytest.raises(InvalidRequestError, match="quant must be one of"):
        hetero.load(directory, quant="q3_k", progress=False)
    with pytest.raises(InvalidRequestError, match="threads must be >= 1"):
        set_threads(0)
    with pytest.raises(InvalidRequestError, match="NUMBA_NUM_THREADS"):
        set_threads(10_000)


@pytest.mark.parametrize("native_bf16", [False, True])
def test_bf16_checkpoint_runs_on_the_bf16_kernel_with_or_without_native_bf16(
    tmp_path, monkeypatch, native_bf16
):
    import cpu_kernels.quant_matrix

    monkeypatch.setattr(cpu_kernels.quant_matrix, "native_bf16_matmul", lambda: native_bf16)
    make_checkpoint(tmp_path, "qwen3_moe", **WIDE).to(torch.bfloat16).save_pretrained(tmp_path)
    # the reference: torch in float32 on the same (bf16) weights
    source = hetero.load(tmp_path, dtype="float32", quant="none", progress=False)
    model = hetero.load(tmp_path, progress=False)
    assert kernel_modules(model) == expected_kernel_modules(source)
    assert model.dtype == torch.float32
    assert model.quant_report.types == {"BF16Matrix": model.quant_report.modules}
    ids = some_ids(source.config.vocab_size, 40)
    # the same weights in float32 math: only summation order differs
    assert relative_rms(model.logits(ids), source.logits(ids)) < 1e-4
    ours = model.generate(ids[:8], max_new_tokens=6, ignore_eos=True)
    assert ours.token_ids == source.generate(ids[:8], max_new_tokens=6, ignore_eos=True).token_ids


@pytest.mark.parametrize("kernel_path", ["avx2", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_float_checkpoint_runs_on_the_panel_kernel_where_avx2_runs(
    tmp_path, monkeypatch, kernel_path, dtype
):
    import cpu_kernels.quant_matrix

    if kernel_path not in available_kernel_paths():
        pytest.skip(f"CPU without the {kernel_path} path")
    monkeypatch.setattr(cpu_kernels.quant_matrix, "host_kernel_path", lambda: kernel_path)
    make_checkpoint(tmp_path, "qwen3_moe", **WIDE).to(dtype).save_pretrained(tmp_path)
    # the reference: torch in float32 on the same weights
    source = hetero.load(tmp_path, dtype="float32", quant="none", progress=False)
    model = hetero.load(tmp_path, progress=False)
    if kernel_path == "plain":  # the plain kernels are slower than torch: torch keeps them
        assert kernel_modules(model) == (0, 0)
        return
    assert kernel_modules(model) == expected_kernel_modules(source)
    name = "F32Matrix" if dtype == torch.float32 else "F16Matrix"
    assert model.quant_report.types == {name: model.quant_report.modules}
    # the kernel matrices count as weights: as many values, as many bytes as held
    assert model.parameter_count == source.parameter_count
    kernel_bytes = model.quant_report.kernel_bytes
    torch_bytes = sum(p.numel() * p.element_size() for p in model.net.parameters())
    assert model.weight_bytes == kernel_bytes + torch_bytes > kernel_bytes
    ids = some_ids(source.config.vocab_size, 40)
    # the same weights and math: only summation order differs
    assert relative_rms(model.logits(ids), source.logits(ids)) < 1e-5
    ours = model.generate(ids[:8], max_new_tokens=6, ignore_eos=True)
    assert ours.token_ids == source.generate(ids[:8], max_new_tokens=6, ignore_eos=True).token_ids
