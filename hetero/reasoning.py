"""Separating a reasoning model's `<think>...</think>` block from its answer, whole or while it
streams. The reasoning is stripped of surrounding whitespace and the answer of the whitespace
that follows `</think>`; text without a reasoning block is left exactly as generated."""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def split_reasoning(text: str, started_in_reasoning: bool = False) -> tuple[str | None, str]:
    """(reasoning, answer) of a completion; reasoning is None when the text has no reasoning.

    `started_in_reasoning`: the prompt already opened `<think>` (DeepSeek-R1's template does), so
    the text begins inside the reasoning. A `</think>` before any `<think>` is taken to mean the
    same even without the flag, as vLLM's DeepSeek-R1 parser does. An unterminated block is all
    reasoning. Only the first block counts; later tags are answer text."""
    close_at, open_at = text.find(THINK_CLOSE), text.find(THINK_OPEN)
    if close_at != -1 and (open_at == -1 or close_at < open_at):
        started_in_reasoning = True
    if started_in_reasoning:
        before, rest = "", text
    else:
        before, opened, rest = text.partition(THINK_OPEN)
        if not opened:
            return None, text
    reasoning, _, after = rest.partition(THINK_CLOSE)
    return reasoning.strip(), before + after.lstrip()


def prompt_opens_reasoning(prompt_text: str) -> bool:
    """Whether a rendered prompt ends inside an unclosed `<think>`, so that generation starts in
    the reasoning (pass the result as `started_in_reasoning`)."""
    return prompt_text.rfind(THINK_OPEN) > prompt_text.rfind(THINK_CLOSE)


class ReasoningStream:
    """`split_reasoning` for streamed text: `push` each text delta and get (reasoning_delta,
    content_delta); `flush` at the end. Text that could still become a tag is held back.

    The joined deltas equal `split_reasoning(whole_text, started_in_reasoning)` for any chunking,
    except that a stream cannot take back answer text when a bare `</think>` shows up later: pass
    `started_in_reasoning=prompt_opens_reasoning(prompt)` to get that case right."""

    def __init__(self, started_in_reasoning: bool = False) -> None:
        self.state = "reasoning" if started_in_reasoning else "before"  # then "after" the block
        self.pending = ""  # text not yet given out: the beginning of a tag, perhaps
        self.reasoning = _StrippedText(strip_end=True)
        self.answer = _StrippedText(strip_end=False)  # the text after </think>

    def push(self, delta: str) -> tuple[str, str]:
        self.pending += delta
        reasoning_out = content_out = ""
        while self.state != "after":
            tag = THINK_OPEN if self.state == "before" else THINK_CLOSE
            at = self.pending.find(tag)
            end = at if at != -1 else len(self.pending) - _partial_tag_length(self.pending, tag)
            if self.state == "before":
                content_out += self.pending[:end]
            else:
                reasoning_out += self.reasoning.feed(self.pending[:end])
            if at == -1:
                self.pending = self.pending[end:]
                return reasoning_out, content_out
            self.pending = self.pending[at + len(tag) :]
            self.state = "reasoning" if self.state == "before" else "after"
        text, self.pending = self.pending, ""
        return reasoning_out, content_out + self.answer.feed(text)

    def flush(self) -> tuple[str, str]:
        """Give out held text as literal text of the current section."""
        text, self.pending = self.pending, ""
        if self.state == "reasoning":
            return self.reasoning.feed(text), ""
        return "", text if self.state == "before" else self.answer.feed(text)


class _StrippedText:
    """One section of streamed text with its leading whitespace removed and, with `strip_end`,
    its trailing whitespace held until more text follows it (so it goes at the end)."""

    def __init__(self, strip_end: bool) -> None:
        self.started = False
        self.held_space = ""
        self.strip_end = strip_end

    def feed(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        if not self.strip_end:
            return text
        text = self.held_space + text
        body = text.rstrip()
        self.held_space = text[len(body) :]
        return body


def _partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for length in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0
