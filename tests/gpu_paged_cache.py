"""Random paged caches for the decode kernels' tests: pages shuffled over the pool, tables padded
with pages a sequence does not own, and the reference's view of a sequence's rows."""

from __future__ import annotations

import torch
from gpu_kernel_device import DEVICE


def random_block_tables(
    lengths: list[int], block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, int]:
    """Each sequence's pages drawn without replacement from a shuffled pool, the table's unused
    entries pointing at other sequences' pages (the kernel must not read them) -> (int32
    [seqs, max_blocks] on DEVICE, pages in the pool)."""
    pages = [-(-n // block_size) for n in lengths]
    width, total = max(pages), sum(pages) + 1
    pool = torch.randperm(total, generator=generator)
    tables, start = torch.empty((len(lengths), width), dtype=torch.int32), 0
    for s, count in enumerate(pages):
        tables[s] = pool[torch.arange(start, start + width) % total]
        start += count
    return tables.to(DEVICE), total


def sequence_rows(table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Flat storage rows of a sequence's first `length` tokens, in order: int64 [length]."""
    positions = torch.arange(length)
    return table.cpu().long()[positions // block_size] * block_size + positions % block_size
