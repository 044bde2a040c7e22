"""Attention backends: each takes a layer's queries and new cache entries, the paged KV cache
and the batch's block tables (slot indices), stores the entries and attends. `attend` picks one
per layer and step from what the cache and inputs are."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from hetero.models.batch import AttentionStep, GroupedQueryStep, LatentStep
from hetero.runtime.attention.numba_decode import NumbaDecodeAttention
from hetero.runtime.attention.torch_reference import TorchAttention

if TYPE_CHECKING:  # the batch module imports this one
    from hetero.runtime.batch import ForwardBatch


class AttentionBackend(Protocol):
    """Both kinds of attention step -> [tokens, heads, dv]. The cache is `batch.kv`, the block
    tables `batch.write_slots` / `batch.read_slots`; a backend stores the step's entries."""

    def grouped_query(
        self, batch: ForwardBatch, layer: int, step: GroupedQueryStep
    ) -> torch.Tensor: ...

    def latent(self, batch: ForwardBatch, layer: int, step: LatentStep) -> torch.Tensor: ...


TORCH = TorchAttention()
NUMBA_DECODE = NumbaDecodeAttention()


def choose_backend(batch: ForwardBatch, layer: int, step: AttentionStep) -> AttentionBackend:
    """The Numba kernels where every sequence decodes over a CPU cache they read, without
    autograd; the torch reference otherwise."""
    return NUMBA_DECODE if NUMBA_DECODE.applies(batch, layer, step) else TORCH


def attend(batch: ForwardBatch, layer: int, step: AttentionStep) -> torch.Tensor:
    backend = choose_backend(batch, layer, step)
    if isinstance(step, LatentStep):
        return backend.latent(batch, layer, step)
    return backend.grouped_query(batch, layer, step)
