"""Sliding-window attention against transformers on tiny models with a window of 8 tokens,
shorter than the prompts: the windowed mask in prefill (logits, float32 1e-4 relative) and the
window's rows in decode (the same greedy tokens), for every family whose configs have one."""

from __future__ import annotations

import pytest
import torch
from test_parity import reference_logits, relative_error

import hetero

WINDOWED = {
    "qwen2": dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "qwen3": dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "qwen2_moe": dict(use_sliding_window=True, sliding_window=8, max_window_layers=2),
    "qwen3_moe": dict(use_sliding_window=True, sliding_window=8),
    "mixtral": dict(sliding_window=8),
    "mistral": dict(sliding_window=8),
}


@pytest.mark.parametrize("family", sorted(WINDOWED))
def test_windowed_model_matches_transformers(family, checkpoint_factory):
    path, hf_model = checkpoint_factory(family, **WINDOWED[family])
    model = hetero.load(path, dtype="float32", progress=False)
    assert any(w == 8 for w in model.config.attention_windows)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, model.config.vocab_size, (29,), generator=g).tolist()
    assert relative_error(model.logits(ids), reference_logits(hf_model, ids)) < 1e-4
    model.tokenizer.eos_token_ids.clear()
    object.__setattr__(model.config, "eos_token_ids", ())
    ours = model.generate(ids[:11], max_new_tokens=20, temperature=0.0)
    with torch.no_grad():
        reference = hf_model.generate(
            torch.tensor([ids[:11]]),
            max_new_tokens=20,
            min_new_tokens=20,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, 11:].tolist()
    assert ours.token_ids == reference


def test_windows_follow_each_familys_layer_rule():
    from hetero.config import sliding_windows

    base = dict(num_hidden_layers=4, sliding_window=8, use_sliding_window=True)
    assert sliding_windows(dict(base, model_type="qwen2", max_window_layers=2)) == (
        None,
        None,
        8,
        8,
    )
    assert sliding_windows(dict(base, model_type="qwen2_moe", max_window_layers=3)) == (
        8,
        None,
        8,
        None,
    )
    assert sliding_windows(dict(base, model_type="qwen3_moe")) == (8, 8, 8, 8)
    assert sliding_windows(dict(base, model_type="qwen3", use_sliding_window=False)) == ()
    assert sliding_windows(dict(base, model_type="mixtral", sliding_window=None)) == ()
    types = ["full_attention", "sliding_attention"] * 2
    assert sliding_windows(dict(base, model_type="qwen2", layer_types=types)) == (
        None,
        8,
        None,
        8,
    )
