"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions (streamed as server-sent
events or not). Parameters follow OpenAI's API; top_k, min_p and repetition_penalty are
accepted as vLLM accepts them."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from hetero.runtime.engine import Event, GenerationResult, TokenLogprob
from server.bridge import EventStream, stream_text
from server.completion import Prepared, chat_prompt, prepare, read_sampling, to_json
from server.response_format import openai_format
from server.state import ServerState, collect
from server.tool_calls import read_tool_use
from server.validation import RequestError, field, stop_strings


def check_common(state: ServerState, body: dict[str, Any]) -> str | None:
    """Checks every request shares; returns the LoRA adapter its model name asks for."""
    adapter = state.check_model(field(body, "model", str, state.served_name))
    if field(body, "n", int, 1) != 1:
        raise RequestError(
            "'n' must be 1: this server returns one choice per request; send n requests "
            "(with different seeds) for n choices",
            param="n",
        )
    return adapter


def usage(result: GenerationResult) -> dict[str, Any]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": result.cached_prompt_tokens},
    }


def finish_reason(result: GenerationResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def sse(data: dict[str, Any]) -> str:
    return f"data: {to_json(data)}\n\n"


class ChunkTemplate:
    """One stream's chunks as server-sent events. What every chunk repeats (id, created, model,
    ...) is serialised once; each chunk serialises only its choice, into the same text that
    `sse({**fields, "choices": [choice], **after})` gives."""

    # its JSON, "\u0000choice", comes only from a string holding a NUL, which no id, model name
    # (a command-line argument) or object name holds
    _SLOT = "\x00choice"

    def __init__(self, fields: dict[str, Any], after: dict[str, Any]):
        whole = sse({**fields, "choices": [self._SLOT], **after})
        self._head, _, self._tail = whole.partition(json.dumps(self._SLOT))

    def __call__(self, choice: dict[str, Any]) -> str:
        return self._head + to_json(choice) + self._tail


def error_event(event: Event) -> str:
    return sse({"error": {"message": event.error, "type": "server_error", "code": None}})


# ---- chat ------------------------------------------------------------------------------------


async def chat_completions(state: ServerState, body: dict[str, Any], http_request) -> Any:
    adapter = check_common(state, body)
    stream = field(body, "stream", bool, False)
    include_usage = bool(field(body, "stream_options", dict, {}).get("include_usage"))
    want_logprobs = field(body, "logprobs", bool, False)
    top_logprobs = field(body, "top_logprobs", int, 0, 0, 20)
    max_tokens = field(body, "max_completion_tokens", int, None, 1, None)
    if max_tokens is None:
        max_tokens = field(body, "max_tokens", int, None, 1, None)
    template_kwargs = field(body, "chat_template_kwargs", dict, {})
    tool_use = read_tool_use(body, state.model.tokenizer.chat_template, state.grammars)
    grammar = openai_format(body, state.grammars)
    if grammar is not None and tool_use.grammar is not None:
        raise RequestError(
            "'response_format' and a forced 'tool_choice' ask for two different outputs; "
            "send one of them",
            param="response_format",
        )
    prompt = chat_prompt(state.model, body.get("messages"), template_kwargs, tool_use.tools)
    prepared = prepare(
        state.model,
        state.context_length,
        prompt,
        read_sampling(body, 1.0, 1.0, 0, "repetition_penalty"),
        max_tokens,
        stop_strings(body),
        top_logprobs if want_logprobs else None,
        chat=True,
        ignore_eos=field(body, "ignore_eos", bool, False),
        grammar=grammar or tool_use.grammar,
        tool_use=tool_use,
        adapter=adapter,
    )
    events = EventStream(state.engine, prepared.request)
    meta = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": state.served_name,
    }
    if stream:
        return StreamingResponse(
            chat_stream(state, events, prepared, meta, include_usage, want_logprobs),
            media_type="text/event-stream",
        )
    result = await collect(events, http_request)
    reasoning, content, calls = prepared.split(result.text)
    # OpenAI's content is null beside tool calls when the model wrote nothing else
    message: dict[str, Any] = {
        "role": "assistant",
        "content": (content or None) if calls else content,
    }
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [call.openai() for call in calls]
    choice: dict[str, Any] = {
        "index": 0,
        "message": message,
        "finish_reason": "tool_calls" if calls else finish_reason(result),
        "logprobs": chat_logprobs(state, result.logprobs) if want_logprobs else None,
    }
    return JSONResponse(
        {**meta, "object": "chat.completion", "choices": [choice], "usage": usage(result)}
    )


