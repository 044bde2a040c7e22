"""Sparse decode attention on the CPU against dense, one layer of the bench model's attention
(Qwen3-30B-A3B: 32 query heads over 4 kv heads of 128) over a bf16 paged cache, one sequence,
and the page selection's retrieval of a planted needle at every depth.

Prints, per context: milliseconds per layer of decode attention (the Numba backend: write,
page bounds, selection, kernel) dense and at each sparse budget, measured interleaved in one
process (medians), their ratio to dense, and the KV bytes read per layer against the cache's
size; then the needle's hit rate by depth (`hetero.bench.needle_keys`).
Run: .venv/bin/python bench/sparse_attention_bench.py [--contexts 8192 32768 131072]
     [--hit-context 8192] [--seeds 4] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from fractions import Fraction

import numba
import numpy as np
import torch

from hetero.bench.needle_keys import needle_case
from hetero.models.batch import GroupedQueryStep
from hetero.runtime.attention import NUMBA_DECODE
from hetero.runtime.attention.page_selection import SparseAttention, page_bounds, select_pages
from hetero.runtime.batch import ForwardBatch, SequenceSlice
from hetero.runtime.kv_cache import KVLayerSpec, PagedKVCache

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 4, 128, 16
BENCH_LAYERS, QWEN3_30B_LAYERS = 8, 48


def filled_cache(keys: torch.Tensor, values: torch.Tensor) -> tuple[PagedKVCache, int]:
    """A one-layer bf16 cache with page summaries holding keys and values [length, kv, d]."""
    length, kv_heads, d = keys.shape
    spec = KVLayerSpec({"k": (kv_heads, d), "v": (kv_heads, d)}, torch.bfloat16, summarized=("k",))
    kv = PagedKVCache([spec], num_blocks=-(-length // BLOCK) + 1, block_size=BLOCK)
    seq, _ = kv.new_sequence()
    kv.reserve(seq, length + 1)
    for start in range(0, length, 8192):
        end = min(start + 8192, length)
        slots = torch.from_numpy(kv.slot_array(seq, start, end - start))
        kv.write(0, slots, {"k": keys[start:end], "v": values[start:end]})
    return kv, seq


def decode_ms(context: int, budgets: list[Fraction], repeats: int) -> dict:
    case = needle_case(context, 0.5, seed=0, kv_heads=KV_HEADS, groups=HEADS // KV_HEADS)
    values = torch.randn(context, KV_HEADS, HEAD_DIM)
    kv, seq = filled_cache(case.keys, values)
    batch = ForwardBatch([SequenceSlice(seq, context, 1)], kv)
    g = torch.Generator().manual_seed(1)
    q = case.query.reshape(1, HEADS, HEAD_DIM)
    new = torch.randn(1, KV_HEADS, HEAD_DIM, generator=g)
    step = GroupedQueryStep(q, new, new, HEAD_DIM**-0.5)
    modes = [None, *(SparseAttention(b, dense_layers=0) for b in budgets)]
    times: dict = {m: [] for m in modes}
    pages: dict = {}
    for _ in range(repeats + 1):  # the first round compiles and warms
        for mode in modes:
            kv.sparse_attention = mode
            read_before = kv.decode_pages_read
            start = time.perf_counter()
            NUMBA_DECODE.grouped_query(batch, 0, step)
            times[mode].append(time.perf_counter() - start)
            pages[mode] = kv.decode_pages_read - read_before
    return {m: (float(np.median(t[1:])) * 1e3, pages[m]) for m, t in times.items()}


def needle_hits(context: int, budget: Fraction, margin: float, seeds: int, depths) -> list:
    """Share of (seed, kv head) whose selection holds the needle's page, per depth."""
    sparse = SparseAttention(budget)
    pages = -(-(context) // BLOCK)
    budget_pages = torch.tensor([sparse.budget_pages(pages, BLOCK)])
    rates = []
    for depth in depths:
        hits = total = 0
        for seed in range(seeds):
            case = needle_case(context, depth, seed, margin=margin)
            kv, seq = filled_cache(case.keys, case.keys)
            tables = torch.tensor([kv.block_table(seq)])
            counts = torch.tensor([pages])
            bounds = page_bounds([case.query[None]], [kv.summaries[0]["k"]], tables, counts)
            chosen, _ = select_pages(bounds, counts, budget_pages, 1, 2)
            for h in range(case.keys.shape[1]):
                hits += case.needle // BLOCK in chosen[0, h].tolist()
                total += 1
        rates.append(hits / total)
    return rates


def e2e_decode_tok_s(
    model_dir: str, context: int, budgets: list[Fraction], new_tokens: int, rounds: int
) -> dict:
    """Decode tok/s of a model after a `context`-token random prompt, dense and at each budget:
    one bf16 cache with page summaries, the prompt prefilled once and then shared through the
    prefix cache, the modes taken in turn for `rounds` rounds (medians)."""
    import hetero
    from hetero.runtime.engine import Engine, Request

    model = hetero.load(model_dir, progress=False)
    model.sparse_attention = SparseAttention(budgets[0])  # allocates the summaries
    kv = model.new_kv_cache(context + new_tokens + BLOCK, 2, "bf16")
    engine = Engine(model.net, model.tokenizer, kv, max_running=1, glue_threads=model.glue_threads)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, model.config.vocab_size, (context,), generator=g).tolist()
    modes = [None, *(SparseAttention(b) for b in budgets)]
    rates: dict = {m: [] for m in modes}
    results: list = []
    for _ in range(rounds + 1):  # the first round prefills and warms
        for mode in modes:
            kv.sparse_attention = mode
            results.clear()
            engine.submit(Request(prompt, new_tokens), lambda e: results.append(e.result))
            while not any(results):
                engine.step()
            rates[mode].append(next(r for r in results if r).decode_tok_s)
    return {m: float(np.median(r[1:])) for m, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--contexts", type=int, nargs="*", default=[8192, 32768, 131072], help="none: no timing"
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--hit-context", type=int, default=8192)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--e2e", metavar="MODEL_DIR", help="also decode tok/s of this model")
    parser.add_argument("--e2e-contexts", type=int, nargs="+", default=[8192])
    args = parser.parse_args()
    numba.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    budgets = [Fraction(1, 16), Fraction(1, 32)]
    print(
        f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )
    if args.contexts:
        kv_token_layer = 2 * KV_HEADS * HEAD_DIM * 2  # k and v, bf16
        print(
            f"KV cache: {kv_token_layer} B per token and layer (bf16); page summaries (min and "
            f"max of the keys per 16-token page) add 1/16 of it"
        )
        print()
        print(
            "| context | KV per layer | KV total, bench model (8 layers) / Qwen3-30B-A3B (48) | "
            "mode | ms per layer | x dense | KV pages read | bytes read per layer |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for context in args.contexts:
            results = decode_ms(context, budgets, args.repeats)
            dense_ms = results[None][0]
            size = context * kv_token_layer
            for mode, (ms, pages) in results.items():
                name = "dense" if mode is None else f"sparse {mode.budget}"
                total_pages = -(-(context + 1) // BLOCK)
                summary_bytes = 0 if mode is None else total_pages * kv_token_layer
                read = pages * BLOCK * kv_token_layer + summary_bytes
                print(
                    f"| {context} | {size / 2**20:.0f} MiB | "
                    f"{size * BENCH_LAYERS / 2**30:.2f} / "
                    f"{size * QWEN3_30B_LAYERS / 2**30:.2f} GiB "
                    f"| {name} | {ms:.2f} | {dense_ms / ms:.2f} | {pages:.0f} | "
                    f"{read / 2**20:.1f} MiB |"
                )
    if args.e2e:
        print(f"\nEnd to end, {args.e2e}: decode tok/s (16 tokens, medians of 3 rounds)\n")
        print("| context | " + " | ".join(["dense", *(f"sparse {b}" for b in budgets)]) + " |")
        print("|---|" + "---|" * (1 + len(budgets)))
        for context in args.e2e_contexts:
            rates = list(e2e_decode_tok_s(args.e2e, context, budgets, 16, 3).values())
            cells = [f"{r:.2f} ({r / rates[0]:.2f}x)" for r in rates]
            print(f"| {context} | " + " | ".join(cells) + " |")
    print()
    depths = np.linspace(0, 1, 11)
    print(
        f"Needle page selected ({args.hit_context} tokens, {args.seeds} seeds x 2 kv heads "
        f"per depth; margin: the needle's score above the largest other, in score std devs)"
    )
    print()
    print("| budget | margin | " + " | ".join(f"{d:.1f}" for d in depths) + " |")
    print("|---|---|" + "---|" * len(depths))
    for budget in budgets:
        for margin in (1.0, 2.0, 4.0):
            rates = needle_hits(args.hit_context, budget, margin, args.seeds, depths)
            print(f"| {budget} | {margin:g} | " + " | ".join(f"{r:.2f}" for r in rates) + " |")
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
