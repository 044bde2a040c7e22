"""bench/gpu_kernel_bench.py on a machine without CUDA: one line and exit 2, nothing written."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_kernel_bench.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the bench would run")
def test_gpu_kernel_bench_says_no_cuda_and_exits_2(tmp_path):
    run = subprocess.run(
        [sys.executable, str(BENCH), "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "no CUDA device" in run.stderr
    assert not any(tmp_path.iterdir())
