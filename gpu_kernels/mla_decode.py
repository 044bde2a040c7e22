"""Multi-head latent attention (DeepSeek MLA) decode in the absorbed form on the GPU: the queries
arrive mapped into the latent space, every head scores against the cached latents (plus the
roped keys) and sums the latents themselves. It is paged_attention's split-K kernel with one kv
head whose keys are [latent, k_rope] and whose values are the latents (the CPU twin:
cpu_kernels/mla_decode.py `latent_attention_decode`)."""

from __future__ import annotations

import torch

from gpu_kernels.launch_checks import (
    require,
    require_float_rows,
    require_same_device,
    require_shape,
)
from gpu_kernels.paged_attention import check_block_tables, launch_paged_decode


def mla_decode(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent_store: torch.Tensor,
    rope_store: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
    splits: int | None = None,
) -> torch.Tensor:
    """out[s, h] = softmax(scale * (q_latent[s, h] . C_s + q_rope[s, h] . R_s)) @ C_s, with C_s
    and R_s the rows of sequence s's pages in the latent and rope stores -> [seqs, heads, rank]
    in q_latent's dtype.

    q_latent: [seqs, heads, rank]; q_rope: [seqs, heads, rope]; latent_store: [rows, rank];
    rope_store: [rows, rope] (PagedKVCache's "latent" and "k_rope", rows = num_blocks *
    block_size); block_tables, context_lens, splits: as `paged_decode_attention`'s."""
    require_shape("q_latent", q_latent, (None, None, None), "[seqs, heads, rank]")
    seqs, heads, rank = q_latent.shape
    require_shape("q_rope", q_rope, (seqs, heads, None), "[seqs, heads, rope]")
    require_shape("latent_store", latent_store, (None, rank), "[rows, rank]")
    require_shape(
        "rope_store", rope_store, (latent_store.shape[0], q_rope.shape[2]), "[rows, rope]"
    )
    tensors = dict(
        q_latent=q_latent, q_rope=q_rope, latent_store=latent_store, rope_store=rope_store
    )
    for name, t in tensors.items():
        require_float_rows(name, t)
    dtypes = {name: t.dtype for name, t in tensors.items()}
    require(len(set(dtypes.values())) == 1, f"queries and stores differ in dtype: {dtypes}")
    check_block_tables(block_tables, context_lens, seqs, block_size)
    require_same_device(**tensors, block_tables=block_tables, context_lens=context_lens)
    return launch_paged_decode(
        q_latent, q_rope, latent_store[None], rope_store[None], None,
        block_tables, context_lens, block_size, scale, splits,
    )  # fmt: skip
