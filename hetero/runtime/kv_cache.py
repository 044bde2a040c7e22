"""Paged KV cache: a fixed pool of blocks of `block_size` tokens; each sequence owns a block table.

Each layer declares what it stores per token (`{"k": (kv_heads, head_dim), "v": ...}` for
GQA, `{"latent": (rank,), "k_rope": (dim,)}` for MLA), its dtype and its device, so every
attention kind shares one cache.

Prefix caching: a full block is named by a hash of its tokens and of everything before it.
A new sequence whose prompt starts with cached blocks shares them (reference counted) and skips
their computation. Freed blocks keep their contents and hash until the space is needed (LRU).

Page summaries (for sparse decode attention, `page_selection.py`): per block, the per-channel
minimum and maximum of the entries a layer names in `KVLayerSpec.summarized` (the keys),
updated as the block fills; a shared prefix block keeps its summary with its contents."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from hetero.errors import HeteroError

EntryShapes = dict[str, tuple[int, ...]]


class KVCacheFullError(HeteroError):
    """No free blocks are left for a sequence to grow."""


@dataclass(frozen=True)
class KVLayerSpec:
    """What one layer keeps per token, in which dtype, where (layers may differ: a bf16 cache
    on the CPU beside a GPU layer's own)."""

    entries: EntryShapes
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    summarized: tuple[str, ...] = ()  # entries whose per-block min and max are kept


@dataclass
class _SequenceBlocks:
    table: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # hashes of the leading full blocks
    root: int = 0  # the parent hash of the first block: its namespace


class PagedKVCache:
    def __init__(self, layers: list[KVLayerSpec], num_blocks: int, block_size: int = 16):
        self.layers = layers
        self.block_size = block_size
        self.num_blocks = num_blocks
        # storage[layer][name]: [*shape[:-1], num_blocks * block_size, shape[-1]], per-head
        # entries head-major ([kv_heads, rows, d]): a decode job reads one head's history, which
        # is then contiguous within each block (the Numba decode kernel ran 2x faster from DRAM
        # than over [rows, kv_heads, d], 16 sequences of 1024 tokens). torch.empty leaves the
        # pages untouched, so memory is committed only as sequences fill blocks.
        rows = num_blocks * block_size
        self.storage = [
            {
                name: torch.empty(
                    (*shape[:-1], rows, shape[-1]), dtype=spec.dtype, device=spec.device
                )
                for name, shape in spec.entries.items()
            }
            for spec in layers
        ]
        # summaries[layer][name] = (minimum, maximum), each [*shape[:-1], num_blocks, d] in the
        # cache dtype: the min and max of stored (already rounded) values are exact in it
        self.summaries = [
            {
                name: tuple(
                    torch.empty(
                        (*shape[:-1], num_blocks, shape[-1]), dtype=spec.dtype, device=spec.device
                    )
                    for _ in range(2)
                )
                for name, shape in spec.entries.items()
                if name in spec.summarized
            }
            for spec in layers
        ]
        self.bytes_per_token = sum(
            t.numel() // rows * t.element_size() for layer in self.storage for t in layer.values()
        )
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, int] = {}
        self._block_of: dict[int, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced, LRU
        self._sequences: dict[int, _SequenceBlocks] = {}
        self._next_id = 0
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        self.sparse_attention = None  # a page_selection.SparseAttention where decode is sparse
        # decode attention's reads, counted per (sequence, layer) and averaged over kv heads:
        # pages read, pages a dense read would take, and how many such reads
        self.decode_pages_read = 0
        self.decode_pages_dense = 0
        self.decode_reads = 0

    @property
    def blocks_free(self) -> int:
        """Blocks a sequence can take: empty ones plus cached ones no sequence uses."""
        return len(self._free) + len(self._evictable)

    @property
    def blocks_used(self) -> int:
        return self.num_blocks - self.blocks_free

    @property
    def blocks_cached(self) -> int:
        return len(self._evictable)

    def block_table(self, seq: int) -> list[int]:
        return self._sequences[seq].table

    def new_sequence(self, prompt: list[int] | None = None, namespace: str = "") -> tuple[int, int]:
        """Open a sequence; with a prompt, share its longest cached prefix of full blocks
        cached in the same `namespace` (a LoRA adapter's name: its keys and values differ).
        Returns (sequence id, number of prompt tokens already in the cache). At least one
        prompt token is always left to compute, so the caller gets logits."""
        seq = self._next_id
        self._next_id += 1
        blocks = _SequenceBlocks(root=hash(namespace) if namespace else 0)
        self._sequences[seq] = blocks
        if not prompt:
            return seq, 0
        usable = (len(prompt) - 1) // self.block_size
        parent = blocks.root
        for i in range(usable):
            h = block_hash(parent, prompt[i * self.block_size : (i + 1) * self.block_size])
            block = self._block_of.get(h)
            if block is None:
                break
            self._ref(block)
            blocks.table.append(block)
            blocks.hashes.append(h)
            parent = h
        cached = len(blocks.table) * self.block_size
        self.prefix_query_tokens += len(prompt)
        self.prefix_hit_tokens += cached
        return seq, cached

    def reserve(self, seq: int, total_tokens: int) -> None:
        """Make room for `total_tokens` tokens of `seq` (all or nothing)."""
        table = self._sequences[seq].table
        needed = -(-total_tokens // self.block_size) - len(table)
        if needed > self.blocks_free:
            raise KVCacheFullError(
                f"KV cache full: a sequence needs {needed} more blocks, {self.blocks_free} free"
            )
        for _ in range(max(needed, 0)):
            block = self._free.pop() if self._free else self._evict()
            self._refs[block] = 1
            table.append(block)

    def commit(self, seq: int, tokens: list[int]) -> None:
        """Name the sequence's full blocks whose KV is computed (`tokens` are exactly those
        tokens), so later prompts can share them."""
        blocks = self._sequences[seq]
        full = len(tokens) // self.block_size
        parent = blocks.hashes[-1] if blocks.hashes else blocks.root
        for i in range(len(blocks.hashes), full):
            h = block_hash(parent, tokens[i * self.block_size : (i + 1) * self.block_size])
            block = blocks.table[i]
            if h not in self._block_of and block not in self._hash_of:
                self._block_of[h] = block
                self._hash_of[block] = h
            blocks.hashes.append(h)
            parent = h

    def free(self, seq: int) -> None:
        for block in reversed(self._sequences.pop(seq).table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def _ref(self, block: int) -> None:
        self._refs[block] += 1
        self._evictable.pop(block, None)

    def _evict(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._hash_of.pop(block)]
        return block

    def slot_array(self, seq: int, start: int, count: int) -> np.ndarray:
        """Flat storage rows of tokens start..start+count of `seq`, int64 (index arithmetic in
        numpy: a few us, where torch's small ops cost ~5-40 us each on a 2-core CPU)."""
        positions = np.arange(start, start + count)
        table = np.array(self._sequences[seq].table, dtype=np.int64)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def write(self, layer: int, slots: torch.Tensor, entries: dict[str, torch.Tensor]) -> None:
        """Store per-token entries ([tokens, *shape] each) at flat storage rows `slots`
        [tokens]."""
        for name, value in entries.items():
            store = self.storage[layer][name]
            rows = value.movedim(0, -2).to(store.dtype)  # [*shape[:-1], tokens, shape[-1]]
            store[..., slots.to(store.device), :] = rows
            if name in self.summaries[layer]:
                self._summarize(self.summaries[layer][name], slots.to(store.device), rows)

    def _summarize(
        self, summary: tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor, rows: torch.Tensor
    ) -> None:
        """Fold rows [*lead, tokens, d] written at `slots` into their blocks' min and max. A
        block's first token (a sequence fills its blocks in order from offset 0) starts its
        summary afresh: the block may hold a summary of a previous owner's tokens. Works on a
        copy of the touched blocks' rows: scatter_reduce_ into the whole store cost ~70 ms a
        decode step at 128K tokens, as much as reading it."""
        blocks, which = torch.unique(slots // self.block_size, return_inverse=True)
        fresh = torch.zeros(len(blocks), dtype=torch.bool, device=blocks.device)
        fresh[which[slots % self.block_size == 0]] = True
        index = which.view(*([1] * (rows.dim() - 2)), -1, 1).expand_as(rows)
        for bound, reduce, start in zip(
            summary, ("amin", "amax"), (torch.inf, -torch.inf), strict=True
        ):
            touched = bound[..., blocks, :].masked_fill(fresh[:, None], start)
            bound[..., blocks, :] = touched.scatter_reduce_(-2, index, rows, reduce)

    def gather(self, layer: int, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """Entries at flat storage rows `slots` (any shape, e.g. [sequences, length]):
        [*slots.shape, *shape] each."""
        gathered = {}
        for name, store in self.storage[layer].items():
            rows = store[..., slots.to(store.device), :]  # [*shape[:-1], *slots.shape, last]
            heads = store.dim() - 2  # leading entry dimensions, moved back behind the slots
            gathered[name] = rows.movedim(tuple(range(heads)), tuple(range(-1 - heads, -1)))
        return gathered


def block_hash(parent: int, tokens: list[int]) -> int:
    return hash((parent, tuple(tokens)))
