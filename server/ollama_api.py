"""Ollama-compatible endpoints (/api/chat, /api/generate streamed as NDJSON or not,
/api/tags, /api/show, /api/ps, /api/version), so Ollama clients work unchanged."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from hetero import __version__
from hetero.runtime.engine import Event, GenerationResult
from server.bridge import EventStream, stream_text
from server.completion import Prepared, chat_prompt, prepare, read_sampling, to_json
from server.response_format import ollama_format
from server.state import ServerState, collect
from server.tool_calls import NO_TOOLS, ToolUse, read_tool_use
from server.validation import RequestError, field, stop_strings


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def final_stats(result: GenerationResult, started_ns: int) -> dict[str, Any]:
    """Ollama's counters. The prefill makes the first token, so prompt_eval_duration covers
    it and eval_duration the steps after it: the two add up to at most total_duration."""
    return {
        "done": True,
        "done_reason": "length" if result.finish_reason == "length" else "stop",
        "total_duration": time.perf_counter_ns() - started_ns,
        "load_duration": 0,
        "prompt_eval_count": result.prompt_tokens,
        "prompt_eval_duration": int(result.prefill_s * 1e9),
        "eval_count": result.completion_tokens,
        "eval_duration": int(result.decode_s * 1e9),
    }


def ndjson(data: dict[str, Any]) -> str:
    return to_json(data) + "\n"


def prepare_ollama(
    state: ServerState,
    body: dict[str, Any],
    prompt: str | None,
    chat: bool,
    tool_use: ToolUse = NO_TOOLS,
):
    adapter = state.check_model(field(body, "model", str))
    options = field(body, "options", dict, {})
    num_predict = field(options, "num_predict", int, None)
    max_tokens = None if num_predict is None or num_predict < 0 else max(num_predict, 1)
    return prepare(
        state.model,
        state.context_length,
        prompt,
        read_sampling(options, 0.8, 0.9, 40, "repeat_penalty"),
        max_tokens,
        stop_strings(options),
        None,
        chat=chat,
        grammar=ollama_format(body, state.grammars),
        tool_use=tool_use,
        adapter=adapter,
    )


async def api_chat(state: ServerState, body: dict[str, Any], http_request) -> Any:
    template_kwargs = {}
    if isinstance(body.get("think"), bool):
        template_kwargs["enable_thinking"] = body["think"]
    # Ollama has no tool_choice: the model always chooses
    tools = {"tools": body.get("tools")}
    tool_use = read_tool_use(tools, state.model.tokenizer.chat_template, state.grammars)
    prompt = chat_prompt(state.model, body.get("messages"), template_kwargs, tool_use.tools)
    prepared = prepare_ollama(state, body, prompt, chat=True, tool_use=tool_use)
    return await respond(state, body, prepared, http_request, chat=True)


async def api_generate(state: ServerState, body: dict[str, Any], http_request) -> Any:
    prompt = field(body, "prompt", str, "")
    if body.get("images"):
        raise RequestError("'images' is not supported: this model reads text only", param="images")
    system = field(body, "system", str, None)
    if not prompt and not system:  # Ollama answers an empty prompt by loading the model
        state.check_model(field(body, "model", str))
        return JSONResponse(
            {
                "model": state.served_name,
                "created_at": now_iso(),
                "response": "",
                "done": True,
                "done_reason": "load",
            }
        )
    chat = not field(body, "raw", bool, False) and state.model.tokenizer.chat_template is not None
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        prompt = chat_prompt(state.model, messages, {})
    prepared = prepare_ollama(state, body, prompt, chat=chat)
    return await respond(state, body, prepared, http_request, chat=False)


async def respond(state, body, prepared: Prepared, http_request, chat: bool) -> Any:
    started = time.perf_counter_ns()
    events = EventStream(state.engine, prepared.request)
    if field(body, "stream", bool, True):
        return StreamingResponse(
            ollama_stream(state, events, prepared, started, chat),
            media_type="application/x-ndjson",
        )
    result = await collect(events, http_request)
    base = {"model": state.served_name, "created_at": now_iso()}
    thinking, content, calls = prepared.split(result.text)
    if chat:
        message = {"role": "assistant", "content": content}
        if thinking is not None:
            message["thinking"] = thinking
        if calls:
            message["tool_calls"] = [call.ollama() for call in calls]
        return JSONResponse({**base, "message": message, **final_stats(result, started)})
    reply = {"response": content}
    if thinking is not None:
        reply["thinking"] = thinking
    return JSONResponse({**base, **reply, **final_stats(result, started)})


def ollama_stream(
    state, events: EventStream, prepared: Prepared, started: int, chat: bool
) -> AsyncIterator[str]:
    reply = prepared.stream()

    def render(event: Event) -> str:
        if event.error:
            return ndjson({"error": event.error})
        thought, text, calls = reply.push(event.text, last=event.result is not None)
        base = {"model": state.served_name, "created_at": now_iso()}
        if chat:
            message = {"role": "assistant", "content": text}
            if thought:
                message["thinking"] = thought
            if calls:
                message["tool_calls"] = [call.ollama() for call in calls]
            piece = {"message": message}
        else:
            piece = {"response": text}
            if thought:
                piece["thinking"] = thought
        if event.result is None:
            return ndjson({**base, **piece, "done": False})
        return ndjson({**base, **piece, **final_stats(event.result, started)})

    return stream_text(events, render)


def tags(state: ServerState) -> dict[str, Any]:
    return {"models": [state.info.tag()]}


def running(state: ServerState) -> dict[str, Any]:
    return {"models": [state.info.running(state.context_length)]}


def show(state: ServerState, body: dict[str, Any]) -> dict[str, Any]:
    # clients send "model"; older ones "name"
    state.check_model(field(body, "model", str, None) or field(body, "name", str))
    return state.info.show(state.context_length)


def version() -> dict[str, str]:
    return {"version": __version__}


def ollama_error(err: RequestError) -> JSONResponse:
    return JSONResponse({"error": str(err)}, status_code=err.status)
