"""Tool calls: the request's `tools` and `tool_choice` checked, a grammar that forces the calls
when the choice is "required" or a named function, and the calls parsed out of the model's text
(whole, or as they stream). The format is the one Qwen's and Hermes' chat templates teach:
`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`; a template that does not
mention it gets tools refused rather than calls never recognised."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from hetero.runtime.grammar import Grammar, GrammarCompiler, lark_json
from hetero.runtime.stopping import StopStrings
from server.validation import RequestError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
CALL_PATTERN = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self, index: int | None = None) -> dict[str, Any]:
        call = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments)},
        }
        return call if index is None else {"index": index, **call}

    def ollama(self) -> dict[str, Any]:
        return {"function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolUse:
    """What a request asks of tools: those the chat template shows the model, whether its
    output is searched for calls, and the grammar that forces calls (None: the model chooses)."""

    tools: list[dict[str, Any]] | None = None
    grammar: Grammar | None = None

    @property
    def parses_calls(self) -> bool:
        return bool(self.tools)


NO_TOOLS = ToolUse()


def read_tool_use(body: dict[str, Any], template: str | None, grammars: GrammarCompiler) -> ToolUse:
    tools = body.get("tools")
    choice = body.get("tool_choice", "auto")
    if tools is None or tools == []:
        if choice not in ("auto", "none", None):
            raise RequestError(f"'tool_choice' {choice!r} needs 'tools'", param="tool_choice")
        return NO_TOOLS
    if not isinstance(tools, list):
        raise RequestError("'tools' must be an array of functions", param="tools")
    names = [tool_name(tool, i) for i, tool in enumerate(tools)]
    if template is None or OPEN not in template:
        raise RequestError(
            "this model's chat template has no tool-call format hetero reads (<tool_call> "
            "blocks, as Qwen's and Hermes' templates write them); send the request without "
            "'tools', or serve with a --chat-template that has it",
            param="tools",
        )
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise RequestError("'parallel_tool_calls' must be a boolean", param="parallel_tool_calls")
    if choice in ("auto", None):
        return ToolUse(tools)
    if choice == "none":
        return NO_TOOLS
    if choice == "required":
        forced = tools
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise RequestError(
                f"'tool_choice' names the function {name!r}, which is not in 'tools' "
                f"({', '.join(names)})",
                param="tool_choice",
            )
        forced = [tools[names.index(name)]]
    else:
        raise RequestError(
            '\'tool_choice\' must be "auto", "none", "required" or '
            '{"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    return ToolUse(tools, grammars.lark(calls_grammar(forced, parallel)))


def tool_name(tool: Any, i: int) -> str:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise RequestError(
            f'tools[{i}] must be {{"type": "function", "function": {{"name": ...}}}}',
            param="tools",
        )
    if not isinstance(function.get("parameters", {}), dict):
        raise RequestError(f"tools[{i}].function.parameters must be a JSON schema", param="tools")
    return function["name"]


def calls_grammar(tools: list[dict[str, Any]], parallel: bool) -> str:
    """Lark for one call (or several, one per line) to any of `tools`, in the template's format,
    each call's arguments matching its function's parameter schema."""
    schema = {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": tool["function"]["name"]},
                    "arguments": tool["function"].get("parameters") or {"type": "object"},
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for tool in tools
        ]
    }
    repeat = ' ("\\n" call)*' if parallel else ""
    return f'start: call{repeat}\ncall: "{OPEN}\\n" {lark_json(schema)} "\\n{CLOSE}"\n'


def parse_call(block: str) -> ToolCall | None:
    """The call in one <tool_call> block's JSON, or None when it is not one."""
    try:
        value = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return ToolCall(value["name"], arguments) if isinstance(arguments, dict) else None


def split_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(the text without its well-formed call blocks, the calls); a block that does not parse
    stays in the text, where the client can see what the model wrote."""
    calls: list[ToolCall] = []

    def take(match: re.Match[str]) -> str:
        call = parse_call(match.group(1))
        if call is None:
            return match.group(0)
        calls.append(call)
        return ""

    rest = CALL_PATTERN.sub(take, text)
    return (rest.strip() if calls else rest), calls


class ToolCallStream:
    """Streamed text in, (text to show, calls completed) out: text that may be the start of a
    call block is held back until it is known not to be, and a block goes out as one call when
    it closes."""

    def __init__(self) -> None:
        self._pending = ""
        self._in_call = False
        self.calls = 0

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        pending, shown, calls = self._pending + text, [], []
        while True:
            if not self._in_call:
                start = pending.find(OPEN)
                if start < 0:
                    hold = StopStrings._overlap(pending, OPEN)
                    shown.append(pending[: len(pending) - hold])
                    pending = pending[len(pending) - hold :]
                    break
                shown.append(pending[:start])
                pending, self._in_call = pending[start:], True
            end = pending.find(CLOSE)
            if end < 0:
                break
            block, pending = pending[: end + len(CLOSE)], pending[end + len(CLOSE) :]
            self._in_call = False
            rest, found = split_tool_calls(block)
            shown.append(rest)
            calls.extend(found)
        self._pending = pending
        self.calls += len(calls)
        return self._visible("".join(shown)), calls

    def flush(self) -> str:
        text, self._pending, self._in_call = self._pending, "", False
        return self._visible(text)

    def _visible(self, text: str) -> str:
        # the newlines between calls are the format's, not an answer
        return "" if self.calls and not text.strip() else text
