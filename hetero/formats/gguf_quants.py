"""GGUF weight formats (llama.cpp's ggml-common.h) described as data, with one numpy dequantise
function per type. Each takes blocks: uint8 [n, type_size] and returns float32 [n, block_size],
equal bit for bit to `gguf.quants.dequantize` (same float32 operations in the same order)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

QK_K = 256  # values per K-quant super-block


@dataclass(frozen=True)
class BlockFormat:
    """One GGML type: `block_size` values stored in `type_size` bytes, laid out as `fields`
    (name, bytes) in storage order. Float types are one-value "blocks" with no fields."""

    ggml_type: T
    block_size: int
    type_size: int
    fields: tuple[tuple[str, int], ...] = ()

    @property
    def name(self) -> str:
        return self.ggml_type.name

    @property
    def quantized(self) -> bool:
        return bool(self.fields)

    def row_bytes(self, values: int) -> int:
        return values // self.block_size * self.type_size


def _format(ggml_type: T, block_size: int, *fields: tuple[str, int]) -> BlockFormat:
    return BlockFormat(ggml_type, block_size, sum(size for _, size in fields), fields)


FORMATS: dict[T, BlockFormat] = {
    T.F32: BlockFormat(T.F32, 1, 4),
    T.F16: BlockFormat(T.F16, 1, 2),
    T.BF16: BlockFormat(T.BF16, 1, 2),
    # 32-value blocks: f16 scale d (and min m), packed 4/5/8-bit values
    T.Q4_0: _format(T.Q4_0, 32, ("d", 2), ("qs", 16)),
    T.Q4_1: _format(T.Q4_1, 32, ("d", 2), ("m", 2), ("qs", 16)),
    T.Q5_0: _format(T.Q5_0, 32, ("d", 2), ("qh", 4), ("qs", 16)),
    T.Q5_1: _format(T.Q5_1, 32, ("d", 2), ("m", 2), ("qh", 4), ("qs", 16)),
    T.Q8_0: _format(T.Q8_0, 32, ("d", 2), ("qs", 32)),
    # 256-value super-blocks of 8 x 32 (Q4_K, Q5_K: 6-bit scales and mins) or 16 x 16 (Q6_K)
    T.Q4_K: _format(T.Q4_K, QK_K, ("d", 2), ("dmin", 2), ("scales", 12), ("qs", QK_K // 2)),
    T.Q5_K: _format(
        T.Q5_K, QK_K, ("d", 2), ("dmin", 2), ("scales", 12), ("qh", QK_K // 8), ("qs", QK_K // 2)
    ),
    T.Q6_K: _format(
        T.Q6_K, QK_K, ("ql", QK_K // 2), ("qh", QK_K // 4), ("scales", QK_K // 16), ("d", 2)
    ),
}


def split_fields(blocks: np.ndarray, fmt: BlockFormat) -> dict[str, np.ndarray]:
    """blocks: uint8 [n, type_size] -> {field: uint8 [n, bytes]} (views)."""
    out, start = {}, 0
    for name, size in fmt.fields:
        out[name] = blocks[:, start : start + size]
        start += size
    return out


def _f16(field: np.ndarray) -> np.ndarray:
    # [n, 2] bytes -> [n, 1] float32
    return field.view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, run: int) -> np.ndarray:
    """qs: uint8 [n, bytes] in runs of `run` bytes; each run holds 2*run values, the low nibbles
    first -> uint8 [n, 2 * bytes]."""
    n = qs.shape[0]
    pairs = qs.reshape(n, -1, 1, run) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (pairs & np.uint8(0x0F)).reshape(n, -1)


def _bits(packed: np.ndarray, count: int, width: int) -> np.ndarray:
    """packed: uint8 [n, bytes]; value i of plane p is bits [width*p, width*(p+1)) of byte i ->
    uint8 [n, count * bytes] ordered (plane, byte)."""
    n = packed.shape[0]
    shifts = np.arange(0, width * count, width, dtype=np.uint8).reshape(1, 1, count, 1)
    planes = packed.reshape(n, -1, 1, packed.shape[1]) >> shifts
    return (planes & np.uint8((1 << width) - 1)).reshape(n, -1)


def _q5_high_bits(qh: np.ndarray) -> np.ndarray:
    # qh: [n, 4] bytes = one little-endian uint32 whose bit j is the 5th bit of value j
    shifts = np.arange(32, dtype=np.uint32).reshape(1, 32)
    return ((qh.view(np.uint32).reshape(-1, 1) >> shifts) & np.uint32(1)).astype(np.uint8)


def k_scales_mins(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins, uint8 [n, 8] each.
    Bytes 0-3: scale j (low 6 bits) + scale j+4 bits 4-5; bytes 4-7: the same for mins;
    bytes 8-11: scale j+4 bits 0-3 (low nibble), min j+4 bits 0-3 (high nibble)."""
    n = scales.shape[0]
    s, m, tail = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([s & 0x3F, (tail & 0x0F) | ((s >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (tail >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.reshape(n, 8), mn.reshape(n, 8)


def dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    f = split_fields(blocks, FORMATS[T.Q4_0])
    q = _nibbles(f["qs"], 16).astype(np.int8) - np.int8(8)
    return _f16(f["d"]) * q.astype(np.float32)


def dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    f = split_fields(blocks, FORMATS[T.Q4_1])
    q = _nibbles(f["qs"], 16).astype(np.float32)
    return _f16(f["d"]) * q + _f16(f["m"])


def dequantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    f = split_fields(blocks, FORMATS[T.Q5_0])
    q = (_nibbles(f["qs"], 16) | (_q5_high_bits(f["qh"]) << np.uint8(4))).astype(np.int8)
    return _f16(f["d"]) * (q - np.int8(16)).astype(np.float32)


def dequantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    f = split_fields(blocks, FORMATS[T.Q5_1])
    q = (_nibbles(f["qs"], 16) | (_q5_high_bits(f["qh"]) << np.uint8(4))).astype(np.float32)
    return _f16(f["d"]) * q + _f16(f["m"])


def dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    f = split_fields(blocks, FORMATS[T.Q8_0])
    return f["qs"].view(np.int8).astype(np.float32) * _f16(f["d"])


def _k_quant_affine(blocks: np.ndarray, fmt: BlockFormat, q: np.ndarray) -> np.ndarray:
    # value = d * scale_j * q - dmin * min_j over 8 sub-blocks of 32
    f = split_fields(blocks, fmt)
    n = blocks.shape[0]
    sc, mn = k_scales_mins(f["scales"])
    d = (_f16(f["d"]) * sc.astype(np.float32)).reshape(n, 8, 1)
    dm = (_f16(f["dmin"]) * mn.astype(np.float32)).reshape(n, 8, 1)
    return (d * q.reshape(n, 8, 32).astype(np.float32) - dm).reshape(n, QK_K)


def dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    # qs: 4 runs of 32 bytes; run r holds sub-block 2r (low nibbles) and 2r+1 (high nibbles)
    fmt = FORMATS[T.Q4_K]
    return _k_quant_affine(blocks, fmt, _nibbles(split_fields(blocks, fmt)["qs"], 32))


def dequantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    # low 4 bits as Q4_K; bit j of qh[l] is the 5th bit of value l of sub-block j
    fmt = FORMATS[T.Q5_K]
    f = split_fields(blocks, fmt)
    q = _nibbles(f["qs"], 32) | (_bits(f["qh"], 8, 1) << np.uint8(4))
    return _k_quant_affine(blocks, fmt, q)


def dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    # 16 sub-blocks of 16 with int8 scales; a value is 4 low bits (ql) + 2 high bits (qh), - 32
    f = split_fields(blocks, FORMATS[T.Q6_K])
    n = blocks.shape[0]
    d = (_f16(f["d"]) * f["scales"].view(np.int8).astype(np.float32)).reshape(n, 16, 1)
    low = _nibbles(f["ql"], 64)
    high = _bits(f["qh"].reshape(n * 2, 32), 4, 2).reshape(n, -1)
    q = (low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)
    return (d * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


def dequantize_f16(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.float16).astype(np.float32)


def dequantize_bf16(blocks: np.ndarray) -> np.ndarray:
    return (blocks.view(np.int16).astype(np.int32) << 16).view(np.float32)


def dequantize_f32(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.float32).copy()


DEQUANTIZERS: dict[T, Callable[[np.ndarray], np.ndarray]] = {
    T.F32: dequantize_f32,
    T.F16: dequantize_f16,
    T.BF16: dequantize_bf16,
    T.Q4_0: dequantize_q4_0,
    T.Q4_1: dequantize_q4_1,
    T.Q5_0: dequantize_q5_0,
    T.Q5_1: dequantize_q5_1,
    T.Q8_0: dequantize_q8_0,
    T.Q4_K: dequantize_q4_k,
    T.Q5_K: dequantize_q5_k,
    T.Q6_K: dequantize_q6_k,
}


def dequantize(data: np.ndarray, ggml_type: T) -> np.ndarray:
    """data: uint8 [..., row_bytes] of `ggml_type` -> float32 [..., row_values]."""
    fmt = FORMATS[ggml_type]
    raw = np.ascontiguousarray(data).view(np.uint8)
    if raw.shape[-1] % fmt.type_size:
        raise ValueError(
            f"{raw.shape[-1]} bytes per row is not a whole number of {fmt.name} blocks"
        )
    values = raw.shape[-1] // fmt.type_size * fmt.block_size
    out = DEQUANTIZERS[ggml_type](raw.reshape(-1, fmt.type_size))
    return out.reshape(*raw.shape[:-1], values)
