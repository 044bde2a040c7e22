"""Structured output: OpenAI's `response_format` (json_object, json_schema) and Ollama's `format`
("json" or a schema) as a grammar the engine decodes under, so the answer is JSON that matches
whatever the model's weights are."""

from __future__ import annotations

from typing import Any

from hetero.errors import HeteroError
from hetero.runtime.grammar import Grammar, GrammarCompiler
from server.validation import RequestError

ANY_OBJECT = {"type": "object"}


def openai_format(body: dict[str, Any], grammars: GrammarCompiler) -> Grammar | None:
    value = body.get("response_format")
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return schema_grammar(ANY_OBJECT, grammars, "response_format")
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema", ANY_OBJECT) if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise RequestError(
                "'response_format.json_schema' must be an object with a 'schema' object",
                param="response_format",
            )
        return schema_grammar(schema, grammars, "response_format")
    raise RequestError(
        '\'response_format.type\' must be "text", "json_object" or "json_schema"',
        param="response_format",
    )


def ollama_format(body: dict[str, Any], grammars: GrammarCompiler) -> Grammar | None:
    value = body.get("format")
    if value is None or value == "":
        return None
    if value == "json":
        return schema_grammar(ANY_OBJECT, grammars, "format")
    if isinstance(value, dict):
        return schema_grammar(value, grammars, "format")
    raise RequestError("'format' must be \"json\" or a JSON schema object", param="format")


def schema_grammar(schema: dict[str, Any], grammars: GrammarCompiler, param: str) -> Grammar:
    try:
        return grammars.json_schema(schema)
    except (HeteroError, ValueError) as err:
        raise RequestError(f"'{param}': {err}", param=param) from None
