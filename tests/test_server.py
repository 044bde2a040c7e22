"""`hetero serve` end to end: a real server on loopback, the official openai client, httpx for
the Ollama API and for raw bad input, concurrency, disconnects and metrics."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
from server_fixtures import running_server

import hetero
from hetero.demo import ensure_demo

KEY = "test-key"
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def url(cache):
    with running_server(cache, "--api-key", KEY, "--max-concurrency", "8") as url:
        yield url


@pytest.fixture(scope="module")
def small_server(cache, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "think.jinja"
    template.write_text(THINKING_TEMPLATE)
    args = [
        "--max-concurrency",
        "1",
        "--max-queue",
        "1",
        "--chat-template",
        str(template),
        "--served-model-name",
        "tiny",
    ]
    with running_server(cache, *args) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY)


@pytest.fixture(scope="module")
def model(cache):
    os.environ["HETERO_CACHE"] = str(cache)
    try:
        return hetero.load(ensure_demo(), progress=False)
    finally:
        del os.environ["HETERO_CACHE"]


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def lone_greedy(model, messages, max_tokens):
    return model.generate(model.encode_chat(messages), max_new_tokens=max_tokens)


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


# ---- OpenAI API ------------------------------------------------------------------------------


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["demo"]


def test_chat_completion_matches_lone_greedy_generation(client, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    reply = client.chat.completions.create(
        model="demo", messages=messages, max_tokens=12, temperature=0
    )
    expected = lone_greedy(model, messages, 12)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(model.encode_chat(messages))
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_streamed_chat_equals_the_whole_reply_and_reports_usage(client):
    messages = [{"role": "user", "content": "Tell me about experts"}]
    whole = client.chat.completions.create(
        model="demo", messages=messages, max_completion_tokens=10, temperature=0
    )
    stream = client.chat.completions.create(
        model="demo",
        messages=messages,
        max_completion_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10


def test_stop_string_and_seeded_sampling(client):
    messages = [{"role": "user", "content": "x"}]
    full = (
        client.chat.completions.create(
            model="demo", messages=messages, max_tokens=20, temperature=0
        )
        .choices[0]
        .message.content
    )
    stop = full[6:9]
    cut = client.chat.completions.create(
        model="demo", messages=messages, max_tokens=20, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[: full.index(stop)]
    kwargs = dict(model="demo", messages=messages, max_tokens=10, temperature=1.0, top_p=0.9)
    a = client.chat.completions.create(seed=7, **kwargs).choices[0].message.content
    b = client.chat.completions.create(seed=7, **kwargs).choices[0].message.content
    assert a == b


def test_chat_logprobs(client):
    reply = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)


def test_completions_stream_and_not(client, model):
    whole = client.completions.create(
        model="demo", prompt="The engine", max_tokens=8, temperature=0, logprobs=2
    )
    expected = model.generate("The engine", max_new_tokens=8)
    assert whole.choices[0].text == expected.text
    assert len(whole.choices[0].logprobs.token_logprobs) == 8
    streamed = client.completions.create(
        model="demo", prompt="The engine", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected.text


def test_32_concurrent_streams_each_get_the_lone_greedy_reply(url, model):
    conversations = [
        [{"role": "user", "content": f"question number {i} " * (1 + i % 5)}] for i in range(32)
    ]
    expected = [lone_greedy(model, m, 16).text for m in conversations]

    async def one(client, messages):
        stream = await client.chat.completions.create(
            model="demo", messages=messages, max_tokens=16, temperature=0, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def run_all():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        return await asyncio.gather(*(one(client, m) for m in conversations))

    assert asyncio.run(run_all()) == expected


def test_disconnect_mid_stream_frees_kv_blocks(url):
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": 3000,
        "stream": True,
    }
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json=body, headers=auth(), timeout=30
    ) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert metric(url, "hetero_kv_blocks_used") > 0
    deadline = time.time() + 20
    while metric(url, "hetero_kv_blocks_used") > 0 or metric(url, "hetero_running_requests") > 0:
        assert time.time() < deadline, "KV blocks not freed after the client left"
        time.sleep(0.1)


def test_metrics_are_prometheus_text(url, client):
    client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "a"}], max_tokens=2
    )
    text = httpx.get(url + "/metrics").text
    for name in (
        "hetero_requests_total",
        "hetero_prompt_tokens_total",
        "hetero_generation_tokens_total",
        "hetero_tokens_per_second",
        "hetero_queue_depth",
        "hetero_running_requests",
        "hetero_kv_blocks_used",
        "hetero_kv_blocks_free",
        "hetero_prefix_cache_hit_rate",
        "hetero_kv_pages_read_total",
        "hetero_kv_pages_read_per_token",
        "hetero_kv_pages_read_fraction",
    ):
        assert f"# TYPE {name} " in text
    assert metric(url, "hetero_requests_total") >= 1


def test_repeated_prompt_hits_the_prefix_cache(url, client):
    messages = [
        {"role": "system", "content": "You are a careful assistant. " * 8},
        {"role": "user", "content": "first"},
    ]
    client.chat.completions.create(model="demo", messages=messages, max_tokens=2)
    messages[1]["content"] = "second"
    reply = client.chat.completions.create(model="demo", messages=messages, max_tokens=2)
    assert reply.usage.prompt_tokens_details.cached_tokens >= 32
    assert metric(url, "hetero_prefix_cache_hit_rate") > 0


# ---- Ollama API ------------------------------------------------------------------------------


def test_ollama_chat_streamed_and_not(url, model):
    messages = [{"role": "user", "content": "Hello"}]
    options = {"temperature": 0, "num_predict": 8}
    body = {"model": "demo", "messages": messages, "options": options}
    whole = httpx.post(url + "/api/chat", json={**body, "stream": False}, headers=auth()).json()
    assert whole["done"] is True and whole["eval_count"] == 8
    assert whole["message"]["content"] == lone_greedy(model, messages, 8).text
    with httpx.stream("POST", url + "/api/chat", json=body, headers=auth()) as response:
        assert response.headers["content-type"].startswith("application/x-ndjson")
        parts = [json.loads(line) for line in response.iter_lines() if line]
    assert "".join(p["message"]["content"] for p in parts) == whole["message"]["content"]
    assert parts[-1]["done"] and parts[-1]["done_reason"] == "length"
    assert all(not p["done"] for p in parts[:-1])


def test_ollama_generate_tags_and_version(url, model):
    reply = httpx.post(
        url + "/api/generate",
        headers=auth(),
        json={
            "model": "demo:latest",
            "prompt": "Hi",
            "stream": False,
            "raw": True,
            "options": {"temperature": 0, "num_predict": 6},
        },
    ).json()
    assert reply["response"] == model.generate("Hi", max_new_tokens=6).text
    streamed = httpx.post(
        url + "/api/generate",
        headers=auth(),
        json={
            "model": "demo",
            "prompt": "Hi",
            "raw": True,
            "options": {"temperature": 0, "num_predict": 6},
        },
    )
    lines = [json.loads(line) for line in streamed.text.splitlines()]
    assert "".join(line["response"] for line in lines) == reply["response"]
    tags = httpx.get(url + "/api/tags", headers=auth()).json()
    assert tags["models"][0]["name"] == "demo:latest"
    assert httpx.get(url + "/api/version", headers=auth()).json()["version"] == hetero.__version__


# ---- bad input -------------------------------------------------------------------------------


BAD_REQUESTS = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"model": "demo"}).encode(), 400, "messages"),
    (json.dumps({"messages": "hi"}).encode(), 400, "messages"),
    (
        json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode(),
        400,
        "temperature",
    ),
    (
        json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}).encode(),
        400,
        "max_tokens",
    ),
    (
        json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}).encode(),
        400,
        "messages",
    ),
    (
        json.dumps({"messages": [{"role": "user", "content": "x"}], "top_p": 3}).encode(),
        400,
        "top_p",
    ),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 2}).encode(), 400, "n"),
    (
        json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}).encode(),
        404,
        "model",
    ),
    (
        json.dumps({"messages": [{"role": "user", "content": "word " * 5000}]}).encode(),
        400,
        "messages",
    ),
]


@pytest.mark.parametrize("body, status, param", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(url, body, status, param):
    response = httpx.post(
        url + "/v1/chat/completions",
        content=body,
        headers={**auth(), "Content-Type": "application/json"},
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] and error["type"]
    assert error["param"] == param


def test_bad_requests_do_not_disturb_a_running_stream(url, client, model):
    messages = [{"role": "user", "content": "steady"}]
    stream = client.chat.completions.create(
        model="demo", messages=messages, max_tokens=24, temperature=0, stream=True
    )
    pieces = []
    for i, chunk in enumerate(stream):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if i == 3:
            for body, status, _ in BAD_REQUESTS:
                assert (
                    httpx.post(
                        url + "/v1/chat/completions", content=body, headers=auth()
                    ).status_code
                    == status
                )
    assert "".join(pieces) == lone_greedy(model, messages, 24).text


def test_api_key_is_required(url):
    response = httpx.post(
        url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
    )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    wrong = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert httpx.post(url + "/api/chat", json={}).status_code == 401


def test_oversized_body_is_refused(url):
    huge = b'{"messages": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    response = httpx.post(url + "/v1/chat/completions", content=huge, headers=auth())
    assert response.status_code == 413


def test_unknown_route_is_an_error_object(url):
    response = httpx.get(url + "/v1/nothing", headers=auth())
    assert response.status_code == 404 and "error" in response.json()


def test_full_queue_answers_429(small_server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 60}

    async def burst():
        async with httpx.AsyncClient(base_url=small_server, timeout=300) as http:
            return await asyncio.gather(
                *(http.post("/v1/chat/completions", json=body) for _ in range(6))
            )

    codes = sorted(r.status_code for r in asyncio.run(burst()))
    assert 429 in codes and 200 in codes
    assert all(code in (200, 429) for code in codes)


def test_reasoning_is_returned_apart_from_the_answer(small_server):
    client = openai.OpenAI(base_url=small_server + "/v1", api_key="none")
    reply = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "think"}],
        max_tokens=8,
        temperature=0,
    )
    message = reply.choices[0].message
    # the template opens <think>, so the text up to </think> is reasoning
    assert message.model_extra["reasoning_content"]
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "think"}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    thought = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
        for c in stream
        if c.choices
    )
    assert thought == message.model_extra["reasoning_content"]


def test_structured_answer_is_content_even_where_the_template_opens_reasoning(small_server):
    client = openai.OpenAI(base_url=small_server + "/v1", api_key="none")
    reply = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "think"}],
        max_tokens=100,
        response_format={"type": "json_object"},
    )
    message = reply.choices[0].message
    assert isinstance(json.loads(message.content), dict)
    assert not (message.model_extra or {}).get("reasoning_content")


def test_serve_follows_a_saved_plan(tmp_path, cache):
    plan = tmp_path / "plan.json"
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "hetero",
            "plan",
            "demo",
            "--context",
            "512",
            "--concurrency",
            "3",
            "--save",
            str(plan),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HETERO_CACHE": str(cache)},
    )
    assert made.returncode == 0, made.stderr
    with running_server(cache, "--plan", str(plan)) as url:
        reply = httpx.get(url + "/v1/models").json()
        assert reply["data"][0]["max_model_len"] == 512
        assert metric(url, "hetero_kv_blocks_free") == 3 * 512 // 16


def test_serve_refuses_a_bad_plan_in_one_line(tmp_path, cache):
    bad = tmp_path / "plan.json"
    bad.write_text('{"version": 99}')
    result = subprocess.run(
        [sys.executable, "-m", "hetero", "serve", "--plan", str(bad)],
        capture_output=True,
        text=True,
        env={**os.environ, "HETERO_CACHE": str(cache)},
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("hetero: error:") and "version" in result.stderr
    assert "Traceback" not in result.stderr
