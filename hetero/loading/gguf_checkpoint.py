"""Memory-mapped, lazy access to a GGUF model (one file or `-0000i-of-0000N` splits), with the
interface of `SafetensorsCheckpoint` so `load_weights` fills a model from it unchanged.

Tensors are named as hetero's modules (`model.layers.0.mlp.experts.3.gate_proj.weight`):
llama.cpp's stacked expert tensors are split into per-expert views, its rope permutation of
llama q/k rows is undone, and DeepSeek's attn_k_b / attn_v_b are joined back into kv_b.

F32/F16/BF16 tensors are zero-copy views of the file. Quantised tensors are dequantised to
float32 when `tensor()` is called, so the model holds them in its float dtype for now;
`raw_tensor()` returns their quantised blocks as stored, for kernels that read blocks."""

from __future__ import annotations

import mmap
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, Keys

from hetero.errors import ModelFormatError, UnsupportedModelError
from hetero.formats.gguf_quants import FORMATS, dequantize
from hetero.loading.gguf_config import hf_config_from_gguf
from hetero.loading.gguf_names import from_gguf, rope_permutation
from hetero.loading.gguf_tokenizer import tokenizer_from_gguf
from hetero.loading.mapped_files import MappedFiles
from hetero.loading.weights import file_name
from hetero.tokenizer import Tokenizer

GGUF_MAGIC = b"GGUF"
SPLIT_NAME = re.compile(r"^(?P<stem>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
TORCH_FLOATS = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}
SUPPORTED_TYPES = tuple(FORMATS)


@dataclass(frozen=True)
class RawTensor:
    """One tensor as stored: `shape` in torch order (ggml's ne reversed)."""

    name: str
    file: Path
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    start: int  # absolute byte offset in `file`
    nbytes: int

    @property
    def row_bytes(self) -> int:
        return FORMATS[self.ggml_type].row_bytes(self.shape[-1])


@dataclass(frozen=True)
class GGUFEntry:
    """How one hetero parameter is made from the file's tensors."""

    source: str  # GGUF tensor name
    shape: tuple[int, ...]  # the parameter's shape
    nbytes: int  # bytes read from the file
    expert: int | None = None  # index into a stacked [experts, ...] tensor
    rope_heads: int = 0  # > 0: undo llama.cpp's q/k row permutation over this many heads
    value_source: str | None = None  # DeepSeek kv_b: source is attn_k_b, this attn_v_b


