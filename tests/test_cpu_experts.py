"""NumbaExperts against TorchExperts holding the same (dequantised) weights, per format.

Budget: weights are identical on both sides; the decode path quantises activations to int8
twice (the input and the SiLU*up product), per 32-value block or per 256-value super-block
(Q4_K). The budget is measured, not guessed: the relative error of the torch experts with their
activations rounded the same way per 256 values (the coarser step), times 3 for the spread of
one draw against another; the prefill path is float32 throughout, 1e-4."""

import numpy as np
import pytest
import torch
from gemv_error_bounds import prefill_error_budget
from gguf import GGMLQuantizationType as T

from cpu_kernels.cpu_features import available_kernel_paths
from cpu_kernels.ffn_glue import silu_mul, weighted_pair_sum
from hetero.config import RopeConfig
from hetero.formats.gguf_quantize import quantize
from hetero.models.decoder import RMSNorm
from hetero.models.experts import TorchExperts, run_grouped_by_expert
from hetero.models.rope import RotaryEmbedding
from hetero.runtime import prefill_matmul
from hetero.runtime.cpu_experts import NumbaExperts
from hetero.runtime.cpu_glue import NumbaRMSNorm, NumbaRotary
from hetero.runtime.prefill_matmul import DECODE_MAX_TOKENS, PREFILL_DTYPES

# K-quants need 256-value rows: hidden and expert size both multiples of 256
EXPERTS, HIDDEN, SIZE, TOP_K = 6, 256, 256, 2
KERNEL_TYPES = [T.Q8_0, T.Q4_K, T.Q6_K]


def experts_pair(
    path: str | None = None, ggml_type: T = T.Q8_0
) -> tuple[NumbaExperts, TorchExperts]:
    reference = TorchExperts(EXPERTS, HIDDEN, SIZE)
    numba_experts = NumbaExperts.from_torch(reference, ggml_type, path)
    with torch.no_grad():
        for e, mlp in enumerate(reference):
            gate, up = torch.from_numpy(numba_experts.gate_up.dequantize(e)).split(SIZE)
            mlp.gate_proj.weight.copy_(gate)
            mlp.up_proj.weight.copy_(up)
            mlp.down_proj.weight.copy_(torch.from_numpy(numba_experts.down.dequantize(e)))
    return numba_experts, reference


def routing(tokens: int, experts_used: int) -> tuple[torch.Tensor, torch.Tensor]:
    # experts >= experts_used get no tokens
    ids = torch.stack([torch.randperm(experts_used)[:TOP_K] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, TOP_K), dim=-1)
    return ids, weights


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(torch.linalg.norm(got - want) / torch.linalg.norm(want))


def int8_rounded(a: torch.Tensor, block: int = 256) -> torch.Tensor:
    """a with each `block` values rounded to int8 steps of their largest / 127, as the
    kernels quantise activations."""
    blocks = a.reshape(a.shape[0], -1, block)
    step = blocks.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30) / 127
    return (torch.round(blocks / step) * step).reshape(a.shape)


def rounded_activation_error(reference, x, ids, weights) -> float:
    """Relative error of `reference` when its input and SiLU*up activations are rounded to
    int8 per 256 values: what the decode kernels' activation quantisation costs."""

    def run_expert(e: int, xs: torch.Tensor) -> torch.Tensor:
        mlp, xq = reference[e], int8_rounded(xs)
        hidden = torch.nn.functional.silu(mlp.gate_proj(xq)) * mlp.up_proj(xq)
        return mlp.down_proj(int8_rounded(hidden))

    with torch.no_grad():
        want = reference(x, ids, weights)
        rounded = run_grouped_by_expert(x, ids, weights, len(reference), run_expert)
    return relative_error(rounded, want)


