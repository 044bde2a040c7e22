"""Aggregate throughput and latency of `hetero serve` at 1, 4, 16 and 64 concurrent streams.

Starts the server on loopback (the demo model written to its cache first, as a user's cache
holds it after the first run), streams chat completions (greedy, fixed length, logprobs on so
that every token makes a chunk) from N clients at once, and prints tokens/s, the ratio to one
stream (the baseline measured in the same run), time to first token and inter-token latency
percentiles.

The clients share the machine's cores with the server, so they are kept cheap, about a fifth of
httpx's cost per token: one process on uvloop, each stream a plain HTTP/1.1 POST over asyncio
streams whose chunked body is read chunk by chunk. The SSE text is only searched for what marks
a token's chunk (its logprobs) and the usage chunk; only the usage chunk is parsed as JSON. A
token's arrival time is when the read that brought its chunk returned.

    .venv/bin/python bench/serve_bench.py demo --tokens 64 > bench/results/serve-demo.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_fixtures import running_server  # noqa: E402

# what marks a chunk in the server's SSE text (its JSON as `json.dumps` writes it): a token's
# chunk carries logprobs, the last chunk the usage
TOKEN_CHUNK = b'"logprobs": {'
USAGE_CHUNK = b'"usage": {'


async def post_streamed(url: str, path: str, body: dict) -> AsyncIterator[bytes]:
    """POST `body` as JSON; yield the pieces of the chunked response body as they arrive."""
    address = urlsplit(url)
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    try:
        payload = json.dumps(body).encode()
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {address.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        status = await reader.readline()
        headers = b""
        while (line := await reader.readline()) not in (b"\r\n", b""):
            headers += line.lower()
        if status.split()[1:2] != [b"200"] or b"transfer-encoding: chunked" not in headers:
            raise RuntimeError(f"{path}: {status.decode().strip()}, not a 200 chunked stream")
        while size := int((await reader.readline()).split(b";")[0], 16):
            yield (await reader.readexactly(size + 2))[:-2]  # each chunk ends with CRLF
    finally:
        writer.close()


async def one_stream(url: str, prompt: str, tokens: int) -> dict:
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
    arrivals, usage, pending = [], None, b""
    async for data in post_streamed(url, "/v1/chat/completions", body):
        now = time.perf_counter()
        *events, pending = (pending + data).split(b"\n\n")
        for event in events:
            if TOKEN_CHUNK in event:
                arrivals.append(now)
            elif USAGE_CHUNK in event:
                usage = json.loads(event.removeprefix(b"data: "))["usage"]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return {"ttft": arrivals[0] - start, "gaps": gaps, "tokens": usage["completion_tokens"]}


async def level(url: str, streams: int, tokens: int) -> dict:
    start = time.perf_counter()
    runs = await asyncio.gather(
        *(one_stream(url, f"Request {i}: tell me about experts.", tokens) for i in range(streams))
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
    if args.model == "demo":
        # a server that writes the demo itself runs torch's thread pools differently (and
        # slower when the machine is quiet) for the rest of its life
        env = dict(os.environ, HETERO_CACHE=str(cache))
        subprocess.run(
            [sys.executable, "-m", "hetero", "demo"], env=env, check=True, stdout=subprocess.DEVNULL
        )
    with running_server(cache, *extra, model=args.model) as url:
        uvloop.run(level(url, 2, 4))  # warm-up
        rows = [uvloop.run(level(url, n, args.tokens)) for n in levels]
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
