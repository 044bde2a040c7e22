"""Training data: JSON lines of {"messages": [...]} (the model's chat template; targets are the
assistant turns) or {"text": ...} (every token a target). A malformed line never stops a run
and is never dropped silently: it is counted, with its line number and reason."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hetero.errors import HeteroError, InvalidRequestError
from hetero.tokenizer import Tokenizer

TOO_LONG_CHOICES = ("truncate", "skip")


@dataclass(frozen=True)
class Example:
    """One training sequence: token ids and which of them are targets (predicted from the
    tokens before them: assistant turns of a chat, every token of a text but the first)."""

    ids: list[int]
    targets: list[bool]

    @property
    def target_count(self) -> int:
        return sum(self.targets[1:])


class DataError(HeteroError):
    """A training data file is missing, empty, or not JSON lines."""


@dataclass
class Dataset:
    """The examples of a data file, and what was left out of it and why."""

    examples: list[Example] = field(default_factory=list)
    bad_lines: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)
    truncated: int = 0
    skipped_too_long: int = 0
    lines: int = 0

    def summary(self) -> list[str]:
        lines = [f"{len(self.examples)} examples from {self.lines} lines"]
        if self.bad_lines:
            shown = "; ".join(f"line {n}: {why}" for n, why in self.bad_lines[:3])
            more = f" (and {len(self.bad_lines) - 3} more)" if len(self.bad_lines) > 3 else ""
            lines.append(f"{len(self.bad_lines)} lines left out: {shown}{more}")
        if self.truncated:
            lines.append(f"{self.truncated} examples longer than --seq-len were truncated")
        if self.skipped_too_long:
            lines.append(f"{self.skipped_too_long} examples longer than --seq-len were skipped")
        return lines


def read_dataset(path: str | Path, tokenizer: Tokenizer, seq_len: int, too_long: str) -> Dataset:
    """Every usable example of the JSON-lines file at `path`, at most `seq_len` tokens each
    (longer ones truncated or skipped, by `too_long`)."""
    if seq_len < 2:
        raise InvalidRequestError(f"--seq-len must be >= 2, got {seq_len}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"the data file {path} does not exist")
    data = Dataset()
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            data.lines += 1
            try:
                e = encode(json.loads(line), tokenizer)
            except (json.JSONDecodeError, ValueError, TypeError, KeyError, HeteroError) as err:
                data.bad_lines.append((number, one_line(err)))
                continue
            if len(e.ids) > seq_len:
                if too_long == "skip":
                    data.skipped_too_long += 1
                    continue
                data.truncated += 1
                e = Example(e.ids[:seq_len], e.targets[:seq_len])
            if e.target_count == 0:
                data.bad_lines.append((number, "no target tokens (left after truncation)"))
                continue
            data.examples.append(e)
    if data.lines == 0:
        raise DataError(f"the data file {path} is empty")
    if not data.examples:
        first = data.bad_lines[0][1] if data.bad_lines else "every example is too long"
        raise DataError(
            f"{path} has no usable example in {data.lines} lines (e.g. {first}); it must be "
            f'JSON lines of {{"messages": [...]}} or {{"text": "..."}}'
        )
    return data


def encode(record: dict, tokenizer: Tokenizer) -> Example:
    """One JSON record as token ids and targets."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise ValueError('"text" must be a non-empty string')
        ids = tokenizer.encode(record["text"], add_special_tokens=True)
        return Example(ids, [True] * len(ids))
    if "messages" in record:
        return encode_chat(record["messages"], tokenizer)
    raise ValueError('neither "messages" nor "text"')


def encode_chat(messages: list, tokenizer: Tokenizer) -> Example:
    """A conversation through the chat template. The targets are each assistant turn: from
    where the template's generation prompt for it ends to the end of its content and the
    end-of-turn token after it (templates such as Qwen3's render earlier turns differently
    from the last, so the turns are found in the one rendering of the whole conversation)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    if not all(isinstance(m, dict) for m in messages):
        raise ValueError("every message must be a JSON object")
    if not any(m.get("role") == "assistant" for m in messages):
        raise ValueError("no assistant message to learn from")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    ends_of_turn = [
        tokenizer.decode([i], skip_special_tokens=False) for i in tokenizer.eos_token_ids
    ]
    spans, searched = [], 0
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = (
            tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
        )
        content = message.get("content")
        start = max(len(prompt), searched)
        found = isinstance(content, str) and content and text.startswith(prompt)
        end = text.find(content, start) if found else -1
        if end < 0:
            raise ValueError(f"message {i}: cannot find this assistant turn in the template's text")
        end += len(content)
        end += next((len(t) for t in ends_of_turn if t and text.startswith(t, end)), 0)
        spans.append((start, end))
        searched = end
    ids: list[int] = []
    targets: list[bool] = []
    done = 0
    for start, end in [*spans, (len(text), len(text))]:
        for piece, target in ((text[done:start], False), (text[start:end], True)):
            if piece:
                piece_ids = tokenizer.encode(piece, add_special_tokens=False)
                ids += piece_ids
                targets += [target] * len(piece_ids)
        done = end
    return Example(ids, targets)


def one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:120] or type(err).__name__
