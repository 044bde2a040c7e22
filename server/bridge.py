"""Async access to the engine thread: submit a request, iterate its events, cancel it when the
client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from hetero.runtime.engine import Engine, Event, Request


class EventStream:
    """Submits at once (so a full queue or an oversized request fails before any response is
    sent); iterate it for the request's events. `close()` cancels an unfinished request, which
    frees its KV blocks at the engine's next step."""

    def __init__(self, engine: Engine, request: Request):
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._handle = engine.submit(
            request, lambda event: loop.call_soon_threadsafe(self._queue.put_nowait, event)
        )
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
