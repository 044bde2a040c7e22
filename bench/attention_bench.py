"""Decode attention per layer on the CPU: the Numba backend (GQA paged decode, MLA absorbed
latent decode) over float32 and bf16 caches against the torch reference, 1 and 16 sequences.

Prints milliseconds per layer and GB/s of cache read as a fraction of this machine's DRAM read
ceiling (a Numba prange float32 sum). Shapes: GQA as Qwen3-30B-A3B (32 query heads over 4 kv
heads of 128), MLA as DeepSeek-V2-Lite (16 heads, latent rank 512, rope 64, nope and v 128).
Run: .venv/bin/python bench/attention_bench.py [--threads N] [--tokens 1024] [--repeats 20]
"""

from __future__ import annotations

import argparse
import os

import numba
import torch
from torch import nn

from hetero.models.batch import GroupedQueryStep, LatentStep
from hetero.runtime.attention import NUMBA_DECODE, TORCH
from hetero.runtime.batch import ForwardBatch, SequenceSlice
from hetero.runtime.kv_cache import EntryShapes, KVLayerSpec, PagedKVCache
from placement.probe import best_seconds, measure_dram_read_gbs

HEADS, KV_HEADS, HEAD_DIM = 32, 4, 128
MLA_HEADS, RANK, ROPE, NOPE, V_DIM = 16, 512, 64, 128, 128
# the torch reference expands every cached latent through kv_b: seconds per layer at 16 x 1024
TORCH_MLA_MAX_SEQUENCES = 1


def filled_batch(entries: EntryShapes, dtype: torch.dtype, sequences: int, tokens: int):
    """A one-layer cache of `sequences` random histories of `tokens`, each decoding one more."""
    blocks_each = -(-(tokens + 1) // 16)
    kv = PagedKVCache([KVLayerSpec(entries, dtype)], sequences * blocks_each, 16)
    slices = []
    for _ in range(sequences):
        seq, _ = kv.new_sequence()
        kv.reserve(seq, tokens + 1)
        slices.append(SequenceSlice(seq, tokens, 1))
    for store in kv.storage[0].values():
        store.copy_(torch.randn(store.shape))
    return ForwardBatch(slices, kv), kv.bytes_per_token * sequences * (tokens + 1)


def gqa_runs(sequences: int, tokens: int):
    n = sequences
    step = GroupedQueryStep(
        torch.randn(n, HEADS, HEAD_DIM),
        torch.randn(n, KV_HEADS, HEAD_DIM),
        torch.randn(n, KV_HEADS, HEAD_DIM),
        HEAD_DIM**-0.5,
    )
    entries = {"k": (KV_HEADS, HEAD_DIM), "v": (KV_HEADS, HEAD_DIM)}
    for name, backend, dtype in [
        ("torch f32", TORCH, torch.float32),
        ("numba f32", NUMBA_DECODE, torch.float32),
        ("numba bf16", NUMBA_DECODE, torch.bfloat16),
    ]:
        batch, nbytes = filled_batch(entries, dtype, sequences, tokens)
        yield name, (lambda b=batch, a=backend: a.grouped_query(b, 0, step)), nbytes


def mla_runs(sequences: int, tokens: int):
    n = sequences
    kv_b = nn.Linear(RANK, MLA_HEADS * (NOPE + V_DIM), bias=False).requires_grad_(False)
    step = LatentStep(
        torch.randn(n, MLA_HEADS, NOPE),
        torch.randn(n, MLA_HEADS, ROPE),
        torch.randn(n, RANK),
        torch.randn(n, ROPE),
        kv_b,
        V_DIM,
        (NOPE + ROPE) ** -0.5,
    )
    cases = [("numba f32", NUMBA_DECODE, torch.float32)]
    cases.append(("numba bf16", NUMBA_DECODE, torch.bfloat16))
    if sequences <= TORCH_MLA_MAX_SEQUENCES:
        cases.insert(0, ("torch f32", TORCH, torch.float32))
    for name, backend, dtype in cases:
        batch, nbytes = filled_batch({"latent": (RANK,), "k_rope": (ROPE,)}, dtype, n, tokens)
        yield name, (lambda b=batch, a=backend: a.latent(b, 0, step)), nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=1024, help="history per sequence")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    ceiling = measure_dram_read_gbs()
    print(f"DRAM read ceiling: {ceiling:.1f} GB/s; {numba.get_num_threads()} threads")
    with torch.inference_mode():
        for kind, runs in (("GQA", gqa_runs), ("MLA", mla_runs)):
            for sequences in (1, 16):
                for name, run, nbytes in runs(sequences, args.tokens):
                    seconds = best_seconds(run, args.repeats)
                    gbs = nbytes / seconds / 1e9
                    print(
                        f"{kind} {sequences:2d} x {args.tokens} tokens, {name:10s}: "
                        f"{seconds * 1e3:7.3f} ms/layer, cache read {gbs:5.1f} GB/s "
                        f"({gbs / ceiling:.2f} of ceiling)",
                        flush=True,
                    )
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
