"""Constrained decoding's pieces: masks applied bit for bit, JSON nesting read from text, and a
random-weight model made to write valid JSON within its token budget."""

from __future__ import annotations

import json
import os

import pytest
import torch

import hetero
from hetero.demo import ensure_demo
from hetero.runtime.engine import Engine, GenerationResult, Request
from hetero.runtime.grammar import GrammarCompiler, apply_token_masks, json_nesting
from hetero.runtime.sampling import SamplingParams


@pytest.mark.parametrize("rows, vocab", [(1, 1), (3, 33), (16, 151936)])
def test_token_masks_keep_exactly_the_allowed_logits(rows, vocab):
    generator = torch.Generator().manual_seed(0)
    allowed = torch.rand(rows, vocab, generator=generator) < 0.3
    padded = torch.zeros(rows, -(-vocab // 32) * 32, dtype=torch.bool)
    padded[:, :vocab] = allowed
    weights = 1 << torch.arange(32, dtype=torch.int64)
    words = (padded.view(rows, -1, 32).long() * weights).sum(-1)
    masks = words.where(words < 2**31, words - 2**32).to(torch.int32)  # as int32 bits
    logits = torch.randn(rows, vocab, generator=generator)
    expected = logits.masked_fill(~allowed, -torch.inf)
    assert torch.equal(apply_token_masks(logits.clone(), masks), expected)


@pytest.mark.parametrize(
    "text, in_string, brackets",
    [
        ('{"a": [1, {"b": "x', True, ["{", "[", "{"]),
        ('{"a": "q\\"}"', False, ["{"]),
        ('<tool_call>\n{"name": "f"}', False, []),
        ('["]', True, ["["]),
    ],
)
def test_json_nesting(text, in_string, brackets):
    assert json_nesting(text) == (in_string, brackets)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    os.environ["HETERO_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        return hetero.load(ensure_demo(), progress=False)
    finally:
        del os.environ["HETERO_CACHE"]


def run_alone(model, request: Request) -> GenerationResult:
    kv = model.new_kv_cache(len(request.prompt_ids) + request.max_new_tokens)
    engine = Engine(model.net, model.tokenizer, kv, max_running=1)
    results: list[GenerationResult] = []
    engine.submit(request, lambda event: results.extend([event.result] if event.result else []))
    while not results:
        engine.step()
    return results[0]


@pytest.mark.parametrize("max_tokens", [12, 60, 300])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_random_model_writes_a_valid_object_within_its_budget(model, max_tokens, temperature):
    grammars = GrammarCompiler(model.tokenizer, model.config.vocab_size, model.eos_token_ids)
    request = Request(
        model.encode_chat([{"role": "user", "content": "JSON please"}]),
        max_tokens,
        SamplingParams(temperature=temperature, seed=0),
        eos_token_ids=frozenset(model.eos_token_ids),
        grammar=grammars.json_schema({"type": "object"}),
    )
    result = run_alone(model, request)
    assert result.finish_reason == "stop", result.text
    assert isinstance(json.loads(result.text), dict)
