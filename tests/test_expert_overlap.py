"""Launch, then wait: a MoE block submits its routed experts, runs its shared experts while they
compute, then adds. The CPU experts run on one long-lived worker thread whose kernels release
the GIL; the tokens decoded are the same with and without the overlap."""

from __future__ import annotations

import importlib
import os
import pkgutil
import signal
import threading

import numba
import pytest
import torch
from conftest import FAMILY_CONFIGS, make_checkpoint
from numba.core.registry import CPUDispatcher

import cpu_kernels
import hetero
from hetero.models import deepseek
from hetero.models.experts import TorchExperts
from hetero.models.moe import SparseMoE
from hetero.runtime.assembler import SplitExperts
from hetero.runtime.cpu_experts import NumbaExperts
from hetero.runtime.expert_worker import ExpertWorker, expert_worker

# long enough that only a deadlock (work run in the submitting thread) reaches it
DEADLOCK_S = 30.0


def test_worker_runs_a_job_while_the_submitter_goes_on():
    released = threading.Event()

    def job() -> str:
        if not released.wait(DEADLOCK_S):
            raise TimeoutError("the submitter never went on: the job ran in its thread")
        return "done"

    handle = ExpertWorker().submit(job)
    released.set()  # reached only if submit returned before the job finished
    assert handle.wait() == "done"


def test_worker_reraises_a_job_exception_with_its_type_at_wait_and_lives_on():
    worker = ExpertWorker()

    def fail() -> None:
        raise KeyError("expert 7")

    handle = worker.submit(fail)
    with pytest.raises(KeyError, match="expert 7"):
        handle.wait()
    assert worker.submit(lambda: 5).wait() == 5


def test_one_long_lived_worker_runs_every_job():
    assert expert_worker() is expert_worker()
    before = threading.active_count()
    threads = {expert_worker().submit(threading.current_thread).wait() for _ in range(20)}
    assert threads == {expert_worker().thread}
    assert threading.active_count() == before


def test_worker_jobs_use_the_submitters_numba_thread_count():
    before = numba.get_num_threads()
    try:
        for threads in (1, numba.config.NUMBA_NUM_THREADS):
            numba.set_num_threads(threads)
            assert expert_worker().submit(numba.get_num_threads).wait() == threads
    finally:
        numba.set_num_threads(before)


def test_a_forked_child_starts_its_own_worker():
    expert_worker()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child writes "ok" if a job ran; a hung one is killed by the alarm
        signal.alarm(10)
        try:
            os.write(write, b"ok" if expert_worker().submit(lambda: True).wait() else b"no")
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 2) == b"ok"


class FinishesAfter(TorchExperts):
    """Routed experts that run on the worker and finish only once `event` is set: a caller that
    waited for them before setting it would never finish."""

    def __init__(self, experts: list[torch.nn.Module], event: threading.Event):
        super().__init__(0, 0, 0)
        self.extend(experts)
        self.event = event

    def submit(self, x, expert_ids, expert_weights):
        def after_the_event() -> torch.Tensor:
            if not self.event.wait(DEADLOCK_S):
                raise TimeoutError("waited for before the event: nothing ran meanwhile")
            return super(FinishesAfter, self).submit(x, expert_ids, expert_weights).wait()

        return expert_worker().submit(after_the_event)


def sparse_moe() -> tuple[torch.nn.Module, str]:
    return SparseMoE(32, 16, 6, 2, normalize_topk=True, shared_expert_size=24), "shared_expert"


def deepseek_moe() -> tuple[torch.nn.Module, str]:
    raw = dict(FAMILY_CONFIGS["deepseek_v3"], model_type="deepseek_v3", vocab_size=64)
    block = deepseek.DeepseekMoE(deepseek.parse_config(raw))
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
    return block, "shared_experts"


