"""A forward batch: tokens of one or more sequences laid out flat as [tokens, ...], their
positions, and the attention interface every model calls (cache write/read + causal attention).

Without a KV cache (`ForwardBatch.fresh`) each sequence attends only to its own tokens: that is
the path `Model.logits` and training take, and autograd runs through it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hetero.runtime.kv_cache import PagedKVCache


@dataclass(frozen=True)
class SequenceSlice:
    seq_id: int | None  # KV cache handle, None without a cache
    past_len: int  # tokens already in the cache
    new_len: int  # tokens of this sequence in the batch


class ForwardBatch:
    def __init__(self, slices: list[SequenceSlice], kv: PagedKVCache | None, device="cpu"):
        self.slices = slices
        self.kv = kv
        self.positions = torch.cat(
            [torch.arange(s.past_len, s.past_len + s.new_len, device=device) for s in slices]
        )

    @classmethod
    def fresh(cls, num_tokens: int, device="cpu") -> ForwardBatch:
        return cls([SequenceSlice(None, 0, num_tokens)], kv=None, device=device)

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    def cached(self, layer: int, **new: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Store this step's per-token entries (each [tokens, ...]) and return, per sequence,
        the whole history of each entry, this step included."""
        out = []
        offset = 0
        for s in self.slices:
            chunk = {name: t[offset : offset + s.new_len] for name, t in new.items()}
            offset += s.new_len
            if self.kv is None:
                out.append(chunk)
                continue
            self.kv.write(layer, s.seq_id, s.past_len, chunk)
            out.append(self.kv.read(layer, s.seq_id, s.past_len + s.new_len))
        return out

    def attention(
        self,
        q: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        scale: float,
    ) -> torch.Tensor:
        """Causal attention per sequence.
        q: [tokens, q_heads, d]; keys[i]: [len_i, kv_heads, d]; values[i]: [len_i, kv_heads, dv]
        -> [tokens, q_heads, dv]"""
        outs = []
        offset = 0
        for s, k, v in zip(self.slices, keys, values, strict=True):
            qs = q[offset : offset + s.new_len].transpose(0, 1)  # [heads, n, d]
            offset += s.new_len
            groups = qs.shape[0] // k.shape[1]
            ks = k.transpose(0, 1).repeat_interleave(groups, dim=0).to(qs.dtype)
            vs = v.transpose(0, 1).repeat_interleave(groups, dim=0).to(qs.dtype)
            mask = None
            if s.new_len > 1:
                # query j sits at absolute position past_len + j and sees keys 0..past_len + j
                q_pos = torch.arange(s.past_len, s.past_len + s.new_len, device=q.device)
                mask = q_pos[:, None] >= torch.arange(k.shape[0], device=q.device)[None, :]
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
            outs.append(o.transpose(0, 1))
        return torch.cat(outs, dim=0)
