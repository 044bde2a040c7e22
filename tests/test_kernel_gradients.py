"""The CPU kernels have no backward yet: every module that runs them (`QuantLinear`,
`JoinedQuantLinear`, `NumbaExperts`, in each weight format, panel formats included) refuses an
input that needs a gradient with `KernelGradientError`, instead of detaching it and training
nothing. Inference, without autograd or on inputs that need no gradient, runs as before."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from cpu_kernels.quant_matrix import quantize_matrix
from hetero.errors import HeteroError, KernelGradientError
from hetero.models.experts import TorchExperts
from hetero.runtime.cpu_experts import NumbaExperts
from hetero.runtime.quantized import JoinedQuantLinear, QuantLinear

# Q8_0 and the K-quants; BF16, F16 and F32 are the panel formats
FORMATS = [T.Q8_0, T.Q4_K, T.Q6_K, T.BF16, T.F16, T.F32]
WIDTH = 256  # whole K-quant super-blocks


def quant_linear(ggml_type: T, rows: int = 32) -> QuantLinear:
    values = np.random.default_rng(0).standard_normal((rows, WIDTH), dtype=np.float32)
    return QuantLinear(quantize_matrix(values, ggml_type), None)


def joined(ggml_type: T) -> JoinedQuantLinear:
    return JoinedQuantLinear([quant_linear(ggml_type), quant_linear(ggml_type, rows=64)])


def numba_experts(ggml_type: T) -> NumbaExperts:
    torch.manual_seed(0)
    return NumbaExperts.from_torch(TorchExperts(4, WIDTH, WIDTH), ggml_type)


def run_experts(experts: NumbaExperts, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    ids = torch.tensor([[0, 3]] * x.shape[0])
    return experts.submit(x, ids, weights).wait()


def calls(ggml_type: T) -> dict:
    """Each module kind, called on x [2, WIDTH] (and the experts' routing weights [2, 2])."""
    linear, pair, experts = quant_linear(ggml_type), joined(ggml_type), numba_experts(ggml_type)
    return {
        "QuantLinear": lambda x, w: linear(x),
        "JoinedQuantLinear": lambda x, w: pair(x)[0],
        "NumbaExperts.submit": lambda x, w: run_experts(experts, x, w),
        "NumbaExperts": lambda x, w: experts(x, torch.tensor([[0, 3]] * x.shape[0]), w),
    }


KINDS = ["QuantLinear", "JoinedQuantLinear", "NumbaExperts.submit", "NumbaExperts"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ggml_type", FORMATS, ids=[t.name for t in FORMATS])
def test_kernel_modules_refuse_an_input_that_needs_a_gradient(kind, ggml_type):
    call = calls(ggml_type)[kind]
    x = torch.randn(2, WIDTH, requires_grad=True)
    with pytest.raises(KernelGradientError, match='no backward yet.*quant="none"'):
        call(x, torch.rand(2, 2))
    assert issubclass(KernelGradientError, HeteroError)


@pytest.mark.parametrize("kind", ["NumbaExperts.submit", "NumbaExperts"])
def test_numba_experts_refuse_routing_weights_that_need_a_gradient(kind):
    call = calls(T.Q8_0)[kind]
    with pytest.raises(KernelGradientError, match="NumbaExperts"):
        call(torch.randn(2, WIDTH), torch.rand(2, 2, requires_grad=True))


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
