"""Block sizes of the Triton kernels as data: per kernel, the shape key its launcher classifies
by and, per class, the tile sizes, warps and pipeline stages (first class whose bound holds).
Starting points from vLLM's and the Triton tutorials' configs for Hopper-class GPUs; a tuning
run edits this table, never the launchers."""

from __future__ import annotations

import math

# kernel -> (shape key, [(largest key value of the class, settings)]); math.inf closes a list
TUNING: dict[str, tuple[str, list[tuple[float, dict[str, int]]]]] = {
    "flash_attention": (
        "head_dim",  # max(d, dv) padded to a power of two: the tiles' registers grow with it
        [
            (64, dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)),
            (128, dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)),
            (math.inf, dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2)),
        ],
    ),
    "paged_decode": (
        "head_dim",  # key width (rank for MLA): the K/V tile is [BLOCK_N, head_dim]
        [
            (128, dict(BLOCK_N=64, MAX_HEADS=16, num_warps=4, num_stages=2)),
            (math.inf, dict(BLOCK_N=32, MAX_HEADS=16, num_warps=8, num_stages=2)),
        ],
    ),
    # Split-K: enough programs to fill the GPU (an H100/H200 has 132 SMs), but no split shorter
    # than MIN_SPLIT_TOKENS, whose partial results would cost more to reduce than to compute.
    "paged_decode_split": (
        "programs",  # sequences x kv heads x head blocks before splitting
        [(math.inf, dict(TARGET_PROGRAMS=4 * 132, MIN_SPLIT_TOKENS=256, MAX_SPLITS=64))],
    ),
    "fused_moe": (
        "pairs",  # token->expert pairs in the batch: decode is a few, prefill thousands
        [
            (64, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)),
            (4096, dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)),
            (math.inf, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)),
        ],
    ),
    "rmsnorm": (
        "hidden",
        [
            (1024, dict(num_warps=4)),
            (8192, dict(num_warps=8)),
            (math.inf, dict(num_warps=16)),
        ],
    ),
    "rope": (
        "heads",
        [(math.inf, dict(BLOCK_H=4, num_warps=4))],
    ),
}


def block_sizes(kernel: str, key_value: float) -> dict[str, int]:
    """The settings of `kernel` for a shape whose key (TUNING[kernel][0]) is `key_value`."""
    _, classes = TUNING[kernel]
    for bound, settings in classes:
        if key_value <= bound:
            return dict(settings)
    raise KeyError(f"no {kernel} block sizes for {key_value}: close TUNING's list with math.inf")
