"""The routing-profile file: how often each routed expert of each layer was chosen, as JSON
(`hetero profile` writes it, `hetero plan --profile` reads it to place the hottest experts)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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
