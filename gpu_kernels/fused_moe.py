"""Fused MoE on the GPU: every expert's FFN over the tokens routed to it, as two grouped GEMMs.
The token->expert pairs are sorted by expert and each expert's run padded to a whole tile
(`align_by_expert`, vLLM's fused_moe idea), so a tile of rows belongs to one expert and
reads that expert's weights once; an expert with no pairs gets no tile at all.

GEMM 1 runs gate and up together and writes SiLU(gate) * up; GEMM 2 runs down and scales each
pair's row by its routing weight; the k rows of a token are then summed in a fixed order (no
atomics: the same inputs give the same bits). Weights are float, or GGUF Q8_0 / Q4_K blocks as
the file stores them, dequantised tile by tile inside the kernel (one file for CPU and GPU)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gpu_kernels.launch_checks import (
    FLOAT_DTYPES,
    dot_precision,
    require,
    require_float_rows,
    require_int,
    require_same_device,
    require_shape,
)
from gpu_kernels.tuning import block_sizes
from hetero.formats.gguf_quants import FORMATS
from hetero.formats.gguf_quants import T as GGMLType

# the kernel's WEIGHT_FORMAT codes
FLOAT, Q8_0, Q4_K = 0, 1, 2
KERNEL_FORMATS = {GGMLType.Q8_0: Q8_0, GGMLType.Q4_K: Q4_K}
# a GGUF weight tile spans one Q8_0 block or Q4_K sub-block of a row: one scale per row, read
# once per tile instead of once per value
GGUF_TILE_VALUES = 32


@dataclass(frozen=True)
class StoredExperts:
    """One projection of every expert as stored: float [experts, rows, cols] (ggml_type None),
    or GGUF blocks uint8 [experts, rows, row_bytes] of ggml_type Q8_0 or Q4_K."""

    data: torch.Tensor
    ggml_type: GGMLType | None = None

    @property
    def cols(self) -> int:
        """Values per row (the GEMM's reduction length)."""
        if self.ggml_type is None:
            return self.data.shape[2]
        fmt = FORMATS[self.ggml_type]
        return self.data.shape[2] // fmt.type_size * fmt.block_size

    def check(self, name: str, experts: int | None, rows: int, cols: int) -> None:
        require_shape(name, self.data, (experts, rows, None), "[experts, rows, cols or bytes]")
        if self.ggml_type is None:
            require_float_rows(name, self.data)
        else:
            require(
                self.ggml_type in KERNEL_FORMATS,
                f"{name}: the GPU kernel reads Q8_0 and Q4_K blocks, not {self.ggml_type.name}",
            )
            fmt = FORMATS[self.ggml_type]
            require(
                self.data.dtype == torch.uint8 and self.data.shape[2] % fmt.type_size == 0,
                f"{name}: {self.ggml_type.name} rows are uint8 whole {fmt.type_size}-byte blocks, "
                f"got {self.data.dtype} rows of {self.data.shape[2]}",
            )
            require(self.data.stride(2) == 1, f"{name}: the rows' bytes must be contiguous")
        require(self.cols == cols, f"{name}: rows of {self.cols} values, expected {cols}")


def align_by_expert(
    expert_ids: torch.Tensor, block_m: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """expert_ids: int [tokens, k], each in [0, num_experts) or -1 (a pair computed elsewhere)
    -> (sorted_pair_ids int32 [capacity]: pair ids (token * k + slot) grouped by expert, each
    expert's run padded to a multiple of block_m with the id tokens * k; block_experts int32
    [capacity / block_m]: the expert of each tile, -1 past the last; padded_count: int64 [],
    the tiles' rows in use). capacity bounds the padding from the shapes alone, so nothing
    waits for the GPU."""
    flat = expert_ids.reshape(-1).long()
    pairs = flat.numel()
    # skipped pairs (-1) sort into an extra last bucket, which gets no tiles
    bucket = torch.where(flat < 0, num_experts, flat)
    # [E + 1]; bincount would read the largest id back to the host (a sync CUDA graphs forbid)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, bucket, torch.ones_like(bucket))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_ends = padded.cumsum(0)
    order = torch.sort(bucket, stable=True).indices  # pair ids by expert, in pair order within
    sorted_buckets = bucket[order]
    run_starts = counts.cumsum(0) - counts
    dest = (padded_ends - padded)[sorted_buckets] + torch.arange(pairs, device=flat.device)
    dest -= run_starts[sorted_buckets]
    capacity = triton.cdiv(pairs + min(num_experts, pairs) * (block_m - 1), block_m) * block_m
    # the skipped bucket lands after the last expert's tiles: in tiles marked -1, or past
    # `capacity` in room left for every pair (dropped by the slice, without a masked copy)
    placed = torch.full((capacity + pairs,), pairs, dtype=torch.int32, device=flat.device)
    placed[dest] = order.to(torch.int32)
    tile_starts = torch.arange(0, capacity, block_m, device=flat.device)
    block_experts = torch.searchsorted(padded_ends[:num_experts], tile_starts, right=True)
    block_experts = torch.where(block_experts < num_experts, block_experts, -1).to(torch.int32)
    return placed[:capacity], block_experts, padded_ends[num_experts - 1]


@triton.jit
def _f16_at(byte_ptrs, mask):
    # a little-endian float16 from two bytes (block fields are only 2-byte aligned) -> float32
    low = tl.load(byte_ptrs, mask=mask, other=0).to(tl.uint16)
    high = tl.load(byte_ptrs + 1, mask=mask, other=0).to(tl.uint16)
    return (low | (high << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _weight_tile(rows_ptrs, k_start, offsets, mask, row_mask, WEIGHT_FORMAT: tl.constexpr):
    """rows_ptrs: [1, BLOCK_N] starts of weight rows; values k_start + offsets ([BLOCK_K, 1])
    of each row -> float32 [BLOCK_K, BLOCK_N] (the tile of w.T a GEMM needs). A GGUF tile is
    one 32-value block (Q8_0) or sub-block (Q4_K), so its scales are one per row."""
    if WEIGHT_FORMAT == 0:
        tile = tl.load(rows_ptrs + k_start + offsets, mask=mask, other=0.0).to(tl.float32)
    elif WEIGHT_FORMAT == 1:
        # Q8_0: 34-byte blocks of 32 values: float16 d, then 32 int8 q; value = q * d
        block = rows_ptrs + (k_start // 32) * 34
        q = tl.load(block + 2 + offsets, mask=mask, other=0).to(tl.int8, bitcast=True)
        tile = q.to(tl.float32) * _f16_at(block, row_mask)
    else:
        # Q4_K: 144-byte super-blocks of 256 values in 8 sub-blocks j of 32: float16 d and dmin,
        # 12 bytes of 6-bit scales and mins, 128 bytes of nibbles (sub-blocks 2r and 2r+1 share
        # 32 bytes: low and high nibbles); value = d * scale_j * q - dmin * min_j
        block = rows_ptrs + (k_start // 256) * 144
        j = (k_start % 256) // 32
        packed = tl.load(block + 16 + (j // 2) * 32 + offsets, mask=mask, other=0)
        q = ((packed >> (4 * (j % 2))) & 0xF).to(tl.float32)
        # scale bytes 0-3: scale j (6 bits) and 2 high bits of scale j+4; 4-7 the same for
        # mins; 8-11: scale j+4's low 4 bits, min j+4's high nibble
        first = tl.load(block + 4 + j % 4, mask=row_mask, other=0)
        second = tl.load(block + 8 + j % 4, mask=row_mask, other=0)
        tail = tl.load(block + 12 + j % 4, mask=row_mask, other=0)
        low = j < 4
        scale = tl.where(low, first & 0x3F, (tail & 0xF) | ((first >> 6) << 4)).to(tl.float32)
        least = tl.where(low, second & 0x3F, (tail >> 4) | ((second >> 6) << 4)).to(tl.float32)
        tile = (_f16_at(block, row_mask) * scale) * q - _f16_at(block + 2, row_mask) * least
    return tile


@triton.jit
def _expert_gemm_kernel(
    a, w, out, sorted_pair_ids, block_experts, pair_weights,
    pairs, n_out, k_in, a_row_divisor,
    stride_am, stride_we, stride_wn, stride_om,
    GATED: tl.constexpr, WEIGHT_FORMAT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One tile: BLOCK_M pairs of one expert x BLOCK_N outputs. A's row of pair p is
    p // a_row_divisor (GEMM 1: the pair's token; GEMM 2: the pair's own row). GATED: weight
    rows n (gate) and n_out + n (up), out = SiLU(gate) * up in out's dtype; else out = the
    pair's routing weight * (a @ w.T), float32."""
    tile, n_block = tl.program_id(0), tl.program_id(1)
    expert = tl.load(block_experts + tile)
    if expert < 0:
        return  # past the last expert's tiles
    pair = tl.load(sorted_pair_ids + tile * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    pair_ok = pair < pairs  # padding rows carry the id `pairs`
    a_rows = a + (pair // a_row_divisor).to(tl.int64)[:, None] * stride_am
    n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_out
    expert_w = w + expert.to(tl.int64) * stride_we
    gate_rows = expert_w + n[None, :].to(tl.int64) * stride_wn  # [1, BLOCK_N]
    up_rows = gate_rows + n_out * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    offsets = tl.arange(0, BLOCK_K)
    row_mask = n_ok[None, :]
    for k_start in range(0, k_in, BLOCK_K):
        cols = k_start + offsets
        col_ok = cols < k_in
        a_tile = tl.load(a_rows + cols[None, :], mask=pair_ok[:, None] & col_ok[None, :], other=0.0)
        w_mask = col_ok[:, None] & row_mask
        w_tile = _weight_tile(
            gate_rows, k_start, offsets[:, None], w_mask, row_mask, WEIGHT_FORMAT
        ).to(a_tile.dtype)
        acc = tl.dot(a_tile, w_tile, acc, input_precision=PRECISION)
        if GATED:
            u_tile = _weight_tile(
                up_rows, k_start, offsets[:, None], w_mask, row_mask, WEIGHT_FORMAT
            ).to(a_tile.dtype)
            acc_up = tl.dot(a_tile, u_tile, acc_up, input_precision=PRECISION)
    if GATED:
        result = acc / (1.0 + tl.exp(-acc)) * acc_up  # SiLU(gate) * up
    else:
        result = acc * tl.load(pair_weights + pair, mask=pair_ok, other=0.0)[:, None]
    o_ptrs = out + pair.to(tl.int64)[:, None] * stride_om + n[None, :]
    tl.store(o_ptrs, result.to(out.dtype.element_ty), mask=pair_ok[:, None] & n_ok[None, :])


def _expert_gemm(
    a: torch.Tensor,
    weights: StoredExperts,
    out: torch.Tensor,
    aligned: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    pair_weights: torch.Tensor,
    a_row_divisor: int,
    gated: bool,
    config: dict[str, int],
) -> None:
    sorted_pair_ids, block_experts, _ = aligned
    n_out = out.shape[1]
    w = weights.data
    if weights.ggml_type is not None:
        config = {**config, "BLOCK_K": GGUF_TILE_VALUES}
    grid = (block_experts.shape[0], triton.cdiv(n_out, config["BLOCK_N"]))
    _expert_gemm_kernel[grid](
        a, w, out, sorted_pair_ids, block_experts, pair_weights,
        pair_weights.shape[0], n_out, a.shape[1], a_row_divisor,
        a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        GATED=gated, PRECISION=dot_precision(a.dtype),
        WEIGHT_FORMAT=FLOAT if weights.ggml_type is None else KERNEL_FORMATS[weights.ggml_type],
        **config,
    )  # fmt: skip


def fused_moe(
    x: torch.Tensor,
    gate_up: torch.Tensor | StoredExperts,
    down: torch.Tensor | StoredExperts,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
) -> torch.Tensor:
    """sum_j expert_weights[t, j] * FFN_{expert_ids[t, j]}(x[t]), FFN(x) = down(SiLU(gate x) *
    up x) -> [tokens, hidden] in x's dtype.

    x: [tokens, hidden] float; gate_up: [experts, 2 * inter, hidden] (gate rows, then up rows);
    down: [experts, hidden, inter]; each a float tensor or StoredExperts (GGUF blocks);
    expert_ids: int [tokens, k], each in [0, experts), or -1 for a pair this call skips (its
    expert runs elsewhere, as the CPU's share of a hybrid step); expert_weights: float
    [tokens, k]."""
    require_shape("x", x, (None, None), "[tokens, hidden]")
    require_float_rows("x", x)
    tokens, hidden = x.shape
    gate_up = gate_up if isinstance(gate_up, StoredExperts) else StoredExperts(gate_up)
    down = down if isinstance(down, StoredExperts) else StoredExperts(down)
    require_shape("down", down.data, (None, hidden, None), "[experts, hidden, inter]")
    experts = down.data.shape[0]
    inter = down.cols
    gate_up.check("gate_up", experts, 2 * inter, hidden)
    down.check("down", experts, hidden, inter)
    require_shape("expert_ids", expert_ids, (tokens, None), "[tokens, k]")
    require_int("expert_ids", expert_ids)
    require_shape("expert_weights", expert_weights, tuple(expert_ids.shape), "[tokens, k]")
    require(expert_weights.dtype in FLOAT_DTYPES, "expert_weights: expected a float tensor")
    require_same_device(
        x=x, gate_up=gate_up.data, down=down.data, expert_ids=expert_ids, weights=expert_weights
    )
    k = expert_ids.shape[1]
    pairs = tokens * k
    if pairs == 0:
        return torch.zeros_like(x)
    config = block_sizes("fused_moe", pairs)
    aligned = align_by_expert(expert_ids, config["BLOCK_M"], experts)
    pair_weights = expert_weights.reshape(-1).to(torch.float32).contiguous()
    activated = torch.empty((pairs, inter), dtype=x.dtype, device=x.device)
    _expert_gemm(x, gate_up, activated, aligned, pair_weights, k, True, config)
    # zeros: the rows of skipped pairs (expert -1) are never written
    pair_out = torch.zeros((pairs, hidden), dtype=torch.float32, device=x.device)
    _expert_gemm(activated, down, pair_out, aligned, pair_weights, 1, False, config)
    return pair_out.view(tokens, k, hidden).sum(dim=1).to(x.dtype)
