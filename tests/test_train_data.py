"""Training data: chat records become the template's text with only the assistant turns as
targets, text records are all targets; malformed lines are counted with their line numbers
and reasons; examples longer than --seq-len are truncated or skipped, and counted."""

from __future__ import annotations

import json

import pytest

from hetero.demo_tokenizer import write_demo_tokenizer
from hetero.tokenizer import Tokenizer
from hetero.train.data import DataError, read_dataset


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    write_demo_tokenizer(directory)
    return Tokenizer.from_dir(directory)


def write(path, *records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_chat_targets_are_the_assistant_turns_only(tokenizer, tmp_path):
    messages = [
        {"role": "user", "content": "what is two plus two"},
        {"role": "assistant", "content": "four"},
        {"role": "user", "content": "and three"},
        {"role": "assistant", "content": "five"},
    ]
    (e,) = read_dataset(
        write(tmp_path / "d.jsonl", {"messages": messages}), tokenizer, 512, "skip"
    ).examples
    assert tokenizer.decode(e.ids, skip_special_tokens=False) == tokenizer.apply_chat_template(
        messages, add_generation_prompt=False
    )
    target_text = tokenizer.decode(
        [i for i, t in zip(e.ids, e.targets, strict=True) if t], skip_special_tokens=True
    )
    assert "four" in target_text and "five" in target_text
    assert "two plus two" not in target_text and "and three" not in target_text


def test_text_records_are_all_targets(tokenizer, tmp_path):
    (e,) = read_dataset(
        write(tmp_path / "d.jsonl", {"text": "hello world"}), tokenizer, 512, "skip"
    ).examples
    assert all(e.targets) and e.target_count == len(e.ids) - 1


def test_bad_lines_are_counted_with_their_reasons(tokenizer, tmp_path):
    path = write(
        tmp_path / "d.jsonl",
        {"text": "good"},
        "{broken",
        {"other": 1},
        {"messages": [{"role": "user", "content": "no answer"}]},
        "[1, 2]",
    )
    data = read_dataset(path, tokenizer, 512, "skip")
    assert len(data.examples) == 1 and data.lines == 5
    assert [n for n, _ in data.bad_lines] == [2, 3, 4, 5]
    assert "no assistant message" in data.bad_lines[2][1]
    assert "4 lines left out" in " ".join(data.summary())


@pytest.mark.parametrize("too_long", ["truncate", "skip"])
def test_long_examples_are_truncated_or_skipped_and_counted(tokenizer, tmp_path, too_long):
    path = write(tmp_path / "d.jsonl", {"text": "word " * 200}, {"text": "short"})
    data = read_dataset(path, tokenizer, 16, too_long)
    if too_long == "truncate":
        assert data.truncated == 1 and len(data.examples) == 2
        assert max(len(e.ids) for e in data.examples) == 16
    else:
        assert data.skipped_too_long == 1 and len(data.examples) == 1
    said = {"truncate": "truncated", "skip": "skipped"}[too_long]
    assert f"1 examples longer than --seq-len were {said}" in " ".join(data.summary())


@pytest.mark.parametrize(
    "content, message",
    [(None, "does not exist"), ("\n\n", "is empty"), ("a\nb\n", "no usable example")],
)
def test_unusable_files_are_refused(tokenizer, tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_dataset(path, tokenizer, 512, "skip")
