"""Sparse decode attention: page summaries kept by the cache as pages fill, the per-page bound
of q.k (never below a page's true maximum), the page selection (sinks, local window, budget),
equality with dense attention when the budget covers every page, retrieval of a planted needle
at every depth, and the `--sparse-attention` budget as given.

Bound tolerance: the bound and the true score are float32 sums of d products, each within
d * 2^-24 * sum |q_i k_i| of its exact value; 1e-5 * sum |q| max|k| covers both at d = 128."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from hetero.bench.needle_keys import needle_case
from hetero.errors import InvalidRequestError
from hetero.models.batch import GroupedQueryStep
from hetero.runtime.attention import NUMBA_DECODE
from hetero.runtime.attention.page_selection import (
    SparseAttention,
    compacted_tables,
    page_bounds,
    page_bounds_reference,
    parse_sparse_attention,
    select_pages,
)
from hetero.runtime.batch import ForwardBatch, SequenceSlice
from hetero.runtime.kv_cache import KVLayerSpec, PagedKVCache

SEED = 18
BLOCK = 16


def cache_holding(keys: torch.Tensor, dtype=torch.float32, chunks=(5, 16, 1, 40)):
    """A one-layer cache with `keys` [length, kv_heads, d] (values alike) written as one
    sequence in uneven chunks, so pages fill across writes -> (cache, sequence id)."""
    length, kv_heads, d = keys.shape
    spec = KVLayerSpec({"k": (kv_heads, d), "v": (kv_heads, d)}, dtype, summarized=("k",))
    kv = PagedKVCache([spec], num_blocks=-(-length // BLOCK) + 3, block_size=BLOCK)
    seq, _ = kv.new_sequence()
    kv.reserve(seq, length)
    start, i = 0, 0
    while start < length:
        count = min(chunks[i % len(chunks)], length - start)
        slots = torch.from_numpy(kv.slot_array(seq, start, count))
        kv.write(0, slots, {"k": keys[start : start + count], "v": keys[start : start + count]})
        start, i = start + count, i + 1
    return kv, seq


def bounds_of(kv: PagedKVCache, seq: int, query: torch.Tensor) -> torch.Tensor:
    """query [kv_heads, groups, d] -> [kv_heads, pages]."""
    tables = torch.tensor([kv.block_table(seq)])
    counts = torch.tensor([tables.shape[1]])
    return page_bounds([query[None]], [kv.summaries[0]["k"]], tables, counts)[0]


def true_page_maxima(keys: torch.Tensor, query: torch.Tensor, dtype) -> torch.Tensor:
    """float64 max over each page's tokens and the group's heads of q.k, on the keys as
    stored -> [kv_heads, pages]."""
    stored = keys.to(dtype).double()
    scores = torch.einsum("hgd,thd->hgt", query.double(), stored).amax(1)  # [kv_heads, length]
    pages = -(-keys.shape[0] // BLOCK)
    padded = torch.full((keys.shape[1], pages * BLOCK), -torch.inf, dtype=torch.float64)
    padded[:, : keys.shape[0]] = scores
    return padded.view(keys.shape[1], pages, BLOCK).amax(-1)


def adversarial_keys(length: int, kv_heads: int, d: int, g: torch.Generator) -> torch.Tensor:
    """Magnitudes from 1e-3 to 1e3 in one page, signs alternating per token, a constant
    channel, whole pages of one repeated key, and a lone huge value."""
    keys = torch.randn(length, kv_heads, d, generator=g)
    keys *= 10.0 ** torch.randint(-3, 4, (length, kv_heads, d), generator=g)
    keys[1::2] *= -1
    keys[:, :, 0] = 7.0
    keys[BLOCK : 2 * BLOCK] = keys[min(BLOCK, length - 1)]
    keys[length // 2, 0, d // 2] = 1e4
    return keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind", ["random", "adversarial"])
@pytest.mark.parametrize("length", [1, 16, 17, 300])
def test_page_bound_is_at_least_every_keys_score(dtype, kind, length):
    g = torch.Generator().manual_seed(SEED)
    kv_heads, groups, d = 2, 3, 128
    if kind == "random":
        keys = torch.randn(length, kv_heads, d, generator=g) * 3
    else:
        keys = adversarial_keys(length, kv_heads, d, g)
    query = torch.randn(kv_heads, groups, d, generator=g)
    query[0, 0, : d // 2] = 0  # zero channels: neither bound of them counts
    kv, seq = cache_holding(keys, dtype)
    bound = bounds_of(kv, seq, query).double()
    truth = true_page_maxima(keys, query, dtype)
    tolerance = 1e-5 * query.abs().sum(-1).amax(-1).double()[:, None] * keys.abs().max()
    assert (bound >= truth - tolerance).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "kv_heads,groups,dims,pages",
    [
        (4, 8, [128], [512, 3]),  # Qwen3-MoE-like GQA, sequences of unlike lengths
        (1, 16, [32, 8], [7]),  # MLA-like: one kv head, a latent and a roped part
        (3, 1, [17], [1, 2, 5]),  # odd width, one query head per kv head, single pages
    ],
)
def test_page_bounds_kernel_matches_the_torch_reference(dtype, kv_heads, groups, dims, pages):
    """Both are float32 sums of d products of the same values: within 1e-5 relative of sum
    |q| max |bound|."""
    g = torch.Generator().manual_seed(SEED)
    blocks = sum(pages) + 2
    summaries = []
    for d in dims:
        a, b = (torch.randn(kv_heads, blocks, d, generator=g).to(dtype) for _ in range(2))
        summaries.append((torch.minimum(a, b), torch.maximum(a, b)))
    queries = [torch.randn(len(pages), kv_heads, groups, d, generator=g) for d in dims]
    tables = torch.zeros(len(pages), max(pages), dtype=torch.int64)
    order = torch.randperm(blocks, generator=g)
    start = 0
    for s, count in enumerate(pages):
        tables[s, :count] = order[start : start + count]
        start += count
    counts = torch.tensor(pages)
    got = page_bounds(queries, summaries, tables, counts)
    want = page_bounds_reference(queries, summaries, tables)
    scale = sum(q.abs().sum(-1).amax() for q in queries) * 3
    for s, count in enumerate(pages):
        torch.testing.assert_close(got[s, :, :count], want[s, :, :count], rtol=0, atol=1e-5 * scale)


def test_summaries_restart_when_a_freed_block_is_reused():
    kv, seq = cache_holding(torch.full((BLOCK, 1, 4), 100.0))
    kv.free(seq)
    other, _ = kv.new_sequence()
    kv.reserve(other, 3)
    small = torch.tensor([[[1.0, -2, 3, 0]], [[0.5, 0, -1, 2]], [[2, 1, 1, 1]]])
    kv.write(0, torch.from_numpy(kv.slot_array(other, 0, 3)), {"k": small, "v": small})
    block = kv.block_table(other)[0]
    lo, hi = (t[:, block] for t in kv.summaries[0]["k"])
    torch.testing.assert_close(lo, small.amin(0), rtol=0, atol=0)
    torch.testing.assert_close(hi, small.amax(0), rtol=0, atol=0)


def test_selection_takes_sinks_local_pages_and_the_best_others():
    bounds = torch.tensor([[[0.0, 9, 1, 8, 2, 3, 0, 0]], [[5.0, 1, 1, 1, 1, 9, 0, 0]]])
    pages, counts = select_pages(
        bounds, torch.tensor([8, 6]), torch.tensor([5, 4]), sinks=1, local=2
    )
    assert counts.tolist() == [[5], [4]]
    assert pages[0, 0, :5].tolist() == [0, 1, 3, 6, 7]  # sink, best two (9, 8), last two
    assert pages[1, 0, :4].tolist() == [0, 1, 4, 5]  # page 6, 7 lie past its 6 pages
    tables = torch.arange(16).view(2, 8) * 3  # any blocks
    lengths = torch.tensor([8 * BLOCK - 5, 6 * BLOCK])
    blocks, tokens = compacted_tables(tables, pages, counts, lengths, BLOCK)
    assert blocks[0, 0, :5].tolist() == [0, 3, 9, 18, 21]
    assert blocks[1, 0, :4].tolist() == [24, 27, 36, 39]
    assert tokens.tolist() == [[5 * BLOCK - 5], [4 * BLOCK]]  # the last page partial


def decode_batch(kv: PagedKVCache, seqs: list[int], lengths: list[int]) -> ForwardBatch:
    """A decode step: each sequence's last token is the new one."""
    slices = [SequenceSlice(s, n - 1, 1) for s, n in zip(seqs, lengths, strict=True)]
    return ForwardBatch(slices, kv)


