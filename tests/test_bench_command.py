"""`hetero bench`: placements become the plans they name, every row runs or says why it did
not, and a run leaves a table, results.json and charts. Numbers are not asserted: the demo
model on tiny lengths measures noise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hetero.bench.command import peer_row
from hetero.bench.placements import (
    BenchPlacementError,
    parse_placement,
    plan_placement,
)
from hetero.bench.report import CHARTS
from hetero.bench.worker import Job
from placement.budgets import Budgets, Workload
from placement.hardware import default_hardware
from placement.inventory import open_model
from placement.policy import plan_for_model
from placement.routing_profile import RoutingProfile
from placement.sizes import GIB

TEST_KEYS = {"kind", "median", "min", "max", "samples", "predicted_tok_s", "ratio", "bound"}


def bench(*args: str, cache: Path, path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HETERO_CACHE=str(cache))
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        [sys.executable, "-m", "hetero", "bench", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.fixture(scope="module")
def demo_plan_inputs():
    inventory = open_model("demo")
    budgets = Budgets(vram_bytes=24 * GIB, gpus=1, dram_bytes=16 * GIB)
    return inventory, budgets, Workload(64, 1, 512, "bf16"), default_hardware()


def devices_by_kind(plan) -> dict[str, set[str]]:
    kinds: dict[str, set[str]] = {}
    for group in plan.groups:
        kinds.setdefault(group.kind, set()).add(group.device)
    for layer in plan.experts:
        kinds.setdefault("expert", set()).update(layer.devices)
    return kinds


@pytest.mark.parametrize(
    "text", ["cpu", "torch", "auto", "disk-experts", "hot-experts:2", "attn-accel", "plan:x.json"]
)
def test_placement_names_parse(text):
    assert parse_placement(text).name == text


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("gpu-everything", "unknown placement"),
        ("hot-experts", "needs a count"),
        ("layers-accel:0", "needs a count"),
        ("cpu:3", "unknown placement"),
        ("plan:", "needs a file"),
    ],
)
def test_bad_placement_names_say_what_to_give(text, fragment):
    with pytest.raises(BenchPlacementError, match=fragment):
        parse_placement(text)


def test_cpu_placements_ignore_the_accelerator_budget(demo_plan_inputs):
    for name in ("cpu", "torch"):
        plan = plan_placement(parse_placement(name), *demo_plan_inputs)
        assert devices_by_kind(plan) == {k: {"cpu"} for k in devices_by_kind(plan)}
    assert parse_placement("torch").quant == "none"


def test_disk_experts_puts_every_routed_expert_on_disk(demo_plan_inputs):
    kinds = devices_by_kind(plan_placement(parse_placement("disk-experts"), *demo_plan_inputs))
    assert kinds.pop("expert") == {"disk"}
    assert set().union(*kinds.values()) == {"cpu"}


def test_hot_experts_puts_n_experts_per_layer_and_every_token_parts_on_the_accelerator(
    demo_plan_inputs,
):
    plan = plan_placement(parse_placement("hot-experts:3"), *demo_plan_inputs)
    assert all(layer.devices.count("gpu") == 3 for layer in plan.experts)
    assert all(layer.devices.count("cpu") == len(layer.devices) - 3 for layer in plan.experts)
    assert devices_by_kind(plan)["attention"] == {"gpu"}


def test_hot_experts_are_the_most_used_by_a_routing_profile(demo_plan_inputs):
    inventory = demo_plan_inputs[0]
    counts = [1] * inventory.num_experts
    counts[5] = counts[11] = 50  # experts 5 and 11 are the hot ones in every layer
    layers = sorted({g.layer for g in inventory.groups if g.kind == "expert"})
    profile = RoutingProfile(
        inventory.name, {layer: 30 for layer in layers}, {layer: counts for layer in layers}
    )
    plan = plan_placement(parse_placement("hot-experts:2"), *demo_plan_inputs, profile, "p.json")
    for layer in plan.experts:
        assert [e for e, d in enumerate(layer.devices) if d == "gpu"] == [5, 11]
    assert plan.profile == "p.json"


def test_attn_accel_puts_only_attention_on_the_accelerator(demo_plan_inputs):
    kinds = devices_by_kind(plan_placement(parse_placement("attn-accel"), *demo_plan_inputs))
    assert kinds.pop("attention") == {"gpu"}
    assert set().union(*kinds.values()) == {"cpu"}


def test_layers_accel_puts_the_first_k_layers_on_the_accelerator(demo_plan_inputs):
    plan = plan_placement(parse_placement("layers-accel:1"), *demo_plan_inputs)
    for group in plan.groups:
        assert group.device == ("gpu" if group.layer == 0 else "cpu"), group.name
    for layer in plan.experts:
        assert set(layer.devices) == {"gpu" if layer.layer == 0 else "cpu"}
    with pytest.raises(BenchPlacementError, match="has 4 layers"):
        plan_placement(parse_placement("layers-accel:9"), *demo_plan_inputs)


def test_a_crashing_peer_becomes_its_rows_reason(tmp_path):
    fake = tmp_path / "llama-bench"
    fake.write_text("#!/bin/sh\necho 'repacking AMX tiles' >&2\nkill -SEGV $$\n")
    fake.chmod(0o755)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    job = Job("hetero", str(model), 1, 8, 3, [0], [1], 1)
    row = peer_row("llama.cpp", job, None, str(fake), tmp_path)
    assert "killed by SIGSEGV" in row["error"] and "repacking AMX tiles" in row["error"]


def test_a_llama_bench_crash_is_retried_with_repacking_off(tmp_path):
    runs = [
        {"n_prompt": 8, "n_gen": 0, "n_depth": 0, "avg_ts": 50.0, "samples_ts": [50.0]},
        {"n_prompt": 0, "n_gen": 3, "n_depth": 0, "avg_ts": 9.0, "samples_ts": [9.0]},
    ]
    fake = tmp_path / "llama-bench"
    # segfaults as llama.cpp's AMX repacking does, unless the last arguments turn it off
    fake.write_text(
        '#!/bin/sh\ncase "$*" in *"--repack 0") ;; *) kill -SEGV $$ ;; esac\n'
        f"echo '{json.dumps(runs)}'\n"
    )
    fake.chmod(0o755)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    job = Job("hetero", str(model), 1, 8, 3, [0], [1], 1)
    row = peer_row("llama.cpp", job, None, str(fake), tmp_path)
    assert [t["test"] for t in row["tests"]] == ["pp8", "tg3"]
    assert "--repack 0" in row["note"] and "SIGSEGV" in row["note"]


def test_llama_bench_samples_become_pp_and_tg_tests(tmp_path):
    # what llama-bench -o json prints, cut to the fields read: pp at each depth, tg at each
    runs = [
        {"n_prompt": 8, "n_gen": 0, "n_depth": 0, "avg_ts": 50.0, "samples_ts": [40.0, 60.0]},
        {"n_prompt": 0, "n_gen": 3, "n_depth": 0, "avg_ts": 9.0, "samples_ts": [8.0, 10.0]},
        {"n_prompt": 8, "n_gen": 0, "n_depth": 16, "avg_ts": 30.0, "samples_ts": [30.0]},
        {"n_prompt": 0, "n_gen": 3, "n_depth": 16, "avg_ts": 7.0, "samples_ts": [7.0, 7.0]},
    ]
    fake = tmp_path / "llama-bench"
    fake.write_text(f"#!/bin/sh\necho '{json.dumps(runs)}'\n")
    fake.chmod(0o755)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    job = Job("hetero", str(model), 1, 8, 3, [0, 16], [1], 2)
    row = peer_row("llama.cpp", job, None, str(fake), tmp_path)
    tests = {t["test"]: t for t in row["tests"]}
    assert list(tests) == ["pp8", "tg3", "tg3 @ d16"]
    assert tests["pp8"]["median"] == 50.0 and tests["pp8"]["min"] == 40.0
    assert tests["tg3 @ d16"]["samples"] == [7.0, 7.0]
    assert row["note"].startswith("CPU only") and row["peak_rss_bytes"] > 0


FAKE_LLAMA_CPP = """
import json, os


