"""Paged KV cache: a fixed pool of blocks of `block_size` tokens; each sequence owns a block table.

Each layer declares what it stores per token (`{"k": (kv_heads, head_dim), "v": ...}` for
GQA, `{"latent": (rank,), "k_rope": (dim,)}` for MLA), so every attention kind shares one cache."""

from __future__ import annotations

import torch

from hetero.errors import HeteroError

EntryShapes = dict[str, tuple[int, ...]]


class KVCacheFullError(HeteroError):
    """No free blocks are left for a sequence to grow."""


class PagedKVCache:
    def __init__(
        self,
        layer_entries: list[EntryShapes],
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.block_size = block_size
        self.num_blocks = num_blocks
        # storage[layer][name]: [num_blocks * block_size, *shape]; torch.empty leaves the pages
        # untouched, so memory is committed only as sequences fill blocks.
        self.storage = [
            {
                name: torch.empty((num_blocks * block_size, *shape), dtype=dtype, device=device)
                for name, shape in entries.items()
            }
            for entries in layer_entries
        ]
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.block_tables: dict[int, list[int]] = {}
        self._next_id = 0

    @property
    def blocks_free(self) -> int:
        return len(self._free)

    @property
    def blocks_used(self) -> int:
        return self.num_blocks - len(self._free)

    def new_sequence(self) -> int:
        seq = self._next_id
        self._next_id += 1
        self.block_tables[seq] = []
        return seq

    def reserve(self, seq: int, total_tokens: int) -> None:
        """Make room for `total_tokens` tokens of `seq` (all or nothing)."""
        table = self.block_tables[seq]
        needed = -(-total_tokens // self.block_size) - len(table)
        if needed > len(self._free):
            raise KVCacheFullError(
                f"KV cache full: sequence needs {needed} more blocks, {len(self._free)} free"
            )
        for _ in range(max(needed, 0)):
            table.append(self._free.pop())

    def free(self, seq: int) -> None:
        self._free.extend(reversed(self.block_tables.pop(seq)))

    def slots(self, seq: int, start: int, count: int) -> torch.Tensor:
        """Flat storage rows of tokens start..start+count of `seq`."""
        positions = torch.arange(start, start + count)
        table = torch.tensor(self.block_tables[seq], dtype=torch.long)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def write(self, layer: int, seq: int, start: int, entries: dict[str, torch.Tensor]) -> None:
        slots = self.slots(seq, start, next(iter(entries.values())).shape[0])
        for name, value in entries.items():
            store = self.storage[layer][name]
            store[slots.to(store.device)] = value.to(store.dtype)

    def read(self, layer: int, seq: int, length: int) -> dict[str, torch.Tensor]:
        slots = self.slots(seq, 0, length)
        return {name: store[slots.to(store.device)] for name, store in self.storage[layer].items()}