@pytest.fixture
def selection_of_every_page(monkeypatch) -> list:
    """Decode through the page selection with a budget of every page on sparse layers (where
    `decode_reads` itself takes the dense rows without bounding any page); returns a list that
    grows by one per selection made."""
    from hetero.runtime.attention import numba_decode, page_selection

    made = []

    def select_all(batch, layer, queries, window):
        sparse = batch.kv.sparse_attention
        if window is not None or sparse is None or layer < sparse.dense_layers:
            return page_selection.decode_reads(batch, layer, queries, window)
        made.append(layer)
        pages = (batch.lengths + BLOCK - 1) // BLOCK
        return page_selection.sparse_reads(batch, layer, queries, sparse, pages)

    monkeypatch.setattr(numba_decode, "decode_reads", select_all)
    return made


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_a_budget_of_every_page_reads_exactly_what_dense_reads(dtype, selection_of_every_page):
    g = torch.Generator().manual_seed(SEED)
    kv_heads, heads, d = 2, 8, 32
    spec = KVLayerSpec({"k": (kv_heads, d), "v": (kv_heads, d)}, dtype, summarized=("k",))
    kv = PagedKVCache([spec, spec, spec], num_blocks=64, block_size=BLOCK)
    lengths = [300, 17, 1]
    seqs = []
    for n in lengths:
        seq, _ = kv.new_sequence()
        kv.reserve(seq, n)
        slots = torch.from_numpy(kv.slot_array(seq, 0, n - 1))
        for layer in range(3):
            old = torch.randn(n - 1, kv_heads, d, generator=g)
            kv.write(layer, slots, {"k": old, "v": old})
        seqs.append(seq)
    step = GroupedQueryStep(
        torch.randn(3, heads, d, generator=g),
        torch.randn(3, kv_heads, d, generator=g),
        torch.randn(3, kv_heads, d, generator=g),
        d**-0.5,
    )
    batch = decode_batch(kv, seqs, lengths)
    dense = NUMBA_DECODE.grouped_query(batch, 2, step)
    kv.sparse_attention = SparseAttention(Fraction(1), dense_layers=0)
    sparse = NUMBA_DECODE.grouped_query(batch, 2, step)
    assert selection_of_every_page
    torch.testing.assert_close(sparse, dense, rtol=0, atol=0)
    assert kv.decode_pages_read == kv.decode_pages_dense  # every page, both times


