"""The accelerator lanes' one interface, specified on the sim lane (no GPU here): a memory
budget that refuses what exceeds it like CUDA's allocator, copies through staging buffers
(accounted, and rate-limited to a "PCIe" rate when given), and work run in order in the lane's
own thread with one torch thread; cuda asked for where there is none is a clear error."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from hetero.models.experts import TorchExperts
from hetero.runtime.accelerator import (
    AcceleratorOutOfMemoryError,
    AcceleratorUnavailableError,
    open_lane,
)
from hetero.runtime.accelerator.placed import LaneExperts, OnLane

KIB = 1024


def test_the_sim_lane_refuses_an_activation_beyond_its_budget_and_frees_it_after():
    lane = open_lane("sim", 64 * KIB)
    held = lane.to_lane(torch.zeros(8 * KIB // 4))  # 8 KiB
    assert lane.used_bytes == 8 * KIB
    with pytest.raises(AcceleratorOutOfMemoryError, match="out of memory.*64.00 MiB|budget"):
        lane.to_lane(torch.zeros(60 * KIB // 4))
    del held
    assert lane.used_bytes == 0
    lane.to_lane(torch.zeros(60 * KIB // 4))  # fits once the first is gone


def test_placing_a_module_charges_its_weights():
    lane = open_lane("sim", 1 << 20)
    linear = torch.nn.Linear(16, 8)
    weight = linear.weight
    lane.place(linear, "a linear")
    assert lane.used_bytes == (16 * 8 + 8) * 4
    assert linear.weight is weight  # the sim lane's memory is the host's: nothing to copy
    with pytest.raises(AcceleratorOutOfMemoryError, match="a big linear needs"):
        lane.place(torch.nn.Linear(1024, 1024), "a big linear")


def test_sim_lane_work_runs_in_order_in_its_own_single_threaded_thread():
    lane = open_lane("sim", 0)
    host_threads = torch.get_num_threads()
    seen = []
    handles = [
        lane.submit(lambda i: seen.append((i, threading.current_thread().name)), i)
        for i in range(5)
    ]
    for handle in handles:
        handle.wait()
    assert [i for i, _ in seen] == list(range(5))
    assert {name for _, name in seen} == {"hetero-sim-lane"}
    assert lane.run(torch.get_num_threads) == 1
    assert torch.get_num_threads() == host_threads  # the host keeps its own


def test_an_error_on_the_lane_is_raised_by_wait():
    lane = open_lane("sim", 0)

    def fail() -> None:
        raise ValueError("bad shapes")

    with pytest.raises(ValueError, match="bad shapes"):
        lane.run(fail)
    assert lane.run(lambda: 3) == 3  # the lane lives on


def test_sim_copies_are_accounted_and_rate_limited_to_the_pcie_rate():
    free = open_lane("sim", 1 << 30)
    limited = open_lane("sim", 1 << 30, pcie_gbs=0.1)  # 100 MB/s
    x = torch.arange(1 << 18, dtype=torch.float32)  # 1 MiB
    began = time.perf_counter()
    up = limited.to_lane(x)
    took = time.perf_counter() - began
    assert took >= x.numel() * 4 / 0.1e9 * 0.95
    assert torch.equal(limited.to_host(up), x) and torch.equal(free.to_lane(x), x)
    assert limited.copied_bytes == {"to_lane": 4 << 18, "to_host": 4 << 18}


def test_cuda_asked_for_without_a_device_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(AcceleratorUnavailableError, match="no CUDA device"):
        open_lane("cuda", 1 << 30)


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "triton"])
def test_lane_experts_match_torch_experts_over_the_same_weights(fused):
    if fused:  # the cuda lane's kernel; on a CPU-only machine in Triton's interpreter
        pytest.importorskip("triton", reason="gpu_kernels need Triton (Linux)")
        from gpu_kernel_device import require_triton

        require_triton()
    seed = torch.seed()
    hidden, size, experts = 24, 40, 5
    reference = TorchExperts(experts, hidden, size)
    for p in reference.parameters():
        torch.nn.init.normal_(p, std=0.2)
    gate_up = torch.stack([torch.cat([m.gate_proj.weight, m.up_proj.weight]) for m in reference])
    down = torch.stack([m.down_proj.weight for m in reference])
    lane = open_lane("sim", 1 << 20)
    on_lane = LaneExperts(lane, gate_up.detach(), down.detach(), "five experts")
    on_lane.fused = fused
    for tokens in (1, 7):  # one token; and tokens where expert 4 gets none
        x = torch.randn(tokens, hidden)
        ids = torch.stack([torch.randperm(4)[:2] for _ in range(tokens)])
        weights = torch.softmax(torch.randn(tokens, 2), dim=-1)
        torch.testing.assert_close(
            on_lane.submit(x, ids, weights).wait(),
            reference(x, ids, weights).detach(),
            msg=f"seed {seed}",
        )


def test_on_lane_runs_its_module_on_the_lane_and_reads_through_to_it():
    lane = open_lane("sim", 1 << 20)
    linear = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    expected = linear(x)
    wrapped = OnLane(lane, lane.place(linear, "a linear"))
    torch.testing.assert_close(wrapped(x), expected)
    assert wrapped.out_features == 3


def test_a_batch_goes_to_a_device_lane_rebuilt_there_once_per_forward():
    from hetero.runtime.accelerator.placed import lane_argument
    from hetero.runtime.batch import ForwardBatch

    class MetaLane(type(open_lane("sim", 0))):  # a lane whose device is not the host's
        device = torch.device("meta")

    lane = MetaLane(0)
    batch = ForwardBatch.fresh(3)
    moved = lane_argument(lane, batch)
    assert moved.positions.device.type == "meta" and moved.num_tokens == 3
    assert lane_argument(lane, batch) is moved  # every layer's attention shares it
    assert lane_argument(open_lane("sim", 0), batch) is batch  # the sim lane's memory is the host's
