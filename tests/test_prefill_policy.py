"""The prefill choice per layer: experts held in DRAM are streamed to the accelerator for a
batch when copying their weights and computing there beats computing them on the CPU, by the
tokens in the batch, the PCIe rate and the CPU's rate; decode never streams."""

from __future__ import annotations

import dataclasses

import pytest

import hetero
from hetero.demo import write_demo
from hetero.runtime.accelerator.cached import CachedExperts
from placement.cost_model import streaming_is_faster
from placement.hardware import default_hardware
from placement.hardware import sim_accelerator as sim_figures
from placement.policy import plan_for_model

# one Qwen3-30B-A3B expert: 3 x 2048 x 768 weights, Q4_K in DRAM (4.5 bits), bf16 streamed
PARAMS = 3 * 2048 * 768
Q4K_BYTES, BF16_BYTES = PARAMS * 4.5 / 8, PARAMS * 2


@pytest.mark.parametrize(
    ("pairs", "h2d_gbs", "streams"),
    [(1, 25.0, False), (4096, 25.0, True), (4096, 0.05, False)],
)
def test_streaming_wins_for_many_tokens_over_a_fast_link(pairs, h2d_gbs, streams):
    gpu = dataclasses.replace(default_hardware(), h2d_gbs=h2d_gbs)
    assert streaming_is_faster(Q4K_BYTES, BF16_BYTES, 2.0 * PARAMS * pairs, gpu) == streams


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo(tmp_path_factory.mktemp("demo"))


def test_a_prefill_streams_the_cpu_experts_where_the_rates_say_so_and_decode_never(demo):
    plan = plan_for_model(str(demo), "4MiB", None, 128, 1, "f32", sim_figures(default_hardware()))
    reference = hetero.load(demo, progress=False).generate(list(range(3, 99)), max_new_tokens=4)
    model = hetero.load(demo, progress=False, plan=plan, accelerator="sim")
    pools = [m for m in model.net.modules() if isinstance(m, CachedExperts)]
    assert pools
    for pool in pools:  # a lane with a GPU's rates behind a PCIe 5 x16 link
        pool.hardware = dataclasses.replace(default_hardware(), h2d_gbs=64.0)
    result = model.generate(list(range(3, 99)), max_new_tokens=4)
    assert result.token_ids == reference.token_ids
    assert sum(p.streamed_steps for p in pools) == len(pools)  # the prefill only
    for pool in pools:  # behind a slow link the CPU computes them
        pool.hardware = dataclasses.replace(default_hardware(), h2d_gbs=1.0)
    assert model.generate(list(range(3, 99)), max_new_tokens=4).token_ids == reference.token_ids
    assert sum(p.streamed_steps for p in pools) == len(pools)
