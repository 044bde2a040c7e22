"""Plans that execute: `hetero.load(..., plan=...)` builds each tensor group where the plan puts
it. A CPU-only plan builds exactly the modules a load without a plan builds; groups on disk are
computed from the memory-mapped file and give the same greedy tokens; a plan for another model,
a corrupt plan, a budget too small and a vanished model file are one line and exit 2."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_checkpoint
from test_cli import assert_one_line_error
from test_cli import hetero as run_hetero

import hetero
from hetero.demo import write_demo
from hetero.models.experts import TorchExperts
from hetero.runtime.assembler import PlanMismatchError, SplitExperts
from hetero.runtime.disk import DiskLinear, DiskMLP
from placement.plan import Plan, load_plan

# half of the experts of layers 0 and 2, and layer 1's attention, on disk
DISK_RULES = ("layers\\.[02]\\..*experts\\.[0-7]\\.=disk", "layers\\.1\\.self_attn=disk")
DTYPE_NAMES = {"f32": "float32", "bf16": "bfloat16"}
PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]


def make_plan(model: str, path, *rules: str) -> Plan:
    overrides = [arg for rule in rules for arg in ("--override", rule)]
    made = run_hetero("plan", model, "--vram-budget", "0", *overrides, "--save", str(path))
    assert made.returncode == 0, made.stderr
    return load_plan(path)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def demo_gguf(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "demo-q8_0.gguf"
    made = run_hetero("quantize", str(demo), str(out), "--type", "q8_0")
    assert made.returncode == 0, made.stderr
    return out


def module_types(model) -> list[tuple[str, str]]:
    return [(name, type(m).__name__) for name, m in model.net.named_modules()]


@pytest.mark.parametrize("quant", ["auto", "none"])
def test_a_cpu_only_plan_builds_exactly_todays_modules(demo, tmp_path, quant):
    plan = make_plan(str(demo), tmp_path / "plan.json")
    assert {g.device for g in plan.groups} == {"cpu"}
    today = hetero.load(demo, quant=quant, progress=False)
    planned = hetero.load(demo, quant=quant, progress=False, plan=plan)
    assert module_types(planned) == module_types(today)
    assert torch.equal(planned.logits(PROMPT), today.logits(PROMPT))
    assert planned.disk_bytes == 0


@pytest.mark.parametrize("quant", ["auto", "none"])
def test_groups_on_disk_give_the_greedy_tokens_of_an_all_dram_plan(demo, tmp_path, quant):
    plan = make_plan(str(demo), tmp_path / "plan.json", *DISK_RULES)
    assert plan.experts[0].devices.count("disk") == 8
    in_dram = hetero.load(demo, quant=quant, progress=False)
    mixed = hetero.load(demo, quant=quant, progress=False, plan=plan)
    layer0 = mixed.net.layers[0].mlp.experts
    if quant == "none":
        assert [isinstance(m, DiskMLP) for m in layer0] == [True] * 8 + [False] * 8
    else:  # the kernels hold experts 8-15, the file the rest
        assert isinstance(layer0, SplitExperts)
    assert isinstance(mixed.net.layers[1].self_attn.q_proj, DiskLinear)
    assert mixed.disk_bytes > 0 and mixed.weight_bytes < in_dram.weight_bytes
    expected = in_dram.generate(PROMPT, max_new_tokens=12).token_ids
    assert mixed.generate(PROMPT, max_new_tokens=12).token_ids == expected
    torch.testing.assert_close(mixed.logits(PROMPT), in_dram.logits(PROMPT))


def test_a_gguf_model_computes_its_disk_experts_from_the_stored_blocks(demo_gguf, tmp_path):
    plan = make_plan(str(demo_gguf), tmp_path / "plan.json", *DISK_RULES)
    mixed = hetero.load(demo_gguf, progress=False, plan=plan)
    split = mixed.net.layers[2].mlp.experts
    assert isinstance(split, SplitExperts) and mixed.disk_bytes > 0
    # a disk expert is the float32 SwiGLU of the stored Q8_0 blocks, dequantised
    as_float = hetero.load(demo_gguf, progress=False, quant="none", dtype="float32")
    seed = torch.seed()
    x = torch.randn(5, as_float.config.hidden_size)
    disk_expert = split.parts[1][3]  # expert 3 of layer 2
    assert isinstance(disk_expert, DiskMLP), f"seed {seed}"
    torch.testing.assert_close(disk_expert(x), as_float.net.layers[2].mlp.experts[3](x))
    # (greedy tokens are not compared with the all-DRAM load: its kernels quantise activations
    # to int8, disk multiplies them as float32, and a random model's close logits may swap)
    assert len(mixed.generate(PROMPT, max_new_tokens=4).token_ids) == 4


def test_a_plan_for_another_model_is_refused(demo, demo_gguf, tmp_path):
    plan = make_plan(str(demo), tmp_path / "plan.json")
    with pytest.raises(PlanMismatchError, match="made for"):
        hetero.load(demo_gguf, progress=False, plan=plan)
    result = run_hetero(
        "generate", str(demo_gguf), "--prompt", "hi", "--plan", str(tmp_path / "plan.json")
    )
    assert_one_line_error(result, "hetero plan")


def test_the_load_log_says_what_the_plan_put_where(demo, tmp_path):
    make_plan(str(demo), tmp_path / "plan.json", *DISK_RULES)
    result = run_hetero(
        "generate", str(demo), "--prompt", "hi", "-n", "2", "--plan", str(tmp_path / "plan.json")
    )
    assert result.returncode == 0, result.stderr
    assert "executing the plan:" in result.stderr and "on disk" in result.stderr


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ('{"version": 99}', "version"),
        ('{"version": 1}', "malformed"),
    ],
)
def test_a_corrupt_plan_is_one_line_and_exit_2(demo, tmp_path, content, fragment):
    bad = tmp_path / "plan.json"
    bad.write_text(content)
    assert_one_line_error(
        run_hetero("generate", str(demo), "--prompt", "hi", "--plan", str(bad)), fragment
    )


def test_a_budget_below_what_every_token_needs_is_one_line(demo):
    result = run_hetero("generate", str(demo), "--prompt", "hi", "--dram-budget", "5MiB")
    assert_one_line_error(result, "DRAM budget")


def test_a_plan_and_budgets_exclude_each_other(demo, tmp_path):
    make_plan(str(demo), tmp_path / "plan.json")
    result = run_hetero(
        "chat", str(demo), "--plan", str(tmp_path / "plan.json"), "--vram-budget", "1GiB"
    )
    assert_one_line_error(result, "exclude each other")


def test_a_model_file_that_vanished_is_one_line(demo, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(demo, copy)
    make_plan(str(copy), tmp_path / "plan.json", *DISK_RULES)
    for weights in copy.glob("*.safetensors"):
        weights.unlink()
    result = run_hetero(
        "generate", str(copy), "--prompt", "hi", "--plan", str(tmp_path / "plan.json")
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr


def test_split_experts_match_one_backend_holding_them_all():
    seed = torch.seed()
    hidden, size, experts, top_k = 24, 40, 6, 3
    whole = TorchExperts(experts, hidden, size)
    for p in whole.parameters():
        torch.nn.init.normal_(p, std=0.2)
    # experts 0, 2, 5 on one backend, 1, 3, 4 on another; no token routes to expert 4
    first, second = [0, 2, 5], [1, 3, 4]
    split = SplitExperts(
        [
            (TorchExperts.of([whole[e] for e in first]), first),
            (TorchExperts.of([whole[e] for e in second]), second),
        ],
        experts,
    )
    x = torch.randn(7, hidden)
    ids = torch.stack([torch.randperm(4)[:top_k] for _ in range(7)])  # experts 0-3 only
    ids[ids == 3] = 5
    weights = torch.softmax(torch.randn(7, top_k), dim=-1)
    torch.testing.assert_close(split(x, ids, weights), whole(x, ids, weights), msg=f"seed {seed}")
    one = ids[:1, :1]  # a single pair: one backend gets none
    assert torch.equal(split(x[:1], one, weights[:1, :1]), whole(x[:1], one, weights[:1, :1]))


@pytest.mark.parametrize(("kv_dtype", "expected"), [("auto", "f32"), ("bf16", "bf16")])
def test_the_kv_cache_allocated_is_the_one_the_plan_sized(demo, kv_dtype, expected):
    from hetero.model_options import load_from_args, plan_from_args

    args = argparse.Namespace(
        model=str(demo),
        dtype="auto",
        quant="auto",
        threads=None,
        kv_dtype=kv_dtype,
        plan=None,
        vram_budget=None,
        dram_budget=None,
        sparse_attention=None,
    )
    plan = plan_from_args(args, 64, 2)
    model = load_from_args(args, plan)
    kv = model.new_kv_cache(plan.kv_cache.tokens, plan.kv_cache.sequences)
    assert plan.kv_cache.dtype == expected
    assert {str(layer.dtype) for layer in kv.layers} == {f"torch.{DTYPE_NAMES[expected]}"}
    assert kv.bytes_per_token == plan.kv_cache.bytes_per_token
    assert kv.num_blocks * kv.block_size * kv.bytes_per_token == plan.kv_cache.nbytes["cpu"]


def test_a_saved_plans_kv_dtype_wins(demo, tmp_path):
    from hetero.model_options import load_from_args

    made = run_hetero(
        "plan", str(demo), "--kv-dtype", "bf16", "--context", "64", "--save", str(tmp_path / "p")
    )
    assert made.returncode == 0, made.stderr
    args = argparse.Namespace(
        model=str(demo), dtype="auto", quant="auto", threads=None, sparse_attention=None
    )
    model = load_from_args(args, load_plan(tmp_path / "p"))
    assert model.new_kv_cache(64).layers[0].dtype == torch.bfloat16


DISK_RSS_PROBE = """
    import json, psutil, torch, hetero
    from placement.plan import load_plan
    plan = load_plan({plan!r}) if {plan!r} else None
    torch.ones(1) @ torch.ones(1)
    model = hetero.load({path!r}, progress=False, quant="f32", plan=None)
    del model
    before = psutil.Process().memory_info().rss
    model = hetero.load({path!r}, progress=False, quant="f32", plan=plan)
    after_load = psutil.Process().memory_info().rss
    tokens = model.generate([1, 2, 3], max_new_tokens=2).token_ids
    print(json.dumps(dict(grown=after_load - before, tokens=tokens)))
"""


def test_experts_on_disk_take_no_dram_at_load(tmp_path):
    """A model larger than DRAM runs: experts the plan leaves on disk are not copied into
    memory at load (the kernels' DRAM copy is what an all-DRAM load adds)."""
    path = tmp_path / "wide-moe"
    path.mkdir()
    # 2 MoE layers x 32 experts of 3 x 64 x 2048 float32: 96 MiB of routed experts
    make_checkpoint(
        path, "qwen3_moe", num_experts=32, moe_intermediate_size=2048, mlp_only_layers=[]
    )
    expert_bytes = 2 * 32 * 3 * 64 * 2048 * 4
    plan_file = tmp_path / "plan.json"
    make_plan(str(path), plan_file, "experts=disk")

    def probe(plan: str) -> dict:
        code = textwrap.dedent(DISK_RSS_PROBE.format(path=str(path), plan=plan))
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    in_dram, on_disk = probe(""), probe(str(plan_file))
    assert in_dram["grown"] > 0.8 * expert_bytes  # repacked for the kernels: anonymous memory
    assert on_disk["grown"] < 0.1 * expert_bytes
    assert on_disk["tokens"] == in_dram["tokens"]
