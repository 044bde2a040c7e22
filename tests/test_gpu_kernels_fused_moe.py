"""Fused MoE (Triton) against a float64 reference of dequantise-then-matmul, with float weights
and GGUF Q8_0 / Q4_K blocks as stored: one token, odd sizes, an expert no token chose.

Error budget (u = 2^-24, u_c the compute dtype's unit roundoff, x's dtype): the kernel casts
each dequantised weight to the compute dtype (u_w = u_c for GGUF blocks in half precision, else
0: float weights arrive in it, and the dequantised float32 values are exact), sums H products
in float32 ((H + 1) u of |x| |W|), rounds SiLU(g) * u to the compute dtype (u_c, plus a few u
for exp and the products), and the down GEMM adds the same terms over I; the weighted rows are
summed in float32 and rounded to x's dtype. |SiLU'| <= 1.1 carries gate errors into h. The
bound is doubled for second-order terms and tensor cores that truncate."""

import numpy as np
import pytest
import torch
from gpu_kernel_device import (
    DEVICE,
    DTYPES,
    UNIT_ROUNDOFF,
    randn,
    require_triton,
    rounding_error,
    seeded_generator,
)

require_triton()

from gguf import GGMLQuantizationType as T  # noqa: E402

from gpu_kernels.fused_moe import StoredExperts, align_by_expert, fused_moe  # noqa: E402
from gpu_kernels.launch_checks import KernelInputError  # noqa: E402
from hetero.formats.gguf_quantize import quantize  # noqa: E402
from hetero.formats.gguf_quants import dequantize  # noqa: E402

F32 = 2.0**-24
EXPERTS, TOP_K, EMPTY_EXPERT = 5, 2, 3


