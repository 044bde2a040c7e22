"""GGUF quantisers in numpy, following llama.cpp's reference code (ggml-quants.c:
quantize_row_*_ref, make_qkx2_quants, make_qx_quants) operation by operation in float32, with
sums taken left to right as the C loops do. Each takes float32 [n, block_size] and returns
uint8 [n, type_size] blocks in the layouts of `gguf_quants.FORMATS`."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType as T

from hetero.formats.gguf_quants import FORMATS, QK_K

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)
QUANTIZE_CHUNK_VALUES = 1 << 20  # values quantised per call of a block quantiser


def nearest_int(x: np.ndarray) -> np.ndarray:
    """llama.cpp's nearest_int: round half to even (the 1.5 * 2^23 trick), as int32."""
    return np.rint(x).astype(np.int32)


def round_away(x: np.ndarray) -> np.ndarray:
    """C roundf: halves away from zero, exactly (no x + 0.5 rounding error)."""
    a = np.abs(x)
    whole = np.floor(a)
    return np.sign(x) * (whole + np.floor(F32(2) * (a - whole)))


def sum_columns(terms: np.ndarray) -> np.ndarray:
    """terms: [k, n] -> [n], added in index order (a C `for` loop's float32 accumulation)."""
    total = terms[0].copy()
    for row in terms[1:]:
        total += row
    return total


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    # [n] float32 -> [n, 2] bytes of the nearest float16
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _signed_absmax(x: np.ndarray) -> np.ndarray:
    # the first value of largest magnitude in each row, with its sign
    return np.take_along_axis(x, np.abs(x).argmax(axis=-1)[:, None], axis=-1)[:, 0]


def _reciprocal(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, F32(0), F32(1) / d).astype(F32)


def _pack_nibbles(q: np.ndarray, run: int) -> np.ndarray:
    """q: uint8 [n, 2 * bytes] in runs of 2*run values -> [n, bytes]; within a run, value i goes
    to the low nibble and value i + run to the high nibble of byte i (inverse of _nibbles)."""
    n = q.shape[0]
    runs = q.reshape(n, -1, 2, run)
    return ((runs[:, :, 0] & 0x0F) | (runs[:, :, 1] << 4)).reshape(n, -1).astype(np.uint8)


def _pack_q5_high_bits(q: np.ndarray) -> np.ndarray:
    # q: [n, 32] 5-bit values -> [n, 4] bytes of a little-endian uint32, bit j = bit 4 of q[j]
    return np.packbits((q >> 4) & 1, axis=-1, bitorder="little")


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    d = (np.abs(x).max(axis=-1) / F32(127)).astype(F32)
    q = round_away(x * _reciprocal(d)[:, None]).astype(np.int8).view(np.uint8)
    return np.concatenate([_f16_bytes(d), q], axis=-1)


def quantize_q5_0(x: np.ndarray) -> np.ndarray:
    d = (_signed_absmax(x) / F32(-16)).astype(F32)
    scaled = x * _reciprocal(d)[:, None] + F32(16.5)
    q = np.minimum(np.trunc(scaled), 31).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _pack_q5_high_bits(q), _pack_nibbles(q, 16)], axis=-1)


