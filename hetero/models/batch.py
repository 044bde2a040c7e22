"""What a model needs from the batch it runs on: token positions, a per-batch memo, and one
attention call per layer. The runtime's ForwardBatch provides it; models import only this, so
they never depend on how the runtime lays out caches or picks attention kernels."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class GroupedQueryStep:
    """One layer's grouped-query attention: this step's queries and the keys and values to store
    (cache entries "k" and "v"), each kv head shared by heads / kv_heads query heads."""

    q: torch.Tensor  # [tokens, heads, d]
    k: torch.Tensor  # [tokens, kv_heads, d]
    v: torch.Tensor  # [tokens, kv_heads, dv]
    scale: float
    window: int | None = None  # sliding window: a query sees only the last `window` keys

    def cache_entries(self) -> dict[str, torch.Tensor]:
        return {"k": self.k, "v": self.v}


@dataclass(frozen=True)
class LatentStep:
    """One layer's multi-head latent attention (DeepSeek MLA): the cache stores a latent per
    token (entries "latent" and "k_rope"); `kv_b` maps a latent to every head's no-rope key part
    and value, [.., rank] -> [.., heads * (nope + v_dim)], heads-major, keys before values."""

    q_nope: torch.Tensor  # [tokens, heads, nope]
    q_rope: torch.Tensor  # [tokens, heads, rope]
    latent: torch.Tensor  # [tokens, rank]
    k_rope: torch.Tensor  # [tokens, rope]
    kv_b: nn.Module
    v_dim: int
    scale: float

    def cache_entries(self) -> dict[str, torch.Tensor]:
        return {"latent": self.latent, "k_rope": self.k_rope}

    def expand(
        self, latent: torch.Tensor, k_rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Histories latent: [seqs, n, rank], k_rope: [seqs, n, rope] -> keys
        [seqs, n, heads, nope + rope], values [seqs, n, heads, v_dim]."""
        seqs, n = latent.shape[:2]
        heads, rope = self.q_nope.shape[1], k_rope.shape[-1]
        kv = self.kv_b(latent).view(seqs, n, heads, -1)
        k_nope, v = kv.split([kv.shape[-1] - self.v_dim, self.v_dim], dim=-1)
        k_rope = k_rope[:, :, None, :].expand(seqs, n, heads, rope)
        return torch.cat((k_nope, k_rope), dim=-1), v

    def queries(self) -> torch.Tensor:
        """[tokens, heads, nope + rope]: the queries against `expand`'s keys."""
        return torch.cat((self.q_nope, self.q_rope), dim=-1)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """kv_b's weight split for the absorbed form (DeepSeek-V2 section 2.1.2: q_nope . W_uk
        latent = (W_uk^T q_nope) . latent, so queries move into the latent space and the
        history is never expanded): (key part [heads, nope, rank], value part [heads, v_dim,
        rank]), views of the weight; None when kv_b holds no plain weight (a kernel format)."""
        weight = getattr(self.kv_b, "weight", None)
        if not isinstance(weight, torch.Tensor):
            return None
        heads, nope = self.q_nope.shape[1:]
        per_head = weight.view(heads, nope + self.v_dim, weight.shape[-1])
        return per_head[:, :nope], per_head[:, nope:]


AttentionStep = GroupedQueryStep | LatentStep

# the cache entries queries are scored against (the keys): what sparse attention summarises
KEY_ENTRIES = frozenset({"k", "latent", "k_rope"})


class Batch(Protocol):
    """Tokens of one or more sequences laid out flat, [tokens, ...]."""

    positions: torch.Tensor  # [tokens] int64, each token's absolute position in its sequence

    def memo(self, key: Hashable, compute: Callable[[], T]) -> T:
        """compute() once per batch for `key` (what every layer derives alike)."""
        ...

    def attention(self, layer: int, step: AttentionStep) -> torch.Tensor:
        """Store this step's cache entries for `layer` and attend: causal attention of each
        sequence's new tokens over its history -> [tokens, heads, dv]."""
        ...
