"""Several LoRA adapters on one model, chosen per request: in one engine batch, each request
gets the tokens it would get from the model loaded with its adapter alone (the bare model for
a request naming none), prefix-cached keys and values are never shared across adapters, and
`hetero serve --lora-modules NAME=DIR` routes by the request's model name."""

from __future__ import annotations

import httpx
import pytest
import torch

import hetero
from hetero.errors import InvalidRequestError
from hetero.runtime.adapters import save_adapter
from hetero.runtime.engine import Engine, Request
from hetero.runtime.lora import LoraSettings, adapt
from tests.server_fixtures import running_server

PROMPT = list(range(5, 40))  # two full KV blocks and more: the prefix cache is exercised


def write_random_adapter(model_dir, out, seed):
    model = hetero.load(model_dir, quant="none", progress=False)
    settings = LoraSettings(rank=4, alpha=8.0)
    updates = adapt(model.net, settings)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for update in updates.values():
            update.lora_B.copy_(torch.randn(update.lora_B.shape, generator=generator))
    save_adapter(out, settings, updates, str(model_dir))
    return out


def greedy(model, n=8):
    return model.generate(PROMPT, max_new_tokens=n, ignore_eos=True).token_ids


def test_one_batch_serves_each_request_its_adapter(checkpoint_factory, tmp_path):
    directory, _ = checkpoint_factory("qwen2_moe")  # attention, experts and a shared expert
    a = write_random_adapter(directory, tmp_path / "a", seed=1)
    b = write_random_adapter(directory, tmp_path / "b", seed=2)
    want = {
        None: greedy(hetero.load(directory, quant="q8_0", progress=False)),
        "a": greedy(hetero.load(directory, quant="q8_0", adapter=a, progress=False)),
        "b": greedy(hetero.load(directory, quant="q8_0", adapter=b, progress=False)),
    }
    assert len({tuple(v) for v in want.values()}) == 3  # the adapters change the output

    from hetero.runtime.adapters import apply_adapter

    model = hetero.load(directory, quant="q8_0", progress=False)
    apply_adapter(model.net, a, "a", default=False)
    apply_adapter(model.net, b, "b", default=False)
    engine = Engine(model.net, model.tokenizer, model.new_kv_cache(64, 6), max_running=6)
    # one batch of the three, then another in another order: its prompts find cached prefix
    # blocks, and must take only their own adapter's
    for names in ([None, "a", "b"], ["b", None, "a"]):
        got: dict = {}
        for name in names:
            request = Request(PROMPT, 8, adapter=name)
            engine.submit(
                request, lambda e, k=name, got=got: e.result and got.setdefault(k, e.result)
            )
        while len(got) < 3:
            engine.step()
        for name, result in got.items():
            assert result.token_ids == want[name], name
    assert engine.kv.prefix_hit_tokens > 0


def test_serve_routes_requests_by_model_name(checkpoint_factory, tmp_path):
    directory, _ = checkpoint_factory("qwen3_moe")
    a = write_random_adapter(directory, tmp_path / "a", seed=1)
    model = hetero.load(directory, quant="q8_0", adapter=a, progress=False)
    want = model.tokenizer.decode(greedy(model, n=4))
    with running_server(
        tmp_path, "--lora-modules", f"tuned={a}", "--quant", "q8_0", model=str(directory)
    ) as url:
        ids = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert ids == [directory.name, "tuned"]
        body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        answer = httpx.post(url + "/v1/completions", json={**body, "model": "tuned"}, timeout=60)
        assert answer.json()["choices"][0]["text"] == want
        missing = httpx.post(url + "/v1/completions", json={**body, "model": "other"})
        assert missing.status_code == 404 and "'tuned'" in missing.json()["error"]["message"]


def test_mla_kv_b_cannot_take_one_of_several_adapters(checkpoint_factory):
    # MLA runs kv_b on cached latents too, whose rows are not the batch's tokens
    directory, _ = checkpoint_factory("deepseek_v3")
    model = hetero.load(directory, quant="none", progress=False)
    settings = LoraSettings(rank=2, alpha=4.0, targets=("attention",))
    with pytest.raises(InvalidRequestError, match="kv_b_proj"):
        adapt(model.net, settings, "a", default=False)
