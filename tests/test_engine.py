"""The continuous-batching engine: batched requests give what lone requests give, prompts are
chunked, prefixes are shared through the cache, cancelled requests free their blocks."""

from __future__ import annotations

import sys
import threading

import pytest
import torch

import hetero
from hetero.demo import write_demo
from hetero.runtime.engine import SWITCH_INTERVAL_S, Engine, QueueFullError, Request
from hetero.runtime.sampling import SamplingParams


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return hetero.load(write_demo(tmp_path_factory.mktemp("demo")), progress=False)


def run_all(engine: Engine, requests: list[Request]) -> list:
    results: dict[int, object] = {}
    streamed: dict[int, list[str]] = {i: [] for i in range(len(requests))}

    def listener(i):
        def listen(event):
            streamed[i].append(event.text)
            if event.result is not None:
                results[i] = event.result

        return listen

    for i, request in enumerate(requests):
        engine.submit(request, listener(i))
    while len(results) < len(requests):
        engine.step()
    for i, result in results.items():
        assert "".join(streamed[i]) == result.text
    return [results[i] for i in range(len(requests))]


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(
            5, vocab, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g
        ).tolist()
        for _ in range(n)
    ]


def test_batched_requests_match_lone_greedy_requests(demo):
    batch = prompts(12, demo.config.vocab_size)
    lone = [demo.generate(p, max_new_tokens=20).token_ids for p in batch]
    engine = Engine(demo.net, demo.tokenizer, demo.new_kv_cache(64, 12), max_running=12)
    results = run_all(engine, [Request(p, 20) for p in batch])
    assert [r.token_ids for r in results] == lone
    assert engine.kv.blocks_used == 0


def test_long_prompt_is_prefilled_in_chunks_with_the_same_result(demo):
    prompt = prompts(1, demo.config.vocab_size, seed=1)[0] * 8  # ~100+ tokens
    whole = demo.generate(prompt, max_new_tokens=10).token_ids
    engine = Engine(demo.net, demo.tokenizer, demo.new_kv_cache(len(prompt) + 10), step_tokens=16)
    (result,) = run_all(engine, [Request(prompt, 10)])
    assert result.token_ids == whole


def test_shared_prefix_is_served_from_the_cache(demo):
    system = list(range(10, 60))  # 50 tokens: 3 full blocks of 16
    engine = Engine(demo.net, demo.tokenizer, demo.new_kv_cache(128, 2), max_running=2)
    (first,) = run_all(engine, [Request(system + [7, 8, 9], 8)])
    (second,) = run_all(engine, [Request(system + [11, 12], 8)])
    assert first.cached_prompt_tokens == 0
    assert second.cached_prompt_tokens == 48
    assert second.token_ids == demo.generate(system + [11, 12], max_new_tokens=8).token_ids
    assert engine.kv.prefix_hit_tokens == 48


def test_cached_blocks_are_evicted_when_space_is_needed(demo):
    engine = Engine(demo.net, demo.tokenizer, demo.new_kv_cache(64, 1))
    for p in prompts(6, demo.config.vocab_size, seed=3):
        (result,) = run_all(engine, [Request(p, 16)])
        assert result.token_ids == demo.generate(p, max_new_tokens=16).token_ids
    assert engine.kv.blocks_used == 0


def test_cancelled_request_frees_its_blocks(demo):
    engine = Engine(demo.net, demo.tokenizer, demo.new_kv_cache(64, 2), max_running=2)
    events = []
    handle = engine.submit(Request([5, 6, 7], 50), events.append)
    engine.step()
    engine.step()
    assert engine.kv.blocks_used > 0
    handle.cancel()
    engine.step()
    assert engine.kv.blocks_used == 0
    assert events[-1].result.finish_reason == "cancelled"


def test_full_queue_is_refused(demo):
    engine = Engine(demo.net, demo.tokenizer, demo.new_kv_cache(64), max_running=1, max_waiting=2)
    engine.submit(Request([5], 4), lambda e: None)
    engine.submit(Request([6], 4), lambda e: None)
    with pytest.raises(QueueFullError):
        engine.submit(Request([7], 4), lambda e: None)


