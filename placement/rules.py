r"""Override rules: ordered `regex -> device` pairs that beat the policy, first match wins.
From the command line (`--override 'blk\.(3|4)\.ffn_.*_exps=gpu'`, as llama.cpp's -ot) or a
YAML/JSON file of `{match: REGEX, device: DEVICE}` entries (as KTransformers' rule files). A
rule matches a tensor group when it finds its pattern in the group's name or in the GGUF or
Hugging Face name of any of its tensors."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from placement.errors import PlacementError
from placement.inventory import TensorGroup

DEVICES = ("gpu", "cpu", "disk")
_ALIASES = {"cuda": "gpu"}


@dataclass(frozen=True)
class Rule:
    pattern: str
    device: str
    regex: re.Pattern = field(compare=False, repr=False)

    @property
    def text(self) -> str:
        return f"{self.pattern}={self.device}"

    def matches(self, group: TensorGroup) -> bool:
        names = [group.name]
        for t in group.tensors:
            names += (t.gguf_name, t.hf_name)
        return any(self.regex.search(name) for name in names)


def make_rule(pattern: str, device: str, origin: str) -> Rule:
    device = _ALIASES.get(device.strip().lower(), device.strip().lower())
    if device not in DEVICES:
        raise PlacementError(
            f"{origin}: unknown device {device!r}; a rule sends tensors to one of "
            f"{', '.join(DEVICES)}"
        )
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise PlacementError(f"{origin}: {pattern!r} is not a valid regex: {err}") from None
    return Rule(pattern, device, regex)


def parse_rule(text: str) -> Rule:
    """'REGEX=DEVICE' (the last '=' separates them; the regex may contain '=')."""
    pattern, sep, device = text.rpartition("=")
    if not sep or not pattern:
        raise PlacementError(f"--override {text!r} is not REGEX=DEVICE, e.g. 'ffn_.*_exps=cpu'")
    return make_rule(pattern, device, f"--override {text!r}")


def load_rules(path: str | Path) -> list[Rule]:
    """Rules from a YAML or JSON file: a list (or {"rules": list}) of {match, device} maps
    or 'REGEX=DEVICE' strings, in priority order."""
    path = Path(path)
    if not path.is_file():
        raise PlacementError(f"rules file {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        parse, errors = yaml.safe_load, (yaml.YAMLError,)
    else:
        parse, errors = json.loads, (json.JSONDecodeError,)
    try:
        data: Any = parse(text)
    except errors as err:
        raise PlacementError(f"rules file {path} does not parse: {err}") from None
    if isinstance(data, dict):
        data = data.get("rules")
    if not isinstance(data, list):
        raise PlacementError(f"rules file {path} holds no list of rules")
    rules = []
    for i, entry in enumerate(data, 1):
        origin = f"{path.name} rule {i}"
        if isinstance(entry, str):
            pattern, _, device = entry.rpartition("=")
        elif isinstance(entry, dict) and "match" in entry and "device" in entry:
            pattern, device = str(entry["match"]), str(entry["device"])
        else:
            raise PlacementError(f"{origin} is neither {{match: REGEX, device: D}} nor 'REGEX=D'")
        rules.append(make_rule(pattern, device, origin))
    return rules


def first_match(rules: list[Rule], group: TensorGroup) -> Rule | None:
    return next((rule for rule in rules if rule.matches(group)), None)
