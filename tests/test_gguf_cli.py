"""`hetero quantize` and GGUF paths on the command line: a quantised demo model that generates,
and one clear line with exit code 2 for truncated, corrupt or unsupported GGUF files."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from test_cli import assert_one_line_error, hetero

from hetero.cli import main


@pytest.fixture(scope="module")
def demo_q8(tmp_path_factory):
    """The demo model quantised through the CLI, in its own process."""
    directory = tmp_path_factory.mktemp("gguf_cli")
    out = directory / "demo-q8_0.gguf"
    result = hetero("quantize", "demo", str(out), "--type", "q8_0", env_cache=directory)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    return out


def test_quantized_demo_generates_from_a_lone_gguf(demo_q8):
    result = hetero("generate", str(demo_q8), "--chat", "--prompt", "hi", "-n", "5")
    assert result.returncode == 0, result.stderr
    assert "5 generated" in result.stderr or "finish: stop" in result.stderr
    types = {t.tensor_type for t in GGUFReader(demo_q8).tensors}
    assert types == {GGMLQuantizationType.Q8_0, GGMLQuantizationType.F32}


def run_main(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def assert_error_line(code: int, err: str, fragment: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("hetero: error:") and fragment in lines[0], lines[0]


def test_truncated_gguf_is_one_line(demo_q8, tmp_path, capsys):
    data = demo_q8.read_bytes()
    for keep, fragment in (
        (len(data) - 1000, "truncated"),
        (5000, "truncated or corrupt"),
        (2, "not a GGUF"),
    ):
        cut = tmp_path / "cut.gguf"
        cut.write_bytes(data[:keep])
        assert_error_line(*run_main(capsys, "generate", str(cut), "--prompt", "x"), fragment)


def test_corrupt_gguf_is_one_line(demo_q8, tmp_path, capsys):
    data = bytearray(demo_q8.read_bytes())
    data[24:64] = b"\xff" * 40  # the first key's length and name
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    assert_error_line(*run_main(capsys, "generate", str(bad), "--prompt", "x"), "corrupt")


def write_tiny_gguf(path, arch: str, tensor_type: GGMLQuantizationType) -> None:
    writer = GGUFWriter(path, arch)
    writer.add_block_count(1)
    raw = np.zeros((4, 256 // 256 * 66), dtype=np.uint8) if tensor_type.name == "IQ2_XXS" else None
    if raw is None:
        writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    else:
        writer.add_tensor("token_embd.weight", raw, raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unknown_architecture_is_one_line(tmp_path, capsys):
    path = tmp_path / "gpt2.gguf"
    write_tiny_gguf(path, "gpt2", GGMLQuantizationType.F32)
    assert_error_line(*run_main(capsys, "generate", str(path), "--prompt", "x"), "'gpt2' model")


def test_unsupported_and_unknown_tensor_types_are_one_line(tmp_path, capsys):
    path = tmp_path / "iq2.gguf"
    write_tiny_gguf(path, "llama", GGMLQuantizationType.IQ2_XXS)
    assert_error_line(*run_main(capsys, "generate", str(path), "--prompt", "x"), "IQ2_XXS")
    # patch the tensor's type field to a number no GGML version defines
    data = bytearray(path.read_bytes())
    tensor = GGUFReader(path).tensors[0]
    type_offset = tensor.field.offset + sum(p.nbytes for p in tensor.field.parts[:4])
    data[type_offset : type_offset + 4] = struct.pack("<I", 999)
    path.write_bytes(bytes(data))
    assert_error_line(*run_main(capsys, "generate", str(path), "--prompt", "x"), "tensor type")


def test_quantize_refuses_a_missing_source(tmp_path):
    result = hetero("quantize", str(tmp_path / "nope"), str(tmp_path / "x.gguf"), "--type", "q8_0")
    assert_one_line_error(result, "does not exist")
