"""Async access to the engine thread: submit a request, iterate its events, cancel it when the
client goes away."""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator

from hetero.runtime.engine import Engine, Event, Request


class LoopPost:
    """Hands events from the engine thread to the event loop with one wake-up for everything
    posted before the loop runs (a step's events for all its streams), not one per event:
    each `call_soon_threadsafe` writes to the loop's self-pipe."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[Event], Event]] = []

    def __call__(self, queue: asyncio.Queue[Event], event: Event) -> None:
        with self._lock:
            self._pending.append((queue, event))
            wake = len(self._pending) == 1
        if wake:
            self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


_posts: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopPost] = weakref.WeakKeyDictionary()


def loop_post(loop: asyncio.AbstractEventLoop) -> LoopPost:
    if loop not in _posts:
        _posts[loop] = LoopPost(loop)
    return _posts[loop]


class EventStream:
    """Submits at once (so a full queue or an oversized request fails before any response is
    sent); iterate it for the request's events. `close()` cancels an unfinished request, which
    frees its KV blocks at the engine's next step."""

    def __init__(self, engine: Engine, request: Request):
        post = loop_post(asyncio.get_running_loop())
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._handle = engine.submit(request, lambda event: post(self._queue, event))
        self.done = False

    async def __aiter__(self) -> AsyncIterator[Event]:
        try:
            while not self.done:
                event = await self._queue.get()
                self.done = event.result is not None
                yield event
        finally:
            self.close()

    def close(self) -> None:
        if not self.done:
            self._handle.cancel()
