"""The torch attention backend, the reference every other backend is checked against: it gathers
each sequence's history from the cache, padded to [sequences, longest, ...], and runs causal
attention in the compute dtype. It takes anything (prompts, autograd, any dtype or device);
without a KV cache each sequence attends only to its own tokens (`Model.logits`, training)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from hetero.models.batch import GroupedQueryStep, LatentStep

if TYPE_CHECKING:  # the batch module imports the backends
    from hetero.runtime.batch import ForwardBatch


class TorchAttention:
    def grouped_query(
        self, batch: ForwardBatch, layer: int, step: GroupedQueryStep
    ) -> torch.Tensor:
        history = stored_history(batch, layer, step.cache_entries(), step.q.dtype)
        return causal_attention(batch, step.q, history["k"], history["v"], step.scale, step.window)

    def latent(self, batch: ForwardBatch, layer: int, step: LatentStep) -> torch.Tensor:
        """kv_b expands every history token to per-head keys and values (the form DeepSeek's
        reference code runs; prefill and training take it)."""
        history = stored_history(batch, layer, step.cache_entries(), step.q_nope.dtype)
        keys, values = step.expand(history["latent"], history["k_rope"])
        return causal_attention(batch, step.queries(), keys, values, step.scale)


def stored_history(
    batch: ForwardBatch, layer: int, new: dict[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Store this step's per-token entries (each [tokens, ...]) and return every sequence's
    whole history of each entry in `dtype`, this step included: [sequences, longest, ...], zero
    past each sequence's end."""
    if batch.kv is None:
        history = {name: t[batch.history_index] for name, t in new.items()}
    else:
        batch.kv.write(layer, batch.write_slots, new)
        # a cache may hold a narrower dtype (bf16) than the model computes in
        stored = batch.kv.gather(layer, batch.read_slots)
        history = {name: t.to(dtype) for name, t in stored.items()}
    if not batch.padded:
        return history
    pad = ~batch.valid
    return {
        name: t.masked_fill(pad.view(*pad.shape, *([1] * (t.dim() - 2))), 0)
        for name, t in history.items()
    }


def causal_attention(
    batch: ForwardBatch,
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its history, within the last
    `window` keys of each query where there is a sliding window.
    q: [tokens, q_heads, d]; keys: [sequences, longest, kv_heads, d];
    values: [sequences, longest, kv_heads, dv] -> [tokens, q_heads, dv]"""
    out = q.new_empty(q.shape[0], q.shape[1], values.shape[-1])
    groups = q.shape[1] // keys.shape[2]
    if batch.decoding:
        # one query per sequence: a single batched call; padding is masked off
        index = batch.decode_index
        decode_keys, decode_values = keys, values
        if len(batch.decoding) < len(batch.slices):  # prompts in the batch too
            decode_keys, decode_values = keys[index], values[index]
        valid = batch.valid[index] if batch.padded else None
        if window is not None:
            lengths = batch.lengths[index]
            inside = torch.arange(keys.shape[1], device=keys.device) >= (lengths - window)[:, None]
            valid = inside if valid is None else valid & inside
        rows = batch.decode_rows
        out[rows] = decode_attention(q[rows], decode_keys, decode_values, valid, scale)
    for i, s in enumerate(batch.slices):
        if s.new_len == 1:
            continue
        start, length = batch.token_starts[i], s.past_len + s.new_len
        qs = q[start : start + s.new_len].transpose(0, 1)  # [heads, n, d]
        ks = heads_first(keys[i, :length], groups, q.dtype)
        vs = heads_first(values[i, :length], groups, q.dtype)
        # query j sits at absolute position past_len + j and sees keys 0..past_len + j
        q_pos = torch.arange(s.past_len, length, device=q.device)
        offset = q_pos[:, None] - torch.arange(length, device=q.device)[None, :]
        mask = (offset >= 0) if window is None else (offset >= 0) & (offset < window)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
        out[start : start + s.new_len] = o.transpose(0, 1)
    return out


def decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """One query per sequence over its history, each kv head's query heads in one matmul (no
    copies of the shared keys). q: [n, q_heads, d]; keys: [n, length, kv_heads, d]; values:
    [n, length, kv_heads, dv]; valid: bool [n, length] or None (no padding) -> [n, q_heads, dv]"""
    n, heads, d = q.shape
    kv_heads = keys.shape[2]
    qg = q.view(n, kv_heads, heads // kv_heads, d)
    scores = torch.matmul(qg, keys.permute(0, 2, 3, 1).to(q.dtype))  # [n, kv, groups, length]
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores * scale, dim=-1, dtype=torch.float32).to(values.dtype)
    out = torch.matmul(probs, values.transpose(1, 2))  # [n, kv, groups, dv]
    return out.reshape(n, heads, values.shape[-1]).to(q.dtype)


def heads_first(t: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """[..., length, kv_heads, d] -> [..., q_heads, length, d], each kv head shared by
    `groups` query heads."""
    return t.transpose(-3, -2).repeat_interleave(groups, dim=-3).to(dtype)
