"""NumbaExperts against TorchExperts holding the same (dequantised Q8_0) weights.

Budget: weights are identical on both sides; the decode path quantises activations to int8 per
32-block twice (input and the SiLU*up product), whose rounding errors (at most 1/254 of each
block's largest value) stay below 2e-2 of the output in Frobenius norm (one heavy-tailed block
can make a single element worse); the prefill path is float32 throughout, 1e-4."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from cpu_kernels.gguf_quantize import quantize
from cpu_kernels.q8_0_gemv import available_kernel_paths
from hetero.runtime.cpu_experts import DECODE_MAX_TOKENS, NumbaExperts, dequantize_expert
from hetero.runtime.experts import TorchExperts

EXPERTS, HIDDEN, SIZE, TOP_K = 6, 96, 64, 2


def experts_pair(path: str | None = None) -> tuple[NumbaExperts, TorchExperts]:
    reference = TorchExperts(EXPERTS, HIDDEN, SIZE)
    numba_experts = NumbaExperts.from_torch(reference, path)
    with torch.no_grad():
        for e, mlp in enumerate(reference):
            gate, up = dequantize_expert(numba_experts.gate_up, e).split(SIZE)
            mlp.gate_proj.weight.copy_(gate)
            mlp.up_proj.weight.copy_(up)
            mlp.down_proj.weight.copy_(dequantize_expert(numba_experts.down, e))
    return numba_experts, reference


def routing(tokens: int, experts_used: int) -> tuple[torch.Tensor, torch.Tensor]:
    # experts >= experts_used get no tokens
    ids = torch.stack([torch.randperm(experts_used)[:TOP_K] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, TOP_K), dim=-1)
    return ids, weights


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(torch.linalg.norm(got - want) / torch.linalg.norm(want))


@pytest.mark.parametrize("path", available_kernel_paths())
@pytest.mark.parametrize("tokens", [1, 3, DECODE_MAX_TOKENS])
def test_numba_experts_decode_matches_torch_experts(path, tokens):
    numba_experts, reference = experts_pair(path)
    x = torch.randn(tokens, HIDDEN)
    ids, weights = routing(tokens, EXPERTS - 2)
    with torch.no_grad():
        want = reference(x, ids, weights)
    got = numba_experts(x, ids, weights)
    assert got.shape == want.shape and got.dtype == x.dtype
    assert relative_error(got, want) < 2e-2


def test_numba_experts_prefill_matches_torch_experts():
    numba_experts, reference = experts_pair()
    x = torch.randn(DECODE_MAX_TOKENS + 5, HIDDEN)
    ids, weights = routing(x.shape[0], EXPERTS - 1)
    with torch.no_grad():
        want = reference(x, ids, weights)
    assert relative_error(numba_experts(x, ids, weights), want) < 1e-4


def test_numba_experts_from_gguf_blocks_rejects_mismatched_down():
    blocks = np.zeros((2, 64, 3 * 34), np.uint8)
    with pytest.raises(ValueError, match="do not fit"):
        NumbaExperts.from_gguf_blocks(blocks, blocks, np.zeros((2, 96, 34), np.uint8))


class RawCheckpoint:
    """Stands in for a GGUF checkpoint: `raw_tensor(name)` -> (blocks, GGML type)."""

    def __init__(self, tensors: dict[str, np.ndarray], ggml_type: T):
        self.tensors, self.ggml_type = tensors, ggml_type

    def raw_tensor(self, name: str) -> tuple[np.ndarray, T]:
        return self.tensors[name], self.ggml_type


def raw_experts(experts: TorchExperts, prefix: str) -> dict[str, np.ndarray]:
    return {
        f"{prefix}.{e}.{name}.weight": quantize(getattr(mlp, name).weight.detach().numpy(), T.Q8_0)
        for e, mlp in enumerate(experts)
        for name in ("gate_proj", "up_proj", "down_proj")
    }


def test_numba_experts_from_checkpoint_reads_q8_0_blocks_as_stored():
    reference = TorchExperts(EXPERTS, HIDDEN, SIZE)
    prefix = "model.layers.0.mlp.experts"
    checkpoint = RawCheckpoint(raw_experts(reference, prefix), T.Q8_0)
    loaded = NumbaExperts.from_checkpoint(checkpoint, prefix, EXPERTS)
    quantised = NumbaExperts.from_torch(reference)
    np.testing.assert_array_equal(loaded.gate_up.values, quantised.gate_up.values)
    np.testing.assert_array_equal(loaded.down.scales, quantised.down.scales)


def test_numba_experts_from_checkpoint_refuses_other_types():
    reference = TorchExperts(1, HIDDEN, SIZE)
    checkpoint = RawCheckpoint(raw_experts(reference, "e"), T.Q4_K)
    with pytest.raises(ValueError, match="runs Q8_0"):
        NumbaExperts.from_checkpoint(checkpoint, "e", 1)