@pytest.mark.parametrize("ggml_type", KERNEL_TYPES)
@pytest.mark.parametrize("path", available_kernel_paths())
@pytest.mark.parametrize("tokens", [1, 3, DECODE_MAX_TOKENS])
def test_numba_experts_decode_matches_torch_experts(ggml_type, path, tokens):
    numba_experts, reference = experts_pair(path, ggml_type)
    x = torch.randn(tokens, HIDDEN)
    ids, weights = routing(tokens, EXPERTS - 2)
    with torch.no_grad():
        want = reference(x, ids, weights)
    got = numba_experts(x, ids, weights)
    assert got.shape == want.shape and got.dtype == x.dtype
    budget = 3 * rounded_activation_error(reference, x, ids, weights) + 1e-4
    assert relative_error(got, want) < budget


@pytest.mark.parametrize("ggml_type", KERNEL_TYPES)
@pytest.mark.parametrize("dtype", PREFILL_DTYPES.values(), ids=PREFILL_DTYPES.keys())
def test_numba_experts_prefill_matches_torch_experts(ggml_type, dtype, monkeypatch):
    monkeypatch.setattr(prefill_matmul, "host_prefill_dtype", lambda: dtype)
    numba_experts, reference = experts_pair(ggml_type=ggml_type)
    x = torch.randn(DECODE_MAX_TOKENS + 5, HIDDEN)
    ids, weights = routing(x.shape[0], EXPERTS - 1)
    with torch.no_grad():
        want = reference(x, ids, weights)
    # gate/up, then down: two matmuls on rounded inputs
    assert relative_error(numba_experts(x, ids, weights), want) < prefill_error_budget(dtype, 2)


def test_numba_experts_from_gguf_blocks_rejects_mismatched_down():
    blocks = np.zeros((2, 64, 3 * 34), np.uint8)
    with pytest.raises(ValueError, match="do not fit"):
        NumbaExperts.from_gguf_blocks(
            (blocks, T.Q8_0), (blocks, T.Q8_0), (np.zeros((2, 96, 34), np.uint8), T.Q8_0)
        )


class RawCheckpoint:
    """Stands in for a GGUF checkpoint: `raw_tensor(name)` -> (blocks, GGML type)."""

    def __init__(self, tensors: dict[str, tuple[np.ndarray, T]]):
        self.tensors = tensors

    def raw_tensor(self, name: str) -> tuple[np.ndarray, T]:
        return self.tensors[name]


def expert_names(prefix: str, experts: int) -> list[dict[str, str]]:
    return [
        {p: f"{prefix}.{e}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
        for e in range(experts)
    ]


def raw_experts(experts: TorchExperts, prefix: str, types: dict[str, T]) -> dict:
    return {
        f"{prefix}.{e}.{name}.weight": (
            quantize(getattr(mlp, name).weight.detach().numpy(), types[name]),
            types[name],
        )
        for e, mlp in enumerate(experts)
        for name in ("gate_proj", "up_proj", "down_proj")
    }


@pytest.mark.parametrize("ggml_type", KERNEL_TYPES)
def test_numba_experts_from_checkpoint_keeps_blocks_as_stored(ggml_type):
    reference = TorchExperts(EXPERTS, HIDDEN, SIZE)
    prefix = "model.layers.0.mlp.experts"
    types = dict.fromkeys(("gate_proj", "up_proj", "down_proj"), ggml_type)
    checkpoint = RawCheckpoint(raw_experts(reference, prefix, types))
    loaded = NumbaExperts.from_checkpoint(checkpoint, expert_names(prefix, EXPERTS))
    quantised = NumbaExperts.from_torch(reference, ggml_type)
    for e in range(EXPERTS):
        np.testing.assert_array_equal(loaded.gate_up.dequantize(e), quantised.gate_up.dequantize(e))
        np.testing.assert_array_equal(loaded.down.dequantize(e), quantised.down.dequantize(e))


def test_numba_experts_requantise_types_without_a_kernel():
    # Q5_K has no kernel: it runs as Q8_0 (mixed gate/up types as gate's format)
    reference = TorchExperts(2, HIDDEN, SIZE)
    types = {"gate_proj": T.Q4_K, "up_proj": T.Q5_K, "down_proj": T.Q5_K}
    checkpoint = RawCheckpoint(raw_experts(reference, "e", types))
    loaded = NumbaExperts.from_checkpoint(checkpoint, expert_names("e", 2))
    assert type(loaded.gate_up).__name__ == "Q4KMatrix"
    assert type(loaded.down).__name__ == "Q8Matrix"
    want = reference[1].down_proj.weight.detach().numpy()
    error = np.linalg.norm(loaded.down.dequantize(1) - want) / np.linalg.norm(want)
    assert error < 0.05  # Q5_K's own error (0.036) plus Q8_0's (0.005)


def test_silu_mul_and_weighted_pair_sum_match_torch():
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(2**31)))
    tokens, top_k, size, width = 3, 4, 96, 80
    gate_up = torch.randn(tokens * top_k, 2 * size, generator=gen) * 4
    gate, up = gate_up.split(size, dim=-1)
    torch.testing.assert_close(
        torch.from_numpy(silu_mul(gate_up.numpy(), size)),
        torch.nn.functional.silu(gate) * up,
        rtol=1e-5,
        atol=1e-6,
    )
    y = torch.randn(tokens * top_k, width, generator=gen)
    weights = torch.rand(tokens, top_k, generator=gen)
    want = (y.view(tokens, top_k, width) * weights[..., None]).sum(dim=1)
    got = torch.from_numpy(weighted_pair_sum(y.numpy(), weights.numpy(), top_k))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 2048), (3, 32, 128), (5, 96)])