def gguf_files(path: Path) -> list[Path]:
    """All files of a GGUF model, given any one of them (splits are found by name)."""
    if not path.is_file():
        raise ModelFormatError(f"GGUF file {path} does not exist")
    split = SPLIT_NAME.match(path.name)
    if split is None:
        return [path]
    count = int(split["count"])
    files = [
        path.with_name(f"{split['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)
    ]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelFormatError(
            f"{path} is part {int(split['index'])} of {count}, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing; download every part"
        )
    return files


def read_gguf(file: Path) -> tuple[dict[str, Any], list[RawTensor]]:
    """Metadata and tensor directory of one GGUF file, checked against the file's size."""
    with open(file, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelFormatError(f"{file} is not a GGUF file (it does not start with 'GGUF')")
    try:
        reader = GGUFReader(file, "r")
    except ValueError as err:
        if "GGMLQuantizationType" in str(err):
            raise UnsupportedModelError(
                f"{file} holds a tensor type unknown to the installed gguf package ({err}); "
                "upgrade gguf, or use a file with F32/F16/BF16/Q4_0/Q5_0/Q8_0/K-quant tensors"
            ) from None
        raise _corrupt(file, err) from None
    except Exception as err:  # the reader raises whatever numpy does on short or garbled data
        raise _corrupt(file, err) from None
    metadata = {name: _field_value(field) for name, field in reader.fields.items()}
    size = file.stat().st_size
    tensors = []
    for t in reader.tensors:
        if t.tensor_type not in SUPPORTED_TYPES:
            raise UnsupportedModelError(
                f"{file}: tensor {t.name!r} is {t.tensor_type.name}; hetero reads "
                f"{', '.join(f.name for f in SUPPORTED_TYPES)} (the types of Q4_K_M, Q5_K_M, "
                "Q6_K, Q8_0 and float files)"
            )
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        tensor = RawTensor(t.name, file, t.tensor_type, shape, int(t.data_offset), int(t.n_bytes))
        if tensor.start + tensor.nbytes > size:
            raise ModelFormatError(
                f"{file} is truncated: tensor {t.name!r} ends at byte "
                f"{tensor.start + tensor.nbytes} but the file has {size}; download it again"
            )
        tensors.append(tensor)
    return metadata, tensors


def _corrupt(file: Path, err: Exception) -> ModelFormatError:
    reason = " ".join(str(err).split()) or type(err).__name__
    return ModelFormatError(f"{file} is truncated or corrupt ({reason}); download it again")


def _field_value(field: Any) -> Any:
    if not field.types:
        return None
    if field.types[0] == GGUFValueType.ARRAY and field.types[-1] != GGUFValueType.STRING:
        return [v for i in field.data for v in field.parts[i].tolist()]
    return field.contents()


class GGUFCheckpoint:
    """A GGUF model's tensors by hetero parameter name, plus its config and tokenizer."""

    def __init__(self, path: Path):
        self.model_dir = path
        self.metadata: dict[str, Any] = {}
        self.raw: dict[str, RawTensor] = {}
        for file in gguf_files(path):
            metadata, tensors = read_gguf(file)
            # split parts after the first carry only split.* keys; the first part's win
            self.metadata = {**metadata, **self.metadata}
            self.raw.update({t.name: t for t in tensors})
        self.arch = self.metadata.get(Keys.General.ARCHITECTURE)
        embedding = self.raw.get("token_embd.weight")
        self.config: dict[str, Any] = hf_config_from_gguf(
            self.metadata, self.raw, embedding.shape[0] if embedding else 0, str(path)
        )
        self.tokenizer: Tokenizer = tokenizer_from_gguf(self.metadata, str(path))
        self.config["torch_dtype"] = self._float_dtype()
        self.entries: dict[str, GGUFEntry] = self._entries()
        self._files = MappedFiles()

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    @staticmethod
    def checkpoint_name(module_name: str) -> str:
        """Entries are named after hetero's modules whatever the family."""
        return module_name

    # ---- tensors ---------------------------------------------------------------------------

    def raw_tensor(self, name: str) -> tuple[np.ndarray, GGMLQuantizationType]:
        """A parameter's bytes as stored: (uint8 [rows, row_bytes] blocks, GGML type), rows in
        hetero's order. kv_b joined from k_b / v_b has no stored form and raises KeyError."""
        entry = self.entries[name]
        if entry.value_source is not None:
            raise KeyError(f"{name} is joined from {entry.source} and {entry.value_source}")
        blocks = self._blocks(entry.source, entry.expert)
        if entry.rope_heads:
            blocks = blocks[rope_permutation(blocks.shape[0], entry.rope_heads)]
        return blocks, self.raw[entry.source].ggml_type

    def tensor(self, name: str) -> torch.Tensor:
        """The parameter as a torch tensor: a zero-copy view for float types, else float32."""
        entry = self.entries[name]
        raw = self.raw[entry.source]
        if entry.value_source is not None:
            return self._joined_kv_b(entry)
        if raw.ggml_type in TORCH_FLOATS and not entry.rope_heads:
            start = raw.start + (entry.expert or 0) * entry.nbytes
            if entry.nbytes == 0:
                return torch.empty(entry.shape, dtype=TORCH_FLOATS[raw.ggml_type])
            flat = torch.frombuffer(
                self._map(raw.file), dtype=torch.uint8, count=entry.nbytes, offset=start
            )
            return flat.view(TORCH_FLOATS[raw.ggml_type]).reshape(entry.shape)
        blocks, ggml_type = self.raw_tensor(name)
        values = torch.from_numpy(dequantize(blocks, ggml_type)).reshape(entry.shape)
        self._release_source(entry)
        return values

    def release(self, name: str, begin: int = 0, end: int | None = None) -> None:
        """Drop this process's pages of bytes [begin, end) of a zero-copy tensor once they have
        been copied elsewhere (dequantised tensors release their source themselves)."""
        entry = self.entries[name]
        raw = self.raw[entry.source]
        if raw.ggml_type not in TORCH_FLOATS or entry.rope_heads:
            return
        start = raw.start + (entry.expert or 0) * entry.nbytes
        end = entry.nbytes if end is None else end
        self._files.release(raw.file, start + begin, start + end)

    def _blocks(self, source: str, expert: int | None) -> np.ndarray:
        raw = self.raw[source]
        data = np.frombuffer(
            self._map(raw.file), dtype=np.uint8, count=raw.nbytes, offset=raw.start
        )
        rows = data.reshape(*raw.shape[:-1], raw.row_bytes)
        if expert is not None:
            rows = rows[expert]
        return rows.reshape(-1, raw.row_bytes)

    def _joined_kv_b(self, entry: GGUFEntry) -> torch.Tensor:
        # k_b: [heads, kv_lora_rank, nope] (transposed by the converter); v_b: [heads, v, rank]
        assert entry.value_source is not None
        k_raw, v_raw = self.raw[entry.source], self.raw[entry.value_source]
        k_b = dequantize(self._blocks(entry.source, None), k_raw.ggml_type).reshape(k_raw.shape)
        v_b = dequantize(self._blocks(entry.value_source, None), v_raw.ggml_type).reshape(
            v_raw.shape
        )
        kv = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1)  # [heads, nope + v, rank]
        return torch.from_numpy(np.ascontiguousarray(kv)).reshape(entry.shape)

    def _release_source(self, entry: GGUFEntry) -> None:
        raw = self.raw[entry.source]
        start = raw.start + (entry.expert or 0) * entry.nbytes
        self._files.release(raw.file, start, start + entry.nbytes)

    def _map(self, file: Path) -> mmap.mmap:
        return self._files.map(file)

    # ---- naming ----------------------------------------------------------------------------

    def _entries(self) -> dict[str, GGUFEntry]:
        shared = "mlp.shared_experts" if self.arch == "deepseek2" else "mlp.shared_expert"
        heads = self.config["num_attention_heads"]
        kv_heads = self.config["num_key_value_heads"]
        entries: dict[str, GGUFEntry] = {}
        for raw in self.raw.values():
            if raw.name.endswith(("attn_k_b.weight", "attn_v_b.weight")):
                continue
            mapped = from_gguf(raw.name, shared)
            if mapped is None:
                continue
            module, stacked = mapped
            if stacked:
                per_expert = raw.nbytes // raw.shape[0]
                for e in range(raw.shape[0]):
                    entries[file_name(module.format(expert=e), self.checkpoint_name)] = GGUFEntry(
                        raw.name, raw.shape[1:], per_expert, expert=e
                    )
                continue
            shape = raw.shape
            if module.endswith("shared_expert_gate.weight"):
                shape = (1, shape[-1])  # HF [1, hidden]; converters may write [hidden]
            rope_heads = 0
            if self.arch == "llama":  # llama.cpp permutes llama/Mixtral q/k for its rope
                if ".self_attn.q_proj." in module:
                    rope_heads = heads
                elif ".self_attn.k_proj." in module:
                    rope_heads = kv_heads
            entries[file_name(module, self.checkpoint_name)] = GGUFEntry(
                raw.name, shape, raw.nbytes, rope_heads=rope_heads
            )
        entries.update(self._split_kv_b_entries())
        return entries

    def _split_kv_b_entries(self) -> dict[str, GGUFEntry]:
        entries = {}
        for name, k_raw in self.raw.items():
            match = re.fullmatch(r"blk\.(\d+)\.attn_k_b\.weight", name)
            if match is None or f"blk.{match[1]}.attn_kv_b.weight" in self.raw:
                continue
            v_name = f"blk.{match[1]}.attn_v_b.weight"
            if v_name not in self.raw:
                raise ModelFormatError(f"{self.model_dir} has {name} but not {v_name}")
            v_raw = self.raw[v_name]
            heads, rank, nope = k_raw.shape
            v_dim = v_raw.shape[1]
            module = f"model.layers.{match[1]}.self_attn.kv_b_proj.weight"
            entries[module] = GGUFEntry(
                name,
                (heads * (nope + v_dim), rank),
                k_raw.nbytes + v_raw.nbytes,
                value_source=v_name,
            )
        return entries

    def _float_dtype(self) -> str:
        """The dtype hetero computes in by default: the file's if all large weights are F32 or
        F16, else bfloat16 (quantised and BF16 files)."""
        weights = [t for t in self.raw.values() if len(t.shape) >= 2]
        kinds = {t.ggml_type for t in weights}
        if kinds <= {GGMLQuantizationType.F32}:
            return "float32"
        if kinds <= {GGMLQuantizationType.F32, GGMLQuantizationType.F16}:
            return "float16"
        return "bfloat16"
