"""The Numba paged decode attention against a float64 torch reference on fresh random inputs
(float32 and bfloat16 stores), the runtime's backends against each other, and the runtime
choosing the kernels exactly where they apply.

Error budget: scores and the weighted sum are float32 sums of d (or length) products, each
within ~n * 2^-24 of its float64 value relative to the sum of magnitudes; softmax weights sum
to 1, so the output moves by at most a few times 1e-6 of the largest |value|. 1e-5 * max |v|
leaves room for that and for exp's own rounding. A bfloat16 store is widened exactly, so the
same budget holds against a reference on the widened values; against a float32 cache of the
unrounded values see `bf16_cache_budget`."""

import numba
import numpy as np
import pytest
import torch

import hetero
from cpu_kernels.attention import paged_decode_attention, softmax_numerators
from hetero.models.batch import GroupedQueryStep
from hetero.runtime.attention import NUMBA_DECODE, TORCH, choose_backend
from hetero.runtime.batch import ForwardBatch, SequenceSlice
from hetero.runtime.kv_cache import KVLayerSpec, PagedKVCache

SEED = 15


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest even as torch does."""
    return torch.from_numpy(a).bfloat16().view(torch.uint16).numpy()


def widened(store: np.ndarray) -> np.ndarray:
    """A store as the float64 values the kernel reads (bfloat16 bits widened exactly)."""
    if store.dtype == np.uint16:
        return (store.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return store.astype(np.float64)


def reference(q, k_store, v_store, slots, lengths, scale):
    """float64: per sequence and head, softmax(scale * q . K) @ V over its rows, GQA groups;
    slots [n, kv_heads or 1, longest] and lengths [n, kv_heads or 1] name each kv head's rows
    (or all heads' alike)."""
    n, heads, _ = q.shape
    groups = heads // k_store.shape[0]
    out = np.zeros((n, heads, v_store.shape[2]))
    for s in range(n):
        for h in range(heads):
            r = h // groups if slots.shape[1] > 1 else 0
            rows = slots[s, r, : lengths[s, r]]
            keys = widened(k_store)[h // groups, rows]
            values = widened(v_store)[h // groups, rows]
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
@pytest.mark.parametrize("store_dtype", [np.float32, np.uint16], ids=["f32", "bf16"])
def test_paged_decode_attention_matches_reference(heads, kv_heads, d, dv, lengths, store_dtype):
    rng = np.random.default_rng(SEED)
    rows, n = 1024, len(lengths)
    k_store = rng.standard_normal((kv_heads, rows, d), dtype=np.float32)  # head-major
    v_store = rng.standard_normal((kv_heads, rows, dv), dtype=np.float32)
    if store_dtype == np.uint16:
        k_store, v_store = bf16_bits(k_store), bf16_bits(v_store)
    longest = max(lengths)
    slots = np.stack([rng.permutation(rows)[:longest] for _ in range(n)])[:, None]  # scattered
    q = rng.standard_normal((n, heads, d), dtype=np.float32) * 2
    lengths = np.array(lengths)[:, None]
    out = np.full((n, heads, dv), np.nan, np.float32)
    scale = d**-0.5
    paged_decode_attention(q, k_store, v_store, slots, lengths, np.float32(scale), out)
    want = reference(q, k_store, v_store, slots, lengths, scale)
    assert np.abs(out - want).max() <= 1e-5 * np.abs(widened(v_store)).max()


@pytest.mark.parametrize("store_dtype", [np.float32, np.uint16], ids=["f32", "bf16"])
def test_paged_decode_attention_reads_each_kv_heads_own_rows(store_dtype):
    """Sparse attention's layout: every kv head its own rows and count."""
    rng = np.random.default_rng(SEED)
    n, heads, kv_heads, d, rows = 3, 12, 3, 40, 512
    k_store = rng.standard_normal((kv_heads, rows, d), dtype=np.float32)
    v_store = rng.standard_normal((kv_heads, rows, d), dtype=np.float32)
    if store_dtype == np.uint16:
        k_store, v_store = bf16_bits(k_store), bf16_bits(v_store)
    slots = rng.integers(0, rows, (n, kv_heads, 70))
    lengths = rng.integers(1, 71, (n, kv_heads))
    q = rng.standard_normal((n, heads, d), dtype=np.float32)
    out = np.full((n, heads, d), np.nan, np.float32)
    paged_decode_attention(q, k_store, v_store, slots, lengths, np.float32(0.15), out)
    want = reference(q, k_store, v_store, slots, lengths, 0.15)
    assert np.abs(out - want).max() <= 1e-5 * np.abs(widened(v_store)).max()


def test_paged_decode_attention_ignores_rows_past_each_length():
    rng = np.random.default_rng()
    k_store = rng.standard_normal((2, 64, 16), dtype=np.float32)
    v_store = rng.standard_normal((2, 64, 16), dtype=np.float32)
    slots = np.arange(64).reshape(2, 1, 32)
    q = rng.standard_normal((2, 4, 16), dtype=np.float32)
    lengths = np.array([[10], [32]])
    out = np.empty((2, 4, 16), np.float32)
    paged_decode_attention(q, k_store, v_store, slots, lengths, np.float32(0.25), out)
    k_store[:, 10:32] = 1e6  # rows sequence 0 does not own
    v_store[:, 10:32] = np.nan
    again = np.empty_like(out)
    paged_decode_attention(
        q[:1], k_store, v_store, slots[:1], lengths[:1], np.float32(0.25), again[:1]
    )
    np.testing.assert_array_equal(again[:1], out[:1])


def batch_and_cache(lengths: list[int], new: list[int], dtype=torch.float32):
    kv = PagedKVCache(
        [KVLayerSpec({"k": (2, 16), "v": (2, 16)}, dtype)], num_blocks=32, block_size=4
    )
    slices = []
    for past, count in zip(lengths, new, strict=True):
        seq, _ = kv.new_sequence()
        kv.reserve(seq, past + count)
        slices.append(SequenceSlice(seq, past, count))
    return ForwardBatch(slices, kv), kv


def random_step(tokens: int, seed: int = SEED) -> GroupedQueryStep:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(tokens, heads, 16, generator=g) for heads in (8, 2, 2))
    return GroupedQueryStep(q, k, v, 0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_numba_decode_agrees_with_the_torch_reference(dtype):
    lengths = [5, 0, 9]  # a sequence with no history, one past two blocks and a bit
    batch, kv = batch_and_cache(lengths, [1, 1, 1], dtype)
    for store in kv.storage[0].values():  # histories already in the cache
        store.copy_(torch.randn(store.shape, generator=torch.Generator().manual_seed(SEED)))
    step = random_step(3)
    got = NUMBA_DECODE.grouped_query(batch, 0, step)
    want = TORCH.grouped_query(batch, 0, step)  # the same cache, widened by torch
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def bf16_cache_budget(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float):
    """How far attention over a bf16 copy of a float32 history may move: each stored value is
    rounded to 8 significant bits (relative error <= 2^-8), so a score moves by at most
    e = 2^-8 * scale * sum |q_i k_i| and each softmax weight by a factor within exp(+-2e); the
    output moves by <= (2e + 2^-8) * max |v| (the rounded values themselves), plus float32
    rounding. q: [heads, d]; keys: [length, kv_heads, d] (one sequence)."""
    groups = q.shape[0] // keys.shape[1]
    magnitudes = torch.einsum("hd,thd->ht", q.abs(), keys.abs().repeat_interleave(groups, 1))
    e = 2.0**-8 * scale * magnitudes.max()
    return float((2 * e + 2.0**-8) * values.abs().max()) + 1e-5


def test_a_bf16_cache_stays_within_its_rounding_of_a_float32_cache():
    lengths, step = [7, 20], random_step(2)
    wide_batch, wide = batch_and_cache(lengths, [1, 1])
    narrow_batch, narrow = batch_and_cache(lengths, [1, 1], torch.bfloat16)
    g = torch.Generator().manual_seed(SEED)
    for name, store in wide.storage[0].items():
        store.copy_(torch.randn(store.shape, generator=g))
        narrow.storage[0][name].copy_(store)  # rounded to bf16
    got = narrow_batch.attention(0, step)
    want = wide_batch.attention(0, step)
    for s, length in enumerate(np.array(lengths) + 1):
        rows = wide_batch.read_slots[s, :length]
        history = wide.gather(0, rows)
        allowed = bf16_cache_budget(step.q[s], history["k"], history["v"], 0.25)
        assert (got[s] - want[s]).abs().max() <= allowed


def count_kernel_calls(monkeypatch) -> list:
    import cpu_kernels.attention as kernels

    calls = []
    real = kernels.paged_decode_attention
    monkeypatch.setattr(kernels, "paged_decode_attention", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_every_sequence_decoding_over_a_cpu_cache_runs_the_kernel(monkeypatch, dtype):
    calls = count_kernel_calls(monkeypatch)
    batch, _ = batch_and_cache([3, 4], [1, 1], dtype)
    step = random_step(2)
    assert choose_backend(batch, 0, step) is NUMBA_DECODE
    batch.attention(0, step)
    assert calls == [1]


def test_prompts_autograd_and_other_dtypes_take_the_torch_reference(monkeypatch):
    calls = count_kernel_calls(monkeypatch)
    step = random_step(2)
    with_prompt, _ = batch_and_cache([3, 0], [1, 2])
    decoding, _ = batch_and_cache([3, 4], [1, 1])
    half_cache, _ = batch_and_cache([3, 4], [1, 1], torch.float16)
    q, k, v = step.q, step.k, step.v
    cases = [
        (with_prompt, random_step(3)),
        (ForwardBatch.fresh(2), step),  # no cache
        (decoding, GroupedQueryStep(q.clone().requires_grad_(), k, v, 0.25)),
        (decoding, GroupedQueryStep(q.double(), k.double(), v.double(), 0.25)),
        (half_cache, step),
    ]
    for batch, case in cases:
        assert choose_backend(batch, 0, case) is TORCH
        batch.attention(0, case)
    assert calls == []


def test_demo_decode_matches_its_own_full_forward():
    # every decode step of the demo runs the kernel; its greedy tokens equal the argmax of a
    # full (cache-free, torch-attention) forward over the sequence so far
    model = hetero.load("demo", progress=False)
    ids = model.tokenizer.encode("The experts said")
    result = model.generate(ids, max_new_tokens=8, ignore_eos=True)
    logits = model.logits(ids + result.token_ids[:-1])
    assert logits[len(ids) - 1 :].argmax(-1).tolist() == result.token_ids


def test_a_bf16_cache_halves_the_memory_and_decodes_on_the_kernel(monkeypatch):
    model = hetero.load("demo", progress=False)
    wide, narrow = (model.new_kv_cache(64, kv_dtype=name) for name in ("f32", "bf16"))
    assert wide.bytes_per_token == 2 * narrow.bytes_per_token
    with pytest.raises(hetero.InvalidRequestError, match="KV cache dtype 'fp8'"):
        model.new_kv_cache(64, kv_dtype="fp8")
    ids = model.tokenizer.encode("The experts said")
    want = model.generate(ids, max_new_tokens=6, ignore_eos=True).token_ids
    calls = count_kernel_calls(monkeypatch)
    model.kv_dtype = "bf16"
    assert model.generate(ids, max_new_tokens=6, ignore_eos=True).token_ids == want
    assert len(calls) == 5 * len(model.net.layers)


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