def test_numba_rms_norm_matches_the_torch_module(shape):
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(2**31)))
    norm = RMSNorm(shape[-1], 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=gen))
    x = torch.randn(*shape, generator=gen) * 3
    got = NumbaRMSNorm(norm)(x)
    assert got.shape == x.shape
    # float32 throughout; only the order of the sum of squares differs
    torch.testing.assert_close(got, norm(x), rtol=1e-5, atol=1e-6)
    # other dtypes go to the torch module
    half = x.to(torch.bfloat16)
    torch.testing.assert_close(NumbaRMSNorm(norm)(half), norm(half))


def test_numba_rms_norm_passes_gradients_through_the_torch_path():
    norm = RMSNorm(96, 1e-6)
    x = torch.randn(4, 96, requires_grad=True)
    y = torch.randn(4, 96)
    (NumbaRMSNorm(norm)(x) * y).sum().backward()
    got_x, got_w = x.grad.clone(), norm.weight.grad.clone()
    x.grad, norm.weight.grad = None, None
    (norm(x) * y).sum().backward()
    torch.testing.assert_close(got_x, x.grad)
    torch.testing.assert_close(got_w, norm.weight.grad)
    # a frozen weight and an input taking a gradient: the input still gets one
    norm.weight.requires_grad_(False)
    x.grad = None
    (NumbaRMSNorm(norm)(x) * y).sum().backward()
    torch.testing.assert_close(x.grad, got_x)


@pytest.mark.parametrize("rope", [RopeConfig(theta=1e6), RopeConfig(type="yarn", factor=4.0)])
def test_numba_rotary_matches_the_torch_module(rope):
    rotary = RotaryEmbedding(64, rope)
    fast = NumbaRotary(rotary)
    positions = torch.tensor([0, 1, 7, 4095, 40000])
    x = torch.randn(5, 3, 64) * 4
    cos, sin = rotary.cos_sin(positions, torch.float32)
    fast_cos, fast_sin = fast.cos_sin(positions, torch.float32)
    # float32 angles either way; sin/cos of float32 may differ in the last bit
    torch.testing.assert_close(fast_cos, cos, rtol=0, atol=2e-6 * rotary.attention_scaling)
    torch.testing.assert_close(fast_sin, sin, rtol=0, atol=2e-6 * rotary.attention_scaling)
    torch.testing.assert_close(fast.apply(x, cos, sin), rotary.apply(x, cos, sin))
    # autograd and other dtypes take the torch path
    grad_x = x.clone().requires_grad_()
    fast.apply(grad_x, cos, sin).sum().backward()
    assert grad_x.grad is not None
    half = x.to(torch.bfloat16)
    half_cos, half_sin = fast.cos_sin(positions, torch.bfloat16)
    assert half_cos.dtype == torch.bfloat16
    want = rotary.apply(half, half_cos, half_sin)
    torch.testing.assert_close(fast.apply(half, half_cos, half_sin), want)
