"""Which KV rows a decode step reads: every row (dense), a sliding window's, or a Quest-style
sparse selection of pages (Tang et al. 2024, "Quest"): an upper bound of q.k per page from the
cache's per-page key minima and maxima, the top pages by it plus attention sinks (the first
pages) and a local window (the last ones).

The selection is a function of (page summaries, queries) returning per-sequence, per-kv-head
page lists in ascending order (`select_pages`), as block tables with token counts
(`compacted_tables`, what a block-table kernel takes) or flat rows (`page_rows`, what the CPU
kernels take); each kernel reads those pages in place. With the budget at every page it
returns every row in order, so sparse attention equals dense exactly."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np
import torch

from hetero.errors import InvalidRequestError
from hetero.runtime.kernel_inputs import KERNEL_STORE_DTYPES, kernel_store

if TYPE_CHECKING:  # the batch module imports the backends, which import this one
    from hetero.runtime.batch import ForwardBatch


@dataclass(frozen=True)
class SparseAttention:
    """How many pages a sparse decode step reads per kv head: `budget` tokens (an int) or a
    fraction of each sequence's pages, counting the sink and local pages; layers below
    `dense_layers` read everything (early layers attend broadly: Quest keeps its first two
    dense)."""

    budget: int | Fraction
    sink_pages: int = 1
    local_pages: int = 2  # >= 1: the newest page holds the token being decoded
    dense_layers: int = 2

    def budget_pages(self, pages: int, block_size: int) -> int:
        """Pages to read of a sequence of `pages` pages: never fewer than the sinks and the
        local window, never more than there are."""
        if isinstance(self.budget, Fraction):
            wanted = math.ceil(self.budget * pages)
        else:
            wanted = -(-self.budget // block_size)
        return min(pages, max(wanted, self.sink_pages + self.local_pages))

    def describe(self) -> str:
        budget = self.budget
        read = f"{budget} of the pages" if isinstance(budget, Fraction) else f"{budget} tokens"
        return (
            f"sparse decode attention: {read} per kv head ({self.sink_pages} first and "
            f"{self.local_pages} last pages among them) after the first {self.dense_layers} "
            f"layers"
        )

    def check_context(self, context: int) -> None:
        """Refuse a token budget beyond the context: a sparse run that could never be sparse."""
        if isinstance(self.budget, int) and self.budget > context:
            raise InvalidRequestError(
                f"--sparse-attention {self.budget} tokens exceeds the context of {context} "
                f"tokens; give a smaller budget or a fraction such as 1/16"
            )


def parse_sparse_attention(text: str) -> SparseAttention:
    """`--sparse-attention` as given: a fraction "1/16" (0 < f <= 1) or a token count "2048"."""
    try:
        budget: int | Fraction = Fraction(text) if "/" in text else int(text)
    except (ValueError, ZeroDivisionError):
        budget = 0
    if not 0 < budget <= (1 if isinstance(budget, Fraction) else budget):
        raise InvalidRequestError(
            f"--sparse-attention {text!r}: give a fraction of the context in (0, 1], e.g. 1/16, "
            f"or a number of tokens > 0, e.g. 2048"
        )
    return SparseAttention(budget)


@dataclass(frozen=True)
class DecodeReads:
    """The rows each decoding sequence's attention reads: slots int64 [n, kv_heads or 1,
    longest] (rows past a count are ignored), counts int64 [n, kv_heads or 1]; pages_read
    (averaged over kv heads) and pages_dense, summed over the sequences, for the metrics."""

    slots: torch.Tensor
    counts: torch.Tensor
    pages_read: float
    pages_dense: int


def page_bounds(
    queries: list[torch.Tensor],
    summaries: list[tuple[torch.Tensor, torch.Tensor]],
    tables: torch.Tensor,
    page_counts: torch.Tensor,
) -> torch.Tensor:
    """Each page's upper bound of q.k over its keys, the maximum over a kv head's group of
    query heads (a page that holds one head's top key must rank for that head; a sum would
    let the other heads drown it).

    queries: per key part (GQA: the keys; MLA: the latent and the roped part), float32 [n,
    kv_heads, groups, d_i]; summaries: the matching (minimum, maximum), [kv_heads, blocks, d_i];
    tables: int64 [n, pages], the blocks of each sequence's pages; page_counts: int64 [n] ->
    float32 [n, kv_heads, pages], anything past a sequence's pages. The Numba kernel where
    the summaries are in CPU memory in a dtype it reads, `page_bounds_reference` otherwise."""
    stores = [t for pair in summaries for t in pair]
    if not all(t.device.type == "cpu" and t.dtype in KERNEL_STORE_DTYPES for t in stores):
        return page_bounds_reference(queries, summaries, tables)
    # imported here: Numba's import costs ~80 MB and a model torch runs may never decode
    from cpu_kernels.page_bounds import accumulate_page_bounds

    n, kv_heads, groups, _ = queries[0].shape
    total = np.zeros((n, kv_heads, groups, tables.shape[1]), np.float32)
    for q, (lo, hi) in zip(queries, summaries, strict=True):
        accumulate_page_bounds(
            q.detach().float().contiguous().numpy(),
            kernel_store(lo),
            kernel_store(hi),
            tables.numpy(),
            page_counts.numpy(),
            total,
        )
    return torch.from_numpy(total).amax(dim=2)


def page_bounds_reference(
    queries: list[torch.Tensor],
    summaries: list[tuple[torch.Tensor, torch.Tensor]],
    tables: torch.Tensor,
) -> torch.Tensor:
    """`page_bounds` in torch, for any device and dtype: sum_i max(q_i lo_i, q_i hi_i) =
    q+ . hi + q- . lo with q+ = max(q, 0) and q- = min(q, 0), two matmuls over gathered
    copies of the summaries."""
    total = None
    for q, (lo, hi) in zip(queries, summaries, strict=True):
        lo_t = lo[:, tables].float().permute(1, 0, 3, 2)  # [n, kv_heads, d, pages]
        hi_t = hi[:, tables].float().permute(1, 0, 3, 2)
        part = q.clamp(min=0) @ hi_t + q.clamp(max=0) @ lo_t  # [n, kv_heads, groups, pages]
        total = part if total is None else total + part
    return total.amax(dim=2)


def select_pages(
    bounds: torch.Tensor, page_counts: torch.Tensor, budgets: torch.Tensor, sinks: int, local: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pages to read: the first `sinks` and last `local` of each sequence's page_counts[s]
    pages, and the best others by `bounds` [n, kv_heads, pages] up to budgets[s] pages in all
    (budgets[s] <= page_counts[s]) -> (pages int64 [n, kv_heads, max budget] in ascending order,
    entries past counts[s, h] unused; counts int64 [n, kv_heads])."""
    n, kv_heads, longest = bounds.shape
    page = torch.arange(longest, device=bounds.device)
    own = page_counts[:, None, None]
    forced = (page < sinks) | (page >= own - local)
    score = bounds.masked_fill(forced, math.inf).masked_fill(page >= own, -math.inf)
    k = int(budgets.max())
    best = score.topk(k, dim=-1).indices  # [n, kv_heads, k], best first
    keep = (torch.arange(k, device=best.device) < budgets[:, None, None]).expand_as(best)
    # ascending, the pages past a sequence's budget sorted behind its own (as its last page)
    last = (page_counts - 1)[:, None, None].expand_as(best)
    pages = torch.where(keep, best, longest).sort(dim=-1).values
    return torch.minimum(pages, last), keep.sum(-1)


