"""The Numba latent-attention (MLA) decode kernel in the absorbed form against a float64 reference
of the expanded form DeepSeek's code runs, on fresh random inputs, float32 and bfloat16 stores;
the runtime's Numba MLA backend against its torch reference.

Error budget, per sequence and head: a float32 sum of n products is within LAMBDA * sqrt(n) *
2^-24 of the sum of their magnitudes except with probability 2 exp(-LAMBDA^2 / 2) (Higham and
Mary's probabilistic bound; the worst case, n instead of sqrt(n), is ~1e5 times the errors
seen). A score is such a sum through two products (q_nope . W_key over nope, then . latent over
rank, plus q_rope . k_rope), so with S = scale * sum |q_d W_dr c_r| + scale * sum |q_rope k_rope|
its error is e <= LAMBDA sqrt(nope + rank + rope) 2^-24 S. An error e moves a softmax weight by
a factor within exp(+-2e), so the output moves by <= 2e max_t |value_t|; the float32 weighted
sums add LAMBDA sqrt(length + rank) 2^-24 max |value|."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_cpu_attention import bf16_bits, widened
from torch import nn

from cpu_kernels.mla_decode import latent_attention_decode
from hetero.models.batch import LatentStep
from hetero.runtime.attention import NUMBA_DECODE, TORCH, choose_backend
from hetero.runtime.attention.numba_decode import kernel_store
from hetero.runtime.batch import ForwardBatch, SequenceSlice
from hetero.runtime.kv_cache import KVLayerSpec, PagedKVCache

SEED = 15


def expanded_reference(q_nope, q_rope, latent, k_rope, w_key, w_value, slots, lengths, scale):
    """float64, the expanded form: per sequence and head, keys [latent @ W_key[h]^T, k_rope],
    values latent @ W_value[h]^T, softmax(scale * q . keys) @ values -> [n, heads, v]."""
    n, heads, _ = q_nope.shape
    out = np.zeros((n, heads, w_value.shape[1]))
    for s in range(n):
        rows = slots[s, : lengths[s]]
        c, r = widened(latent)[rows], widened(k_rope)[rows]
        for h in range(heads):
            keys = np.concatenate([c @ w_key[h].T.astype(np.float64), r], axis=1)
            q = np.concatenate([q_nope[s, h], q_rope[s, h]]).astype(np.float64)
            scores = scale * keys @ q
            weights = np.exp(scores - scores.max())
            out[s, h] = weights / weights.sum() @ (c @ w_value[h].T.astype(np.float64))
    return out


def absorbed_decode(q_nope, q_rope, latent, k_rope, w_key, w_value, slots, lengths, scale):
    """What the runtime's backend does around the kernel: queries into the latent space, the
    kernel, the result through the value part (float32 torch matmuls)."""
    q_latent = torch.bmm(torch.from_numpy(q_nope).transpose(0, 1), torch.from_numpy(w_key))
    mixed = latent_attention_decode(
        q_latent.transpose(0, 1).contiguous().numpy(),
        q_rope,
        latent,
        k_rope,
        slots[:, None],
        lengths[:, None],
        scale,
    )
    out = torch.bmm(torch.from_numpy(mixed).transpose(0, 1), torch.from_numpy(w_value).mT)
    return out.transpose(0, 1).numpy()


LAMBDA = 6.0  # a budget exceeded with probability < 3e-8 per sum


def budget(q_nope, q_rope, latent, k_rope, w_key, w_value, lengths, scale) -> np.ndarray:
    """[n, heads]: the largest error allowed in each output row (module docstring)."""
    c, r = widened(latent), widened(k_rope)
    u = LAMBDA * 2.0**-24
    q_latent = np.einsum("nhd,hdr->nhr", np.abs(q_nope), np.abs(w_key.astype(np.float64)))
    terms = np.einsum("nhr,tr->nht", q_latent, np.abs(c)) + np.einsum(
        "nhd,td->nht", np.abs(q_rope.astype(np.float64)), np.abs(r)
    )  # [n, heads, rows]: every row, a superset of each sequence's
    score_error = u * np.sqrt(w_key.shape[1] + c.shape[1] + r.shape[1]) * scale * terms.max(-1)
    value_max = np.abs(np.einsum("tr,hvr->htv", c, w_value)).max(axis=(1, 2))  # [heads]
    sums = u * np.sqrt(max(lengths) + c.shape[1])
    return (2 * score_error + sums) * value_max


SHAPES = {
    "one sequence, one head": (1, 32, 8, 16, 12, [7]),
    "lengths unlike, not multiples of a block": (4, 64, 16, 32, 32, [1, 17, 40, 3]),
    "DeepSeek-V2-Lite heads and ranks": (16, 512, 64, 128, 128, [300, 45]),
}


@pytest.mark.parametrize("store_dtype", [np.float32, np.uint16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_absorbed_latent_decode_matches_expanded_reference(shape, store_dtype):
    heads, rank, rope, nope, v_dim, lengths = SHAPES[shape]
    rng = np.random.default_rng(SEED)
    rows, n = 512, len(lengths)
    latent = rng.standard_normal((rows, rank), dtype=np.float32)
    k_rope = rng.standard_normal((rows, rope), dtype=np.float32)
    if store_dtype == np.uint16:
        latent, k_rope = bf16_bits(latent), bf16_bits(k_rope)
    w_key = rng.standard_normal((heads, nope, rank), dtype=np.float32) * rank**-0.5
    w_value = rng.standard_normal((heads, v_dim, rank), dtype=np.float32) * rank**-0.5
    slots = np.stack([rng.permutation(rows)[: max(lengths)] for _ in range(n)])  # scattered
    q_nope = rng.standard_normal((n, heads, nope), dtype=np.float32) * 2
    q_rope = rng.standard_normal((n, heads, rope), dtype=np.float32) * 2
    lengths = np.array(lengths)
    scale = (nope + rope) ** -0.5
    args = (q_nope, q_rope, latent, k_rope, w_key, w_value)
    got = absorbed_decode(*args, slots, lengths, scale)
    want = expanded_reference(*args, slots, lengths, scale)
    error, allowed = np.abs(got - want).max(-1), budget(*args, lengths, scale)
    print(f"seed {SEED}: largest error / budget {(error / allowed).max():.2e}")
    assert (error <= allowed).all()


def test_latent_decode_ignores_rows_past_each_length():
    rng = np.random.default_rng(SEED)
    latent = rng.standard_normal((64, 32), dtype=np.float32)
    k_rope = rng.standard_normal((64, 8), dtype=np.float32)
    slots = np.arange(64).reshape(2, 1, 32)
    q_latent = rng.standard_normal((2, 4, 32), dtype=np.float32)
    q_rope = rng.standard_normal((2, 4, 8), dtype=np.float32)
    lengths = np.array([[10], [32]])
    out = latent_attention_decode(q_latent, q_rope, latent, k_rope, slots, lengths, 0.2)
    latent[10:32], k_rope[10:32] = np.nan, 1e6  # rows sequence 0 does not own
    again = latent_attention_decode(
        q_latent[:1], q_rope[:1], latent, k_rope, slots[:1], lengths[:1], 0.2
    )
    np.testing.assert_array_equal(again, out[:1])


def test_latent_decode_refuses_stores_of_another_rank():
    q = np.zeros((1, 2, 32), np.float32)
    with pytest.raises(ValueError, match="do not match stores"):
        latent_attention_decode(
            q,
            np.zeros((1, 2, 8), np.float32),
            np.zeros((4, 16), np.float32),
            np.zeros((4, 8), np.float32),
            np.zeros((1, 1, 1), np.int64),
            np.ones((1, 1), np.int64),
            1.0,
        )


def latent_case(lengths, dtype, heads, rank, rope, nope, v_dim):
    """A paged latent cache (blocks of 4) holding random histories, a batch of one decoding
    token per sequence, and that token's MLA step with a random kv_b."""
    kv = PagedKVCache(
        [KVLayerSpec({"latent": (rank,), "k_rope": (rope,)}, dtype)], num_blocks=128, block_size=4
    )
    slices = []
    for past in lengths:
        seq, _ = kv.new_sequence()
        kv.reserve(seq, past + 1)
        slices.append(SequenceSlice(seq, past, 1))
    g = torch.Generator().manual_seed(SEED)
    for store in kv.storage[0].values():
        store.copy_(torch.randn(store.shape, generator=g))
    kv_b = nn.Linear(rank, heads * (nope + v_dim), bias=False).requires_grad_(False)
    kv_b.weight.copy_(torch.randn(kv_b.weight.shape, generator=g) * rank**-0.5)
    n = len(lengths)
    step = LatentStep(
        torch.randn(n, heads, nope, generator=g) * 2,
        torch.randn(n, heads, rope, generator=g) * 2,
        torch.randn(n, rank, generator=g),
        torch.randn(n, rope, generator=g),
        kv_b,
        v_dim,
        (nope + rope) ** -0.5,
    )
    return ForwardBatch(slices, kv), kv, step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_numba_latent_backend_agrees_with_the_torch_reference(shape, dtype):
    heads, rank, rope, nope, v_dim, lengths = SHAPES[shape]
    batch, kv, step = latent_case(lengths, dtype, heads, rank, rope, nope, v_dim)
    assert choose_backend(batch, 0, step) is NUMBA_DECODE
    got = NUMBA_DECODE.latent(batch, 0, step)
    want = TORCH.latent(batch, 0, step)  # expands the same (widened) history through kv_b
    # each is within `budget` of the float64 value, so within twice it of each other
    w_key, w_value = (w.numpy() for w in step.absorbed_weights())
    store = [kernel_store(kv.storage[0][name]) for name in ("latent", "k_rope")]
    q_nope, q_rope = step.q_nope.numpy(), step.q_rope.numpy()
    lengths = batch.lengths.numpy()
    allowed = 2 * budget(q_nope, q_rope, *store, w_key, w_value, lengths, step.scale)
    assert ((got - want).abs().amax(-1).numpy() <= allowed).all()


def test_latent_steps_without_a_plain_kv_b_weight_take_the_torch_reference():
    batch, _, step = latent_case([3], torch.float32, 2, 16, 4, 8, 8)
    wrapped = dataclasses.replace(step, kv_b=nn.Sequential(step.kv_b))
    assert choose_backend(batch, 0, wrapped) is TORCH
    torch.testing.assert_close(batch.attention(0, wrapped), NUMBA_DECODE.latent(batch, 0, step))
