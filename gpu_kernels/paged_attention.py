"""Decode attention over the paged KV cache, one query per sequence, split-K: long histories are
cut into splits that run as separate programs (one sequence at 32K context still fills the GPU),
each writing a partial output and its log-sum-exp, which a second kernel merges. The heads that
share a kv head are one program's rows, so each K/V row is loaded once for all of them.

The block table may be any list of pages, in order: a sequence's whole table, or the compacted
table of the pages sparse attention selected (context_lens then counts the tokens in those
pages, the last page possibly partial). The MLA decode (mla_decode.py) runs the same kernels
with the latent rows as keys and values plus a second key part (the roped keys)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_kernels.launch_checks import (
    dot_precision,
    next_power_of_2,
    require,
    require_float_rows,
    require_int,
    require_same_device,
    require_shape,
)
from gpu_kernels.tuning import block_sizes

LOG2_E = 1.4426950408889634


@triton.jit
def _paged_decode_split_kernel(
    q, q_rope, k_store, rope_store, v_store, block_tables, context_lens, partial, partial_lse,
    scale_log2, tokens_per_split, block_size,
    stride_qs, stride_qh, stride_rs, stride_rh, stride_kh, stride_kr, stride_ropeh, stride_roper,
    stride_vh, stride_vr, stride_bt, stride_ps, stride_ph, stride_pk, stride_ls, stride_lh,
    GROUP: tl.constexpr, HEAD_BLOCKS: tl.constexpr, D: tl.constexpr, DR: tl.constexpr,
    DV: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ROPE: tl.constexpr,
    V_IS_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # one program: one sequence, BLOCK_H heads of one kv head, one split of the history
    seq, head_block, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kv_head = head_block // HEAD_BLOCKS
    in_group = (head_block % HEAD_BLOCKS) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = in_group < GROUP
    heads = kv_head * GROUP + in_group  # [BLOCK_H]
    dims, vdims = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)

    q_ptrs = q + seq * stride_qs + heads[:, None] * stride_qh + dims[None, :]
    q_tile = tl.load(q_ptrs, mask=head_ok[:, None] & (dims[None, :] < D), other=0.0)
    if HAS_ROPE:
        rdims = tl.arange(0, BLOCK_R)
        r_ptrs = q_rope + seq * stride_rs + heads[:, None] * stride_rh + rdims[None, :]
        r_tile = tl.load(r_ptrs, mask=head_ok[:, None] & (rdims[None, :] < DR), other=0.0)

    length = tl.load(context_lens + seq)
    start = split * tokens_per_split
    end = tl.minimum(length, start + tokens_per_split)
    running_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    for n_start in range(start, end, BLOCK_N):
        tokens = n_start + tl.arange(0, BLOCK_N)  # [BLOCK_N] positions in the (compacted) table
        token_ok = tokens < end
        page = tl.load(block_tables + seq * stride_bt + tokens // block_size, mask=token_ok)
        rows = page.to(tl.int64) * block_size + tokens % block_size  # flat storage rows
        k_ptrs = k_store + kv_head * stride_kh + rows[None, :] * stride_kr + dims[:, None]
        k_tile = tl.load(k_ptrs, mask=token_ok[None, :] & (dims[:, None] < D), other=0.0)
        scores = tl.dot(q_tile, k_tile, input_precision=PRECISION)  # [BLOCK_H, BLOCK_N]
        if HAS_ROPE:
            rope_ptrs = rope_store + kv_head * stride_ropeh + rows[None, :] * stride_roper
            rope_tile = tl.load(
                rope_ptrs + rdims[:, None],
                mask=token_ok[None, :] & (rdims[:, None] < DR),
                other=0.0,
            )
            scores += tl.dot(r_tile, rope_tile, input_precision=PRECISION)
        scores = tl.where(token_ok[None, :], scores * scale_log2, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        p = tl.math.exp2(scores - new_max[:, None])  # every block has a visible token
        correction = tl.math.exp2(running_max - new_max)
        running_sum = running_sum * correction + tl.sum(p, 1)
        if V_IS_K:
            v_tile = tl.trans(k_tile)  # MLA: the latent rows are the values too
        else:
            v_ptrs = v_store + kv_head * stride_vh + rows[:, None] * stride_vr + vdims[None, :]
            v_tile = tl.load(v_ptrs, mask=token_ok[:, None] & (vdims[None, :] < DV), other=0.0)
        acc = acc * correction[:, None] + tl.dot(
            p.to(v_tile.dtype), v_tile, input_precision=PRECISION
        )
        running_max = new_max
    # an empty split (past the sequence's end) leaves lse -inf: the merge gives it no weight
    filled = running_sum > 0
    total = tl.where(filled, running_sum, 1.0)
    lse = tl.where(filled, running_max + tl.math.log2(total), float("-inf"))
    acc = acc / total[:, None]
    p_ptrs = partial + seq * stride_ps + heads[:, None] * stride_ph + split * stride_pk
    tl.store(p_ptrs + vdims[None, :], acc, mask=head_ok[:, None] & (vdims[None, :] < DV))
    tl.store(partial_lse + seq * stride_ls + heads * stride_lh + split, lse, mask=head_ok)


@triton.jit
def _merge_splits_kernel(
    partial, partial_lse, out, splits,
    stride_ps, stride_ph, stride_pk, stride_ls, stride_lh, stride_os, stride_oh,
    DV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    # one program: one sequence and head; the splits' outputs weighted by their softmax mass
    seq, head = tl.program_id(0), tl.program_id(1)
    ks, vdims = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_DV)
    lse = tl.load(
        partial_lse + seq * stride_ls + head * stride_lh + ks, mask=ks < splits, other=float("-inf")
    )
    top = tl.max(lse, 0)
    weights = tl.math.exp2(lse - tl.where(top == float("-inf"), 0.0, top))  # [BLOCK_S]
    total = tl.sum(weights, 0)
    p_ptrs = partial + seq * stride_ps + head * stride_ph + ks[:, None] * stride_pk + vdims[None, :]
    parts = tl.load(p_ptrs, mask=(ks[:, None] < splits) & (vdims[None, :] < DV), other=0.0)
    merged = tl.sum(weights[:, None] * parts, 0) / tl.where(total > 0, total, 1.0)
    o_ptrs = out + seq * stride_os + head * stride_oh + vdims
    tl.store(o_ptrs, merged.to(out.dtype.element_ty), mask=vdims < DV)


def check_block_tables(
    block_tables: torch.Tensor, context_lens: torch.Tensor, seqs: int, block_size: int
) -> None:
    require_shape("block_tables", block_tables, (seqs, None), "[seqs, max_blocks]")
    require_shape("context_lens", context_lens, (seqs,), "[seqs]")
    require_int("block_tables", block_tables)
    require_int("context_lens", context_lens)
    require(block_tables.stride(-1) == 1, "block_tables: rows must be contiguous")
    require(block_size >= 1, f"block_size must be at least 1, not {block_size}")


def launch_paged_decode(
    q: torch.Tensor,
    q_rope: torch.Tensor | None,
    k_store: torch.Tensor,
    rope_store: torch.Tensor | None,
    v_store: torch.Tensor | None,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
    splits: int | None,
) -> torch.Tensor:
    """The split and merge kernels for checked inputs (see `paged_decode_attention` and
    `mla_decode`): q [seqs, heads, d], q_rope [seqs, heads, dr] or None, k_store [kv_heads,
    rows, d], rope_store [kv_heads, rows, dr] or None, v_store [kv_heads, rows, dv] or None (the
    keys are the values) -> [seqs, heads, dv] in q's dtype."""
    seqs, heads, d = q.shape
    kv_heads = k_store.shape[0]
    values = k_store if v_store is None else v_store
    dv, dr = values.shape[2], 0 if rope_store is None else rope_store.shape[2]
    out = torch.empty((seqs, heads, dv), dtype=q.dtype, device=q.device)
    if seqs == 0:
        return out
    group = heads // kv_heads
    block_d, block_dv, block_r = next_power_of_2(d), next_power_of_2(dv), next_power_of_2(dr)
    config = block_sizes("paged_decode", block_d)
    block_h = min(next_power_of_2(group), config.pop("MAX_HEADS"))
    head_blocks = triton.cdiv(group, block_h)

    # Split the longest history the table can hold (no sync to read context_lens): splits
    # past a sequence's end exit at once.
    programs = seqs * kv_heads * head_blocks
    max_tokens = max(block_tables.shape[1] * block_size, 1)
    if splits is None:
        split = block_sizes("paged_decode_split", programs)
        splits = min(
            max(split["TARGET_PROGRAMS"] // programs, 1),
            split["MAX_SPLITS"],
            triton.cdiv(max_tokens, split["MIN_SPLIT_TOKENS"]),
        )
    tokens_per_split = triton.cdiv(triton.cdiv(max_tokens, splits), config["BLOCK_N"])
    tokens_per_split *= config["BLOCK_N"]
    splits = triton.cdiv(max_tokens, tokens_per_split)

    partial = torch.empty((seqs, heads, splits, dv), dtype=torch.float32, device=q.device)
    partial_lse = torch.empty((seqs, heads, splits), dtype=torch.float32, device=q.device)
    rope_q = q if q_rope is None else q_rope  # unread placeholders when there is no rope part
    rope_kv = k_store if rope_store is None else rope_store
    _paged_decode_split_kernel[(seqs, kv_heads * head_blocks, splits)](
        q, rope_q, k_store, rope_kv, values, block_tables, context_lens, partial, partial_lse,
        scale * LOG2_E, tokens_per_split, block_size,
        q.stride(0), q.stride(1), rope_q.stride(0), rope_q.stride(1),
        k_store.stride(0), k_store.stride(1), rope_kv.stride(0), rope_kv.stride(1),
        values.stride(0), values.stride(1), block_tables.stride(0),
        partial.stride(0), partial.stride(1), partial.stride(2),
        partial_lse.stride(0), partial_lse.stride(1),
        GROUP=group, HEAD_BLOCKS=head_blocks, D=d, DR=dr, DV=dv, BLOCK_H=block_h,
        BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_DV=block_dv, HAS_ROPE=rope_store is not None,
        V_IS_K=v_store is None, PRECISION=dot_precision(k_store.dtype), **config,
    )  # fmt: skip
    _merge_splits_kernel[(seqs, heads)](
        partial, partial_lse, out, splits,
        partial.stride(0), partial.stride(1), partial.stride(2),
        partial_lse.stride(0), partial_lse.stride(1), out.stride(0), out.stride(1),
        DV=dv, BLOCK_S=next_power_of_2(splits, least=2), BLOCK_DV=block_dv,
    )  # fmt: skip
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_store: torch.Tensor,
    v_store: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
    splits: int | None = None,
) -> torch.Tensor:
    """One decode step of grouped-query attention -> [seqs, heads, dv] in q's dtype.

    q: [seqs, heads, d]; k_store, v_store: one layer's cache as PagedKVCache stores it,
    [kv_heads, num_blocks * block_size, d or dv], heads a multiple of kv_heads; block_tables:
    int [seqs, max_blocks], the pages of each sequence in order (entries past its length are
    not read); context_lens: int [seqs], tokens to attend to, each >= 1; splits: how many
    programs share each history (default: from tuning.py's table)."""
    require_shape("q", q, (None, None, None), "[seqs, heads, d]")
    seqs, heads, d = q.shape
    require_shape("k_store", k_store, (None, None, d), "[kv_heads, rows, d]")
    kv_heads, rows, _ = k_store.shape
    require_shape("v_store", v_store, (kv_heads, rows, None), "[kv_heads, rows, dv]")
    require(heads % kv_heads == 0, f"q's {heads} heads are not a multiple of {kv_heads} kv heads")
    for name, t in (("q", q), ("k_store", k_store), ("v_store", v_store)):
        require_float_rows(name, t)
    require(
        q.dtype == k_store.dtype == v_store.dtype,
        f"q and the stores differ in dtype: {q.dtype}, {k_store.dtype}, {v_store.dtype}",
    )
    check_block_tables(block_tables, context_lens, seqs, block_size)
    require_same_device(
        q=q, k_store=k_store, v_store=v_store, block_tables=block_tables, context_lens=context_lens
    )
    return launch_paged_decode(
        q, None, k_store, None, v_store, block_tables, context_lens, block_size, scale, splits
    )
