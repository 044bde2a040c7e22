"""MLA absorbed decode (Triton) against float64 attention with keys [latent, k_rope] and the
latents as values, over paged latent stores; and against the CPU kernel on the same cache."""

import numpy as np
import pytest
import torch
from gpu_kernel_device import DEVICE, DTYPES, randn, require_triton, seeded_generator

require_triton()

from gpu_attention_reference import assert_within, attention_reference  # noqa: E402
from gpu_paged_cache import random_block_tables, sequence_rows  # noqa: E402

from gpu_kernels.launch_checks import KernelInputError  # noqa: E402
from gpu_kernels.mla_decode import mla_decode  # noqa: E402

LENGTHS = {"one token": [1], "partial pages": [7, 33], "long and short": [150, 1, 70]}


def random_mla_inputs(gen, dtype, lengths, block_size, heads, rank, rope):
    tables, pages = random_block_tables(lengths, block_size, gen)
    rows = pages * block_size
    q_latent = randn((len(lengths), heads, rank), dtype, gen)
    q_rope = randn((len(lengths), heads, rope), dtype, gen)
    latent_store = randn((rows, rank), dtype, gen)
    rope_store = randn((rows, rope), dtype, gen)
    context_lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    return q_latent, q_rope, latent_store, rope_store, tables, context_lens


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("block_size,heads,rank,rope", [(16, 4, 32, 16), (5, 20, 24, 8)])
def test_mla_decode_matches_reference(
    request, dtype, lengths, splits, block_size, heads, rank, rope
):
    gen = seeded_generator(request)
    inputs = random_mla_inputs(gen, dtype, lengths, block_size, heads, rank, rope)
    q_latent, q_rope, latent_store, rope_store, tables, context_lens = inputs
    scale = 0.1
    got = mla_decode(*inputs, block_size, scale, splits)
    assert got.shape == (len(lengths), heads, rank) and got.dtype == dtype
    for s, length in enumerate(lengths):
        rows = sequence_rows(tables[s], length, block_size).to(DEVICE)
        keys = torch.cat([latent_store[rows], rope_store[rows]], dim=-1)[:, None]
        queries = torch.cat([q_latent[s : s + 1], q_rope[s : s + 1]], dim=-1)
        visible = torch.ones((1, length), dtype=torch.bool)
        want, bound = attention_reference(
            queries, keys, latent_store[rows][:, None], visible, scale
        )
        assert_within(got[s : s + 1], want, bound)


def test_mla_decode_agrees_with_the_cpu_kernel(request):
    from cpu_kernels.mla_decode import latent_attention_decode

    gen = seeded_generator(request)
    lengths, block_size = [9, 40], 8
    inputs = random_mla_inputs(gen, torch.float32, lengths, block_size, 4, 32, 16)
    q_latent, q_rope, latent_store, rope_store, tables, context_lens = inputs
    got = mla_decode(*inputs, block_size, 0.2)
    slots = np.stack(
        [sequence_rows(tables[s], max(lengths), block_size).numpy() for s in range(len(lengths))]
    )
    arrays = [t.cpu().numpy() for t in (q_latent, q_rope, latent_store, rope_store)]
    # the CPU kernel reads rows per kv head: [n, 1, L] and [n, 1] for MLA's one latent head
    counts = np.array(lengths, np.int64)[:, None]
    want = latent_attention_decode(*arrays, slots[:, None], counts, 0.2)
    torch.testing.assert_close(got.cpu(), torch.from_numpy(want), rtol=1e-5, atol=1e-5)


def test_mla_decode_rejects_a_rope_store_of_another_width():
    q_latent, q_rope = torch.zeros(1, 2, 32), torch.zeros(1, 2, 16)
    latent, rope = torch.zeros(16, 32), torch.zeros(16, 8)
    table, lens = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(KernelInputError, match=r"rope_store: expected \[rows, rope\]"):
        mla_decode(q_latent, q_rope, latent, rope, table, lens, 16, 1.0)
