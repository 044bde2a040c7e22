"""The hybrid engine on the sim lane: a plan that puts attention, norms, routers, embeddings
and each layer's hot experts on the accelerator and the cold experts on the CPU kernels gives
the greedy tokens of a CPU-only load, through `generate` and the server's engine, for several
families; what the lane cannot hold is one line and exit 2 at start, or an error for the one
request that hit it (503 in the server) while the engine serves the next."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import make_checkpoint
from test_cli import assert_one_line_error
from test_cli import hetero as run_hetero

import hetero
from hetero.demo import write_demo
from hetero.runtime.accelerator import AcceleratorOutOfMemoryError
from hetero.runtime.accelerator.cached import CachedExperts
from hetero.runtime.accelerator.placed import LaneExperts, OnLane
from hetero.runtime.assembler import SplitExperts
from hetero.runtime.engine import Engine, Request
from hetero.runtime.sampling import SamplingParams
from placement.plan import Plan, load_plan

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]
# experts 0-3 of every MoE layer on the accelerator, the rest on the CPU
HYBRID_RULES = (r"experts\.[0-3]\.=gpu", r"experts\.=cpu")


def sim_plan(model: str, path, vram: str = "64MiB", *extra: str) -> Plan:
    overrides = [arg for rule in HYBRID_RULES for arg in ("--override", rule)]
    made = run_hetero(
        "plan", model, "--accelerator", "sim", "--vram-budget", vram, "--context", "128",
        *overrides, *extra, "--save", str(path),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    return load_plan(path)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo(tmp_path_factory.mktemp("demo"))


@pytest.mark.parametrize(
    ("family", "expert_cache"),
    [
        ("qwen3_moe", "static"),
        ("qwen3_moe", "score"),
        ("qwen2_moe", "lru"),
        ("deepseek_v3", "score"),
    ],
)
def test_a_sim_hybrid_plan_gives_the_greedy_tokens_of_a_cpu_only_load(
    tmp_path, family, expert_cache
):
    path = tmp_path / family
    path.mkdir()
    make_checkpoint(path, family)
    plan = sim_plan(str(path), tmp_path / "plan.json")
    cpu_only = hetero.load(path, progress=False)
    hybrid = hetero.load(
        path, progress=False, plan=plan, accelerator="sim", expert_cache=expert_cache
    )
    moe = next(layer.mlp for layer in hybrid.net.layers if hasattr(layer.mlp, "experts"))
    if expert_cache == "static":  # the plan's experts 0-3 on the lane, for good
        assert isinstance(moe.experts, SplitExperts)
        assert isinstance(moe.experts.parts[-1], LaneExperts)
    else:  # a pool of 4 slots seeded with them, every expert on the CPU kernels too
        assert isinstance(moe.experts, CachedExperts)
        assert moe.experts.slot_expert == [0, 1, 2, 3]
    assert isinstance(hybrid.net.layers[0].self_attn, OnLane)
    assert isinstance(moe.gate, OnLane)  # the router runs on the accelerator
    expected = cpu_only.generate(PROMPT, max_new_tokens=12).token_ids
    assert hybrid.generate(PROMPT, max_new_tokens=12).token_ids == expected
    # the server's path: the engine, two streams batched together
    kv = hybrid.new_kv_cache(64, max_sequences=2)
    engine = Engine(hybrid.net, hybrid.tokenizer, kv, max_running=2)
    results = []
    for prompt in (PROMPT, PROMPT[:5]):
        request = Request(prompt, 12, SamplingParams(), (), frozenset())
        engine.submit(request, lambda e: e.result is not None and results.append(e.result))
    while len(results) < 2:
        engine.step()
    by_prompt = {r.prompt_tokens: r.token_ids for r in results}
    assert by_prompt[len(PROMPT)] == expected
    assert by_prompt[5] == cpu_only.generate(PROMPT[:5], max_new_tokens=12).token_ids
    if expert_cache != "static":
        assert 0 < hybrid.expert_cache_hit_rate() <= 1


def test_the_demo_runs_on_a_4mib_sim_accelerator_with_the_cpu_only_text(demo):
    args = ("generate", str(demo), "--prompt", "Hello", "-n", "8")
    hybrid = run_hetero(*args, "--accelerator", "sim", "--vram-budget", "4MiB")
    assert hybrid.returncode == 0, hybrid.stderr
    assert "run on the sim accelerator, 4.0 MiB budget" in hybrid.stderr
    assert hybrid.stdout == run_hetero(*args).stdout


def test_cuda_asked_for_where_there_is_none_is_one_line(demo):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    result = run_hetero("generate", str(demo), "--prompt", "hi", "--accelerator", "cuda")
    assert_one_line_error(result, "no CUDA device")


def test_sim_without_a_budget_is_one_line(demo):
    result = run_hetero("generate", str(demo), "--prompt", "hi", "--accelerator", "sim")
    assert_one_line_error(result, "--vram-budget")


def test_a_sim_budget_below_what_every_token_needs_is_one_line(demo):
    result = run_hetero(
        "generate", str(demo), "--prompt", "hi", "--accelerator", "sim", "--vram-budget", "1MiB"
    )
    assert_one_line_error(result, "VRAM budget")


def test_a_request_beyond_the_lane_budget_fails_alone_and_the_engine_serves_the_next(
    demo, tmp_path
):
    plan = sim_plan(str(demo), tmp_path / "plan.json", "8MiB")
    model = hetero.load(demo, progress=False, plan=plan, accelerator="sim")
    lane = model.placement.lane
    kv = model.new_kv_cache(64, max_sequences=1)
    # another tenant of the device takes all but 1 KiB: a prompt's activations do not fit
    taken = lane.vram_bytes - lane.used_bytes - 1024
    lane.reserve(taken, "another process")
    with pytest.raises(AcceleratorOutOfMemoryError, match="sim accelerator is out of memory"):
        model.generate(PROMPT, max_new_tokens=1)
    engine = Engine(model.net, model.tokenizer, kv, max_running=1)
    done = threading.Event()
    events = []

    def listen(event) -> None:
        if event.result is None:
            return
        if not events:
            lane.release(taken)  # the first request failed; the device is free again
        events.append(event)
        if len(events) == 2:
            done.set()

    for prompt in (PROMPT, PROMPT[:5]):
        engine.submit(Request(prompt, 4, SamplingParams(), (), frozenset()), listen)
    engine.start()
    try:
        assert done.wait(120), "the engine hung"
    finally:
        engine.shutdown()
    failed, served = events
    assert failed.error_status == 503 and "out of memory" in failed.error
    assert served.error is None and len(served.result.token_ids) == 4


def test_the_server_on_a_sim_accelerator_answers_with_the_cpu_text_and_reports_hits(tmp_path):
    import httpx
    from server_fixtures import running_server

    body = {"model": "demo", "prompt": "Hello", "max_tokens": 8, "temperature": 0}
    texts = []
    for args in ((), ("--accelerator", "sim", "--vram-budget", "8MiB")):
        with running_server(
            tmp_path, "--context-length", "256", "--max-concurrency", "2", *args
        ) as url:
            texts.append(httpx.post(url + "/v1/completions", json=body, timeout=60).json())
            metrics = httpx.get(url + "/metrics").text
    assert texts[1]["choices"][0]["text"] == texts[0]["choices"][0]["text"]
    assert "hetero_expert_cache_hit_rate 0." in metrics  # the sim run's
