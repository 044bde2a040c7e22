"""Structured output and tool calls end to end: the official openai and ollama clients against a
real server on loopback. The demo model has random weights, so every answer that parses and
matches its schema does so because the grammar allowed nothing else."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from server_fixtures import running_server

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
USER = [{"role": "user", "content": "Tell me about someone."}]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("cache")) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none")


def matches_person(value) -> bool:
    return (
        set(value) == {"name", "age", "tags"}
        and isinstance(value["name"], str)
        and len(value["name"]) <= 12
        and isinstance(value["age"], int)
        and 0 <= value["age"] <= 150
        and all(t in ("a", "b") for t in value["tags"])
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_answers_match_the_schema(client, seed):
    reply = client.chat.completions.create(
        model="demo",
        messages=USER,
        max_tokens=200,
        temperature=1.0,
        seed=seed,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON, "strict": True},
        },
    )
    assert reply.choices[0].finish_reason == "stop"
    assert matches_person(json.loads(reply.choices[0].message.content))


def test_json_object_answer_is_an_object(client):
    reply = client.chat.completions.create(
        model="demo",
        messages=USER,
        max_tokens=200,
        response_format={"type": "json_object"},
        extra_body={"top_k": 5},
    )
    text = reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop", text
    assert isinstance(json.loads(text), dict)


def test_streamed_structured_answer_is_the_same_json(client):
    kwargs = dict(
        model="demo",
        messages=USER,
        max_tokens=200,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
    )
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = client.chat.completions.create(stream=True, **kwargs)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole


def test_required_tool_choice_returns_calls_with_valid_arguments(client):
    reply = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER, CLOCK],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=200,
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id
    arguments = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert isinstance(arguments["city"], str) and 1 <= arguments["days"] <= 7
    else:
        assert call.function.name == "get_time"


def test_named_tool_choice_streams_tool_call_deltas(client):
    kwargs = dict(
        model="demo",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=200,
        temperature=0,
    )
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert {c.function.name for c in whole.message.tool_calls} == {"get_weather"}
    calls, reasons = {}, []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            reasons.append(choice.finish_reason)
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    assert reasons[-1] == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls
    ]


def test_tool_results_are_fed_back_through_the_template(client):
    reply = client.chat.completions.create(
        model="demo",
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
        ],
        tools=[WEATHER],
        max_tokens=8,
    )
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tools": [WEATHER], "tool_choice": {"function": {"name": "nope"}}}, "tool_choice"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": 3}}, "response_format"),
        (
            {
                "tools": [WEATHER],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "response_format",
        ),
    ],
)
def test_bad_tool_and_format_requests_are_400s(url, extra, param):
    response = httpx.post(url + "/v1/chat/completions", json={"messages": USER, **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_ollama_client_format_schema_and_json(url):
    ollama = pytest.importorskip("ollama")
    client = ollama.Client(host=url)
    reply = client.chat(
        model="demo", messages=USER, format=PERSON, options={"num_predict": 200, "seed": 3}
    )
    assert matches_person(json.loads(reply.message.content))
    generated = client.generate(
        model="demo", prompt="Hi", format="json", options={"num_predict": 200}
    )
    assert isinstance(json.loads(generated.response), dict)


def test_ollama_chat_returns_tool_calls(url):
    # Ollama has no tool_choice; a schema-constrained reply still parses, a tool call or not
    reply = httpx.post(
        url + "/api/chat",
        json={
            "model": "demo",
            "messages": USER,
            "tools": [WEATHER],
            "stream": False,
            "options": {"num_predict": 30},
        },
    )
    assert reply.status_code == 200
    message = reply.json()["message"]
    assert all(c["function"]["name"] for c in message.get("tool_calls", []))


def test_constrained_and_free_streams_share_a_batch(url):
    free = {"messages": USER, "max_tokens": 20, "temperature": 0}
    constrained = {
        **free,
        "max_tokens": 150,
        "logprobs": True,
        "top_logprobs": 20,
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
    }
    bodies = [free, constrained] * 4

    async def ask_all():
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:
            return await asyncio.gather(
                *(http.post("/v1/chat/completions", json=b) for b in bodies)
            )

    replies = asyncio.run(ask_all())
    assert all(r.status_code == 200 for r in replies), [r.text[:200] for r in replies]
    texts = [r.json()["choices"][0]["message"]["content"] for r in replies]
    assert len(set(texts[0::2])) == 1  # greedy, whatever shares the batch
    assert all(matches_person(json.loads(t)) for t in texts[1::2])


def test_unsatisfiable_schema_is_a_400_in_one_line(url):
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}
    response = httpx.post(
        url + "/v1/chat/completions",
        json={
            "messages": USER,
            "response_format": {"type": "json_schema", "json_schema": {"schema": schema}},
        },
    )
    assert response.status_code == 400
    assert "\n" not in response.json()["error"]["message"]


def test_parallel_required_calls_each_match_their_function(client):
    reply = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "Weather and time?"}],
        tools=[WEATHER, CLOCK],
        tool_choice="required",
        max_tokens=300,
        temperature=1.0,
        seed=5,
    )
    calls = reply.choices[0].message.tool_calls
    assert calls and reply.choices[0].finish_reason == "tool_calls"
    for call in calls:
        arguments = json.loads(call.function.arguments)
        assert call.function.name in ("get_weather", "get_time")
        if call.function.name == "get_weather":
            assert set(arguments) == {"city", "days"}


def test_ollama_streamed_chat_carries_the_schema_answer(url):
    body = {
        "model": "demo",
        "messages": USER,
        "format": PERSON,
        "options": {"num_predict": 200, "temperature": 0},
    }
    lines = httpx.post(url + "/api/chat", json=body, timeout=120).text.splitlines()
    chunks = [json.loads(line) for line in lines]
    assert chunks[-1]["done"] is True
    assert matches_person(json.loads("".join(c["message"]["content"] for c in chunks)))
