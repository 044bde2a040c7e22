"""RoPE (Triton) against hetero's torch rotary embedding (hetero/models/rope.py), whose cos/sin
the cache reproduces: half-split, interleaved (the models' output re-interleaved), partial
rotary, YaRN frequencies and mscale; in place and out of place.

Budget (u = 2^-24): the reference rotates in float32 from the same float32 cos/sin, the kernel
too, each output one product, one fused or rounded product and a sum: at most 3 u |x1 c| + |x2 s|
apart, plus the output's rounding to its dtype; doubled for fused multiply-adds either side."""

import pytest
import torch
from gpu_kernel_device import (
    DEVICE,
    DTYPES,
    randn,
    require_triton,
    rounding_error,
    seeded_generator,
)

require_triton()

from gpu_kernels.launch_checks import KernelInputError  # noqa: E402
from gpu_kernels.rope import build_cos_sin_cache, rope  # noqa: E402
from hetero.config import RopeConfig  # noqa: E402
from hetero.models.rope import RotaryEmbedding  # noqa: E402

F32 = 2.0**-24
MAX_POSITIONS = 300
SCHEDULES = {
    "default": RopeConfig(theta=10000.0),
    "yarn": RopeConfig(
        theta=10000.0,
        type="yarn",
        factor=4.0,
        original_max_position_embeddings=64,
        mscale=0.707,
        mscale_all_dim=0.5,
    ),
}


def model_rotation(x, positions, rot_dim, schedule, interleaved):
    """hetero's RotaryEmbedding over the first rot_dim values, in float32; interleaved output
    put back in pair order (the model de-interleaves to halves)."""
    embedding = RotaryEmbedding(rot_dim, SCHEDULES[schedule], interleaved=interleaved)
    cos, sin = embedding.cos_sin(positions.cpu(), torch.float32)
    head = x.float().cpu()[..., :rot_dim]
    rotated = embedding.apply(head, cos, sin)
    if interleaved:
        t, h, _ = rotated.shape
        rotated = rotated.view(t, h, 2, rot_dim // 2).transpose(-1, -2).reshape(t, h, rot_dim)
    if interleaved:  # each value's partner: its pair's other value
        partner = head.unflatten(-1, (rot_dim // 2, 2)).flip(-1).flatten(-2)
    else:  # the value half a rotation away
        partner = head.roll(rot_dim // 2, -1)
    bound = 6 * F32 * (head.abs() + partner.abs()) * embedding.attention_scaling
    return torch.cat([rotated, x.float().cpu()[..., rot_dim:]], -1), bound, embedding


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
@pytest.mark.parametrize("tokens,heads,kv_heads,d,rot_dim", [(1, 2, 1, 16, 16), (5, 3, 2, 24, 8)])
@pytest.mark.parametrize("inplace", [False, True], ids=["new", "inplace"])
def test_rope_matches_the_models_rotation(
    request, dtype, schedule, interleaved, tokens, heads, kv_heads, d, rot_dim, inplace
):
    gen = seeded_generator(request)
    q, k = randn((tokens, heads, d), dtype, gen), randn((tokens, kv_heads, d), dtype, gen)
    positions = torch.randint(0, MAX_POSITIONS, (tokens,), generator=gen).to(DEVICE)
    q_ref, q_bound, embedding = model_rotation(q, positions, rot_dim, schedule, interleaved)
    k_ref, k_bound, _ = model_rotation(k, positions, rot_dim, schedule, interleaved)
    cache = build_cos_sin_cache(embedding.inv_freq, MAX_POSITIONS, embedding.attention_scaling)
    q_out, k_out = rope(q, k, positions, cache.to(DEVICE), interleaved, inplace)
    assert (q_out is q) == inplace and (k_out is k) == inplace
    for got, want, bound in ((q_out, q_ref, q_bound), (k_out, k_ref, k_bound)):
        bound = torch.cat([bound, torch.zeros_like(want[..., rot_dim:])], -1)
        bound = 2 * (bound + rounding_error(dtype, want))
        assert ((got.float().cpu() - want).abs() <= bound).all()


def test_rope_rotates_q_alone():
    q = torch.ones((2, 1, 4), device=DEVICE)
    cache = build_cos_sin_cache(torch.tensor([1.0, 0.5]), 8).to(DEVICE)
    q_out, k_out = rope(q, None, torch.tensor([0, 3], device=DEVICE), cache)
    assert k_out is None and torch.equal(q_out[0], q[0])  # position 0 turns nothing


def test_rope_rejects_a_cache_wider_than_the_heads():
    cache = build_cos_sin_cache(torch.ones(8), 4)
    with pytest.raises(KernelInputError, match="rotates 16 values, heads have only 8"):
        rope(torch.zeros(1, 1, 8), None, torch.zeros(1, dtype=torch.int32), cache)
