"""Routing profiles: recording at the expert-backend seam counts every (token, expert) choice
without changing what the model computes, leaves the model as it was, and the saved profile
reads back or is refused with a clear message."""

from __future__ import annotations

import pytest
import torch

import hetero
from hetero.demo import write_demo
from hetero.runtime.routing_recorder import RecordingExperts, record_routing
from placement.routing_profile import ProfileFormatError, RoutingProfile


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The demo model on one thread (tiny matmuls; process-wide setting restored after)."""
    threads = torch.get_num_threads()
    yield hetero.load(write_demo(tmp_path_factory.mktemp("demo")), threads=1, progress=False)
    torch.set_num_threads(threads)


def test_recording_counts_every_choice_and_changes_nothing(model):
    ids = list(range(5, 37))
    reference = model.logits(ids)
    with record_routing(model.net, model.name) as recorder:
        recorded = model.logits(ids)
    profile = recorder.profile()
    torch.testing.assert_close(recorded, reference, rtol=0, atol=0)
    top_k = model.config.num_experts_per_tok
    assert sorted(profile.counts) == [0, 1, 2, 3]
    for layer, counts in profile.counts.items():
        assert profile.tokens[layer] == len(ids)
        assert len(counts) == model.config.num_experts and sum(counts) == top_k * len(ids)
        assert sum(profile.use_per_token(layer)) == pytest.approx(top_k)


def test_recording_counts_match_the_router(model):
    """Layer 0's counts equal a bincount of the router's own top-k on the same input."""
    ids = torch.arange(3, 19)
    net = model.net
    with torch.inference_mode():
        x = net.layers[0].post_attention_layernorm(net.embed_tokens(ids))
        with record_routing(net, model.name) as recorder:
            net.layers[0].mlp(x)
        logits = net.layers[0].mlp.gate(x)
    expected = torch.bincount(
        torch.topk(logits, model.config.num_experts_per_tok, dim=-1).indices.reshape(-1),
        minlength=model.config.num_experts,
    )
    assert recorder.profile().counts[0] == expected.tolist()


def test_recording_restores_the_expert_backends(model):
    backends = [layer.mlp.experts for layer in model.net.layers]
    with record_routing(model.net, model.name):
        assert all(isinstance(layer.mlp.experts, RecordingExperts) for layer in model.net.layers)
    assert [layer.mlp.experts for layer in model.net.layers] == backends


def test_profiles_round_trip_through_json(tmp_path):
    profile = RoutingProfile("m", {3: 10}, {3: [5, 0, 15]})
    path = tmp_path / "profile.json"
    profile.save(path)
    assert RoutingProfile.load(path) == profile
    assert RoutingProfile.load(path).use_per_token(3) == [0.5, 0.0, 1.5]


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("{oops", "not valid JSON"),
        ('{"version": 99, "layers": {}}', "not a version-1 routing profile"),
        ('{"version": 1, "layers": {"x": {"tokens": 1, "counts": [1]}}}', "malformed"),
    ],
)
def test_bad_profiles_are_refused(tmp_path, content, fragment):
    path = tmp_path / "profile.json"
    path.write_text(content)
    with pytest.raises(ProfileFormatError, match=fragment):
        RoutingProfile.load(path)
