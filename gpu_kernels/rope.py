"""Rotary position embeddings on the GPU: q and k rotated from a cos/sin cache indexed by
position, in place or into new tensors. Half-split layout (GPT-NeoX/Llama: value j pairs with
j + rot/2) or interleaved (GPT-J, DeepSeek MLA: values 2j and 2j+1 pair, and stay in their
places); partial rotary: only the first rot_dim values of each head turn. YaRN and the other
schedules are only different caches: `build_cos_sin_cache` from their inverse frequencies and
cos/sin scaling (YaRN's mscale)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_kernels.launch_checks import (
    next_power_of_2,
    require,
    require_float_rows,
    require_int,
    require_same_device,
    require_shape,
)
from gpu_kernels.tuning import block_sizes


def build_cos_sin_cache(
    inv_freq: torch.Tensor, max_positions: int, scaling: float = 1.0
) -> torch.Tensor:
    """inv_freq: [rot_dim / 2] -> float32 [max_positions, rot_dim]: cos then sin of position *
    inv_freq, times `scaling`. Angles in float32, as the torch models compute them."""
    positions = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    angles = positions[:, None] * inv_freq.to(torch.float32)[None, :]
    return torch.cat([angles.cos() * scaling, angles.sin() * scaling], dim=-1)


@triton.jit
def _rope_kernel(
    x, out, positions, cos_sin, heads,
    stride_xt, stride_xh, stride_ot, stride_oh, stride_c,
    HALF: tl.constexpr, D: tl.constexpr, INTERLEAVED: tl.constexpr, COPY_REST: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr,
):  # fmt: skip
    # one program: BLOCK_H heads of one token
    token = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    pair_ok = (h[:, None] < heads) & (j[None, :] < HALF)
    row = cos_sin + tl.load(positions + token).to(tl.int64) * stride_c
    cos = tl.load(row + j, mask=j < HALF, other=0.0)[None, :]
    sin = tl.load(row + HALF + j, mask=j < HALF, other=0.0)[None, :]
    if INTERLEAVED:
        first, second = 2 * j, 2 * j + 1
    else:
        first, second = j, j + HALF
    x_heads = x + token * stride_xt + h[:, None] * stride_xh
    o_heads = out + token * stride_ot + h[:, None] * stride_oh
    x1 = tl.load(x_heads + first[None, :], mask=pair_ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_heads + second[None, :], mask=pair_ok, other=0.0).to(tl.float32)
    dtype = out.dtype.element_ty
    tl.store(o_heads + first[None, :], (x1 * cos - x2 * sin).to(dtype), mask=pair_ok)
    tl.store(o_heads + second[None, :], (x2 * cos + x1 * sin).to(dtype), mask=pair_ok)
    if COPY_REST:  # out of place with partial rotary: the values past rot_dim pass through
        rest = 2 * HALF + tl.arange(0, BLOCK_REST)
        rest_ok = (h[:, None] < heads) & (rest[None, :] < D)
        tl.store(
            o_heads + rest[None, :], tl.load(x_heads + rest[None, :], mask=rest_ok), mask=rest_ok
        )


def _rotate(x: torch.Tensor, name: str, positions, cos_sin, interleaved, inplace) -> torch.Tensor:
    require_shape(name, x, (positions.shape[0], None, None), "[tokens, heads, d]")
    require_float_rows(name, x)
    tokens, heads, d = x.shape
    rot_dim = cos_sin.shape[1]
    require(rot_dim <= d, f"{name}: the cache rotates {rot_dim} values, heads have only {d}")
    out = x if inplace else torch.empty_like(x)
    if tokens == 0:
        return out
    config = block_sizes("rope", heads)
    grid = (tokens, triton.cdiv(heads, config["BLOCK_H"]))
    _rope_kernel[grid](
        x, out, positions, cos_sin, heads,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos_sin.stride(0),
        HALF=rot_dim // 2, D=d, INTERLEAVED=interleaved, COPY_REST=not inplace and rot_dim < d,
        BLOCK_HALF=next_power_of_2(rot_dim // 2, least=1),
        BLOCK_REST=next_power_of_2(d - rot_dim, least=1), **config,
    )  # fmt: skip
    return out


def rope(
    q: torch.Tensor,
    k: torch.Tensor | None,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    interleaved: bool = False,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate q and k (None: q only) by their tokens' positions -> (q, k) rotated, the inputs
    themselves when inplace.

    q: [tokens, heads, d]; k: [tokens, kv_heads, d]; positions: int [tokens], each below
    max_pos; cos_sin_cache: float32 [max_pos, rot_dim] from `build_cos_sin_cache`, rot_dim even
    and <= d. Interleaved output keeps the pairs in place; hetero's torch models instead
    de-interleave to halves: the q.k products are the same, but one layer must not mix them."""
    require_shape("cos_sin_cache", cos_sin_cache, (None, None), "[max_pos, rot_dim]")
    require(cos_sin_cache.dtype == torch.float32, "cos_sin_cache: expected float32")
    require(cos_sin_cache.shape[1] % 2 == 0, "cos_sin_cache: rot_dim must be even")
    require(cos_sin_cache.stride(1) == 1, "cos_sin_cache: rows must be contiguous")
    require_shape("positions", positions, (None,), "[tokens]")
    require_int("positions", positions)
    tensors = dict(q=q, positions=positions, cos_sin_cache=cos_sin_cache)
    require_same_device(**tensors, **({} if k is None else dict(k=k)))
    q_out = _rotate(q, "q", positions, cos_sin_cache, interleaved, inplace)
    k_out = None if k is None else _rotate(k, "k", positions, cos_sin_cache, interleaved, inplace)
    return q_out, k_out
