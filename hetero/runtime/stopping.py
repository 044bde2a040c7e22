"""Stop strings over streamed text: text that could still become a stop string is held back,
so a caller never sees part of one."""

from __future__ import annotations


class StopStrings:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.matched: str | None = None

    def push(self, delta: str) -> str:
        """Take new text; return what is safe to emit. After a match, `matched` is set and
        the returned text ends just before the stop string."""
        text = self._pending + delta
        if not self.stops:
            return text
        hits = [(text.find(s), s) for s in self.stops if s in text]
        if hits:
            cut, self.matched = min(hits)
            self._pending = ""
            return text[:cut]
        hold = max((self._overlap(text, s) for s in self.stops), default=0)
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return text

    @staticmethod
    def _overlap(text: str, stop: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of stop."""
        for n in range(min(len(text), len(stop) - 1), 0, -1):
            if stop.startswith(text[-n:]):
                return n
        return 0
