"""A forward batch: tokens of one or more sequences laid out flat as [tokens, ...], their
positions, and the attention interface every model calls (cache write/read + causal attention).

Histories come back padded, [sequences, longest, ...], so that a step of many decoding
sequences runs one batched attention per layer. Without a KV cache (`ForwardBatch.fresh`) each
sequence attends only to its own tokens: that is the path `Model.logits` and training take,
and autograd runs through it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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
        # index arithmetic in numpy, then one tensor each: a decode step builds these for
        # every sequence, and torch's small ops cost ~5-40 us each on a 2-core CPU
        self.slices = slices
        self.kv = kv
        past = np.array([s.past_len for s in slices], np.int64)
        new = np.array([s.new_len for s in slices], np.int64)
        lengths = past + new
        longest = int(lengths.max())
        starts = np.concatenate(([0], np.cumsum(new)[:-1]))
        positions = [np.arange(p, n) for p, n in zip(past, lengths, strict=True)]
        self.positions = tensor(np.concatenate(positions), device)
        self.lengths = tensor(lengths, device)
        # valid[s, i]: position i holds a token of sequence s
        valid = np.arange(longest)[None, :] < lengths[:, None]
        self.valid = tensor(valid, device)
        self.token_starts = starts.tolist()
        # histories need their padding zeroed only when sequences differ in length
        self.padded = int(lengths.min()) != longest
        # sequences with one new token attend in one batched call: their rows and indices
        self.decoding = [i for i, s in enumerate(slices) if s.new_len == 1]
        self.decode_rows = torch.tensor([self.token_starts[i] for i in self.decoding])
        self.decode_index = torch.tensor(self.decoding, dtype=torch.long)
        self._memo: dict = {}
        if kv is None:
            if past.any():
                raise ValueError("a batch with past tokens needs a KV cache")
            # history row (s, i) is token starts[s] + i of this batch
            index = starts[:, None] + np.arange(longest)[None, :]
            self.history_index = tensor(np.where(valid, index, 0), device)
        else:
            self.write_slots = tensor(
                np.concatenate([kv.slot_array(s.seq_id, s.past_len, s.new_len) for s in slices])
            )
            read = np.zeros((len(slices), longest), np.int64)  # padding reads row 0
            for i, (s, n) in enumerate(zip(slices, lengths, strict=True)):
                read[i, :n] = kv.slot_array(s.seq_id, 0, int(n))
            self.read_slots = tensor(read)

    @classmethod
    def fresh(cls, num_tokens: int, device="cpu") -> ForwardBatch:
        return cls([SequenceSlice(None, 0, num_tokens)], kv=None, device=device)

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    def memo(self, key, compute):
        """compute() once per batch for `key` (what every layer derives alike, e.g. rotary
        cos/sin of the batch's positions)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def cached(self, layer: int, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Store this step's per-token entries (each [tokens, ...]) and return every sequence's
        whole history of each entry, this step included: [sequences, longest, ...], zero past
        each sequence's end."""
        if self.kv is None:
            history = {name: t[self.history_index] for name, t in new.items()}
        else:
            self.kv.write(layer, self.write_slots, new)
            history = self.kv.gather(layer, self.read_slots)
        if not self.padded:
            return history
        pad = ~self.valid
        return {
            name: t.masked_fill(pad.view(*pad.shape, *([1] * (t.dim() - 2))), 0)
            for name, t in history.items()
        }

    def self_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Store this step's keys and values (cache entries "k" and "v") and attend: causal
        attention of each sequence's new tokens over its history. q: [tokens, q_heads, d];
        k: [tokens, kv_heads, d]; v: [tokens, kv_heads, dv] -> [tokens, q_heads, dv].

        A step where every sequence decodes one token, over a float32 cache in CPU memory and
        without autograd, runs `paged_decode_attention`: one Numba call reading the history in
        place, where the torch path gathers a copy of it per layer."""
        if self._cpu_decode_step(q, layer):
            # imported here: Numba's import costs ~80 MB and a model torch runs may never decode
            from cpu_kernels.attention import paged_decode_attention

            self.kv.write(layer, self.write_slots, {"k": k, "v": v})
            store = self.kv.storage[layer]
            out = np.empty((q.shape[0], q.shape[1], v.shape[-1]), np.float32)
            paged_decode_attention(
                q.detach().contiguous().numpy(),
                store["k"].numpy(),
                store["v"].numpy(),
                self.read_slots.numpy(),
                self.lengths.numpy(),
                np.float32(scale),
                out,
            )
            return torch.from_numpy(out)
        history = self.cached(layer, k=k, v=v)
        return self.attention(q, history["k"], history["v"], scale)

    def _cpu_decode_step(self, q: torch.Tensor, layer: int) -> bool:
        if self.kv is None or len(self.decoding) != len(self.slices):
            return False
        return all(cpu_kernel_input(t) for t in (q, *self.kv.storage[layer].values()))

    def attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Causal attention of each sequence's new tokens over its history.
        q: [tokens, q_heads, d]; keys: [sequences, longest, kv_heads, d];
        values: [sequences, longest, kv_heads, dv] -> [tokens, q_heads, dv]"""
        out = q.new_empty(q.shape[0], q.shape[1], values.shape[-1])
        groups = q.shape[1] // keys.shape[2]
        if self.decoding:
            # one query per sequence: a single batched call; padding is masked off
            index = self.decode_index
            decode_keys, decode_values = keys, values
            if len(self.decoding) < len(self.slices):  # prompts in the batch too
                decode_keys, decode_values = keys[index], values[index]
            valid = self.valid[index] if self.padded else None
            rows = self.decode_rows
            out[rows] = decode_attention(q[rows], decode_keys, decode_values, valid, scale)
        for i, s in enumerate(self.slices):
            if s.new_len == 1:
                continue
            start, length = self.token_starts[i], s.past_len + s.new_len
            qs = q[start : start + s.new_len].transpose(0, 1)  # [heads, n, d]
            ks = heads_first(keys[i, :length], groups, q.dtype)
            vs = heads_first(values[i, :length], groups, q.dtype)
            # query j sits at absolute position past_len + j and sees keys 0..past_len + j
            q_pos = torch.arange(s.past_len, length, device=q.device)
            mask = q_pos[:, None] >= torch.arange(length, device=q.device)[None, :]
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
            out[start : start + s.new_len] = o.transpose(0, 1)
        return out


def cpu_kernel_input(t: torch.Tensor) -> bool:
    """Whether the Numba glue kernels may take `t`: float32 in CPU memory, and no gradient to
    track (they return plain arrays, which autograd cannot run through)."""
    if t.dtype != torch.float32 or t.device.type != "cpu":
        return False
    return not (t.requires_grad and torch.is_grad_enabled())


def tensor(array: np.ndarray, device="cpu") -> torch.Tensor:
    """A numpy array as a torch tensor on `device` (shared memory on the CPU)."""
    t = torch.from_numpy(array)
    return t if str(device) == "cpu" else t.to(device)


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
