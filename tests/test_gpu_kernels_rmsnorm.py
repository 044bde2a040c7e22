"""RMSNorm and residual-add + RMSNorm (Triton) against float64, at one token, odd widths and a
width over one warp's tile.

Budget (u = 2^-24): the sum of squares takes `hidden` float32 roundings, the mean, eps, sqrt
and reciprocal 4 more, each at most u relative; the square root halves the sum's error, and the
two products with x and w add 2 u: |y - ref| <= (hidden / 2 + 8) u |ref| + u_out |ref|, doubled
for second-order terms. The new residual is the dtype's rounding of the exact sum (a float32
sum of two half values is exact), so it must equal torch's add bit for bit."""

import pytest
import torch
from gpu_kernel_device import DTYPES, randn, require_triton, rounding_error, seeded_generator

require_triton()

from gpu_kernels.launch_checks import KernelInputError  # noqa: E402
from gpu_kernels.rmsnorm import add_rmsnorm, rmsnorm  # noqa: E402

F32 = 2.0**-24
EPS = 1e-6


def reference(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    v = values.double().cpu()
    return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + EPS) * weight.double().cpu()


def assert_close_to(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    hidden = want.shape[-1]
    bound = 2 * ((hidden / 2 + 8) * F32 * want.abs() + rounding_error(dtype, want))
    assert ((got.double().cpu() - want).abs() <= bound).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 64), (3, 37), (5, 1500)])
def test_rmsnorm_matches_reference(request, dtype, tokens, hidden):
    gen = seeded_generator(request)
    x, weight = randn((tokens, hidden), dtype, gen), randn((hidden,), dtype, gen)
    got = rmsnorm(x, weight, EPS)
    assert got.dtype == dtype
    assert_close_to(got, reference(x, weight), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 64), (3, 37), (5, 1500)])
def test_add_rmsnorm_normalises_the_rounded_sum(request, dtype, tokens, hidden):
    gen = seeded_generator(request)
    x, residual = randn((tokens, hidden), dtype, gen), randn((tokens, hidden), dtype, gen)
    weight = randn((hidden,), dtype, gen)
    normed, new_residual = add_rmsnorm(x, residual, weight, EPS)
    assert torch.equal(new_residual, x + residual)
    assert_close_to(normed, reference(x + residual, weight), dtype)


def test_rmsnorm_rejects_a_weight_of_another_width():
    with pytest.raises(KernelInputError, match=r"weight: expected \[hidden\] = \[8\]"):
        rmsnorm(torch.zeros(2, 8), torch.zeros(9), EPS)
