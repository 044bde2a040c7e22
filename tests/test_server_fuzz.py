"""No input gets a 5xx: schemathesis generates requests, valid and not, for every endpoint of the
server's OpenAPI description, against a live server on loopback. Every answer is a 2xx or a 4xx
JSON error in the API's own dialect (OpenAI's object, Ollama's string on /api/), and a stream
running throughout keeps going. Bounded: 30 examples an endpoint in each mode, derandomised."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from server_fixtures import running_server

EXAMPLES_PER_ENDPOINT = 30


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    # a short context keeps every generated completion short
    with running_server(tmp_path_factory.mktemp("cache"), "--context-length", "96") as url:
        yield url


@pytest.fixture(scope="module")
def background_stream(url):
    """Streamed chats, one after another, while the fuzzer runs; their failures, if any."""
    failures: list[str] = []
    stop = threading.Event()

    def run() -> None:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16, "stream": True}
        while not stop.is_set():
            reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
            if reply.status_code != 200 or not reply.text.endswith("data: [DONE]\n\n"):
                failures.append(f"{reply.status_code}: {reply.text[-200:]}")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield failures
    stop.set()
    thread.join(timeout=60)


def assert_error_dialect(path: str, response) -> None:
    body = json.loads(response.text)
    if path.startswith("/api/"):
        assert isinstance(body.get("error"), str) and body["error"], body
    else:
        error = body.get("error")
        assert isinstance(error, dict) and error.get("message") and error.get("type"), body


def operations(url: str) -> list:
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_gets_a_server_error(url, background_stream, mode):
    for operation in operations(url):
        if mode is GenerationMode.NEGATIVE and operation.method.lower() == "get":
            continue  # nothing to make invalid

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES_PER_ENDPOINT,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def answers_without_a_server_error(case):
            response = case.call(timeout=60)
            assert response.status_code < 500, (case.path, case.body, response.text[:500])
            if response.status_code >= 400:
                assert_error_dialect(case.path, response)

        answers_without_a_server_error()


def test_the_background_stream_kept_going(background_stream):
    assert background_stream == []
