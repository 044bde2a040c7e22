"""What Ollama's /api/tags, /api/show and /api/ps say about the loaded model: its real format
(a GGUF file or safetensors), quantisation as Ollama names it ("Q4_K_M", "Q8_0", "BF16"),
parameter count, and where its weights are held."""

from __future__ import annotations

from datetime import UTC, datetime
from hashlib import sha256
from typing import Any

import gguf

from hetero.loading.gguf_checkpoint import gguf_files, read_gguf
from hetero.runtime.model import Model

# the CPU kernels' matrix types, as Ollama names a quantisation
KERNEL_QUANTS = {
    "Q4KMatrix": "Q4_K",
    "Q6KMatrix": "Q6_K",
    "Q8Matrix": "Q8_0",
    "BF16Matrix": "BF16",
    "F16Matrix": "F16",
    "F32Matrix": "F32",
}
TORCH_QUANTS = {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16"}


class ModelInfo:
    """Read once when the server starts (a GGUF header read is cheap, the weights are not)."""

    def __init__(self, model: Model, served_name: str, started: float):
        self.model = model
        self.is_gguf = model.path.is_file()
        metadata = read_gguf(gguf_files(model.path)[0])[0] if self.is_gguf else {}
        self.gguf_metadata = metadata
        self.quantization_level = quantization_level(model, metadata.get("general.file_type"))
        self.parameter_count = model.parameter_count
        self.weight_bytes = model.weight_bytes
        self.vram_bytes = sum(
            p.numel() * p.element_size() for p in model.net.parameters() if p.device.type != "cpu"
        )
        self.name = f"{served_name}:latest"
        self.modified_at = datetime.fromtimestamp(started, UTC).isoformat()
        self.digest = sha256(str(model.path.resolve()).encode()).hexdigest()

    def details(self) -> dict[str, Any]:
        family = self.model.config.model_type
        return {
            "parent_model": "",
            "format": "gguf" if self.is_gguf else "safetensors",
            "family": family,
            "families": [family],
            "parameter_size": parameter_size(self.parameter_count),
            "quantization_level": self.quantization_level,
        }

    def tag(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": self.modified_at,
            "size": self.weight_bytes,
            "digest": self.digest,
            "details": self.details(),
        }

    def running(self, context_length: int) -> dict[str, Any]:
        """An /api/ps entry: loaded for as long as the server runs."""
        return {
            **self.tag(),
            "expires_at": "9999-12-31T23:59:59Z",
            "size_vram": self.vram_bytes,
            "context_length": context_length,
        }

    def show(self, context_length: int) -> dict[str, Any]:
        config = self.model.config
        arch = config.model_type
        tokenizer = self.model.tokenizer
        template = tokenizer.chat_template or ""
        capabilities = ["completion"]
        if "<tool_call>" in template:
            capabilities.append("tools")
        if tokenizer.token_to_id("</think>") is not None:
            capabilities.append("thinking")
        return {
            "license": "",
            "modelfile": f"FROM {self.model.path}\n",
            "parameters": "",
            "template": template,
            "details": self.details(),
            "model_info": {
                "general.architecture": arch,
                "general.parameter_count": self.parameter_count,
                "general.file_type": self.gguf_metadata.get("general.file_type"),
                f"{arch}.context_length": config.context_limit,
                f"{arch}.vocab_size": config.vocab_size,
                f"{arch}.block_count": config.num_hidden_layers,
                f"{arch}.embedding_length": config.hidden_size,
            },
            "capabilities": capabilities,
            "modified_at": self.modified_at,
            "context_length": context_length,
        }


def quantization_level(model: Model, gguf_file_type: int | None) -> str:
    """A GGUF file's own file type; else the kernels' commonest matrix type; else the dtype."""
    if gguf_file_type is not None:
        try:
            return (
                gguf.LlamaFileType(gguf_file_type).name.removeprefix("MOSTLY_").replace("ALL_", "")
            )
        except ValueError:
            pass
    report = model.quant_report
    if report is not None and report.types:
        commonest = max(report.types, key=report.types.get)
        return KERNEL_QUANTS.get(commonest, commonest)
    return TORCH_QUANTS.get(str(model.dtype), str(model.dtype).removeprefix("torch."))


def parameter_size(count: int) -> str:
    """Ollama's form: "30.5B", "494.0M", "7.1K"."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)
