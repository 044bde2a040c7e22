"""What the server makes of requests at the edges of the API: seeds of any size, messages that
name the field and its allowed range, refused roles and content parts, `echo`, `ignore_eos`,
and Ollama's timings. A real server on loopback."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from server_fixtures import running_server

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("cache")) as url:
        yield url


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60)


@pytest.mark.parametrize("seed", [2**64, -(2**70), 99999999999999999999, -1])
def test_seeds_of_any_size_are_accepted_and_repeatable(url, seed):
    body = {"messages": USER, "max_tokens": 6, "temperature": 1.0, "seed": seed}
    first = post(url, CHAT, body)
    assert first.status_code == 200, first.text
    assert post(url, CHAT, body).json()["choices"][0] == first.json()["choices"][0]
    streamed = post(url, CHAT, {**body, "stream": True})
    assert streamed.status_code == 200 and "data: [DONE]" in streamed.text
    ollama = post(
        url, "/api/chat", {"model": "demo", "messages": USER, "stream": False, "options": body}
    )
    assert ollama.status_code == 200, ollama.text


def test_generate_accepts_a_seed_wider_than_64_bits(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "hetero", "generate", "demo", "--prompt", "Hi", "-n", "3"]
        + ["--temperature", "1", "--seed", "99999999999999999999"],
        capture_output=True,
        text=True,
        env={"HETERO_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"max_tokens": -5}, "'max_tokens' must be >= 1, got -5"),
        ({"max_tokens": "ten"}, "'max_tokens' must be an integer, got a string"),
        ({"temperature": 3}, "'temperature' must be between 0 and 2, got 3.0"),
        ({"stream": 1}, "'stream' must be a boolean, got an integer"),
        ({"seed": 1.5}, "'seed' must be an integer, got a number"),
    ],
)
def test_errors_name_the_field_and_its_allowed_values(url, extra, message):
    response = post(url, CHAT, {"messages": USER, **extra})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == message


@pytest.mark.parametrize(
    "messages, words",
    [
        ([{"role": "wizard", "content": "Hi"}], "role 'wizard' is not one of"),
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                }
            ],
            "messages[0].content[0] of type 'image_url' is not supported",
        ),
        ([{"role": "user", "content": [{"type": "text"}]}], "content[0].text must be a string"),
        ([{"role": "user", "content": 7}], "must be a string or an array of parts"),
    ],
)
def test_unknown_roles_and_non_text_parts_are_refused(url, messages, words):
    for path, body in [
        (CHAT, {"messages": messages}),
        ("/api/chat", {"model": "demo", "messages": messages, "stream": False}),
    ]:
        response = post(url, path, body)
        assert response.status_code == 400
        error = response.json()["error"]
        assert words in (error if isinstance(error, str) else error["message"])


def test_ollama_images_are_refused(url):
    chat = {"model": "demo", "stream": False}
    message = {"role": "user", "content": "What is this?", "images": ["aGk="]}
    assert post(url, "/api/chat", {**chat, "messages": [message]}).status_code == 400
    generate = {**chat, "prompt": "What is this?", "images": ["aGk="]}
    response = post(url, "/api/generate", generate)
    assert response.status_code == 400 and "text only" in response.json()["error"]


def test_text_parts_are_joined(url):
    parts = [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]
    body = {"max_tokens": 5, "temperature": 0}
    joined = post(url, CHAT, {"messages": [{"role": "user", "content": parts}], **body})
    assert joined.json()["choices"] == post(url, CHAT, {"messages": USER, **body}).json()["choices"]


def test_n_above_one_is_refused_with_what_to_do(url):
    error = post(url, CHAT, {"messages": USER, "n": 3}).json()["error"]
    assert error["param"] == "n" and "send n requests" in error["message"]


def test_echo_puts_the_prompt_before_the_completion(url):
    body = {"prompt": "The experts", "max_tokens": 4, "temperature": 0}
    plain = post(url, "/v1/completions", body).json()["choices"][0]["text"]
    echoed = post(url, "/v1/completions", {**body, "echo": True}).json()["choices"][0]["text"]
    assert echoed == "The experts" + plain
    streamed = post(url, "/v1/completions", {**body, "echo": True, "stream": True}).text
    chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == echoed


def test_ignore_eos_runs_to_max_tokens(url):
    body = {"messages": USER, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    usage = post(url, CHAT, body).json()["usage"]
    assert usage["completion_tokens"] == 40


def test_ollama_timings_add_up_within_the_total(url):
    reply = post(
        url,
        "/api/generate",
        {"model": "demo", "prompt": "Hi", "stream": False, "options": {"num_predict": 8}},
    ).json()
    assert reply["eval_count"] >= 1
    assert 0 < reply["prompt_eval_duration"] + reply["eval_duration"] <= reply["total_duration"]


@pytest.mark.parametrize(
    "extra, status",
    [
        ({"temperature": 5e-324}, 200),
        ({"top_p": 5e-324, "temperature": 1}, 200),
        ({"repetition_penalty": 5e-324}, 400),
        ({"repetition_penalty": 1e300}, 400),
    ],
)
def test_extreme_sampling_values_are_served_or_refused(url, extra, status):
    response = post(url, CHAT, {"messages": USER, "max_tokens": 4, **extra})
    assert response.status_code == status, response.text
