"""What the OpenAI and Ollama front ends share: turning messages or a prompt plus sampling
values into an engine request, splitting reasoning from the answer, and writing JSON text."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hetero.errors import HeteroError
from hetero.reasoning import ReasoningStream, prompt_opens_reasoning, split_reasoning
from hetero.runtime.engine import Request
from hetero.runtime.grammar import Grammar
from hetero.runtime.model import Model
from hetero.runtime.sampling import SamplingParams
from server.tool_calls import NO_TOOLS, ToolCall, ToolCallStream, ToolUse, split_tool_calls
from server.validation import RequestError, field

# JSON text with non-ASCII characters kept, as json.dumps(..., ensure_ascii=False) writes it:
# that call builds a new encoder each time, a third of what a streamed chunk's JSON costs
to_json = json.JSONEncoder(ensure_ascii=False).encode


@dataclass(frozen=True)
class Prepared:
    request: Request
    reasoning: bool  # split <think>...</think> from the answer
    starts_in_reasoning: bool
    tool_use: ToolUse = NO_TOOLS

    def split(self, text: str) -> tuple[str | None, str, list[ToolCall]]:
        """(reasoning or None, answer, tool calls) of a whole reply."""
        reasoning = None
        if self.reasoning:
            reasoning, text = split_reasoning(text, self.starts_in_reasoning)
        calls: list[ToolCall] = []
        if self.tool_use.parses_calls:
            text, calls = split_tool_calls(text)
        return reasoning, text, calls

    def stream(self) -> ReplyStream:
        return ReplyStream(
            ReasoningStream(self.starts_in_reasoning) if self.reasoning else None,
            ToolCallStream() if self.tool_use.parses_calls else None,
        )


class ReplyStream:
    """A streamed reply's text, step by step, as (reasoning, answer, tool calls completed)."""

    def __init__(self, reasoning: ReasoningStream | None, tools: ToolCallStream | None):
        self.reasoning, self.tools = reasoning, tools

    def push(self, text: str, last: bool) -> tuple[str, str, list[ToolCall]]:
        thought, text = self.reasoning.push(text) if self.reasoning else ("", text)
        if last and self.reasoning:
            tail_thought, tail_text = self.reasoning.flush()
            thought, text = thought + tail_thought, text + tail_text
        if self.tools is None:
            return thought, text, []
        text, calls = self.tools.push(text)
        if last:
            text += self.tools.flush()
        return thought, text, calls


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def message_text(content: Any, where: str) -> str:
    """A message's content as text: a string, or OpenAI content parts of type "text". Other
    parts (images, audio, files) are refused: this server's models read text only, and a
    silently dropped image would be answered as if it had been seen."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise RequestError(
            f"{where}.content must be a string or an array of parts", param="messages"
        )
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            named = f"of type '{kind}' " if isinstance(kind, str) else ""
            raise RequestError(
                f"{where}.content[{j}] {named}is not supported: this model reads text only; "
                "send parts of type 'text'",
                param="messages",
            )
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{where}.content[{j}].text must be a string", param="messages")
        texts.append(part["text"])
    return "".join(texts)


def tool_call_fields(message: dict[str, Any], where: str) -> dict[str, Any]:
    """An assistant message's earlier `tool_calls`, checked (OpenAI's form, or Ollama's with
    `arguments` an object), so the chat template can render them back to the model."""
    calls = message.get("tool_calls")
    if calls is None:
        return {}
    if not isinstance(calls, list):
        raise RequestError(f"{where}.tool_calls must be an array", param="messages")
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestError(
                f"{where}.tool_calls[{j}] must be an object with function.name", param="messages"
            )
        if not isinstance(function.get("arguments", {}), str | dict):
            raise RequestError(
                f"{where}.tool_calls[{j}].function.arguments must be a string or an object",
                param="messages",
            )
    return {"tool_calls": calls}


def chat_prompt(
    model: Model,
    messages: Any,
    template_kwargs: dict[str, Any],
    tools: list[dict[str, Any]] | None = None,
) -> str:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty array", param="messages")
    clean = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(f"{where} must be an object with a 'role'", param="messages")
        if message["role"] not in CHAT_ROLES:
            raise RequestError(
                f"{where}.role '{message['role']}' is not one of {', '.join(CHAT_ROLES)}",
                param="messages",
            )
        if message.get("images"):  # Ollama's form of image parts
            raise RequestError(
                f"{where}.images is not supported: this model reads text only", param="messages"
            )
        clean.append(
            {**message, "content": message_text(message.get("content"), where)}
            | tool_call_fields(message, where)
        )
    try:
        return model.apply_chat_template(
            clean, add_generation_prompt=True, tools=tools, **template_kwargs
        )
    except HeteroError as err:
        raise RequestError(str(err), param="messages") from None


def prepare(
    model: Model,
    context_length: int,
    prompt: str | list[int],
    sampling: SamplingParams,
    max_tokens: int | None,
    stop: tuple[str, ...],
    logprobs: int | None,
    chat: bool,
    ignore_eos: bool = False,
    grammar: Grammar | None = None,
    tool_use: ToolUse = NO_TOOLS,
    adapter: str | None = None,
) -> Prepared:
    """Tokenise, check the context window, and build the engine request. `ignore_eos`: run to
    max_tokens past the model's end-of-sequence tokens (vLLM's flag, for benchmarks);
    `adapter`: the LoRA adapter the request runs with (None: the model as loaded)."""
    if isinstance(prompt, str):
        prompt_ids = model.tokenizer.encode(prompt, add_special_tokens=not chat)
    else:
        prompt_ids = prompt
    vocab = model.config.vocab_size
    if not prompt_ids:
        raise RequestError("the prompt is empty", param="prompt")
    if any(not 0 <= t < vocab for t in prompt_ids):
        raise RequestError(f"token ids must be in 0..{vocab - 1}", param="prompt")
    room = context_length - len(prompt_ids)
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asked = f", {max_tokens} in the completion" if max_tokens is not None else ""
        raise RequestError(
            f"this model's maximum context length is {context_length} tokens; the request has "
            f"{len(prompt_ids)} in the prompt{asked}; shorten the prompt or lower max_tokens",
            param="messages" if chat else "prompt",
            code="context_length_exceeded",
        )
    request = Request(
        prompt_ids=prompt_ids,
        max_new_tokens=room if max_tokens is None else max_tokens,
        sampling=sampling,
        stop=stop,
        eos_token_ids=frozenset() if ignore_eos else frozenset(model.eos_token_ids),
        logprobs=logprobs,
        grammar=grammar,
        adapter=adapter,
    )
    # under a grammar the whole reply is the answer (JSON, tool calls), even where the template
    # opened a <think> block
    thinks = chat and grammar is None and model.tokenizer.token_to_id("</think>") is not None
    opens = thinks and isinstance(prompt, str) and prompt_opens_reasoning(prompt)
    return Prepared(request, thinks, opens, tool_use)


def read_sampling(
    body: dict[str, Any], temperature: float, top_p: float, top_k: int, repetition_key: str
) -> SamplingParams:
    """Sampling values of an OpenAI body or Ollama options; the defaults and the name of the
    repetition penalty are what differ between the two APIs."""
    values = dict(
        temperature=field(body, "temperature", float, temperature, 0.0, 2.0),
        top_p=field(body, "top_p", float, top_p, 0.0, 1.0),
        top_k=field(body, "top_k", int, top_k, 0, None),
        min_p=field(body, "min_p", float, 0.0, 0.0, 1.0),
        # beyond these a penalty divides logits into infinities
        repetition_penalty=field(body, repetition_key, float, 1.0, 0.01, 100.0),
        presence_penalty=field(body, "presence_penalty", float, 0.0, -2.0, 2.0),
        frequency_penalty=field(body, "frequency_penalty", float, 0.0, -2.0, 2.0),
        seed=field(body, "seed", int, None),
    )
    try:
        return SamplingParams(**values)
    except HeteroError as err:
        raise RequestError(str(err)) from None
