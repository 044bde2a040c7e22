"""Every family against transformers on tiny random-weight models: same logits (float32, 1e-4
relative), same 32 greedy tokens, and bfloat16 within a documented tolerance."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_CONFIGS

import hetero

# bfloat16 keeps 8 bits of mantissa; over a few layers the logits drift by 1-4% of their
# range. Documented in README ("Precision").
BF16_LOGITS_REL_TOLERANCE = 5e-2


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


def reference_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


@pytest.fixture(params=sorted(FAMILY_CONFIGS))
def family(request):
    return request.param


def test_logits_match_transformers_float32(family, checkpoint_factory):
    path, hf_model = checkpoint_factory(family)
    model = hetero.load(path, dtype="float32", progress=False)
    ids = torch.randint(
        0, model.config.vocab_size, (37,), generator=torch.Generator().manual_seed(1)
    )
    ours = model.logits(ids.tolist())
    reference = reference_logits(hf_model, ids.tolist())
    assert ours.shape == reference.shape == (37, model.config.vocab_size)
    assert ours.dtype == torch.float32
    assert relative_error(ours, reference) < 1e-4


def test_greedy_generation_matches_transformers(family, checkpoint_factory):
    path, hf_model = checkpoint_factory(family)
    model = hetero.load(path, dtype="float32", progress=False)
    prompt = torch.randint(
        0, model.config.vocab_size, (11,), generator=torch.Generator().manual_seed(2)
    )
    prompt_ids = prompt.tolist()
    # no EOS on either side: compare all 32 tokens
    model.tokenizer.eos_token_ids.clear()
    object.__setattr__(model.config, "eos_token_ids", ())
    ours = model.generate(prompt_ids, max_new_tokens=32, temperature=0.0)
    with torch.no_grad():
        reference = hf_model.generate(
            prompt[None],
            max_new_tokens=32,
            min_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt_ids) :].tolist()
    assert ours.token_ids == reference
    assert ours.finish_reason == "length"


def test_bfloat16_logits_stay_within_documented_tolerance(family, checkpoint_factory):
    path, hf_model = checkpoint_factory(family)
    model = hetero.load(path, dtype="bfloat16", progress=False)
    assert model.net.layers[0].self_attn.o_proj.weight.dtype == torch.bfloat16
    ids = torch.randint(
        0, model.config.vocab_size, (29,), generator=torch.Generator().manual_seed(3)
    )
    error = relative_error(model.logits(ids.tolist()), reference_logits(hf_model, ids.tolist()))
    assert error < BF16_LOGITS_REL_TOLERANCE


def test_sharded_checkpoint_loads_the_same_weights(checkpoint_factory, tmp_path):
    path, hf_model = checkpoint_factory("qwen3_moe", shards=True)
    assert (path / "model.safetensors.index.json").is_file()
    model = hetero.load(path, dtype="float32", progress=False)
    ids = list(range(5, 30))
    assert relative_error(model.logits(ids), reference_logits(hf_model, ids)) < 1e-4
