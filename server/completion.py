"""What the OpenAI and Ollama front ends share: turning messages or a prompt plus sampling
values into an engine request, splitting reasoning from the answer, and writing JSON text."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hetero.errors import HeteroError
from hetero.reasoning import ReasoningStream, prompt_opens_reasoning, split_reasoning
from hetero.runtime.engine import Request
from hetero.runtime.model import Model
from hetero.runtime.sampling import SamplingParams
from server.validation import RequestError, field

# JSON text with non-ASCII characters kept, as json.dumps(..., ensure_ascii=False) writes it:
# that call builds a new encoder each time, a third of what a streamed chunk's JSON costs
to_json = json.JSONEncoder(ensure_ascii=False).encode


@dataclass(frozen=True)
class Prepared:
    request: Request
    reasoning: bool  # split <think>...</think> from the answer
    starts_in_reasoning: bool

    def reasoning_stream(self) -> ReasoningStream | None:
        return ReasoningStream(self.starts_in_reasoning) if self.reasoning else None

    def split(self, text: str) -> tuple[str | None, str]:
        if not self.reasoning:
            return None, text
        return split_reasoning(text, self.starts_in_reasoning)


def chat_prompt(model: Model, messages: Any, template_kwargs: dict[str, Any]) -> str:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a 'role'", param="messages")
        content = message.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            if not all(isinstance(p, dict) for p in content):
                raise RequestError(f"messages[{i}].content parts must be objects", param="messages")
            content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
        if content is not None and not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string", param="messages")
        clean.append({**message, "content": content or ""})
    try:
        return model.apply_chat_template(clean, add_generation_prompt=True, **template_kwargs)
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
) -> Prepared:
    """Tokenise, check the context window, and build the engine request."""
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
        eos_token_ids=frozenset(model.eos_token_ids),
        logprobs=logprobs,
    )
    thinks = chat and model.tokenizer.token_to_id("</think>") is not None
    opens = thinks and isinstance(prompt, str) and prompt_opens_reasoning(prompt)
    return Prepared(request, thinks, opens)


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
        repetition_penalty=field(body, repetition_key, float, 1.0, 0.0, None),
        presence_penalty=field(body, "presence_penalty", float, 0.0, -2.0, 2.0),
        frequency_penalty=field(body, "frequency_penalty", float, 0.0, -2.0, 2.0),
        seed=field(body, "seed", int, None),
    )
    try:
        return SamplingParams(**values)
    except HeteroError as err:
        raise RequestError(str(err)) from None
