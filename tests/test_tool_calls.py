"""Tool calls read from a model's text: whole replies, and the same reply streamed in pieces of
every size, give the same text and calls; malformed blocks stay visible as text."""

from __future__ import annotations

import pytest

from server.tool_calls import ToolCallStream, split_tool_calls

REPLY = (
    "Let me check.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": "{}"}\n</tool_call>'
)


def test_whole_reply_gives_text_and_calls():
    text, calls = split_tool_calls(REPLY)
    assert text == "Let me check."
    assert [(c.name, c.arguments) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": 2}),
        ("get_time", {}),
    ]
    assert len({c.id for c in calls}) == 2


def test_malformed_block_stays_in_the_text():
    reply = "<tool_call>\n{not json}\n</tool_call> ok"
    assert split_tool_calls(reply) == (reply, [])


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 11, len(REPLY)])
def test_streamed_pieces_give_the_same_text_and_calls(piece):
    stream = ToolCallStream()
    shown, names = [], []
    for start in range(0, len(REPLY), piece):
        text, calls = stream.push(REPLY[start : start + piece])
        assert "<tool_call" not in text
        shown.append(text)
        names += [c.name for c in calls]
    shown.append(stream.flush())
    assert "".join(shown).strip() == "Let me check."
    assert names == ["get_weather", "get_time"]


def test_text_that_only_looks_like_a_call_start_is_released():
    stream = ToolCallStream()
    assert stream.push("a <tool") == ("a ", [])
    assert stream.push("box>") == ("<toolbox>", [])
    assert stream.push("<tool_call>\n{") == ("", [])
    assert stream.flush() == "<tool_call>\n{"
