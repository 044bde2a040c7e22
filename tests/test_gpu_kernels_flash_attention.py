"""Causal flash-attention prefill (Triton) against a float64 reference, per sequence, over
packed sequences of awkward lengths: one token, queries after a cached prefix, more queries
and keys than one tile, a sequence with no queries."""

import pytest
import torch
from gpu_kernel_device import DEVICE, DTYPES, randn, require_triton, seeded_generator

require_triton()

from gpu_attention_reference import assert_within, attention_reference  # noqa: E402

from gpu_kernels.flash_attention import flash_attention  # noqa: E402
from gpu_kernels.launch_checks import KernelInputError  # noqa: E402

# (queries, keys) per sequence: keys - queries of them are a cached prefix
SEQUENCES = {
    "one token": [(1, 1)],
    "after a prefix": [(3, 10), (1, 7)],
    "several tiles": [(70, 70), (5, 81)],
    "no queries": [(0, 4), (2, 2)],
}


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sequences", SEQUENCES.values(), ids=SEQUENCES.keys())
@pytest.mark.parametrize(
    "heads,kv_heads,d,dv", [(4, 2, 16, 16), (3, 1, 24, 8), (2, 2, 48, 32)]
)  # GQA; odd widths; MLA's d > dv (192, 128) scaled down
def test_flash_attention_matches_reference(request, dtype, sequences, heads, kv_heads, d, dv):
    gen = seeded_generator(request)
    q_lens, kv_lens = [s[0] for s in sequences], [s[1] for s in sequences]
    q = randn((sum(q_lens), heads, d), dtype, gen)
    k = randn((sum(kv_lens), kv_heads, d), dtype, gen)
    v = randn((sum(kv_lens), kv_heads, dv), dtype, gen)
    cu_q, cu_kv = cu_seqlens(q_lens), cu_seqlens(kv_lens)
    scale = d**-0.5
    got = flash_attention(q, k, v, cu_q.to(DEVICE), cu_kv.to(DEVICE), max(q_lens), scale)
    assert got.shape == (sum(q_lens), heads, dv) and got.dtype == dtype
    for s, (q_len, kv_len) in enumerate(sequences):
        qs, ks = slice(cu_q[s], cu_q[s + 1]), slice(cu_kv[s], cu_kv[s + 1])
        positions = torch.arange(kv_len - q_len, kv_len)  # the queries' key positions
        visible = torch.arange(kv_len)[None, :] <= positions[:, None]
        want, bound = attention_reference(q[qs], k[ks], v[ks], visible, scale)
        assert_within(got[qs], want, bound)


def test_flash_attention_rejects_heads_not_a_multiple_of_kv_heads():
    q, k = torch.zeros(2, 3, 16), torch.zeros(2, 2, 16)
    cu = torch.tensor([0, 2], dtype=torch.int32)
    with pytest.raises(KernelInputError, match="not a multiple"):
        flash_attention(q, k, k, cu, cu, 2, 1.0)


def test_flash_attention_rejects_key_width_unlike_queries():
    q, k = torch.zeros(2, 2, 16), torch.zeros(2, 2, 8)
    cu = torch.tensor([0, 2], dtype=torch.int32)
    with pytest.raises(KernelInputError, match=r"k: expected \[kv_tokens, kv_heads, d\]"):
        flash_attention(q, k, k, cu, cu, 2, 1.0)
