"""The FastAPI app: OpenAI and Ollama endpoints, the web chat page, /health and /metrics.
Every refusal is an error object with the right 4xx status, never a traceback."""

from __future__ import annotations

import hmac
import json
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from hetero.errors import HeteroError
from hetero.runtime.engine import QueueFullError
from server import ollama_api, openai_api
from server.metrics import render_metrics
from server.openapi import OPENAPI
from server.state import ServerState
from server.validation import RequestError

OPEN_PATHS = ("/", "/health", "/metrics", "/favicon.ico", "/openapi.json")


def refusal(path: str, err: RequestError) -> JSONResponse:
    """The error response in the dialect of the API the path belongs to."""
    if path.startswith("/api/"):
        return ollama_api.ollama_error(err)
    return JSONResponse(err.body(), status_code=err.status)


class RequestGuard:
    """Refuses an oversized body (413) or a missing API key (401) before any route runs. A plain
    ASGI middleware: @app.middleware("http") would relay every streamed chunk through an extra
    task and memory stream, a large share of what a streamed token costs the server."""

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = self.check(scope) if scope["type"] == "http" else None
        if error is None:
            await self.app(scope, receive, send)
        else:
            await refusal(scope["path"], error)(scope, receive, send)

    def check(self, scope: Scope) -> RequestError | None:
        headers = Headers(scope=scope)
        limit = self.state.max_body_bytes
        size = headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > limit):
            return RequestError(f"request body over {limit} bytes", status=413)
        key = self.state.api_key
        if key and scope["path"] not in OPEN_PATHS:
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return RequestError(
                    "missing or wrong API key (send 'Authorization: Bearer KEY')",
                    status=401,
                    code="invalid_api_key",
                )
        return None


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="hetero", docs_url=None, redoc_url=None, openapi_url=None)
    page = files("server").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError):
        return refusal(request.url.path, err)

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, err: QueueFullError):
        return refusal(
            request.url.path, RequestError(str(err), status=429, kind="rate_limit_error")
        )

    @app.exception_handler(HeteroError)
    async def hetero_error(request: Request, err: HeteroError):
        return refusal(request.url.path, RequestError(str(err)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return refusal(request.url.path, RequestError(str(err.detail), status=err.status_code))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):
        # a bug, not a bad request: still an error object the client can read, never a traceback
        message = f"internal error: {type(err).__name__}: {err}"
        return refusal(request.url.path, RequestError(message, status=500, kind="server_error"))

    app.add_middleware(RequestGuard, state=state)

    async def json_body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > state.max_body_bytes:
            raise RequestError(f"request body over {state.max_body_bytes} bytes", status=413)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(f"the body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        return body

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await openai_api.chat_completions(state, await json_body(request), request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await openai_api.completions(state, await json_body(request), request)

    @app.get("/v1/models")
    async def models():
        base = {
            "object": "model",
            "created": int(state.started),
            "owned_by": "hetero",
            "max_model_len": state.context_length,
        }
        # adapters as vLLM lists its LoRA modules: their own ids, the model as parent
        adapters = [
            {"id": name, **base, "root": name, "parent": state.served_name}
            for name in state.adapters
        ]
        return {"object": "list", "data": [{"id": state.served_name, **base}, *adapters]}

    @app.post("/api/chat")
    async def api_chat(request: Request):
        return await ollama_api.api_chat(state, await json_body(request), request)

    @app.post("/api/generate")
    async def api_generate(request: Request):
        return await ollama_api.api_generate(state, await json_body(request), request)

    @app.get("/api/tags")
    async def api_tags():
        return ollama_api.tags(state)

    @app.post("/api/show")
    async def api_show(request: Request):
        return ollama_api.show(state, await json_body(request))

    @app.get("/api/ps")
    async def api_ps():
        return ollama_api.running(state)

    @app.get("/api/version")
    async def api_version():
        return ollama_api.version()

    @app.get("/openapi.json")
    async def openapi():
        return OPENAPI

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.served_name}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(state), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    return app
