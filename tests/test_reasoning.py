"""Reasoning split: `<think>` blocks whole and streamed in every chunking."""

from __future__ import annotations

import pytest

from hetero.reasoning import ReasoningStream, prompt_opens_reasoning, split_reasoning

# (text, started_in_reasoning, expected (reasoning, answer))
SPLITS = [
    (
        "<think>\nLet me add.\n</think>\n\nThe answer is 4.",
        False,
        ("Let me add.", "The answer is 4."),
    ),
    ("The answer is 4.", False, (None, "The answer is 4.")),
    # no reasoning block: the text stays exactly as generated
    ("  plain answer with spaces \n", False, (None, "  plain answer with spaces \n")),
    (
        "<think>\nstill thinking when the length ran out",
        False,
        ("still thinking when the length ran out", ""),
    ),
    ("<think></think>\n\nanswer", False, ("", "answer")),
    ("<think>\n\n</think>\n\n", False, ("", "")),
    ("Sure. <think> hmm </think> Here it is.", False, ("hmm", "Sure. Here it is.")),
    ("<think>a <think> b</think> c </think> d", False, ("a <think> b", "c </think> d")),
    ("x < y and <thin walls>, no tags", False, (None, "x < y and <thin walls>, no tags")),
    ("<think>ends with a partial tag </thi", False, ("ends with a partial tag </thi", "")),
    ("answer ends with <thi", False, (None, "answer ends with <thi")),
    ("emoji 🤔 <think>思考 🧠</think>答案 ✅", False, ("思考 🧠", "emoji 🤔 答案 ✅")),
    ("<think>r</think>\n\nanswer ends in space ", False, ("r", "answer ends in space ")),
    # The prompt opened the block (DeepSeek-R1): the text holds only the closing tag.
    ("Okay, 2+2.\n</think>\n\n4", True, ("Okay, 2+2.", "4")),
    ("only reasoning, never closed\n", True, ("only reasoning, never closed", "")),
    ("\n</think>\n\nanswer", True, ("", "answer")),
    ("r</think>a<think>b", True, ("r", "a<think>b")),
]


@pytest.mark.parametrize(("text", "started", "expected"), SPLITS)
def test_split_reasoning_separates_think_block_from_answer(text, started, expected):
    assert split_reasoning(text, started_in_reasoning=started) == expected


def test_split_reasoning_treats_bare_closing_tag_as_end_of_reasoning():
    # vLLM's DeepSeek-R1 rule: the template opened <think> in the prompt, the caller forgot to say
    assert split_reasoning("thoughts\n</think>\n\nanswer") == ("thoughts", "answer")
    assert split_reasoning("a</think>b<think>c</think>d") == ("a", "b<think>c</think>d")


def stream(chunks: list[str], started: bool) -> tuple[str, str]:
    parser = ReasoningStream(started_in_reasoning=started)
    reasoning, content = "", ""
    for chunk in chunks:
        r, c = parser.push(chunk)
        reasoning, content = reasoning + r, content + c
    r, c = parser.flush()
    return reasoning + r, content + c


def chunkings(text: str):
    """The text whole, char by char, and cut at every pair of positions into 2-3 chunks.
    Joined deltas equal to the whole split also show no partial tag leaked."""
    yield [text]
    yield list(text)
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            yield [text[:i], text[i:j], text[j:]]


@pytest.mark.parametrize(("text", "started", "expected"), SPLITS)
def test_reasoning_stream_equals_split_for_every_chunking(text, started, expected):
    reasoning, answer = expected
    for chunks in chunkings(text):
        assert stream(chunks, started) == (reasoning or "", answer), chunks


def test_reasoning_stream_gives_text_out_as_soon_as_it_cannot_be_a_tag():
    parser = ReasoningStream()
    assert parser.push("<thi") == ("", "")
    assert parser.push("nk>Let") == ("Let", "")
    assert parser.push(" me <") == (" me", "")
    assert parser.push("b") == (" <b", "")  # "<b" cannot begin "</think>"
    assert parser.push("r> x </") == ("r> x", "")  # " </" could still be the closing tag
    assert parser.push("think>\n\nDone ") == ("", "Done ")
    assert parser.flush() == ("", "")


def test_prompt_opens_reasoning_when_prompt_ends_inside_think():
    assert prompt_opens_reasoning("<｜User｜>hi<｜Assistant｜><think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n")
    assert prompt_opens_reasoning("<think>old</think> user text <think>")