class Llama:
    def __init__(self, model_path, **settings):
        self.log = open(os.environ["FAKE_LLAMA_LOG"], "a")
        self.log.write(json.dumps({"model": model_path, **settings}) + "\\n")
        self.n_tokens = 0

    def n_vocab(self):
        return 50

    def reset(self):
        self.n_tokens = 0

    def eval(self, tokens):
        assert all(0 <= t < 50 for t in tokens)
        self.n_tokens += len(tokens)
        self.log.write(json.dumps({"eval": len(tokens), "after": self.n_tokens}) + "\\n")
        self.log.flush()

    def sample(self, temp):
        assert temp == 0.0 and self.n_tokens > 0
        return 7
"""


def test_llama_cpp_python_runs_the_peer_where_llama_bench_is_missing(tmp_path, monkeypatch):
    package = tmp_path / "site" / "llama_cpp"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_LLAMA_CPP)
    log = tmp_path / "calls.jsonl"
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    path = os.pathsep.join(filter(None, [str(tmp_path / "site"), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("FAKE_LLAMA_LOG", str(log))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    job = Job("hetero", str(model), 2, 8, 3, [0, 16], [1], 2)
    row = peer_row("llama.cpp", job, None, None, tmp_path)
    assert "error" not in row, row
    assert [t["test"] for t in row["tests"]] == ["pp8", "tg3", "tg3 @ d16"]
    assert all(len(t["samples"]) == 2 for t in row["tests"])
    assert "llama-cpp-python" in row["note"] and row["note"].startswith("CPU only")
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls[0]["n_threads"] == 2 and calls[0]["n_gpu_layers"] == 0
    evals = [c["eval"] for c in calls[1:]]
    # warm-up, two prompts; then per depth and repeat: the depth's prompt, two decoded tokens
    assert evals == [2, 8, 8] + [1, 1, 1] * 2 + [16, 1, 1] * 2


def test_the_llama_peer_says_what_to_install_when_neither_form_is_there(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    job = Job("hetero", str(tmp_path / "m.gguf"), 1, 8, 3, [0], [1], 1)
    row = peer_row("llama.cpp", job, None, None, tmp_path)
    assert "llama-bench is not on PATH" in row["error"] and "llama-cpp-python" in row["error"]


def test_bench_runs_placements_and_peers_and_writes_table_json_and_charts(
    tmp_path, checkpoint_factory
):
    other, _ = checkpoint_factory("qwen3_moe")
    other_plan = tmp_path / "other.json"
    plan_for_model(str(other), None, "8GiB", 64, 1).save(other_plan)
    out = tmp_path / "out"
    placements = f"cpu,torch,disk-experts,hot-experts:1,bogus,plan:{other_plan}"
    args = ["demo", "--placements", placements, "--accelerator", "sim", "-p", "8", "-n", "3"]
    args += ["-d", "0,8", "--repeat", "1", "--concurrency", "1,2", "--out", str(out)]
    # PATH without llama-bench: its row says so
    result = bench(*args, cache=tmp_path, path=os.path.dirname(sys.executable) + ":/bin")
    assert result.returncode == 0, result.stderr

    data = json.loads((out / "results.json").read_text())
    assert {"model", "command", "settings", "machine", "hardware", "rows"} <= set(data)
    assert {"cpu", "cpu_flags", "cores", "ram_bytes", "accelerator", "versions"} <= set(
        data["machine"]
    )
    rows = {row["name"]: row for row in data["rows"]}
    assert list(rows) == placements.split(",") + ["llama.cpp", "transformers"]
    for name in ("cpu", "torch", "disk-experts", "hot-experts:1"):
        row = rows[name]
        assert {"tests", "ttft_s", "peak_rss_bytes", "plan"} <= set(row), name
        tests = [t["test"] for t in row["tests"]]
        assert tests == ["pp8", "tg3", "tg3 x2", "tg3 @ d8", "tg3 @ d8 x2"], name
        for test in row["tests"]:
            assert set(test) >= TEST_KEYS
    # the sim lane's rows are labelled, and set beside the sim lane's own prediction
    assert rows["hot-experts:1"]["simulated"] and rows["hot-experts:1"]["tests"][0]["ratio"] > 0
    assert rows["cpu"]["tests"][0]["ratio"] > 0
    assert rows["cpu"]["plan"]["kv_dtype"] == "f32"  # as `hetero generate`: the compute dtype
    assert "unknown placement" in rows["bogus"]["error"]
    assert "the plan was made for" in rows[f"plan:{other_plan}"]["error"]
    assert "not on PATH" in rows["llama.cpp"]["error"]
    assert [t["test"] for t in rows["transformers"]["tests"]] == ["pp8", "tg3", "tg3 @ d8"]

    for name in ("cpu", "torch", "disk-experts", "hot-experts:1 (sim)", "bogus", "transformers"):
        assert name in result.stdout
    table = (out / "results.md").read_text()
    assert "| row | test | tok/s |" in table and "| cpu | pp8 |" in table
    for chart in CHARTS:
        assert (out / chart).read_bytes()[:4] == b"\x89PNG"


def test_accelerator_rows_say_why_without_an_accelerator(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    out = tmp_path / "out"
    result = bench(
        "demo", "--placements", "attn-accel", "--peers", "none", "--out", str(out), cache=tmp_path
    )
    assert result.returncode == 0, result.stderr
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert "no accelerator" in row["error"]
    cuda = bench("demo", "--accelerator", "cuda", "--out", str(out), cache=tmp_path)
    assert cuda.returncode == 2 and "no CUDA device" in cuda.stderr, cuda.stderr


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["-p", "0"], "-p >= 1"),
        (["-d", "0,x"], "comma-separated integers"),
        (["-d", "5000"], "lower them"),
        (["--peers", "vllm"], "choose from"),
        (["--placements", ""], "is empty"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_unusable_arguments_are_one_line_and_exit_2(tmp_path, args, fragment):
    result = bench("demo", *args, "--out", str(tmp_path / "out"), cache=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hetero: error:") and fragment in lines[0]


def test_markdown_rows_keep_their_columns_when_a_reason_quotes_a_regex():
    from hetero.bench.report import COLUMNS, markdown

    settings = dict(prompt_tokens=8, new_tokens=3, depths=[0], concurrency=[1], repeat=1)
    machine = dict(cpu="x", cpu_flags=[], cores=1, threads=1, ram_bytes=2**30, accelerator=None)
    results = {
        "model": "m",
        "command": "hetero bench m",
        "settings": {**settings, "threads": 1, "accelerator": "sim"},
        "machine": {**machine, "load_average": [0.0] * 3, "versions": {}},
        "hardware": "defaults",
        "rows": [{"name": "disk-experts", "error": "rule ffn_(up|down|gate)_exps=disk failed"}],
    }
    row = next(line for line in markdown(results).splitlines() if line.startswith("| disk"))
    assert row.replace("\\|", "").count("|") == len(COLUMNS) + 1
