"""Sizing models before they are downloaded: llama.cpp's Q4_K_M mixture reproduced from the
public config.json files (tests/data/configs) lands on the published GGUF file sizes; sizes,
budgets and weight types given by users parse or fail with one clear message."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest

from placement.budgets import MachineMemory, machine_memory, resolve_budgets
from placement.errors import PlacementError
from placement.inventory import ModelInventory, inventory_from_config, open_model
from placement.sizes import GIB, gib, parse_size

CONFIGS = Path(__file__).parent / "data" / "configs"
GB = 1e9


@cache
def inventory(name: str, quant: str | None = "q4_k_m") -> ModelInventory:
    return open_model(str(CONFIGS / name), quant)


# Published Q4_K_M GGUF file sizes (decimal GB, as Hugging Face lists them). File headers and
# the tokenizer add well under 0.1%.
PUBLISHED_Q4_K_M = {
    # unsloth/DeepSeek-V3-GGUF (and -R1): 404 GB = 377 GiB; the GGUF has no MTP layer (the
    # converter skips layer 61, num_nextn_predict_layers), nor has hetero's model
    "DeepSeek-V3": 404.0,
    # Qwen/Qwen3-30B-A3B-GGUF, Qwen3-30B-A3B-Q4_K_M.gguf
    "Qwen3-30B-A3B": 18.6,
    # unsloth/DeepSeek-V2-Lite-Chat-GGUF; its 1408-wide experts do not split into 256-value
    # K-quant blocks, so their ffn_down falls back to Q5_0 / Q8_0
    "DeepSeek-V2-Lite": 10.4,
    # altomek/Mixtral-8x7B-Instruct-v0.1-GGUF (same shapes as v0.1), today's llama.cpp. The
    # often quoted 26.4 GB (TheBloke/Mixtral-8x7B-v0.1-GGUF) was made with llama.cpp of
    # December 2023 (commit 8a7b2fa), before expert ffn_down got Q6_K in use_more_bits
    # layers: that repository's Q4_0, Q4_K_S and Q4_K_M files are all 26.4 GB, and
    # ikawrakow's table of the time gives its Q4_K_S and Q4_K_M the same perplexity.
    "Mixtral-8x7B-v0.1": 28.4,
    # unsloth/Qwen3-235B-A22B-GGUF, Q4_K_M (3 parts)
    "Qwen3-235B-A22B": 142.7,
    # Qwen/Qwen2-57B-A14B-Instruct-GGUF, q4_k_m
    "Qwen2-57B-A14B": 34.7,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_Q4_K_M))
def test_q4_k_m_size_matches_the_published_gguf(name):
    planned = inventory(name).weight_bytes / GB
    assert planned == pytest.approx(PUBLISHED_Q4_K_M[name], rel=0.05)


def test_deepseek_v3_q4_k_m_is_377_gib():
    assert inventory("DeepSeek-V3").weight_bytes / GIB == pytest.approx(377, rel=0.01)


def test_mixtral_8x22b_mixtures_match_llama_cpp_to_a_tenth_of_a_percent():
    """bartowski/Mixtral-8x22B-v0.1-GGUF (llama.cpp b2636) lists Q5_K_M 99.96 GB and Q4_K_M
    85.58 GB: every per-tensor rule of the mixture at once (8-expert attn_v/attn_k at Q8_0,
    attn_output Q5_K, use_more_bits ffn_down)."""
    raw = json.loads((CONFIGS / "Mixtral-8x7B-v0.1" / "config.json").read_text())
    raw.update(
        hidden_size=6144,
        intermediate_size=16384,
        num_hidden_layers=56,
        num_attention_heads=48,
        max_position_embeddings=65536,
    )
    for quant, size_gb in {"q5_k_m": 99.96, "q4_k_m": 85.58}.items():
        planned = inventory_from_config(raw, "Mixtral-8x22B", "test", quant).weight_bytes
        assert planned / GB == pytest.approx(size_gb, rel=0.001), quant


def weight_types(inv: ModelInventory) -> dict[str, str]:
    return {t.gguf_name: t.weight_type for g in inv.groups for t in g.tensors}


def test_q4_k_m_gives_more_bits_to_the_sensitive_tensors():
    types = weight_types(inventory("Qwen3-30B-A3B"))
    assert types["output.weight"] == "q6_k"
    assert types["token_embd.weight"] == "q4_k"
    assert types["blk.0.ffn_down_exps.weight"] == "q6_k"  # first eighth of 48 layers
    assert types["blk.6.ffn_down_exps.weight"] == "q4_k"
    assert types["blk.8.ffn_down_exps.weight"] == "q6_k"  # (8 - 6) % 3 == 2
    assert types["blk.0.attn_v.weight"] == "q6_k"
    assert types["blk.6.attn_v.weight"] == "q4_k"
    assert types["blk.6.ffn_gate_inp.weight"] == "f32"  # routers are never quantised
    assert types["blk.6.attn_norm.weight"] == "f32"


def test_k_quant_falls_back_when_rows_do_not_fill_a_block():
    types = weight_types(inventory("DeepSeek-V2-Lite"))
    assert types["blk.4.ffn_gate_exps.weight"] == "q4_k"  # rows of 2048
    assert types["blk.4.ffn_down_exps.weight"] == "q5_0"  # rows of 1408: Q4_K -> Q5_0
    assert types["blk.5.ffn_down_exps.weight"] == "q8_0"  # a use_more_bits layer: Q6_K -> Q8_0


def test_a_tied_head_is_the_embedding_sized_once_as_the_output():
    raw = json.loads((CONFIGS / "Qwen3-30B-A3B" / "config.json").read_text())
    tied = inventory_from_config({**raw, "tie_word_embeddings": True}, "tied", "test", "q4_k_m")
    names = [g.name for g in tied.groups]
    assert "embed" not in names and "lm_head" in names
    assert weight_types(tied)["token_embd.weight"] == "q6_k"
    untied = inventory("Qwen3-30B-A3B")
    embed = next(g.nbytes for g in untied.groups if g.kind == "embed")
    assert tied.weight_bytes < untied.weight_bytes - embed / 2


def test_checkpoint_directories_are_sized_as_hetero_loads_them():
    """No --quant: the config's torch_dtype (DeepSeek-V3's fp8 is dequantised to bf16)."""
    loaded = inventory("DeepSeek-V3", None)
    assert loaded.weights == "bf16 as loaded"
    assert loaded.weight_bytes / GB == pytest.approx(2 * 671.0, rel=0.01)


def test_unknown_weight_type_is_refused_by_name():
    with pytest.raises(PlacementError, match="unknown weight type 'q3_k_xl'.*q4_k_m"):
        inventory("Qwen3-30B-A3B", "q3_k_xl")


@pytest.mark.parametrize(
    "text, whole, expected",
    [
        ("24GiB", None, 24 * GIB),
        ("24G", None, 24 * GIB),
        ("24 gb", None, 24 * 10**9),
        ("512MiB", None, 512 * 2**20),
        ("1.5TiB", None, int(1.5 * 2**40)),
        ("80%", 100 * GIB, 80 * GIB),
        ("0", None, 0),
    ],
)
def test_sizes_parse(text, whole, expected):
    assert parse_size(text, whole) == expected


@pytest.mark.parametrize("text", ["24XB", "GiB", "-3GiB", "120%", "lots"])
def test_malformed_sizes_are_refused(text):
    with pytest.raises(PlacementError, match="malformed --vram-budget|more than 100%"):
        parse_size(text, 100 * GIB, "--vram-budget")


def test_sizes_print_in_the_unit_that_reads_best():
    assert gib(24 * GIB) == "24.0 GiB"
    assert gib(6 * 2**20) == "6.0 MiB"
    assert gib(0) == "0 GiB"


MACHINE = MachineMemory(
    vram_total=[24 * GIB, 24 * GIB],
    vram_free=[23 * GIB, 22 * GIB],
    dram_total=256 * GIB,
    dram_available=200 * GIB,
)
NO_GPU = MachineMemory([], [], 64 * GIB, 60 * GIB)


def test_default_budgets_are_free_memory_minus_a_reserve():
    budgets = resolve_budgets(None, None, None, MACHINE)
    assert budgets.gpus == 2
    assert budgets.vram_bytes == 22 * GIB - int(1.2 * GIB)  # the fuller GPU, 5% reserve
    assert budgets.dram_bytes == 200 * GIB - int(12.8 * GIB)


def test_budgets_given_as_sizes_and_shares():
    budgets = resolve_budgets("80%", "50%", 1, MACHINE)
    assert (budgets.vram_bytes, budgets.gpus, budgets.dram_bytes) == (
        int(0.8 * 24 * GIB),
        1,
        128 * GIB,
    )


def test_without_a_gpu_the_default_plans_for_the_cpu_and_a_size_plans_for_a_gpu():
    assert resolve_budgets(None, None, None, NO_GPU).gpus == 0
    assert resolve_budgets("0", None, None, MACHINE).gpus == 0
    elsewhere = resolve_budgets("24GiB", "128GiB", None, NO_GPU)
    assert (elsewhere.gpus, elsewhere.vram_bytes) == (1, 24 * GIB)
    with pytest.raises(PlacementError, match="no GPU is visible"):
        resolve_budgets("80%", None, None, NO_GPU)


def test_this_machine_reports_its_memory():
    machine = machine_memory()
    assert 0 < machine.dram_available <= machine.dram_total
    assert len(machine.vram_free) == len(machine.vram_total)