def test_a_budget_of_every_page_skips_the_bounds(monkeypatch):
    from hetero.runtime.attention import page_selection

    kv = PagedKVCache(
        [KVLayerSpec({"k": (1, 4), "v": (1, 4)}, summarized=("k",))], 4, block_size=BLOCK
    )
    kv.sparse_attention = SparseAttention(2048, dense_layers=0)
    seq, _ = kv.new_sequence()
    kv.reserve(seq, 40)
    kv.write(0, torch.from_numpy(kv.slot_array(seq, 0, 40)), {"k": torch.ones(40, 1, 4)})
    monkeypatch.setattr(page_selection, "page_bounds", None)  # would fail if called
    reads = page_selection.decode_reads(decode_batch(kv, [seq], [40]), 0, [], None)
    assert reads.counts.tolist() == [[40]]


def test_needle_page_is_selected_at_every_depth_reading_a_sixteenth():
    length, depths, seeds = 4096, np.linspace(0, 1, 11), range(2)
    sparse = SparseAttention(Fraction(1, 16))
    pages = length // BLOCK
    budget = sparse.budget_pages(pages, BLOCK)
    for depth in depths:
        for seed in seeds:
            case = needle_case(length, depth, seed)
            kv, seq = cache_holding(case.keys, torch.bfloat16, chunks=(1000, 7))
            bounds = bounds_of(kv, seq, case.query)[None]
            chosen, _ = select_pages(bounds, torch.tensor([pages]), torch.tensor([budget]), 1, 2)
            for h in range(case.keys.shape[1]):
                assert case.needle // BLOCK in chosen[0, h].tolist(), (depth, seed, h)


