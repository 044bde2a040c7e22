"""Rotary position embeddings: default, linear, llama3 and YaRN frequency schedules, applied
in the half-split (GPT-NeoX/Llama) or interleaved (DeepSeek) layout."""

from __future__ import annotations

import math

import torch
from torch import nn

from hetero.config import RopeConfig
from hetero.models.batch import Batch


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention-temperature correction (DeepSeek also uses it on the softmax scale)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def inverse_frequencies(dim: int, rope: RopeConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim/2], scale applied to cos/sin) for a rotary dimension `dim`."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    pos_freqs = rope.theta**exponents
    inv_freq = 1.0 / pos_freqs
    if rope.type == "default":
        return inv_freq, 1.0
    if rope.type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.type == "llama3":
        return llama3_frequencies(inv_freq, rope), 1.0
    return yarn_frequencies(pos_freqs, dim, rope)


def llama3_frequencies(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Long wavelengths are divided by `factor`, short ones kept, the band between blended.
    old_len = rope.original_max_position_embeddings or 8192
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def llama3_frequency_factors(dim: int, rope: RopeConfig) -> torch.Tensor:
    """llama3 scaling as llama.cpp's converter stores it (the GGUF tensor `rope_freqs`): the
    number each default inverse frequency [dim/2] is divided by, in float64."""
    inv_freq = 1.0 / rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return inv_freq / llama3_frequencies(inv_freq, rope)


def yarn_frequencies(
    pos_freqs: torch.Tensor, dim: int, rope: RopeConfig
) -> tuple[torch.Tensor, float]:
    # YaRN (arXiv 2309.00071): interpolate low frequencies, extrapolate high ones, linear ramp
    # between the dimensions that turn beta_fast and beta_slow times over the original context.
    factor = rope.factor
    if rope.attention_factor is not None:
        attention_factor = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = yarn_mscale(factor, rope.mscale) / yarn_mscale(
            factor, rope.mscale_all_dim
        )
    else:
        attention_factor = yarn_mscale(factor)
    original = rope.original_max_position_embeddings or 4096

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(
        0, 1
    )
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """cos/sin for absolute token positions; `apply` rotates q or k: [tokens, heads, dim]."""

    def __init__(self, dim: int, rope: RopeConfig, interleaved: bool = False):
        super().__init__()
        inv_freq, self.attention_scaling = inverse_frequencies(dim, rope)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleaved = interleaved
        self.settings = (dim, rope)  # what cos/sin depend on besides positions

    def batch_cos_sin(self, batch: Batch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`cos_sin` of a batch's positions, computed once per batch for every layer
        with the same settings."""
        return batch.memo(
            ("rope", self.settings, dtype), lambda: self.cos_sin(batch.positions, dtype)
        )

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [tokens] -> cos, sin: [tokens, 1, dim], sin with its first half negated
        (the sign `apply` needs on the rolled halves)."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = emb.sin() * self.attention_scaling
        half = sin.shape[-1] // 2
        signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).to(dtype)
        return cos[:, None, :], signed[:, None, :]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [tokens, heads, dim] rotated by `cos_sin`'s cos and signed sin: x * cos +
        rotate_half(x) * sin, where rotate_half(x) = (-x2, x1) is the halves swapped (one roll)
        times the sign already in sin (3 ops a call where the textbook form takes 6)."""
        if self.interleaved:
            # DeepSeek stores rotary pairs as (x0, x1), (x2, x3)...: de-interleave to halves first.
            t, h, d = x.shape
            x = x.view(t, h, d // 2, 2).transpose(-1, -2).reshape(t, h, d)
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)
