"""The runtime: KV cache, forward batches, expert backends, generation, and the `Model` API."""
