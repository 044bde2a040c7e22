"""`hetero merge`: a model directory with a LoRA adapter added into its weights (W + s B A, in
the checkpoint's own dtype and tensor names), beside its config and tokenizer files, so any
tool loads it without PEFT."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from hetero.errors import InvalidRequestError
from hetero.loading.safetensors_checkpoint import SafetensorsCheckpoint
from hetero.loading.weights import file_name
from hetero.runtime.adapters import load_into, read_settings
from hetero.runtime.lora import LowRank, adapt, delta_weights, expert_shape


def merge_adapter(model_dir: Path, adapter_dir: Path, out: Path) -> Path:
    """Write model_dir's weights with the adapter merged to `out`; returns `out`."""
    if not model_dir.is_dir():
        raise InvalidRequestError(
            f"hetero merge needs a safetensors model directory; {model_dir} is not one (merge "
            f"into the float checkpoint, then `hetero quantize` the result)"
        )
    if out.exists() and any(out.iterdir()):
        raise InvalidRequestError(f"{out} exists and is not empty; choose a new directory")
    import hetero

    model = hetero.load(model_dir, quant="none", dtype="float32", progress=False)
    settings = read_settings(adapter_dir)
    updates = adapt(model.net, settings)
    load_into(updates, adapter_dir)
    deltas = tensor_deltas(model.net, updates, model.family.checkpoint_name)
    checkpoint = SafetensorsCheckpoint(model_dir)
    tensors = {}
    for name in checkpoint.names():
        tensor = checkpoint.tensor(name)
        if name in deltas:
            tensor = (tensor.float() + deltas[name]).to(tensor.dtype)
        tensors[name] = tensor.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    for extra in model_dir.iterdir():
        if (
            extra.is_file()
            and not extra.name.endswith(".safetensors")
            and not extra.name.endswith(".safetensors.index.json")
        ):
            shutil.copy2(extra, out / extra.name)
    return out


def tensor_deltas(
    net: torch.nn.Module, updates: dict[str, LowRank], checkpoint_name
) -> dict[str, torch.Tensor]:
    """Each adapted checkpoint tensor's update, by its name in the checkpoint."""
    deltas = {}

    def put(module_name: str, delta: torch.Tensor) -> None:
        deltas[file_name(f"{module_name}.weight", checkpoint_name)] = delta

    for path, update in updates.items():
        name = path.removeprefix("model.")
        if name.endswith(".base_layer"):  # the experts' fused gate/up: gate rows first
            experts = name.removesuffix(".base_layer")
            size = expert_shape(net.get_submodule(experts).base)[2]
            for e, delta in enumerate(delta_weights(update)):
                put(f"{experts}.{e}.gate_proj", delta[:size])
                put(f"{experts}.{e}.up_proj", delta[size:])
        elif name.endswith(".experts"):
            for e, delta in enumerate(delta_weights(update)):
                put(f"{name}.{e}.down_proj", delta)
        else:
            put(name, delta_weights(update)[0])
    return deltas