def route(tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k distinct experts per token, never EMPTY_EXPERT; softmax-like positive weights."""
    chosen = [e for e in range(EXPERTS) if e != EMPTY_EXPERT]
    scores = torch.rand((tokens, len(chosen)), generator=gen)
    top = scores.topk(TOP_K, dim=1)
    ids = torch.tensor(chosen)[top.indices].to(torch.int32)
    return ids.to(DEVICE), (top.values / top.values.sum(1, keepdim=True)).to(DEVICE)


def moe_reference(x, gate_up, down, ids, weights, weight_unit):
    """float64 output [tokens, hidden] and its error budget for a kernel computing in x's
    dtype, its weights rounded by `weight_unit`."""
    x64 = x.double().cpu()
    unit = UNIT_ROUNDOFF[x.dtype]
    out, bound, magnitude = (torch.zeros_like(x64) for _ in range(3))
    hidden, inter = x.shape[1], down.shape[2]
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e, w = int(ids[t, slot]), float(weights[t, slot])
            if e < 0:
                continue  # a pair computed elsewhere
            gate_w, up_w = gate_up[e, :inter], gate_up[e, inter:]
            g, u = gate_w @ x64[t], up_w @ x64[t]
            h = torch.nn.functional.silu(g) * u
            y = w * (down[e] @ h)
            out[t] += y
            magnitude[t] += y.abs()
            in_rel = weight_unit + (hidden + 1) * F32
            dg, du = in_rel * (gate_w.abs() @ x64[t].abs()), in_rel * (up_w.abs() @ x64[t].abs())
            dh = 1.1 * dg * u.abs() + torch.nn.functional.silu(g).abs() * du
            dh += (unit + 8 * F32) * h.abs()
            down_rel = weight_unit + (inter + 2) * F32
            bound[t] += w * (down[e].abs() @ (dh + down_rel * (h.abs() + dh)))
    bound += TOP_K * F32 * magnitude + rounding_error(x.dtype, out)
    return out, 2 * bound


def float_weights(shape, gen, fmt):
    """Random weights as the kernel takes them and as float64 for the reference."""
    values = torch.randn(shape, generator=gen) * shape[-1] ** -0.5
    if fmt in (torch.float32, torch.float16):
        stored = values.to(fmt)
        return stored.to(DEVICE), stored.double()
    blocks = quantize(values.numpy() + 0.01, fmt)  # an offset makes Q4_K's mins matter
    exact = torch.from_numpy(dequantize(blocks, fmt)).double()
    return StoredExperts(torch.from_numpy(blocks).to(DEVICE), fmt), exact


SIZES = {  # weight format -> (hidden, inter): GGUF rows hold whole blocks
    torch.float32: (40, 24),
    torch.float16: (72, 40),
    T.Q8_0: (96, 64),
    T.Q4_K: (256, 256),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 5, 19])
@pytest.mark.parametrize("fmt", SIZES.keys(), ids=["f32", "f16", "q8_0", "q4_k"])
def test_fused_moe_matches_dequantise_then_matmul(request, dtype, tokens, fmt):
    gen = seeded_generator(request)
    hidden, inter = SIZES[fmt]
    gate_up, gate_up64 = float_weights((EXPERTS, 2 * inter, hidden), gen, fmt)
    down, down64 = float_weights((EXPERTS, hidden, inter), gen, fmt)
    x = randn((tokens, hidden), dtype, gen)
    ids, weights = route(tokens, gen)
    got = fused_moe(x, gate_up, down, ids, weights)
    assert got.shape == x.shape and got.dtype == dtype
    # weights rounded to the compute dtype unless they arrive in it or it is float32 (which
    # holds every float16 and every dequantised value)
    exact = fmt == dtype or dtype == torch.float32
    weight_unit = 0.0 if exact else UNIT_ROUNDOFF[dtype]
    want, bound = moe_reference(x, gate_up64, down64, ids.cpu(), weights.cpu(), weight_unit)
    error = (got.double().cpu() - want).abs()
    assert (error <= bound).all(), f"worst error/budget {(error / bound).max():.3g}"


def test_fused_moe_skips_pairs_marked_minus_one(request):
    # a hybrid step's accelerator share: the CPU's pairs are -1 here, one token has none left
    gen = seeded_generator(request)
    hidden, inter = SIZES[T.Q8_0]
    gate_up, gate_up64 = float_weights((EXPERTS, 2 * inter, hidden), gen, T.Q8_0)
    down, down64 = float_weights((EXPERTS, hidden, inter), gen, T.Q8_0)
    x = randn((6, hidden), torch.float32, gen)
    ids, weights = route(6, gen)
    ids[torch.rand(ids.shape, generator=gen).to(DEVICE) < 0.4] = -1
    ids[2] = -1
    got = fused_moe(x, gate_up, down, ids, weights)
    want, bound = moe_reference(x, gate_up64, down64, ids.cpu(), weights.cpu(), 0.0)
    assert (got[2] == 0).all()
    assert ((got.double().cpu() - want).abs() <= bound).all()


def test_align_by_expert_pads_each_expert_to_whole_tiles():
    ids = torch.tensor([[2, 0], [2, 4], [0, 2]], device=DEVICE)
    sorted_ids, block_experts, padded = align_by_expert(ids, block_m=4, num_experts=5)
    pad = ids.numel()
    # pair = token * k + slot; expert 0: pairs 1, 4; expert 2: 0, 2, 5; expert 4: 3
    assert sorted_ids[:12].tolist() == [1, 4, pad, pad, 0, 2, 5, pad, 3, pad, pad, pad]
    assert (sorted_ids[12:] == pad).all()
    assert block_experts[:3].tolist() == [0, 2, 4] and (block_experts[3:] == -1).all()
    assert int(padded) == 12


def test_align_by_expert_gives_skipped_pairs_no_tile():
    ids = torch.tensor([[-1, 1], [1, -1], [-1, -1]], device=DEVICE)
    sorted_ids, block_experts, padded = align_by_expert(ids, block_m=4, num_experts=3)
    assert block_experts.tolist()[0] == 1 and (block_experts[1:] == -1).all()
    assert sorted_ids[:4].tolist() == [1, 2, 6, 6] and int(padded) == 4


def test_fused_moe_with_no_tokens_returns_an_empty_batch():
    x = torch.zeros((0, 32), device=DEVICE)
    gate_up, down = torch.zeros((2, 16, 32), device=DEVICE), torch.zeros((2, 32, 8), device=DEVICE)
    ids = torch.zeros((0, 2), dtype=torch.int32, device=DEVICE)
    assert fused_moe(x, gate_up, down, ids, ids.float()).shape == (0, 32)


def test_fused_moe_rejects_a_format_the_kernel_cannot_read():
    blocks = torch.from_numpy(quantize(np.zeros((2, 512, 256), np.float32), T.Q6_K))
    down = torch.from_numpy(quantize(np.zeros((2, 256, 256), np.float32), T.Q8_0))
    x, ids = torch.zeros((1, 256)), torch.zeros((1, 1), dtype=torch.int32)
    with pytest.raises(KernelInputError, match="reads Q8_0 and Q4_K blocks, not Q6_K"):
        fused_moe(x, StoredExperts(blocks, T.Q6_K), StoredExperts(down, T.Q8_0), ids, ids.float())
