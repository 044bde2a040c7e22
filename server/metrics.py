"""Prometheus text exposition of the engine's counters and gauges."""

from __future__ import annotations

from server.state import ServerState


def render_metrics(state: ServerState) -> str:
    engine, kv = state.engine, state.engine.kv
    queried = kv.prefix_query_tokens
    rows = [
        ("hetero_requests_total", "counter", "Requests accepted", engine.requests_total),
        ("hetero_prompt_tokens_total", "counter", "Prompt tokens", engine.prompt_tokens_total),
        (
            "hetero_generation_tokens_total",
            "counter",
            "Generated tokens",
            engine.completion_tokens_total,
        ),
        (
            "hetero_tokens_per_second",
            "gauge",
            "Tokens per second of the last step",
            engine.recent_tok_s,
        ),
        ("hetero_queue_depth", "gauge", "Requests waiting", len(engine.waiting)),
        ("hetero_running_requests", "gauge", "Requests in the running batch", len(engine.running)),
        ("hetero_kv_blocks_used", "gauge", "KV cache blocks in use", kv.blocks_used),
        ("hetero_kv_blocks_free", "gauge", "KV cache blocks free", kv.blocks_free),
        (
            "hetero_kv_blocks_cached",
            "gauge",
            "Free KV blocks holding a cached prefix",
            kv.blocks_cached,
        ),
        (
            "hetero_prefix_cache_hit_rate",
            "gauge",
            "Share of prompt tokens served from cache",
            kv.prefix_hit_tokens / queried if queried else 0.0,
        ),
        (
            "hetero_kv_pages_read_total",
            "counter",
            "KV pages (16 tokens) decode attention read, per sequence and layer",
            kv.decode_pages_read,
        ),
        (
            "hetero_kv_pages_read_per_token",
            "gauge",
            "KV pages read per decoded token and layer (sparse attention reads fewer)",
            kv.decode_pages_read / kv.decode_reads if kv.decode_reads else 0.0,
        ),
        (
            "hetero_kv_pages_read_fraction",
            "gauge",
            "Share of the KV pages dense attention would have read",
            kv.decode_pages_read / kv.decode_pages_dense if kv.decode_pages_dense else 0.0,
        ),
    ]
    hit_rate = state.model.expert_cache_hit_rate()
    if hit_rate is not None:
        rows.append(
            (
                "hetero_expert_cache_hit_rate",
                "gauge",
                "Share of routed pairs whose expert was in the accelerator's pool",
                hit_rate,
            )
        )
    lines = []
    for name, kind, doc, value in rows:
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(lines) + "\n"
