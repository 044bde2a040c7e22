"""A forward batch: tokens of one or more sequences laid out flat as [tokens, ...], and what the
attention backends need to know about them: positions, lengths, the cache slots each token is
written to and each history is read from, which sequences decode one token. It is the
`hetero.models.batch.Batch` the models run on; attention itself is the backends' (`attention/`).
Without a KV cache (`ForwardBatch.fresh`) each sequence attends only to its own tokens: that is
the path `Model.logits` and training take, and autograd runs through it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hetero.models.batch import AttentionStep
from hetero.runtime.attention import attend
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

    def attention(self, layer: int, step: AttentionStep) -> torch.Tensor:
        """Store the step's cache entries and attend, on the backend `attend` picks for this
        layer, batch and step."""
        return attend(self, layer, step)


def tensor(array: np.ndarray, device="cpu") -> torch.Tensor:
    """A numpy array as a torch tensor on `device` (shared memory on the CPU)."""
    t = torch.from_numpy(array)
    return t if str(device) == "cpu" else t.to(device)
