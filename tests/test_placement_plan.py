"""Plans as files: they round-trip through JSON unchanged, carry the fields the runtime and
users read, and `load_plan` refuses other versions and malformed files."""

from __future__ import annotations

import json

import pytest
from test_placement_policy import plan

from placement.errors import PlacementError
from placement.plan import PLAN_VERSION, Plan, load_plan


@pytest.fixture(scope="module")
def deepseek_plan() -> Plan:
    return plan("DeepSeek-V2-Lite", vram_gib=4, dram_gib=64, rules=[r"blk\.1\.=cpu"])


def test_plans_round_trip_through_json(deepseek_plan, tmp_path):
    path = tmp_path / "plan.json"
    deepseek_plan.save(path)
    assert load_plan(path) == deepseek_plan
    assert Plan.from_dict(json.loads(deepseek_plan.to_json())) == deepseek_plan


def test_plan_json_has_totals_prediction_and_every_group(deepseek_plan):
    data = json.loads(deepseek_plan.to_json())
    assert data["version"] == PLAN_VERSION
    assert set(data["totals"]) == {"gpu", "cpu", "disk"}
    assert all(isinstance(v, int) for v in data["totals"].values())
    assert {"decode_tok_s", "prefill_tok_s", "bound"} <= set(data["predicted"])
    kinds = {g["kind"] for g in data["groups"]}
    assert {"embed", "lm_head", "attention", "norms", "router", "shared_experts"} <= kinds
    assert len(data["experts"]) == 26 and all(len(e["devices"]) == 64 for e in data["experts"])
    assert data["kv_cache"]["nbytes"]["gpu"] > 0 and data["workspace"]["gpu"] > 0


def test_load_plan_refuses_another_version(deepseek_plan, tmp_path):
    data = deepseek_plan.to_dict()
    data["version"] = PLAN_VERSION + 1
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlacementError, match=f"version {PLAN_VERSION + 1}.*hetero plan"):
        load_plan(path)


@pytest.mark.parametrize("content", ["{not json", '{"version": 1}', "[1, 2]"])
def test_load_plan_refuses_malformed_files(tmp_path, content):
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(PlacementError, match="plan"):
        load_plan(path)


def test_load_plan_refuses_a_missing_file(tmp_path):
    with pytest.raises(PlacementError, match="does not exist"):
        load_plan(tmp_path / "nope.json")
