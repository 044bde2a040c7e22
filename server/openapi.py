"""The server's OpenAPI description, served at /openapi.json: every endpoint with the fields it
reads, so clients see what is accepted and a schema fuzzer (tests/test_server_fuzz.py) can
generate requests, valid and not, for each of them."""

from __future__ import annotations

from typing import Any

NUMBER = {"type": "number"}
INTEGER = {"type": "integer"}
STRING = {"type": "string"}
BOOLEAN = {"type": "boolean"}
STOP = {"anyOf": [STRING, {"type": "array", "items": STRING, "maxItems": 16}]}
CONTENT = {
    "anyOf": [
        STRING,
        {"type": "null"},
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"type": {"enum": ["text", "image_url"]}, "text": STRING},
                "required": ["type"],
            },
        },
    ]
}
MESSAGES = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "properties": {
            "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
            "content": CONTENT,
            "tool_calls": {"type": "array", "items": {"type": "object"}},
            "tool_call_id": STRING,
            "images": {"type": "array", "items": STRING},
        },
        "required": ["role"],
    },
}
TOOLS = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "type": {"const": "function"},
            "function": {
                "type": "object",
                "properties": {
                    "name": STRING,
                    "description": STRING,
                    "parameters": {"type": "object"},
                },
                "required": ["name"],
            },
        },
        "required": ["type", "function"],
    },
}
SAMPLING = {
    "temperature": {**NUMBER, "minimum": 0, "maximum": 2},
    "top_p": {**NUMBER, "minimum": 0, "maximum": 1},
    "top_k": {**INTEGER, "minimum": 0},
    "min_p": {**NUMBER, "minimum": 0, "maximum": 1},
    "presence_penalty": {**NUMBER, "minimum": -2, "maximum": 2},
    "frequency_penalty": {**NUMBER, "minimum": -2, "maximum": 2},
    "seed": INTEGER,
    "stop": STOP,
}
OPENAI_COMMON = {
    "model": STRING,
    "n": {**INTEGER, "minimum": 1, "maximum": 1},
    "stream": BOOLEAN,
    "stream_options": {"type": "object", "properties": {"include_usage": BOOLEAN}},
    "max_tokens": {**INTEGER, "minimum": 1},
    "ignore_eos": BOOLEAN,
    "repetition_penalty": {**NUMBER, "minimum": 0.01, "maximum": 100},
    **SAMPLING,
}
CHAT = {
    "type": "object",
    "properties": {
        **OPENAI_COMMON,
        "messages": MESSAGES,
        "max_completion_tokens": {**INTEGER, "minimum": 1},
        "logprobs": BOOLEAN,
        "top_logprobs": {**INTEGER, "minimum": 0, "maximum": 20},
        "tools": TOOLS,
        "tool_choice": {
            "anyOf": [
                {"enum": ["auto", "none", "required"]},
                {
                    "type": "object",
                    "properties": {"type": {"const": "function"}, "function": {"type": "object"}},
                },
            ]
        },
        "parallel_tool_calls": BOOLEAN,
        "response_format": {
            "type": "object",
            "properties": {
                "type": {"enum": ["text", "json_object", "json_schema"]},
                "json_schema": {"type": "object", "properties": {"schema": {"type": "object"}}},
            },
            "required": ["type"],
        },
        "chat_template_kwargs": {"type": "object"},
    },
    "required": ["messages"],
}
COMPLETION = {
    "type": "object",
    "properties": {
        **OPENAI_COMMON,
        "prompt": {"anyOf": [STRING, {"type": "array", "items": {**INTEGER, "minimum": 0}}]},
        "echo": BOOLEAN,
        "logprobs": {**INTEGER, "minimum": 0, "maximum": 20},
    },
    "required": ["prompt"],
}
OLLAMA_OPTIONS = {
    "type": "object",
    "properties": {
        **SAMPLING,
        "num_predict": INTEGER,
        "repeat_penalty": {**NUMBER, "minimum": 0.01, "maximum": 100},
    },
}
OLLAMA_FORMAT = {"anyOf": [{"const": "json"}, {"type": "object"}]}
OLLAMA_CHAT = {
    "type": "object",
    "properties": {
        "model": STRING,
        "messages": MESSAGES,
        "stream": BOOLEAN,
        "think": BOOLEAN,
        "tools": TOOLS,
        "format": OLLAMA_FORMAT,
        "options": OLLAMA_OPTIONS,
    },
    "required": ["model", "messages"],
}
OLLAMA_GENERATE = {
    "type": "object",
    "properties": {
        "model": STRING,
        "prompt": STRING,
        "system": STRING,
        "raw": BOOLEAN,
        "images": {"type": "array", "items": STRING},
        "stream": BOOLEAN,
        "format": OLLAMA_FORMAT,
        "options": OLLAMA_OPTIONS,
    },
    "required": ["model"],
}
OLLAMA_SHOW = {"type": "object", "properties": {"model": STRING, "name": STRING}}


def post(summary: str, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": {"200": {"description": "the answer (JSON, or a stream)"}},
        }
    }


def get(summary: str) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": {"description": "JSON"}}}}


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "hetero", "version": "1"},
    "paths": {
        "/v1/chat/completions": post("OpenAI chat completion", CHAT),
        "/v1/completions": post("OpenAI text completion", COMPLETION),
        "/v1/models": get("the served model"),
        "/api/chat": post("Ollama chat", OLLAMA_CHAT),
        "/api/generate": post("Ollama generate", OLLAMA_GENERATE),
        "/api/show": post("Ollama model details", OLLAMA_SHOW),
        "/api/tags": get("Ollama model list"),
        "/api/ps": get("Ollama running models"),
        "/api/version": get("Ollama version"),
        "/health": get("liveness"),
    },
}