def chat_stream(
    state: ServerState,
    events: EventStream,
    prepared: Prepared,
    meta: dict[str, Any],
    include_usage: bool,
    want_logprobs: bool,
) -> AsyncIterator[str]:
    template = ChunkTemplate(
        {**meta, "object": "chat.completion.chunk"}, {"usage": None} if include_usage else {}
    )

    def chunk(delta: dict[str, Any], reason: str | None = None, logprobs=None) -> str:
        return template({"index": 0, "delta": delta, "finish_reason": reason, "logprobs": logprobs})

    reply = prepared.stream()
    calls_sent = 0

    def render(event: Event) -> str:
        nonlocal calls_sent
        if event.error:
            return error_event(event)
        thought, text, calls = reply.push(event.text, last=event.result is not None)
        delta: dict[str, Any] = {}
        if thought:
            delta["reasoning_content"] = thought
        if text:
            delta["content"] = text
        if calls:
            delta["tool_calls"] = [c.openai(calls_sent + i) for i, c in enumerate(calls)]
            calls_sent += len(calls)
        logprobs = (
            chat_logprobs(state, event.logprobs) if want_logprobs and event.logprobs else None
        )
        out = chunk(delta, logprobs=logprobs) if delta or logprobs else ""
        if event.result is not None:
            out += chunk({}, "tool_calls" if calls_sent else finish_reason(event.result))
            if include_usage:
                out += sse(
                    {
                        **meta,
                        "object": "chat.completion.chunk",
                        "choices": [],
                        "usage": usage(event.result),
                    }
                )
        return out

    head = chunk({"role": "assistant", "content": ""})
    return stream_text(events, render, head, tail="data: [DONE]\n\n")


def chat_logprobs(state: ServerState, logprobs: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = state.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
            for lp in logprobs
        ]
    }


# ---- completions -----------------------------------------------------------------------------


async def completions(state: ServerState, body: dict[str, Any], http_request) -> Any:
    adapter = check_common(state, body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    valid_ids = isinstance(prompt, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    )
    if not isinstance(prompt, str) and not valid_ids:
        raise RequestError("'prompt' must be a string or a list of token ids", param="prompt")
    stream = field(body, "stream", bool, False)
    include_usage = bool(field(body, "stream_options", dict, {}).get("include_usage"))
    logprobs = field(body, "logprobs", int, None, 0, 20)
    echo = field(body, "echo", bool, False)
    if echo and logprobs is not None:
        raise RequestError(
            "'echo' with 'logprobs' is not supported (the prompt's logprobs are not computed); "
            "send one or the other",
            param="echo",
        )
    prepared = prepare(
        state.model,
        state.context_length,
        prompt,
        read_sampling(body, 1.0, 1.0, 0, "repetition_penalty"),
        field(body, "max_tokens", int, 16, 1, None),
        stop_strings(body),
        logprobs,
        chat=False,
        ignore_eos=field(body, "ignore_eos", bool, False),
        adapter=adapter,
    )
    echoed = "" if not echo else prompt if isinstance(prompt, str) else state.token_texts(prompt)
    events = EventStream(state.engine, prepared.request)
    meta = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": state.served_name,
    }
    if stream:
        return StreamingResponse(
            completion_stream(state, events, meta, include_usage, logprobs is not None, echoed),
            media_type="text/event-stream",
        )
    result = await collect(events, http_request)
    choice = {
        "index": 0,
        "text": echoed + result.text,
        "finish_reason": finish_reason(result),
        "logprobs": completion_logprobs(state, result.logprobs) if logprobs is not None else None,
    }
    return JSONResponse({**meta, "choices": [choice], "usage": usage(result)})


def completion_stream(
    state: ServerState,
    events: EventStream,
    meta: dict[str, Any],
    include_usage: bool,
    want_logprobs: bool,
    echoed: str,
) -> AsyncIterator[str]:
    template = ChunkTemplate(meta, {})

    def render(event: Event) -> str:
        if event.error:
            return error_event(event)
        out = ""
        reason = finish_reason(event.result) if event.result is not None else None
        if event.text or reason or event.logprobs:
            logprobs = (
                completion_logprobs(state, event.logprobs)
                if want_logprobs and event.logprobs
                else None
            )
            choice = {"index": 0, "text": event.text, "finish_reason": reason, "logprobs": logprobs}
            out = template(choice)
        if event.result is not None and include_usage:
            out += sse({**meta, "choices": [], "usage": usage(event.result)})
        return out

    head = template({"index": 0, "text": echoed, "finish_reason": None, "logprobs": None})
    return stream_text(events, render, head if echoed else "", tail="data: [DONE]\n\n")


def completion_logprobs(state: ServerState, logprobs: list[TokenLogprob]) -> dict[str, Any]:
    tokens = [state.token_text(lp.token_id) for lp in logprobs]
    offsets, position = [], 0
    for text in tokens:
        offsets.append(position)
        position += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{state.token_text(t): v for t, v in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }
