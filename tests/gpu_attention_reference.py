"""Float64 attention reference for the Triton attention kernels, and the error budget of a
kernel that takes inputs in one dtype and computes in float32.

Budget, per output value (u = 2^-24 float32's unit roundoff, n the visible keys):
- a score q.k * scale sums d exact products (half inputs multiply exactly in float32) with
  d + 2 roundings: |ds| <= (d + 2) u S, S = scale * max_j |q|.|k_j|; the exp2 argument takes two
  more roundings (times log2 e, minus the running max) on |s| <= S, and exp2 itself ~2^-22:
  each unnormalised weight's relative error e_p <= (d + 6) u S + 2^-21;
- the online softmax rescales the sums once per key block (one exp2 and a product each):
  at most n * 2^-21 more;
- the weights are cast to v's dtype for the second product (u_v), the weighted sum and the
  normaliser each take n + 2 float32 roundings, and the output is rounded to its dtype (u_out):
  |out - ref| <= (2 e_p + n 2^-20 + u_v + 2 (n + 2) u) sum_j P_j |v_j| + u_out |ref|,
  doubled for second-order terms and for tensor cores that truncate instead of rounding."""

from __future__ import annotations

import torch
from gpu_kernel_device import UNIT_ROUNDOFF, rounding_error

F32 = 2.0**-24


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence: q [nq, heads, d], k [nk, kv_heads, d], v [nk, kv_heads, dv], visible: bool
    [nq, nk] -> (float64 output [nq, heads, dv], its error budget [nq, heads, dv]) for a kernel
    in q's dtype (its output) and v's (the weights' cast)."""
    group = q.shape[1] // k.shape[1]
    q64 = q.double().cpu()
    k64 = k.double().cpu().repeat_interleave(group, dim=1)
    v64 = v.double().cpu().repeat_interleave(group, dim=1)
    hidden = ~visible.cpu()[None]  # [1, nq, nk]
    scores = scale * torch.einsum("qhd,khd->hqk", q64, k64).masked_fill(hidden, float("-inf"))
    weights = scores.softmax(dim=-1)  # [heads, nq, nk]
    out = torch.einsum("hqk,khd->qhd", weights, v64)

    magnitude = scale * torch.einsum("qhd,khd->hqk", q64.abs(), k64.abs()).masked_fill(hidden, 0)
    largest = magnitude.amax(dim=-1).transpose(0, 1)  # [nq, heads]
    keys = visible.sum(dim=-1).double().cpu()[:, None]  # [nq, 1]
    weight_error = (q.shape[2] + 6) * F32 * largest + 2.0**-21
    relative = (
        2 * weight_error
        + keys * 2.0**-20
        + (0.0 if v.dtype == torch.float32 else UNIT_ROUNDOFF[v.dtype])
        + 2 * (keys + 2) * F32
    )
    spread = torch.einsum("hqk,khd->qhd", weights, v64.abs())
    bound = 2 * (relative[..., None] * spread + rounding_error(q.dtype, out))
    return out, bound


def assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor) -> None:
    error = (got.double().cpu() - want).abs()
    if not (error <= bound).all():
        worst = (error - bound).argmax()
        raise AssertionError(
            f"error {error.flatten()[worst]:.3g} over budget {bound.flatten()[worst]:.3g} at "
            f"flat index {worst} of {list(got.shape)}"
        )
