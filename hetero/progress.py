"""Progress bars on stderr for steps that take more than a second (loading, repacking weights for
the CPU kernels, conversion, writing a GGUF file); shown only on a terminal, gone when done."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")


class Bar:
    def __init__(self, progress: Progress, task: int):
        self._progress, self._task = progress, task

    def advance(self, amount: float = 1) -> None:
        self._progress.advance(self._task, amount)


@contextmanager
def progress_bar(label: str, total: float, in_bytes: bool = False, enabled: bool = True):
    """A bar of `total` steps (or bytes) labelled `label`; `advance` it as work is done."""
    console = Console(stderr=True)
    count = DownloadColumn() if in_bytes else MofNCompleteColumn()
    progress = Progress(
        TextColumn(label),
        BarColumn(),
        count,
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not (enabled and console.is_terminal),
    )
    with progress:
        yield Bar(progress, progress.add_task(label, total=total))


def track(items: Iterable[T], label: str, total: int, enabled: bool = True) -> Iterator[T]:
    """`items`, with a bar that advances by one per item."""
    with progress_bar(label, total, enabled=enabled) as bar:
        for item in items:
            yield item
            bar.advance()