def quantize_q5_1(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(axis=-1), x.max(axis=-1)
    d = ((hi - lo) / F32(31)).astype(F32)
    q = np.trunc((x - lo[:, None]) * _reciprocal(d)[:, None] + F32(0.5)).astype(np.uint8)
    return np.concatenate(
        [_f16_bytes(d), _f16_bytes(lo), _pack_q5_high_bits(q), _pack_nibbles(q, 16)], axis=-1
    )


def make_qkx2_quants(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine quantisation of each column of x: [k, n] (k values of n groups) to 0..nmax, with
    a weighted least-squares search over `nstep` + 1 candidate scales.
    -> (L uint8 [k, n], scale [n], the_min [n]): x ~ scale * L - the_min."""
    lo = np.minimum(x.min(axis=0), F32(0))
    hi = x.max(axis=0)
    sum_w = sum_columns(weights)
    sum_x = sum_columns(weights * x)
    flat = hi == lo
    span = np.where(flat, F32(1), hi - lo)
    iscale = F32(nmax) / span
    scale = F32(1) / iscale
    L = np.clip(nearest_int(iscale * (x - lo)), 0, nmax).astype(F32)
    best_error = sum_columns(weights * np.square(scale * L + lo - x))
    for step in range(nstep + 1):
        # `lo` moves when a candidate wins, and later candidates start from it (as in C)
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / np.where(flat, 1, hi - lo)
        laux = np.clip(nearest_int(iscale * (x - lo)), 0, nmax).astype(F32)
        wl = weights * laux
        sum_l, sum_l2, sum_xl = sum_columns(wl), sum_columns(wl * laux), sum_columns(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            clamp = this_min > 0
            this_min = np.where(clamp, F32(0), this_min)
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
        cur_error = sum_columns(weights * np.square(this_scale * laux + this_min - x))
        better = (D > 0) & (cur_error < best_error) & ~flat
        L = np.where(better, laux, L)
        best_error = np.where(better, cur_error, best_error)
        scale = np.where(better, this_scale, scale)
        lo = np.where(better, this_min, lo)
    L = np.where(flat, 0, L)
    scale = np.where(flat, F32(0), scale)
    return L.astype(np.uint8), scale.astype(F32), (-lo).astype(F32)


def _quantize_k_affine(x: np.ndarray, nmax: int, rmin: float, nstep: int):
    """Q4_K / Q5_K core. x: [n, 256] -> (d [n], dmin [n], ls [n, 8], lm [n, 8], L [n, 256])."""
    n = x.shape[0]
    sub = np.ascontiguousarray(x.reshape(n * 8, 32).T)  # [32, n*8]: one column per sub-block
    av_x = np.sqrt(sum_columns(sub * sub) / F32(32))
    weights = av_x + np.abs(sub)
    L, scales, mins = make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale = np.maximum(scales.max(axis=-1), F32(0))
    max_min = np.maximum(mins.max(axis=-1), F32(0))
    inv_scale = np.where(max_scale > 0, F32(63) / np.where(max_scale > 0, max_scale, 1), 0)
    inv_min = np.where(max_min > 0, F32(63) / np.where(max_min > 0, max_min, 1), 0)
    # C stores nearest_int(...) into a uint8 (wrapping), then caps at 63
    ls = np.minimum(nearest_int(inv_scale[:, None].astype(F32) * scales) & 0xFF, 63)
    lm = np.minimum(nearest_int(inv_min[:, None].astype(F32) * mins) & 0xFF, 63)
    d16 = (max_scale / F32(63)).astype(np.float16)
    dmin16 = (max_min / F32(63)).astype(np.float16)
    # requantise against the scales as stored (f16 super-scale x 6-bit scale)
    d = (d16.astype(F32)[:, None] * ls.astype(F32)).reshape(n * 8, 1)
    dm = (dmin16.astype(F32)[:, None] * lm.astype(F32)).reshape(n * 8, 1)
    values = x.reshape(n * 8, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(nearest_int((values + dm) / d), 0, nmax)
    L = np.where(d != 0, requant, L.T).astype(np.uint8).reshape(n, QK_K)
    return d16, dmin16, ls.astype(np.uint8), lm.astype(np.uint8), L


def _pack_k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    # inverse of gguf_quants.k_scales_mins: 8 six-bit scales and mins -> 12 bytes
    low = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    tail = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return np.concatenate([low, mid, tail], axis=-1).astype(np.uint8)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, ls, lm, L = _quantize_k_affine(x, nmax=15, rmin=-1.0, nstep=20)
    parts = [_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(ls, lm), _pack_nibbles(L, 32)]
    return np.concatenate(parts, axis=-1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, ls, lm, L = _quantize_k_affine(x, nmax=31, rmin=-0.5, nstep=15)
    n = x.shape[0]
    # bit j of qh[l]: bit 4 of value l of sub-block j
    high = ((L.reshape(n, 8, 32) >> 4) & 1).astype(np.uint8) << np.arange(8, dtype=np.uint8)[
        None, :, None
    ]
    qh = np.bitwise_or.reduce(high, axis=1)
    parts = [_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(ls, lm), qh, _pack_nibbles(L, 32)]
    return np.concatenate(parts, axis=-1)


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantisation of each column of x: [k, n] to -nmax..nmax-1 with x^2-weighted
    least squares over 19 candidate scales (rmse_type 1). -> (L = q + nmax uint8 [k, n],
    scale [n])."""
    absx = np.abs(x)
    pick = absx.argmax(axis=0)
    amax = np.take_along_axis(absx, pick[None], axis=0)[0]
    signed_max = np.take_along_axis(x, pick[None], axis=0)[0]
    zero = amax < GROUP_MAX_EPS
    signed_max = np.where(zero, F32(1), signed_max)
    w = x * x

    def candidate(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q = np.clip(nearest_int(iscale * x), -nmax, nmax - 1).astype(F32)
        return q, sum_columns(w * x * q), sum_columns(w * q * q)

    q, sumlx, suml2 = candidate(F32(-nmax) / signed_max)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
    best = scale * sumlx
    L = q
    for step in (*range(-9, 0), *range(1, 10)):
        iscale = -(F32(nmax) + F32(0.1) * F32(step)) / signed_max
        q, sumlx, suml2 = candidate(iscale.astype(F32))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        with np.errstate(divide="ignore", invalid="ignore"):
            new_scale = (sumlx / suml2).astype(F32)
        L = np.where(better, q, L)
        scale = np.where(better, new_scale, scale)
        best = np.where(better, scale * sumlx, best)
    L = np.where(zero, 0, L + nmax)
    return L.astype(np.uint8), np.where(zero, F32(0), scale).astype(F32)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    sub = np.ascontiguousarray(x.reshape(n * 16, 16).T)  # [16, n*16]
    L, scales = make_qx_quants(sub, nmax=32)
    scales = scales.reshape(n, 16)
    L = L.T.reshape(n * 16, 16)
    pick = np.abs(scales).argmax(axis=-1)
    max_abs_scale = np.take_along_axis(np.abs(scales), pick[:, None], axis=-1)[:, 0]
    empty = max_abs_scale < GROUP_MAX_EPS
    max_scale = np.take_along_axis(scales, pick[:, None], axis=-1)[:, 0]
    iscale = F32(-128) / np.where(empty, F32(1), max_scale)
    d16 = (F32(1) / iscale).astype(np.float16)
    q_scales = np.minimum(nearest_int(iscale[:, None] * scales), 127).astype(np.int8)
    d = (d16.astype(F32)[:, None] * q_scales.astype(F32)).reshape(n * 16, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(nearest_int(x.reshape(n * 16, 16) / d), -32, 31) + 32
    L = np.where(d != 0, requant, L).astype(np.uint8).reshape(n, 2, 4, 32)  # [n, half, quarter, l]
    ql = np.concatenate(
        [
            L[:, :, 0] & 0x0F | (L[:, :, 2] & 0x0F) << 4,
            L[:, :, 1] & 0x0F | (L[:, :, 3] & 0x0F) << 4,
        ],
        axis=-1,
    ).reshape(n, QK_K // 2)
    qh = L[:, :, 0] >> 4 | (L[:, :, 1] >> 4) << 2 | (L[:, :, 2] >> 4) << 4 | (L[:, :, 3] >> 4) << 6
    out = np.concatenate(
        [ql, qh.reshape(n, QK_K // 4), q_scales.view(np.uint8), d16.reshape(-1, 1).view(np.uint8)],
        axis=-1,
    ).astype(np.uint8)
    out[empty] = 0
    return out


def quantize_bf16(x: np.ndarray) -> np.ndarray:
    # ggml_compute_fp32_to_bf16: round to nearest even, NaN kept quiet
    bits = x.view(np.uint32)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = (bits.astype(np.uint64) + (0x7FFF + ((bits >> 16) & 1))) >> 16
    out = np.where(nan, (bits >> 16) | 64, rounded).astype(np.uint16)
    return out.view(np.uint8)


QUANTIZERS: dict[T, Callable[[np.ndarray], np.ndarray]] = {
    T.F32: lambda x: x.view(np.uint8),
    T.F16: lambda x: x.astype(np.float16).view(np.uint8),
    T.BF16: quantize_bf16,
    T.Q8_0: quantize_q8_0,
    T.Q5_0: quantize_q5_0,
    T.Q5_1: quantize_q5_1,
    T.Q4_K: quantize_q4_k,
    T.Q5_K: quantize_q5_k,
    T.Q6_K: quantize_q6_k,
}


def quantize(x: np.ndarray, ggml_type: T) -> np.ndarray:
    """x: float32 [..., k] -> uint8 [..., k / block_size * type_size] of `ggml_type`."""
    fmt = FORMATS[ggml_type]
    values = np.ascontiguousarray(x, dtype=F32)
    if values.shape[-1] % fmt.block_size:
        raise ValueError(
            f"rows of {values.shape[-1]} values are not a whole number of {fmt.name} blocks "
            f"({fmt.block_size})"
        )
    rows = values.shape[-1] // fmt.block_size * fmt.type_size
    flat = values.reshape(-1, fmt.block_size)
    blocks = np.empty((flat.shape[0], fmt.type_size), np.uint8)
    # in chunks: the quantisers' temporaries are tens of times their input (K-quant searches)
    step = max(1, QUANTIZE_CHUNK_VALUES // fmt.block_size)
    for start in range(0, flat.shape[0], step):
        blocks[start : start + step] = QUANTIZERS[ggml_type](flat[start : start + step])
    return blocks.reshape(*values.shape[:-1], rows)
