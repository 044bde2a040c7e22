"""`hetero plan`, `hetero profile` and `hetero probe` end to end: tables and JSON for config
files, GGUF files and the demo model; a recorded routing profile feeding a plan; a probe
cached and used; bad input as one line and exit code 2."""

from __future__ import annotations

import json

import pytest
import torch
from gguf import GGUFReader
from test_placement_sizes import CONFIGS

from hetero.cli import main
from placement.hardware import load_hardware
from placement.plan import Plan, load_plan

V2_LITE = str(CONFIGS / "DeepSeek-V2-Lite" / "config.json")
BUDGETS = ["--vram-budget", "8GiB", "--dram-budget", "64GiB"]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    """A private cache folder: the demo model, probes."""
    folder = tmp_path_factory.getbasetemp() / "hetero-cache"
    monkeypatch.setenv("HETERO_CACHE", str(folder))
    return folder


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("hetero: error:") and fragment in lines[0], err


def test_plan_prints_placement_memory_and_speed(capsys):
    code, out, _ = run(capsys, "plan", V2_LITE, "--quant", "q4_k_m", *BUDGETS)
    assert code == 0
    for fragment in ("Placement", "Memory", "KV cache", "GPU experts serve", "Predicted"):
        assert fragment in out
    assert "bound by" in out and "24.0 GiB" not in out


def test_plan_json_and_save_agree(capsys, tmp_path):
    saved = tmp_path / "plan.json"
    code, out, _ = run(capsys, "plan", V2_LITE, *BUDGETS, "--json", "--save", str(saved))
    assert code == 0
    printed = Plan.from_dict(json.loads(out))
    assert load_plan(saved) == printed
    assert printed.model.weights == "bf16 as loaded"
    assert printed.totals["gpu"] <= 8 * 1024**3


@pytest.mark.parametrize(
    "name, text, group, device",
    [
        (
            "rules.yaml",
            "- match: '^model\\.layers\\.2\\.mlp\\.experts\\.'\n  device: disk\n"
            "- match: 'attn_kv_b'\n  device: cpu\n",
            "layers.2.experts.63",
            "disk",
        ),
        ("rules.json", json.dumps({"rules": ["blk\\.4\\.attn_=cpu"]}), "layers.4.attention", "cpu"),
    ],
)
def test_plan_reads_rules_from_yaml_and_json(capsys, tmp_path, name, text, group, device):
    rules = tmp_path / name
    rules.write_text(text)
    code, out, _ = run(capsys, "plan", V2_LITE, *BUDGETS, "--rules", str(rules), "--json")
    assert code == 0
    assert Plan.from_dict(json.loads(out)).device_of(group) == device


@pytest.fixture
def one_thread():
    """`--threads 1` sets torch's process-wide thread count: restore it afterwards. (On a
    busy 2-core machine one thread also runs the tiny demo 100x faster than two.)"""
    threads = torch.get_num_threads()
    yield "1"
    torch.set_num_threads(threads)


def test_profile_records_routing_and_the_plan_uses_it(capsys, tmp_path, one_thread):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\n\nWhat is a mixture of experts?\n")
    profile = tmp_path / "profile.json"
    code, out, err = run(
        capsys,
        "profile",
        "demo",
        "--prompts",
        str(prompts),
        "--out",
        str(profile),
        "-n",
        "3",
        "--chat",
        "--threads",
        one_thread,
    )
    assert code == 0, err
    assert "MoE layers" in out
    layers = json.loads(profile.read_text())["layers"]
    assert len(layers) == 4 and all(sum(v["counts"]) == 4 * v["tokens"] for v in layers.values())
    code, out, _ = run(
        capsys,
        "plan",
        "demo",
        "--profile",
        str(profile),
        "--vram-budget",
        "1GiB",
        "--dram-budget",
        "4GiB",
        "--json",
    )
    placed = Plan.from_dict(json.loads(out))
    assert code == 0 and placed.profile == str(profile) and placed.model.name == "demo-v1"
    assert placed.expert_share_gpu == pytest.approx(1.0)  # the demo fits