def test_request_larger_than_the_cache_is_refused(demo):
    engine = Engine(demo.net, demo.tokenizer, demo.new_kv_cache(32))
    with pytest.raises(hetero.InvalidRequestError, match="KV cache"):
        engine.submit(Request([5] * 20, 40), lambda e: None)


def test_logprobs_are_the_models_log_softmax(demo):
    prompt = [5, 9, 13]
    result = demo.generate(prompt, max_new_tokens=4, logprobs=3)
    assert len(result.logprobs) == 4
    full = demo.logits(prompt + result.token_ids[:-1]).log_softmax(-1)
    for i, lp in enumerate(result.logprobs):
        row = full[len(prompt) - 1 + i]
        assert lp.token_id == result.token_ids[i]
        assert abs(lp.logprob - float(row[lp.token_id])) < 1e-4
        assert [t for t, _ in lp.top] == row.topk(3).indices.tolist()


def test_sampled_batch_is_reproducible_with_seeds(demo):
    batch = prompts(4, demo.config.vocab_size, seed=5)
    sampling = SamplingParams(temperature=1.0, seed=11)
    lone = [demo.generate(p, max_new_tokens=12, temperature=1.0, seed=11).token_ids for p in batch]
    engine = Engine(demo.net, demo.tokenizer, demo.new_kv_cache(64, 4), max_running=4)
    assert [r.token_ids for r in run_all(engine, [Request(p, 12, sampling) for p in batch])] == lone


def test_glue_threads_apply_to_small_steps_only_and_are_restored(demo):
    seen: list[tuple[int, int]] = []  # (tokens in the step, torch threads during it)
    net = demo.net

    def forward(token_ids, batch, logit_rows=None):
        seen.append((len(token_ids), torch.get_num_threads()))
        return net(token_ids, batch, logit_rows)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine = Engine(forward, demo.tokenizer, demo.new_kv_cache(64), glue_threads=1)
        prompt = list(range(5, 45))  # more tokens than a small step
        result = run_all(engine, [Request(prompt, 5)])[0]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert result.token_ids == demo.generate(prompt, max_new_tokens=5).token_ids
    assert seen[0] == (len(prompt), 2) and len(prompt) > 16
    assert all(threads == 1 for _, threads in seen[1:]) and len(seen) == 5


def test_request_joining_a_decoding_batch_gets_its_lone_reply(demo):
    # steps that mix decoding sequences with a new prompt (its prefill) in one forward
    first, second, third = prompts(3, demo.config.vocab_size, seed=5)
    lone = [demo.generate(p, max_new_tokens=12).token_ids for p in (first, second, third)]
    engine = Engine(demo.net, demo.tokenizer, demo.new_kv_cache(64, 3), max_running=3)
    results: dict[int, list[int]] = {}

    def listener(i):
        def listen(event):
            if event.result is not None:
                results[i] = event.result.token_ids

        return listen

    engine.submit(Request(first, 12), listener(0))
    for _ in range(3):
        engine.step()
    engine.submit(Request(second, 12), listener(1))
    engine.step()
    engine.submit(Request(third, 12), listener(2))
    while len(results) < 3:
        engine.step()
    assert [results[i] for i in range(3)] == lone


def test_engine_thread_serves_requests_and_lowers_the_switch_interval(demo):
    engine = Engine(demo.net, demo.tokenizer, demo.new_kv_cache(64, 1))
    before = sys.getswitchinterval()
    done = threading.Event()
    texts = []

    def listen(event):
        texts.append(event.text)
        if event.result is not None:
            done.set()

    try:
        engine.start()
        assert sys.getswitchinterval() == pytest.approx(min(before, SWITCH_INTERVAL_S))
        engine.submit(Request(demo.tokenizer.encode("hello"), 4), listen)
        assert done.wait(60)
    finally:
        engine.shutdown()
        sys.setswitchinterval(before)
    lone = Engine(demo.net, demo.tokenizer, demo.new_kv_cache(64, 1))
    want = run_all(lone, [Request(demo.tokenizer.encode("hello"), 4)])
    assert "".join(texts) == want[0].text