@pytest.mark.parametrize("make_block", [sparse_moe, deepseek_moe])
def test_moe_block_runs_its_shared_experts_while_the_routed_experts_compute(make_block):
    torch.manual_seed(0)
    block, shared_name = make_block()
    x = torch.randn(5, block.experts[0].gate_proj.in_features)
    with torch.no_grad():
        want = block(x)
    shared_ran = threading.Event()
    getattr(block, shared_name).register_forward_hook(lambda *_: shared_ran.set())
    block.experts = FinishesAfter(list(block.experts), shared_ran)
    with torch.no_grad():
        got = block(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_split_experts_submit_every_backend_before_waiting_for_any():
    torch.manual_seed(2)
    whole = TorchExperts(4, 16, 8)
    x, ids, weights = torch.randn(3, 16), torch.tensor([[0, 3], [1, 2], [3, 0]]), torch.rand(3, 2)
    second_started = threading.Event()
    second = TorchExperts.of([whole[1], whole[3]])
    second[1].register_forward_pre_hook(lambda *_: second_started.set())  # expert 3, routed
    split = SplitExperts(
        [(FinishesAfter([whole[0], whole[2]], second_started), [0, 2]), (second, [1, 3])], 4
    )
    with torch.no_grad():
        torch.testing.assert_close(split(x, ids, weights), whole(x, ids, weights))


def test_numba_experts_give_the_same_output_on_the_worker_and_inline():
    torch.manual_seed(1)
    experts = NumbaExperts.from_torch(TorchExperts(6, 64, 32))
    x = torch.randn(3, 64)
    ids, weights = torch.tensor([[0, 5], [5, 2], [1, 0]]), torch.rand(3, 2)
    experts.overlap = True
    on_worker = experts.submit(x, ids, weights).wait()
    experts.overlap = False
    assert torch.equal(on_worker, experts.submit(x, ids, weights).wait())
    assert torch.equal(on_worker, experts(x, ids, weights))


def test_numba_experts_reraise_a_kernel_error_at_wait():
    experts = NumbaExperts.from_torch(TorchExperts(4, 64, 32))
    experts.overlap = True
    handle = experts.submit(torch.randn(1, 64), torch.tensor([[0, 9]]), torch.rand(1, 2))
    with pytest.raises(ValueError, match="ids outside"):
        handle.wait()


# the shared experts 64 wide (not the fixtures' 48): every weight of them on the Q8_0 kernels
SHARED_ON_KERNELS = {"qwen2_moe": dict(shared_expert_intermediate_size=64), "deepseek_v3": {}}


@pytest.mark.parametrize("model_type", sorted(SHARED_ON_KERNELS))
def test_decode_tokens_are_identical_with_and_without_the_overlap(model_type, tmp_path):
    make_checkpoint(tmp_path, model_type, **SHARED_ON_KERNELS[model_type])
    model = hetero.load(tmp_path, quant="q8_0", progress=False)
    routed = [m for m in model.net.modules() if isinstance(m, NumbaExperts)]
    assert routed

    def decode(overlap: bool):
        for experts in routed:
            experts.overlap = overlap
        return model.generate([3, 1, 4, 1, 5], max_new_tokens=12, logprobs=0, ignore_eos=True)

    without, with_overlap = decode(False), decode(True)
    assert with_overlap.token_ids == without.token_ids
    assert [e.logprob for e in with_overlap.logprobs] == [e.logprob for e in without.logprobs]


def compiled_kernels() -> list[tuple[str, CPUDispatcher]]:
    found = []
    for info in pkgutil.walk_packages(cpu_kernels.__path__, "cpu_kernels."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if isinstance(obj, CPUDispatcher) and obj.__module__ == module.__name__:
                found.append((f"{info.name}.{name}", obj))
    return found


def test_every_cpu_kernel_releases_the_gil():
    """What lets the shared experts run in torch while the worker computes: a kernel without
    nogil holds the GIL for its whole run (inlined helpers compile into their callers)."""
    kernels = compiled_kernels()
    assert kernels
    holding = [
        name
        for name, kernel in kernels
        if not kernel.targetoptions.get("nogil")
        and kernel.targetoptions.get("inline", "never") != "always"
    ]
    assert holding == []
