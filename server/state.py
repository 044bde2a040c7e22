"""The server's shared state: the model, its engine, and the settings requests are checked
against."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

from hetero.runtime.engine import Engine, GenerationResult
from hetero.runtime.grammar import GrammarCompiler
from hetero.runtime.model import Model
from server.bridge import EventStream
from server.model_info import ModelInfo
from server.validation import RequestError

DISCONNECT_POLL_S = 0.25


@dataclass
class ServerState:
    model: Model
    engine: Engine
    served_name: str
    context_length: int
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    started: float = field(default_factory=time.time)
    adapters: tuple[str, ...] = ()  # LoRA adapters served beside the model, by their names

    def check_model(self, name: str) -> str | None:
        """The LoRA adapter a request's model name asks for (None: the model itself)."""
        name = name.removesuffix(":latest")  # Ollama clients add it to bare names
        if name == self.served_name:
            return None
        if name in self.adapters:
            return name
        served = ", ".join(f"'{n}'" for n in (self.served_name, *self.adapters))
        raise RequestError(
            f"the model '{name}' does not exist; this server serves {served}",
            status=404,
            param="model",
            code="model_not_found",
        )

    @cached_property
    def info(self) -> ModelInfo:
        return ModelInfo(self.model, self.served_name, self.started)

    @cached_property
    def grammars(self) -> GrammarCompiler:
        """Built on the first request that needs one (about a second on a 150k vocabulary)."""
        model = self.model
        return GrammarCompiler(model.tokenizer, model.config.vocab_size, model.eos_token_ids)

    def token_text(self, token_id: int) -> str:
        return _token_text(self.model.tokenizer, token_id)

    def token_texts(self, token_ids: list[int]) -> str:
        return self.model.tokenizer.decode(token_ids, skip_special_tokens=False)


@lru_cache(maxsize=65536)
def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


async def collect(events: EventStream, http_request) -> GenerationResult:
    """Wait for a non-streamed request's result; a client that disconnects cancels it."""
    task = asyncio.current_task()

    async def watch() -> None:
        while not await http_request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        async for event in events:
            if event.error:
                kind = "server_error" if event.error_status == 500 else "capacity_error"
                raise RequestError(event.error, status=event.error_status, kind=kind)
            if event.result is not None:
                return event.result
    finally:
        watcher.cancel()
        events.close()
    raise RequestError("the request ended without a result", status=500, kind="server_error")
