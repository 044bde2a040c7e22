"""Expert popularity: how often each routed expert of each layer is chosen, recorded at the
expert-backend seam (`experts(x, expert_ids, expert_weights)`) while a model runs, and saved
as JSON for the placement planner (`hetero profile`, then `hetero plan --profile`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hetero.errors import HeteroError

PROFILE_VERSION = 1


class ProfileFormatError(HeteroError):
    """A routing profile file is missing, malformed or of another version."""


@dataclass
class RoutingProfile:
    model: str
    tokens: dict[int, int]  # MoE layer -> tokens routed through it
    counts: dict[int, list[int]]  # MoE layer -> times each expert was chosen

    def use_per_token(self, layer: int) -> list[float]:
        """Expected activations of each expert per token (they sum to top_k)."""
        tokens = max(self.tokens[layer], 1)
        return [c / tokens for c in self.counts[layer]]

    def hottest_share(self, fraction: float) -> float:
        """Share of all activations taken by the most used `fraction` of each layer's experts."""
        hot = total = 0
        for counts in self.counts.values():
            ranked = sorted(counts, reverse=True)
            hot += sum(ranked[: max(1, round(len(ranked) * fraction))])
            total += sum(ranked)
        return hot / total if total else 0.0

    def to_json(self) -> str:
        layers = {
            str(layer): {"tokens": self.tokens[layer], "counts": self.counts[layer]}
            for layer in sorted(self.counts)
        }
        return json.dumps({"version": PROFILE_VERSION, "model": self.model, "layers": layers})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RoutingProfile:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ProfileFormatError(f"routing profile {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ProfileFormatError(f"routing profile {path} is not valid JSON: {err}") from None
        if not isinstance(data, dict) or data.get("version") != PROFILE_VERSION:
            raise ProfileFormatError(
                f"{path} is not a version-{PROFILE_VERSION} routing profile; "
                f"record one with `hetero profile MODEL --prompts FILE --out {path.name}`"
            )
        try:
            layers = data["layers"]
            return cls(
                model=str(data.get("model", "")),
                tokens={int(k): int(v["tokens"]) for k, v in layers.items()},
                counts={int(k): [int(c) for c in v["counts"]] for k, v in layers.items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ProfileFormatError(f"routing profile {path} is malformed: {err!r}") from None


class RecordingExperts(nn.Module):
    """An expert backend that counts the expert ids it is asked to run, then delegates."""

    def __init__(self, inner: nn.Module, num_experts: int):
        super().__init__()
        self.inner = inner
        self.counts = np.zeros(num_experts, dtype=np.int64)
        self.tokens = 0

    def forward(
        self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor
    ) -> torch.Tensor:
        # expert_ids: [tokens, top_k]
        ids = expert_ids.reshape(-1).cpu().numpy()
        self.counts += np.bincount(ids, minlength=len(self.counts))[: len(self.counts)]
        self.tokens += int(x.shape[0])
        return self.inner(x, expert_ids, expert_weights)


def num_experts_of(backend: nn.Module) -> int:
    """Routed experts a backend holds: `num_experts` where a backend declares it, else its
    length (TorchExperts is a list of experts)."""
    return int(getattr(backend, "num_experts", 0) or len(backend))


@dataclass
class ProfileRecorder:
    model: str
    layers: dict[int, RecordingExperts]

    def profile(self) -> RoutingProfile:
        return RoutingProfile(
            model=self.model,
            tokens={i: r.tokens for i, r in self.layers.items()},
            counts={i: r.counts.tolist() for i, r in self.layers.items()},
        )


@contextmanager
def record_routing(net: nn.Module, model_name: str) -> Iterator[ProfileRecorder]:
    """Wrap the expert backend of every MoE layer of `net` (a CausalLM) for the duration of
    the block; the yielded recorder's `profile()` gives the counts so far."""
    wrapped: dict[int, RecordingExperts] = {}
    for i, layer in enumerate(net.layers):
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            wrapped[i] = RecordingExperts(experts, num_experts_of(experts))
            layer.mlp.experts = wrapped[i]
    try:
        yield ProfileRecorder(model_name, wrapped)
    finally:
        for i, recorder in wrapped.items():
            net.layers[i].mlp.experts = recorder.inner
