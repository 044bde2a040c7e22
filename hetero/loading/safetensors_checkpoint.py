"""Memory-mapped, lazy access to a Hugging Face safetensors checkpoint (one file or sharded).

Opening reads only the JSON headers. `tensor(name)` returns a zero-copy view into a private
(copy-on-write) mapping, so a tensor's pages are read from disk only when touched."""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from hetero.errors import ModelFormatError
from hetero.loading.mapped_files import MappedFiles

# safetensors dtype tags -> torch dtypes
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


class SafetensorsCheckpoint:
    """All tensors of a checkpoint directory, by name."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.entries: dict[str, TensorEntry] = {}
        self._files = MappedFiles()
        for file in checkpoint_files(model_dir):
            self.entries.update(read_header(file))

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def tensor(self, name: str) -> torch.Tensor:
        """Zero-copy view of one tensor; its bytes are read when first touched."""
        entry = self.entries[name]
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        buf = self._map(entry.file)
        flat = torch.frombuffer(buf, dtype=torch.uint8, count=entry.nbytes, offset=entry.start)
        return flat.view(entry.dtype).reshape(entry.shape)

    def release(self, name: str, begin: int = 0, end: int | None = None) -> None:
        """Drop this process's pages of bytes [begin, end) of a tensor once they have been
        copied elsewhere."""
        entry = self.entries[name]
        end = entry.nbytes if end is None else end
        self._files.release(entry.file, entry.start + begin, entry.start + end)

    def _map(self, file: Path) -> mmap.mmap:
        return self._files.map(file)


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a directory: from model.safetensors.index.json when present."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ModelFormatError(f"{index} is malformed ({err})") from None
        files = sorted({model_dir / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelFormatError(
                f"{model_dir} is missing shard(s) {', '.join(missing)} listed in "
                f"model.safetensors.index.json; download them again"
            )
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{model_dir} has no *.safetensors weight files")
    return files


def read_header(file: Path) -> dict[str, TensorEntry]:
    """Parse one safetensors header and check that the file holds every byte it promises."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFormatError(f"{file} is truncated ({size} bytes): not a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise ModelFormatError(f"{file} is truncated or not a safetensors file (bad header)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelFormatError(f"{file} has a corrupt safetensors header") from None
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    end = data_start
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            begin, stop = info["data_offsets"]
            shape = tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise ModelFormatError(
                f"{file}: tensor {name!r} has an unreadable header entry"
            ) from None
        entries[name] = TensorEntry(file, dtype, shape, data_start + begin, stop - begin)
        end = max(end, data_start + stop)
    if end > size:
        raise ModelFormatError(
            f"{file} is truncated: its header needs {end} bytes but the file has {size}; "
            f"download it again"
        )
    return entries
