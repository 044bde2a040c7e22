"""Aggregate throughput and latency of `hetero serve` at 1, 4, 16 and 64 concurrent streams.

Starts the server on loopback, streams chat completions (greedy, fixed length) from N clients
at once, and prints tokens/s, the ratio to one stream (the baseline measured in the same run),
time to first token and inter-token latency percentiles.

    .venv/bin/python bench/serve_bench.py demo --tokens 64 > bench/results/serve-demo.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_fixtures import running_server  # noqa: E402


async def one_stream(http: httpx.AsyncClient, prompt: str, tokens: int) -> dict:
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        # a chunk per token even where a random model's token decodes to no text
        "logprobs": True,
    }
    start = time.perf_counter()
    arrivals, usage = [], None
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0].get("logprobs"):
                arrivals.append(time.perf_counter())
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return {"ttft": arrivals[0] - start, "gaps": gaps, "tokens": usage["completion_tokens"]}


async def level(url: str, streams: int, tokens: int) -> dict:
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        runs = await asyncio.gather(
            *(
                one_stream(http, f"Request {i}: tell me about experts.", tokens)
                for i in range(streams)
            )
        )
        wall = time.perf_counter() - start
    gaps = sorted(g for r in runs for g in r["gaps"])
    ttfts = sorted(r["ttft"] for r in runs)

    def pct(values, q):
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    return {
        "streams": streams,
        "tok_s": sum(r["tokens"] for r in runs) / wall,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p95": pct(ttfts, 0.95),
        "itl_p50": pct(gaps, 0.5),
        "itl_p95": pct(gaps, 0.95),
        "itl_p99": pct(gaps, 0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="demo")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per reply")
    parser.add_argument("--levels", default="1,4,16,64")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    extra = ["--max-concurrency", str(max(levels)), "--context-length", "1024"]
    extra += ["--dtype", args.dtype]
    if args.threads:
        extra += ["--threads", str(args.threads)]
    cache = Path(os.environ.get("HETERO_CACHE") or tempfile.mkdtemp())
    model_args = [] if args.model == "demo" else [args.model]
    with running_server(cache, *extra, model=model_args[0] if model_args else "demo") as url:
        asyncio.run(level(url, 2, 4))  # warm-up
        rows = [asyncio.run(level(url, n, args.tokens)) for n in levels]
    base = rows[0]["tok_s"]
    cpu = platform.processor() or platform.machine()
    print(f"# hetero serve: {args.model}, {args.tokens} tokens per reply, greedy, logprobs on\n")
    print(
        f"Machine: {cpu}, {psutil.cpu_count(logical=False)} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, torch threads "
        f"{args.threads or 'default'}. Command: `{' '.join(sys.argv)}`\n"
    )
    print(
        "| streams | aggregate tok/s | x one stream | TTFT p50 | TTFT p95 | "
        "ITL p50 | ITL p95 | ITL p99 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['streams']} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f}x | "
            f"{r['ttft_p50'] * 1e3:.0f} ms | {r['ttft_p95'] * 1e3:.0f} ms | "
            f"{r['itl_p50'] * 1e3:.1f} ms | {r['itl_p95'] * 1e3:.1f} ms | "
            f"{r['itl_p99'] * 1e3:.1f} ms |"
        )


if __name__ == "__main__":
    main()
