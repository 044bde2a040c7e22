"""Ollama's model listing as Ollama clients read it: /api/tags, /api/show and /api/ps report the
real format, quantisation and parameter count, for the safetensors demo and a Q8_0 GGUF of it,
read with the official ollama client."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from server_fixtures import running_server

import hetero
from hetero.demo import ensure_demo

ollama = pytest.importorskip("ollama")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def demo_parameters(cache):
    os.environ["HETERO_CACHE"] = str(cache)
    try:
        return hetero.load(ensure_demo(), progress=False).parameter_count
    finally:
        del os.environ["HETERO_CACHE"]


@pytest.fixture(scope="module")
def demo_q8(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "demo-q8_0.gguf"
    done = subprocess.run(
        [sys.executable, "-m", "hetero", "quantize", "demo", str(out), "--type", "q8_0"],
        capture_output=True,
        text=True,
        env={"HETERO_CACHE": str(cache), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    return out


def check_listing(url: str, fmt: str, quant: str, parameters: int) -> None:
    client = ollama.Client(host=url)
    [tag] = client.list().models
    assert tag.model == "demo:latest" and tag.size > 0
    assert (tag.details.format, tag.details.quantization_level) == (fmt, quant)
    assert tag.details.parameter_size == f"{parameters / 1e6:.1f}M"
    shown = client.show("demo")
    assert shown.details.format == fmt and "completion" in shown.capabilities
    assert shown.modelinfo["general.parameter_count"] == parameters
    assert "tools" in shown.capabilities  # the demo template has the <tool_call> format
    [running] = client.ps().models
    assert running.model == "demo:latest" and running.size_vram == 0


def test_safetensors_demo_listing(cache, demo_parameters):
    with running_server(cache) as url:
        check_listing(url, "safetensors", "F32", demo_parameters)


def test_gguf_listing_reports_its_file_type(cache, demo_q8, demo_parameters):
    with running_server(cache, "--served-model-name", "demo", model=str(demo_q8)) as url:
        check_listing(url, "gguf", "Q8_0", demo_parameters)


def test_show_of_another_model_is_a_404(cache):
    with running_server(cache) as url:
        with pytest.raises(ollama.ResponseError) as err:
            ollama.Client(host=url).show("llama3")
        assert err.value.status_code == 404
