"""Reading request bodies field by field, so every bad value becomes an OpenAI-style 400 with
the parameter's name instead of a traceback."""

from __future__ import annotations

import math
from typing import Any

from hetero.errors import HeteroError


class RequestError(HeteroError):
    """A request the server refuses; carries the HTTP status and the OpenAI error fields."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": str(self),
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


_MISSING = object()


def field(
    body: dict[str, Any],
    name: str,
    kind: type | tuple[type, ...],
    default: Any = _MISSING,
    low: float | None = None,
    high: float | None = None,
) -> Any:
    """body[name], checked for type and range; `default` when absent or null."""
    value = body.get(name)
    if value is None:
        if default is _MISSING:
            raise RequestError(f"'{name}' is required", param=name)
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python, and ints are acceptable floats in JSON
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(JSON_KINDS[k] for k in kinds)
        raise RequestError(
            f"'{name}' must be {names}, got {JSON_KINDS.get(type(value), 'a value')}", param=name
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise RequestError(f"'{name}' must be a finite number", param=name)
    if low is not None and value < low or high is not None and value > high:
        raise RequestError(f"'{name}' must be {allowed_range(low, high)}, got {value}", param=name)
    return value


# how a request's author names the JSON types (Python's type names mean nothing to them)
JSON_KINDS = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    dict: "an object",
    list: "an array",
}


def allowed_range(low: float | None, high: float | None) -> str:
    """'>= 1', '<= 2', or 'between 0 and 2', in the words an error message uses."""
    if high is None:
        return f">= {low:g}"
    if low is None:
        return f"<= {high:g}"
    return f"between {low:g} and {high:g}"


def stop_strings(body: dict[str, Any], name: str = "stop") -> tuple[str, ...]:
    value = body.get(name)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value) and len(value) <= 16:
        return tuple(value)
    raise RequestError(f"'{name}' must be a string or a list of up to 16 strings", param=name)
