"""Training through a frozen base held as stored: every module that runs the CPU kernels
(`QuantLinear`, `JoinedQuantLinear`, `NumbaExperts`, in each weight format) and the disk
modules give an input that needs a gradient dX = dY W from the same stored weights, equal to
a float64 reference over the dequantised weights within float32's rounding; inference, without
autograd, runs as before."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from cpu_kernels.quant_matrix import quantize_matrix
from hetero.models.experts import TorchExperts
from hetero.runtime.cpu_experts import NumbaExperts
from hetero.runtime.disk import DiskLinear, StoredMatrix
from hetero.runtime.quantized import JoinedQuantLinear, QuantLinear

# Q8_0 and the K-quants; BF16, F16 and F32 are the panel formats
FORMATS = [T.Q8_0, T.Q4_K, T.Q6_K, T.BF16, T.F16, T.F32]
WIDTH = 256  # whole K-quant super-blocks
EPS32 = float(np.finfo(np.float32).eps)
SEED = 0


def quant_linear(ggml_type: T, rows: int = 33) -> QuantLinear:
    values = np.random.default_rng(SEED).standard_normal((rows, WIDTH), dtype=np.float32)
    return QuantLinear(quantize_matrix(values, ggml_type), None)


def assert_within_float32_rounding(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor):
    """|got - want| <= 2 * terms * eps32 * sum |products|: float32 accumulation's worst case
    over dot products of `terms` products (`scale`: [..., terms] of |products|); the factor 2
    covers the float32 rounding of the products themselves."""
    bound = 2 * scale.shape[-1] * EPS32 * scale.sum(-1)
    assert (got.double() - want).abs().le(bound).all()


def reference_grad(grad_out: torch.Tensor, weight: torch.Tensor):
    """grad_out [n, out] @ W [out, in] in float64, and its error scale |grad_out| |W| per term."""
    g, w = grad_out.double(), weight.double()
    want = g @ w
    scale = g.abs()[:, None, :] * w.abs().T[None, :, :]  # [n, in, out]
    return want, scale


@pytest.mark.parametrize("tokens", [1, 3, 40])  # the GEMV, and the prefill tiles
@pytest.mark.parametrize("ggml_type", FORMATS, ids=[t.name for t in FORMATS])
def test_quant_linear_backward_is_dy_times_the_stored_weight(ggml_type, tokens):
    linear = quant_linear(ggml_type)
    weight = torch.from_numpy(linear.qweight.dequantize())
    torch.manual_seed(SEED)
    x = torch.randn(tokens, WIDTH, requires_grad=True)
    grad_out = torch.randn(tokens, linear.out_features)
    y = linear(x)
    y.backward(grad_out)
    want, scale = reference_grad(grad_out, weight)
    assert_within_float32_rounding(x.grad, want, scale)
    want_y, scale_y = reference_grad(x.detach(), weight.T)
    assert_within_float32_rounding(y.detach(), want_y, scale_y)


def test_joined_linears_pass_each_part_its_gradient():
    parts = [quant_linear(T.Q8_0), quant_linear(T.Q8_0, rows=64)]
    pair = JoinedQuantLinear(parts)
    weights = [torch.from_numpy(p.qweight.dequantize()) for p in parts]
    x = torch.randn(5, WIDTH, requires_grad=True)
    a, b = pair(x)
    ga, gb = torch.randn_like(a), torch.randn_like(b)
    torch.autograd.backward([a, b], [ga, gb])
    want_a, scale_a = reference_grad(ga, weights[0])
    want_b, scale_b = reference_grad(gb, weights[1])
    assert_within_float32_rounding(x.grad, want_a + want_b, torch.cat([scale_a, scale_b], -1))


def test_disk_linear_backward_reads_the_file_tiles():
    weight = torch.randn(48, WIDTH)
    linear = DiskLinear(StoredMatrix.from_tensor(weight), torch.randn(48))
    x = torch.randn(4, WIDTH, requires_grad=True)
    grad_out = torch.randn(4, 48)
    linear(x).backward(grad_out)
    want, scale = reference_grad(grad_out, weight)
    assert_within_float32_rounding(x.grad, want, scale)


@pytest.mark.parametrize("ggml_type", FORMATS, ids=[t.name for t in FORMATS])
def test_numba_experts_backward_matches_float64_experts(ggml_type):
    torch.manual_seed(SEED)
    experts = NumbaExperts.from_torch(TorchExperts(4, WIDTH, WIDTH), ggml_type)
    # the reference: the same dequantised experts in float64 torch
    reference = TorchExperts(4, WIDTH, WIDTH).double()
    for e, mlp in enumerate(reference):
        gate_up = torch.from_numpy(experts.gate_up.dequantize(e)).double()
        mlp.gate_proj.weight.data, mlp.up_proj.weight.data = gate_up.chunk(2)
        mlp.down_proj.weight.data = torch.from_numpy(experts.down.dequantize(e)).double()
    ids = torch.tensor([[0, 3], [3, 1], [0, 1]])  # expert 2 gets no token
    x = torch.randn(3, WIDTH, requires_grad=True)
    routing = torch.rand(3, 2, requires_grad=True)
    grad_out = torch.randn(3, WIDTH)
    experts.submit(x, ids, routing).wait().backward(grad_out)
    x64 = x.detach().double().requires_grad_()
    routing64 = routing.detach().double().requires_grad_()
    reference(x64, ids, routing64).backward(grad_out.double())
    # two float32 GEMMs and a SwiGLU between: relative to the gradient's size
    for got, want in ((x.grad, x64.grad), (routing.grad, routing64.grad)):
        error = (got.double() - want).norm() / want.norm()
        assert error < 1e-5, f"{ggml_type.name}: relative error {error:.2e}"


KINDS = ["QuantLinear", "JoinedQuantLinear", "NumbaExperts.submit", "NumbaExperts"]


def calls(ggml_type: T) -> dict:
    """Each module kind, called on x [2, WIDTH] (and the experts' routing weights [2, 2])."""
    linear = quant_linear(ggml_type)
    pair = JoinedQuantLinear([quant_linear(ggml_type), quant_linear(ggml_type, rows=64)])
    torch.manual_seed(SEED)
    experts = NumbaExperts.from_torch(TorchExperts(4, WIDTH, WIDTH), ggml_type)
    ids = torch.tensor([[0, 3], [0, 3]])
    return {
        "QuantLinear": lambda x, w: linear(x),
        "JoinedQuantLinear": lambda x, w: pair(x)[0],
        "NumbaExperts.submit": lambda x, w: experts.submit(x, ids, w).wait(),
        "NumbaExperts": lambda x, w: experts(x, ids, w),
    }


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_modules_run_inputs_without_autograd_as_before(kind):
    call = calls(T.Q8_0)[kind]
    x, weights = torch.randn(2, WIDTH), torch.rand(2, 2)
    want = call(x, weights)  # autograd on, but nothing needs a gradient
    assert not want.requires_grad
    with torch.no_grad():  # an input that requires a gradient, with autograd off
        assert torch.equal(call(x.clone().requires_grad_(), weights), want)
    with torch.inference_mode():
        assert torch.equal(call(x, weights), want)
