"""LoRA in hetero computes what PEFT computes: on tiny models of each MoE family, the
gradients of every LoRA tensor (attention, routed experts as transformers' fused 3-D
parameters, shared experts) equal those of transformers + PEFT in float64, over a float and a
Q8_0 base alike; the adapter hetero writes loads in PEFT with no missing or unexpected keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hetero
import hetero.train.loss
from hetero.runtime.adapters import save_adapter
from hetero.runtime.lora import LoraSettings, adapt, default_targets
from hetero.train.loss import Example, batch_loss

SEED = 0
FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v2"]


def randomise(updates, seed=SEED):
    """PEFT starts B at zero (a zero gradient for A): random A and B test both."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for update in updates.values():
            for p in (update.lora_A, update.lora_B):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def example(vocab: int, length: int = 24) -> Example:
    ids = torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(1))
    return Example(ids.tolist(), [i % 3 != 0 for i in range(length)])


def peft_gradients(reference, adapter_dir, e: Example) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    reference.set_experts_implementation("eager")  # grouped_mm takes no float64
    model = PeftModel.from_pretrained(reference.double(), adapter_dir, is_trainable=True)
    model.to(torch.float64)
    logits = model(input_ids=torch.tensor([e.ids])).logits[0]
    rows = [i - 1 for i in range(1, len(e.ids)) if e.targets[i]]
    labels = torch.tensor([e.ids[i + 1] for i in rows])
    F.cross_entropy(logits[rows], labels, reduction="sum").backward()
    return {
        name.replace(".default", ""): p.grad
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def load_dequantised(reference, net) -> None:
    """Copy the kernel modules' weights, dequantised, into the transformers model."""
    from hetero.runtime.cpu_experts import NumbaExperts
    from hetero.runtime.quantized import JoinedQuantLinear, QuantLinear

    params = dict(reference.named_parameters())

    def put(name: str, values) -> None:
        key = name if name.startswith("lm_head") else f"model.{name}"
        params[key].data.copy_(torch.as_tensor(values).view(params[key].shape))

    for name, module in net.named_modules():
        if isinstance(module, NumbaExperts):
            for matrix, param in ((module.gate_up, "gate_up_proj"), (module.down, "down_proj")):
                experts = [matrix.dequantize(e) for e in range(module.num_experts)]
                put(f"{name}.{param}", np.stack(experts))
        elif isinstance(module, QuantLinear) and ".passes." not in name:
            put(f"{name}.weight", module.qweight.dequantize())
        elif isinstance(module, JoinedQuantLinear):
            parent, _, joined = name.rpartition(".")
            parts = type(net.get_submodule(parent)).JOINABLE[joined]
            for part, (k, start, stop) in zip(parts, module._where, strict=True):
                weight = module.passes[k].qweight.dequantize()[start:stop]
                put(f"{parent}.{part}.weight", weight)


@pytest.mark.parametrize("quant", ["none", "q8_0"])
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_gradients_match_transformers_and_peft(
    checkpoint_factory, tmp_path, monkeypatch, family, quant
):
    monkeypatch.setattr(hetero.train.loss, "HEAD_CHUNK_ROWS", 5)  # the head in several chunks
    directory, reference = checkpoint_factory(family)
    model = hetero.load(directory, quant=quant, progress=False)
    if quant == "q8_0":  # the reference runs the same dequantised weights
        load_dequantised(reference, model.net)
    settings = LoraSettings(rank=2, alpha=4.0, targets=default_targets(model.net))
    updates = adapt(model.net, settings)
    randomise(updates)
    adapter_dir = tmp_path / "adapter"
    save_adapter(adapter_dir, settings, updates, str(directory))
    e = example(model.config.vocab_size)
    batch_loss(model.net, [e], recompute=True).backward()
    want = peft_gradients(reference, adapter_dir, e)
    got = {}
    for path, update in updates.items():
        for name in ("lora_A", "lora_B"):
            got[f"base_model.model.{path}.{name}.weight"] = getattr(update, name).grad
    assert set(got) == set(want)
    for key, grad in got.items():
        assert want[key].norm() > 0, key
        error = (grad.double() - want[key]).norm() / want[key].norm()
        assert error <= 1e-5, f"{key}: relative error {error:.2e}"
