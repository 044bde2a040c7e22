"""Paged decode attention (Triton, split-K) against a float64 reference over each sequence's
gathered rows: one token, a partial last page, pages shuffled over the pool, a compacted table
of selected pages, histories cut into more splits than some sequences fill."""

import pytest
import torch
from gpu_kernel_device import DEVICE, DTYPES, randn, require_triton, seeded_generator

require_triton()

from gpu_attention_reference import assert_within, attention_reference  # noqa: E402
from gpu_paged_cache import random_block_tables, sequence_rows  # noqa: E402

from gpu_kernels.launch_checks import KernelInputError  # noqa: E402
from gpu_kernels.paged_attention import paged_decode_attention  # noqa: E402

LENGTHS = {"one token": [1], "partial pages": [7, 33, 16], "long and short": [150, 1, 70]}


def check_decode(gen, dtype, lengths, block_size, heads, kv_heads, d, dv, splits, tables=None):
    if tables is None:
        tables, pages = random_block_tables(lengths, block_size, gen)
    else:
        pages = int(tables.max()) + 1
    rows = pages * block_size
    q = randn((len(lengths), heads, d), dtype, gen)
    k_store = randn((kv_heads, rows, d), dtype, gen)
    v_store = randn((kv_heads, rows, dv), dtype, gen)
    context_lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    scale = d**-0.5
    got = paged_decode_attention(
        q, k_store, v_store, tables, context_lens, block_size, scale, splits
    )
    assert got.shape == (len(lengths), heads, dv) and got.dtype == dtype
    for s, length in enumerate(lengths):
        seq_rows = sequence_rows(tables[s], length, block_size).to(DEVICE)
        k = k_store[:, seq_rows].transpose(0, 1)  # [length, kv_heads, d]
        v = v_store[:, seq_rows].transpose(0, 1)
        visible = torch.ones((1, length), dtype=torch.bool)
        want, bound = attention_reference(q[s : s + 1], k, v, visible, scale)
        assert_within(got[s : s + 1], want, bound)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize(
    "block_size,heads,kv_heads,d,dv", [(16, 4, 2, 16, 16), (5, 3, 3, 24, 8), (8, 8, 1, 32, 32)]
)  # GQA; odd page size, widths and no grouping; all heads on one kv head
def test_paged_decode_matches_reference(
    request, dtype, lengths, splits, block_size, heads, kv_heads, d, dv
):
    gen = seeded_generator(request)
    check_decode(gen, dtype, lengths, block_size, heads, kv_heads, d, dv, splits)


def test_paged_decode_splits_a_long_history_of_one_sequence_by_default(request):
    # one sequence leaves the GPU idle unless its history is shared out (tuning.py's split
    # rule: no split under 256 tokens, so 600 tokens make 3)
    gen = seeded_generator(request)
    check_decode(gen, torch.float16, [600], 16, 4, 2, 16, 16, splits=None)


def test_paged_decode_reads_a_compacted_table_of_selected_pages(request):
    # sparse attention passes only the pages it selected, in order; the last one partial
    gen = seeded_generator(request)
    block_size = 4
    tables = torch.tensor([[9, 2, 5, 0], [7, 7, 1, 3]], dtype=torch.int32, device=DEVICE)
    check_decode(gen, torch.float32, [14, 6], block_size, 4, 2, 16, 16, splits=2, tables=tables)


def test_paged_decode_rejects_queries_unlike_the_store_dtype():
    q, store = torch.zeros(1, 2, 16), torch.zeros(2, 16, 16, dtype=torch.float16)
    table, lens = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(KernelInputError, match="differ in dtype"):
        paged_decode_attention(q, store, store, table, lens, 16, 1.0)


def test_paged_decode_rejects_a_table_per_sequence_missing():
    q, store = torch.zeros(2, 2, 16), torch.zeros(2, 16, 16)
    table, lens = torch.zeros(1, 1, dtype=torch.int32), torch.ones(2, dtype=torch.int32)
    with pytest.raises(KernelInputError, match=r"block_tables: expected \[seqs, max_blocks\]"):
        paged_decode_attention(q, store, store, table, lens, 16, 1.0)
