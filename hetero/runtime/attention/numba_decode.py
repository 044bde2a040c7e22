"""The CPU kernels' attention backend: a step where every sequence decodes one token, over a KV
cache in CPU memory (float32, or bfloat16 widened as it is read) and without autograd, is one
Numba call per layer reading each history in place, where the torch backend gathers a copy of
it per layer plus ~10 small ops (each ~5-40 us of dispatch on the 2-core machines)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from hetero.models.batch import AttentionStep, GroupedQueryStep, LatentStep
from hetero.runtime.attention.page_selection import DecodeReads, decode_reads
from hetero.runtime.kernel_inputs import KERNEL_STORE_DTYPES, cpu_kernel_input, kernel_store

if TYPE_CHECKING:  # the batch module imports the backends
    from hetero.runtime.batch import ForwardBatch


class NumbaDecodeAttention:
    def applies(self, batch: ForwardBatch, layer: int, step: AttentionStep) -> bool:
        if batch.kv is None or len(batch.decoding) != len(batch.slices):
            return False
        stores = batch.kv.storage[layer].values()
        if any(t.device.type != "cpu" or t.dtype not in KERNEL_STORE_DTYPES for t in stores):
            return False
        if isinstance(step, LatentStep):
            weights = step.absorbed_weights()
            inputs = [step.q_nope, step.q_rope, step.latent, step.k_rope]
            return weights is not None and all(map(cpu_kernel_input, [*inputs, *weights]))
        return all(map(cpu_kernel_input, (step.q, step.k, step.v)))

    def grouped_query(
        self, batch: ForwardBatch, layer: int, step: GroupedQueryStep
    ) -> torch.Tensor:
        # imported here: Numba's import costs ~80 MB and a model torch runs may never decode
        from cpu_kernels.attention import paged_decode_attention

        batch.kv.write(layer, batch.write_slots, step.cache_entries())
        store = batch.kv.storage[layer]
        q = step.q.detach().contiguous()
        n, heads, d = q.shape
        kv_heads = step.k.shape[1]
        queries = [q.view(n, kv_heads, heads // kv_heads, d)]
        reads = read_rows(batch, layer, queries, step.window)
        out = np.empty((n, heads, step.v.shape[-1]), np.float32)
        paged_decode_attention(
            q.numpy(),
            kernel_store(store["k"]),
            kernel_store(store["v"]),
            reads.slots.numpy(),
            reads.counts.numpy(),
            np.float32(step.scale),
            out,
        )
        return torch.from_numpy(out)

    def latent(self, batch: ForwardBatch, layer: int, step: LatentStep) -> torch.Tensor:
        """The absorbed form: q_nope through kv_b's key part into the latent space, attention
        over the cached latents, the result through kv_b's value part. Per step that is two
        [heads] batched matmuls of one row per sequence, where expanding the history costs a
        kv_b matmul over every cached token."""
        from cpu_kernels.mla_decode import latent_attention_decode

        batch.kv.write(layer, batch.write_slots, step.cache_entries())
        store = batch.kv.storage[layer]
        key_part, value_part = step.absorbed_weights()  # [heads, nope, rank], [heads, v, rank]
        q_latent = torch.bmm(step.q_nope.transpose(0, 1), key_part).transpose(0, 1).contiguous()
        q_rope = step.q_rope.contiguous()  # q_latent: [n, heads, rank]; q_rope: [n, heads, rope]
        # one kv head (the latent) shared by every query head
        reads = read_rows(batch, layer, [q_latent[:, None], q_rope[:, None]], None)
        out = latent_attention_decode(
            q_latent.numpy(),
            q_rope.numpy(),
            kernel_store(store["latent"]),
            kernel_store(store["k_rope"]),
            reads.slots.numpy(),
            reads.counts.numpy(),
            step.scale,
        )  # [n, heads, rank]
        mixed = torch.from_numpy(out).transpose(0, 1)  # [heads, n, rank]
        return torch.bmm(mixed, value_part.transpose(1, 2)).transpose(0, 1)  # [n, heads, v]


def read_rows(
    batch: ForwardBatch, layer: int, queries: list[torch.Tensor], window: int | None
) -> DecodeReads:
    """`decode_reads`, counted in the cache's decode-read metrics."""
    reads = decode_reads(batch, layer, queries, window)
    kv = batch.kv
    kv.decode_pages_read += reads.pages_read
    kv.decode_pages_dense += reads.pages_dense
    kv.decode_reads += reads.counts.shape[0]
    return reads