def compacted_tables(
    tables: torch.Tensor,
    pages: torch.Tensor,
    counts: torch.Tensor,
    lengths: torch.Tensor,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selected pages as block tables: what a paged decode kernel that takes a block table
    and a token count per sequence reads (gpu_kernels/paged_attention.py; with one kv head,
    as MLA has, [n, 1, k] is its [n, k]). tables int64 [n, pages] (blocks), pages [n, kv_heads,
    k] ascending with the sequence's last page among them, counts [n, kv_heads], lengths [n]
    -> (blocks int64 [n, kv_heads, k], token counts int64 [n, kv_heads]); only the last page
    may be partial."""
    n, kv_heads, k = pages.shape
    blocks = tables.gather(1, pages.reshape(n, -1)).view(n, kv_heads, k)
    last_fill = lengths - (lengths - 1) // block_size * block_size  # 1..block_size
    return blocks, (counts - 1) * block_size + last_fill[:, None]


def page_rows(blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat rows of blocks [n, kv_heads, k] -> int64 [n, kv_heads, k * block_size]."""
    offsets = torch.arange(block_size, device=blocks.device)
    return (blocks[..., None] * block_size + offsets).flatten(-2)


def window_rows(
    read_slots: torch.Tensor, lengths: torch.Tensor, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A sliding window's rows: the last `window` tokens of each history (a query at position
    p sees keys p - window < position <= p, as transformers' sliding-window mask).
    read_slots int64 [n, longest], lengths [n] -> (slots [n, 1, min(window, longest)],
    counts [n, 1])."""
    width = min(window, read_slots.shape[1])
    start = (lengths - window).clamp(min=0)
    offsets = torch.arange(width, device=read_slots.device)
    index = (start[:, None] + offsets).clamp(max=read_slots.shape[1] - 1)
    return read_slots.gather(1, index)[:, None], lengths.clamp(max=window)[:, None]


def decode_reads(
    batch: ForwardBatch, layer: int, queries: list[torch.Tensor], window: int | None
) -> DecodeReads:
    """What a decode-only batch's attention at `layer` reads: the window's rows on a
    sliding-window layer; a sparse selection where the cache has a SparseAttention, this layer
    is past its dense layers and the cache keeps page summaries; every row otherwise.
    queries: as `page_bounds` takes them (used only for a sparse selection)."""
    kv, lengths = batch.kv, batch.lengths
    block = kv.block_size
    page_counts = (lengths + block - 1) // block
    dense_pages = int(page_counts.sum())
    if window is not None:
        slots, counts = window_rows(batch.read_slots, lengths, window)
        pages = (lengths - 1) // block - (lengths - counts[:, 0]) // block + 1
        return DecodeReads(slots, counts, float(pages.sum()), dense_pages)
    sparse, summaries = kv.sparse_attention, kv.summaries[layer]
    if sparse is not None and layer >= sparse.dense_layers and summaries:
        budgets = torch.tensor([sparse.budget_pages(int(p), block) for p in page_counts])
        if (budgets < page_counts).any():
            return sparse_reads(batch, layer, queries, sparse, budgets)
    # dense, or a budget of every page: the same rows in the same order, without the bounds
    counts = lengths[:, None]
    return DecodeReads(batch.read_slots[:, None], counts, float(dense_pages), dense_pages)


def sparse_reads(
    batch: ForwardBatch,
    layer: int,
    queries: list[torch.Tensor],
    sparse: SparseAttention,
    budgets: torch.Tensor,
) -> DecodeReads:
    """`decode_reads`' sparse selection: budgets[s] pages of each sequence per kv head."""
    kv, lengths, block = batch.kv, batch.lengths, batch.kv.block_size
    page_counts = (lengths + block - 1) // block
    summaries = kv.summaries[layer]
    tables = batch.read_slots[:, ::block] // block  # [n, longest pages]
    parts = [
        tuple(t if t.dim() == 3 else t[None] for t in pair) for pair in summaries.values()
    ]  # MLA's summaries have no head dimension: one kv head
    bounds = page_bounds(queries, parts, tables, page_counts)
    pages, chosen = select_pages(
        bounds, page_counts, budgets, sparse.sink_pages, sparse.local_pages
    )
    blocks, counts = compacted_tables(tables, pages, chosen, lengths, block)
    read = float(chosen.float().mean(1).sum())
    return DecodeReads(page_rows(blocks, block), counts, read, int(page_counts.sum()))