def test_plan_sizes_a_gguf_by_its_stored_types(capsys, tmp_path, one_thread):
    """A Q4_K_M GGUF written by `hetero quantize`: the plan's bytes are the file's tensor
    bytes, and equal what `--quant q4_k_m` plans for the model it came from."""
    path = tmp_path / "demo-q4_k_m.gguf"
    assert run(capsys, "quantize", "demo", str(path), "--type", "q4_k_m")[0] == 0
    rule = r"model\.layers\.1\.mlp\.experts\.0\.=disk"
    code, out, err = run(
        capsys,
        "plan",
        str(path),
        "--vram-budget",
        "0",
        "--dram-budget",
        "4GiB",
        "--json",
        "--override",
        rule,
    )
    assert code == 0, err
    placed = Plan.from_dict(json.loads(out))
    assert placed.model.weights == "GGUF types" and placed.model.experts == 16
    assert placed.model.weight_bytes == sum(t.n_bytes for t in GGUFReader(path).tensors)
    assert placed.device_of("layers.1.experts.0") == "disk"
    assert placed.totals["disk"] == placed.experts[1].nbytes_each
    code, out, _ = run(
        capsys,
        "plan",
        "demo",
        "--quant",
        "q4_k_m",
        "--vram-budget",
        "0",
        "--dram-budget",
        "4GiB",
        "--json",
    )
    assert json.loads(out)["model"]["weight_bytes"] == placed.model.weight_bytes


def test_probe_measures_caches_and_feeds_the_plan(capsys, cache):
    code, out, _ = run(capsys, "probe", "--buffer-mib", "8")
    assert code == 0 and "dram_read_gbs" in out
    assert (cache / "probe.json").is_file()
    measured = load_hardware()
    assert measured.source.startswith("hetero probe") and measured.dram_read_gbs > 0
    code, out, _ = run(capsys, "plan", V2_LITE, *BUDGETS, "--json")
    assert json.loads(out)["predicted"]["hardware"] == measured.source


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--quant", "q3_k_xl"], "unknown weight type 'q3_k_xl'"),
        (["--vram-budget", "24XB"], "malformed --vram-budget '24XB'"),
        (["--dram-budget", "lots"], "malformed --dram-budget 'lots'"),
        (["--override", "attn=gpu0"], "unknown device 'gpu0'"),
        (["--override", "no-device"], "is not REGEX=DEVICE"),
        (["--override", "(=cpu"], "not a valid regex"),
        (["--context", "999999"], "exceeds the 163840 positions"),
        (["--context", "0"], "--context must be >= 1, got 0"),
        (["--rules", "missing.yaml"], "rules file missing.yaml does not exist"),
        (["--rules", __file__], "does not parse"),
        (["--profile", "missing.json"], "routing profile missing.json does not exist"),
        (["--vram-budget", "2GiB", "--context", "163840", "--concurrency", "8"], "GiB short"),
    ],
)
def test_bad_plan_input_is_one_line_and_exit_2(capsys, args, fragment):
    code, _, err = run(capsys, "plan", V2_LITE, "--dram-budget", "64GiB", *args)
    assert_one_line_error(code, err, fragment)


def test_missing_model_is_one_line_and_exit_2(capsys, tmp_path):
    code, _, err = run(capsys, "plan", str(tmp_path / "nope.gguf"))
    assert_one_line_error(code, err, "does not exist")
    (tmp_path / "notes.txt").write_text("hello")
    code, _, err = run(capsys, "plan", str(tmp_path / "notes.txt"))
    assert_one_line_error(code, err, "neither a model directory, a config.json nor a .gguf")
    code, _, err = run(
        capsys,
        "profile",
        "demo",
        "--prompts",
        str(tmp_path / "no.txt"),
        "--out",
        str(tmp_path / "p.json"),
    )
    assert_one_line_error(code, err, "prompts file")
