"""Private memory maps of checkpoint files, shared by the safetensors and GGUF readers.

Maps are copy-on-write (writable for torch.frombuffer, never written back) and never written
by hetero, so dropping their pages is always safe: a page touched again is re-read from disk."""

from __future__ import annotations

import mmap
from pathlib import Path


class MappedFiles:
    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}

    def map(self, file: Path) -> mmap.mmap:
        if file not in self._maps:
            with open(file, "rb") as f:
                self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[file]

    def release(self, file: Path, start: int, stop: int) -> None:
        """Drop this process's pages of bytes [start, stop) of `file` once they have been
        copied elsewhere, so peak RSS stays near what is materialised."""
        buf = self._maps.get(file)
        if buf is None or stop <= start:
            return
        page = mmap.PAGESIZE
        first = start // page * page
        last = min(len(buf), -(-stop // page) * page)
        buf.madvise(mmap.MADV_DONTNEED, first, last - first)
