"""Synthetic keys for testing and benching sparse attention's page selection: a low-rank,
slowly drifting process with a few large outlier channels (the structure real keys show: a
handful of massive channels, most variance in a few directions that move with position), and
one planted needle key that the query retrieves."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NeedleCase:
    keys: torch.Tensor  # [length, kv_heads, d] float32
    query: torch.Tensor  # [kv_heads, groups, d] float32
    needle: int  # the needle's position


def needle_case(
    length: int,
    depth: float,
    seed: int,
    kv_heads: int = 2,
    groups: int = 4,
    d: int = 128,
    rank: int = 8,
    outliers: int = 4,
    margin: float = 4.0,
) -> NeedleCase:
    """Keys k_t = A z_t + 0.3 noise + outlier offsets, z_t an AR(1) process (correlation 0.995
    per token: drifting over a few hundred tokens); the needle at round(depth * (length - 1))
    gets a direction u the query shares, sized so its score beats the largest other score of
    the retrieving head by `margin` standard deviations of the scores. Only one head of each
    group retrieves (the others are noise), which checks that the group's bound is not
    averaged away."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(kv_heads, d, rank, generator=g)
    rho = 0.995
    steps = torch.randn(length, kv_heads, rank, generator=g) * (1 - rho**2) ** 0.5
    z = ar1(steps, rho, torch.randn(kv_heads, rank, generator=g))
    keys = torch.einsum("hdr,thr->thd", basis, z) + 0.3 * torch.randn(
        length, kv_heads, d, generator=g
    )
    channels = torch.randperm(d, generator=g)[:outliers]
    keys[:, :, channels] += 12.0 * torch.randn(kv_heads, outliers, generator=g).sign()
    query = torch.randn(kv_heads, groups, d, generator=g)
    u = torch.randn(kv_heads, d, generator=g)
    u -= (
        (u * query[:, 0]).sum(-1, keepdim=True) / query[:, 0].square().sum(-1, True) * query[:, 0]
    )  # orthogonal to the retrieving query's own part, so only the needle carries u
    u /= u.norm(dim=-1, keepdim=True)
    query[:, 0] += u * query[:, 0].norm(dim=-1, keepdim=True)
    needle = round(depth * (length - 1))
    scores = torch.einsum("thd,hd->ht", keys, query[:, 0])  # [kv_heads, length]
    excess = scores.max(-1).values - scores[:, needle] + margin * scores.std(-1)
    keys[needle] += u * (excess / (u * query[:, 0]).sum(-1))[:, None]
    return NeedleCase(keys, query, needle)


def ar1(steps: torch.Tensor, rho: float, start: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """z_t = rho z_{t-1} + steps[t] from z_{-1} = start, along dim 0, without a Python loop per
    token: within a chunk z_t = rho^t (rho z_{-1} + sum_{j <= t} rho^-j steps[j]) in float64
    (rho^-1024 stays far from overflow)."""
    out = torch.empty_like(steps)
    state = start.double()
    for first in range(0, steps.shape[0], chunk):
        part = steps[first : first + chunk].double()
        powers = (rho ** torch.arange(part.shape[0], dtype=torch.float64)).view(
            -1, *([1] * (part.dim() - 1))
        )
        z = powers * (rho * state + torch.cumsum(part / powers, dim=0))
        out[first : first + chunk] = z.to(out.dtype)
        state = z[-1]
    return out