@pytest.mark.parametrize("text,budget", [("1/16", Fraction(1, 16)), ("2048", 2048), ("1", 1)])
def test_sparse_attention_budget_parses(text, budget):
    assert parse_sparse_attention(text).budget == budget


@pytest.mark.parametrize("text", ["0", "0/4", "-3", "3/2", "1/0", "half", "1.5", ""])
def test_sparse_attention_refuses_an_unusable_budget(text):
    with pytest.raises(InvalidRequestError, match="--sparse-attention"):
        parse_sparse_attention(text)


def test_sparse_attention_refuses_a_budget_beyond_the_context():
    with pytest.raises(InvalidRequestError, match="exceeds the context"):
        parse_sparse_attention("8192").check_context(4096)
    parse_sparse_attention("1/2").check_context(16)


def test_budget_pages_never_drop_the_sinks_and_local_pages():
    sparse = SparseAttention(Fraction(1, 32), sink_pages=1, local_pages=2)
    assert sparse.budget_pages(4, BLOCK) == 3
    assert sparse.budget_pages(2, BLOCK) == 2
    assert sparse.budget_pages(1024, BLOCK) == 32
    assert SparseAttention(100).budget_pages(1024, BLOCK) == 7


# GQA over 4K tokens; MLA over 1K (its torch prefill expands the whole history per chunk)
@pytest.mark.parametrize("family,length", [("qwen3", 4090), ("deepseek_v2", 1000)])
def test_greedy_tokens_over_a_long_context_with_every_page_equal_dense(
    family, length, checkpoint_factory, selection_of_every_page
):
    import hetero

    path, _ = checkpoint_factory(family, max_position_embeddings=4200)
    model = hetero.load(path, dtype="float32", progress=False)
    model.tokenizer.eos_token_ids.clear()
    object.__setattr__(model.config, "eos_token_ids", ())
    g = torch.Generator().manual_seed(SEED)
    prompt = torch.randint(0, model.config.vocab_size, (length,), generator=g).tolist()
    dense = model.generate(prompt, max_new_tokens=6)
    model.sparse_attention = SparseAttention(Fraction(1), dense_layers=1)
    sparse = model.generate(prompt, max_new_tokens=6)
    assert selection_of_every_page
    assert sparse.token_ids == dense.token_ids


def test_served_sparse_attention_reads_fewer_pages_in_metrics(tmp_path):
    import httpx
    from server_fixtures import running_server

    args = ["--sparse-attention", "1/16", "--context-length", "2048", "--max-concurrency", "1"]
    with running_server(tmp_path, *args) as url:
        body = {"prompt": "one two three " * 300, "max_tokens": 4, "temperature": 0}
        reply = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        metrics = {
            line.split()[0]: float(line.split()[1])
            for line in httpx.get(url + "/metrics").text.splitlines()
            if line.startswith("hetero_kv_pages_read")
        }
    # the demo has four layers and its first two stay dense: (2 P + 2 P / 16) / 4 P of the
    # pages a dense read takes, for a prompt of P pages (~100)
    assert 0.5 < metrics["hetero_kv_pages_read_fraction"] < 0.56
    assert metrics["hetero_kv_pages_read_per_token"] > 0
