"""Async access to the engine thread: submit a request, iterate its events, cancel it when the
client goes away, and turn a stream's events into response text."""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator, Callable

from hetero.runtime.engine import Engine, Event, Request


class LoopPost:
    """Hands events from the engine thread to the event loop with one wake-up for everything
    posted before the loop runs (a step's events for all its streams), not one per event:
    each `call_soon_threadsafe` writes to the loop's self-pipe."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[EventStream, Event]] = []

    def __call__(self, stream: EventStream, event: Event) -> None:
        with self._lock:
            self._pending.append((stream, event))
            wake = len(self._pending) == 1
        if wake:
            self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for stream, event in pending:
            stream.put(event)


_posts: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopPost] = weakref.WeakKeyDictionary()


def loop_post(loop: asyncio.AbstractEventLoop) -> LoopPost:
    if loop not in _posts:
        _posts[loop] = LoopPost(loop)
    return _posts[loop]


class EventStream:
    """Submits at once (so a full queue or an oversized request fails before any response is
    sent); iterate it for the request's events, or `batches()` for them grouped as they reached
    the loop. `close()` cancels an unfinished request, which frees its KV blocks at the engine's
    next step."""

    def __init__(self, engine: Engine, request: Request):
        post = loop_post(asyncio.get_running_loop())
        self._ready: list[Event] = []  # delivered, not yet taken
        self._wake: asyncio.Future[None] | None = None
        self._handle = engine.submit(request, lambda event: post(self, event))
        self.done = False

    def put(self, event: Event) -> None:
        """On the loop: one more event; wakes the reader if it waits."""
        self._ready.append(event)
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def batches(self) -> AsyncIterator[list[Event]]:
        """Every event delivered since the last batch, oldest first: one event per engine step
        while the loop keeps up, several when this stream fell behind."""
        try:
            while not self.done:
                while not self._ready:
                    self._wake = asyncio.get_running_loop().create_future()
                    await self._wake
                batch, self._ready = self._ready, []
                self.done = batch[-1].result is not None  # the final event is always last
                yield batch
        finally:
            self.close()

    async def __aiter__(self) -> AsyncIterator[Event]:
        async for batch in self.batches():
            for event in batch:
                yield event

    def close(self) -> None:
        if not self.done:
            self._handle.cancel()


async def stream_text(
    events: EventStream, render: Callable[[Event], str], head: str = "", tail: str = ""
) -> AsyncIterator[str]:
    """A streamed response's body: `head`, what `render` makes of each event, `tail`. The
    events of one batch go out as one write: the client reads the same events, the server makes
    one send where a lagging stream would make several."""
    if head:
        yield head
    async for batch in events.batches():
        text = "".join([render(event) for event in batch])
        if text:
            yield text
    if tail:
        yield tail
