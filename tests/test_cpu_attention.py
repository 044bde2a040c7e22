"""The Numba paged decode attention against a float64 torch reference on fresh random inputs,
and the runtime choosing it only where it applies.

Error budget: scores and the weighted sum are float32 sums of d (or length) products, each
within ~n * 2^-24 of its float64 value relative to the sum of magnitudes; softmax weights sum
to 1, so the output moves by at most a few times 1e-6 of the largest |value|. 1e-5 * max |v|
leaves room for that and for exp's own rounding."""

import numba
import numpy as np
import pytest
import torch

import hetero
from cpu_kernels.attention import paged_decode_attention, softmax_numerators
from hetero.runtime.batch import ForwardBatch, SequenceSlice
from hetero.runtime.kv_cache import PagedKVCache


def reference(q, k_store, v_store, slots, lengths, scale):
    """float64: per sequence and head, softmax(scale * q . K) @ V over its rows, GQA groups."""
    n, heads, _ = q.shape
    groups = heads // k_store.shape[1]
    out = np.zeros((n, heads, v_store.shape[2]))
    for s in range(n):
        rows = slots[s, : lengths[s]]
        for h in range(heads):
            keys = k_store[rows, h // groups].astype(np.float64)
            values = v_store[rows, h // groups].astype(np.float64)
            scores = scale * keys @ q[s, h].astype(np.float64)
            weights = np.exp(scores - scores.max())
            out[s, h] = weights / weights.sum() @ values
    return out


@pytest.mark.parametrize(
    "heads,kv_heads,d,dv,lengths",
    [
        (32, 4, 128, 128, [1, 37, 300]),  # Qwen3-MoE-like GQA, one sequence of a lone token
        (8, 8, 64, 64, [5]),  # multi-head (one query head per kv head)
        (16, 1, 32, 48, [17, 16]),  # multi-query, a value width unlike the key's
    ],
)
def test_paged_decode_attention_matches_reference(heads, kv_heads, d, dv, lengths):
    rng = np.random.default_rng()
    rows, n = 1024, len(lengths)
    k_store = rng.standard_normal((rows, kv_heads, d), dtype=np.float32)
    v_store = rng.standard_normal((rows, kv_heads, dv), dtype=np.float32)
    longest = max(lengths)
    slots = np.stack([rng.permutation(rows)[:longest] for _ in range(n)])  # scattered rows
    q = rng.standard_normal((n, heads, d), dtype=np.float32) * 2
    lengths = np.array(lengths)
    out = np.full((n, heads, dv), np.nan, np.float32)
    scale = d**-0.5
    paged_decode_attention(q, k_store, v_store, slots, lengths, np.float32(scale), out)
    want = reference(q, k_store, v_store, slots, lengths, scale)
    assert np.abs(out - want).max() <= 1e-5 * np.abs(v_store).max()


def test_paged_decode_attention_ignores_rows_past_each_length():
    rng = np.random.default_rng()
    k_store = rng.standard_normal((64, 2, 16), dtype=np.float32)
    v_store = rng.standard_normal((64, 2, 16), dtype=np.float32)
    slots = np.arange(64).reshape(2, 32)
    q = rng.standard_normal((2, 4, 16), dtype=np.float32)
    lengths = np.array([10, 32])
    out = np.empty((2, 4, 16), np.float32)
    paged_decode_attention(q, k_store, v_store, slots, lengths, np.float32(0.25), out)
    k_store[10:32] = 1e6  # rows sequence 0 does not own
    v_store[10:32] = np.nan
    again = np.empty_like(out)
    paged_decode_attention(
        q[:1], k_store, v_store, slots[:1], lengths[:1], np.float32(0.25), again[:1]
    )
    np.testing.assert_array_equal(again[:1], out[:1])


def batch_and_cache(lengths: list[int], new: list[int]):
    kv = PagedKVCache([{"k": (2, 16), "v": (2, 16)}], num_blocks=32, block_size=4)
    slices = []
    for past, count in zip(lengths, new, strict=True):
        seq, _ = kv.new_sequence()
        kv.reserve(seq, past + count)
        slices.append(SequenceSlice(seq, past, count))
    return ForwardBatch(slices, kv), kv


@pytest.mark.parametrize("new", [[1, 1, 1], [1, 3, 1]], ids=["all decoding", "a prompt too"])
def test_self_attention_agrees_with_the_torch_path(new):
    torch.manual_seed(0)
    lengths = [5, 0, 9]
    batch, kv = batch_and_cache(lengths, new)
    for name in ("k", "v"):  # histories already in the cache
        kv.storage[0][name].normal_()
    tokens = sum(new)
    q, k, v = torch.randn(tokens, 8, 16), torch.randn(tokens, 2, 16), torch.randn(tokens, 2, 16)
    got = batch.self_attention(0, q, k, v, 0.25)
    history = batch.cached(0, k=k, v=v)  # the torch path on the same cache
    want = batch.attention(q, history["k"], history["v"], 0.25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_kernel_runs_only_where_it_applies(monkeypatch):
    calls = []
    import cpu_kernels.attention as kernels

    real = kernels.paged_decode_attention
    monkeypatch.setattr(kernels, "paged_decode_attention", lambda *a: calls.append(1) or real(*a))
    q, k, v = torch.randn(2, 4, 16), torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    batch, _ = batch_and_cache([3, 4], [1, 1])
    batch.self_attention(0, q, k, v, 0.25)
    assert calls == [1]
    # a prompt in the step, autograd, another dtype: the torch path
    batch, _ = batch_and_cache([3, 0], [1, 2])
    batch.self_attention(
        0, torch.randn(3, 4, 16), torch.randn(3, 2, 16), torch.randn(3, 2, 16), 0.25
    )
    batch, _ = batch_and_cache([3, 4], [1, 1])
    batch.self_attention(0, q.requires_grad_(), k, v, 0.25)
    batch.self_attention(0, q.detach().double(), k.double(), v.double(), 0.25)
    assert calls == [1]


def test_demo_decode_matches_its_own_full_forward():
    # every decode step of the demo runs the kernel; its greedy tokens equal the argmax of a
    # full (cache-free, torch-attention) forward over the sequence so far
    model = hetero.load("demo", progress=False)
    ids = model.tokenizer.encode("The experts said")
    result = model.generate(ids, max_new_tokens=8, ignore_eos=True)
    logits = model.logits(ids + result.token_ids[:-1])
    assert logits[len(ids) - 1 :].argmax(-1).tolist() == result.token_ids


def test_softmax_numerators_match_exp():
    @numba.njit
    def numerators(row, top):
        bits = np.empty(len(row), np.int32)
        poly = np.empty(len(row), np.float32)
        return softmax_numerators(row, top, bits, poly)

    rng = np.random.default_rng()
    # the whole range a shifted score takes, its ends, and arguments past e^-87
    x = np.concatenate(
        [-rng.exponential(8, 5000), [0.0, -1e-7, -0.3466, -0.3467, -86.9, -87.0, -100.0, -1e30]]
    ).astype(np.float32)
    row = x + np.float32(3.5)
    total = numerators(row, np.float32(3.5))
    want = np.exp(np.maximum(x.astype(np.float64), -87.0))
    np.testing.assert_allclose(row, want, rtol=4e-7, atol=0)
    # a float32 sum of n terms: within n * 2^-24 of the sum of their magnitudes
    assert abs(total - want.sum()) <= len(x) * 2.0**-24 * want.sum()
