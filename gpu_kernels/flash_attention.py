"""Causal flash-attention prefill over packed variable-length sequences, with grouped-query
heads and a value width that may differ from the key width (MLA prefill: d=192, dv=128).
A sequence's queries are the last q_len positions of its keys: prefill after a cached prefix."""

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

LOG2_E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): exp2 is the GPU's native instruction


@triton.jit
def _flash_attention_kernel(
    q, k, v, out, cu_q, cu_kv, scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    # one program: BLOCK_M queries of one sequence, one head; online softmax over its keys
    m_block, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(cu_q + seq).to(tl.int64)  # token x stride passes 2^31 in long batches
    q_len = tl.load(cu_q + seq + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    kv_start = tl.load(cu_kv + seq).to(tl.int64)
    kv_len = tl.load(cu_kv + seq + 1) - kv_start
    prefix = kv_len - q_len  # query i sits at key position prefix + i
    kv_head = head // GROUP

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query index in the sequence
    dims, vdims = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    row_ok = rows < q_len
    q_ptrs = q + (q_start + rows)[:, None] * stride_qt + head * stride_qh + dims[None, :]
    q_tile = tl.load(q_ptrs, mask=row_ok[:, None] & (dims[None, :] < D), other=0.0)

    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # causal: this block's last query sees keys up to prefix + its row
    kv_end = tl.minimum(kv_len, prefix + (m_block + 1) * BLOCK_M)
    for n_start in range(0, kv_end, BLOCK_N):
        cols = n_start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
        col_ok = cols < kv_len
        k_ptrs = k + (kv_start + cols)[None, :] * stride_kt + kv_head * stride_kh + dims[:, None]
        k_tile = tl.load(k_ptrs, mask=col_ok[None, :] & (dims[:, None] < D), other=0.0)
        scores = tl.dot(q_tile, k_tile, input_precision=PRECISION) * scale_log2  # [M, N]
        visible = col_ok[None, :] & (cols[None, :] <= prefix + rows[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        # rows with nothing visible yet keep max -inf: subtract 0 instead (exp2(-inf) = 0)
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.math.exp2(scores - safe_max[:, None])
        correction = tl.math.exp2(running_max - safe_max)
        running_sum = running_sum * correction + tl.sum(p, 1)
        v_ptrs = v + (kv_start + cols)[:, None] * stride_vt + kv_head * stride_vh + vdims[None, :]
        v_tile = tl.load(v_ptrs, mask=col_ok[:, None] & (vdims[None, :] < DV), other=0.0)
        acc = acc * correction[:, None] + tl.dot(
            p.to(v_tile.dtype), v_tile, input_precision=PRECISION
        )
        running_max = new_max
    acc = acc / running_sum[:, None]  # every query sees at least its own key: sum > 0
    o_ptrs = out + (q_start + rows)[:, None] * stride_ot + head * stride_oh + vdims[None, :]
    tl.store(o_ptrs, acc.to(out.dtype.element_ty), mask=row_ok[:, None] & (vdims[None, :] < DV))


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_kv: torch.Tensor,
    max_q_len: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention of packed sequences -> [tokens, heads, dv] in q's dtype.

    q: [tokens, heads, d]; k: [kv_tokens, kv_heads, d]; v: [kv_tokens, kv_heads, dv], heads a
    multiple of kv_heads; cu_seqlens_q, cu_seqlens_kv: int [seqs + 1] offsets of each sequence
    in q and in k/v, each sequence with at least as many keys as queries; max_q_len: the
    longest sequence's query count (an int the caller knows, so launching needs no sync)."""
    require_shape("q", q, (None, None, None), "[tokens, heads, d]")
    tokens, heads, d = q.shape
    require_shape("k", k, (None, None, d), "[kv_tokens, kv_heads, d]")
    kv_tokens, kv_heads, _ = k.shape
    require_shape("v", v, (kv_tokens, kv_heads, None), "[kv_tokens, kv_heads, dv]")
    require(heads % kv_heads == 0, f"q's {heads} heads are not a multiple of {kv_heads} kv heads")
    seqs = cu_seqlens_q.shape[0] - 1
    require_shape("cu_seqlens_kv", cu_seqlens_kv, (seqs + 1,), "[seqs + 1]")
    for name, t in (("q", q), ("k", k), ("v", v)):
        require_float_rows(name, t)
    require(
        k.dtype == q.dtype == v.dtype, f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}"
    )
    require_int("cu_seqlens_q", cu_seqlens_q)
    require_int("cu_seqlens_kv", cu_seqlens_kv)
    require_same_device(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_kv=cu_seqlens_kv)
    dv = v.shape[2]
    out = torch.empty((tokens, heads, dv), dtype=q.dtype, device=q.device)
    if tokens == 0 or seqs == 0:
        return out
    block_d, block_dv = next_power_of_2(d), next_power_of_2(dv)
    config = block_sizes("flash_attention", max(block_d, block_dv))
    grid = (triton.cdiv(max_q_len, config["BLOCK_M"]), seqs, heads)
    _flash_attention_kernel[grid](
        q, k, v, out, cu_seqlens_q, cu_seqlens_kv, scale * LOG2_E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        GROUP=heads // kv_heads, D=d, DV=dv, BLOCK_D=block_d, BLOCK_DV=block_dv,
        PRECISION=dot_precision(q.dtype), **config,
    )  # fmt: skip
    return out
