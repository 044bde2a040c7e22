"""The reference expert backend: `TorchExperts` gives each token the routing-weighted sum of
its experts' outputs, for any routing, and autograd runs through it."""

import torch

from hetero.models.experts import TorchExperts


def per_token_reference(experts, x, ids, weights):
    rows = []
    for t in range(x.shape[0]):
        outs = [
            weights[t, s] * experts[int(ids[t, s])](x[t : t + 1])[0] for s in range(ids.shape[1])
        ]
        rows.append(torch.stack(outs).sum(dim=0))
    return torch.stack(rows) if rows else x.new_zeros(x.shape)


def test_torch_experts_match_a_per_token_loop_and_pass_gradients():
    gen = torch.Generator().manual_seed(int(torch.randint(2**31, (1,))))
    experts = TorchExperts(6, 24, 40)
    x = torch.randn(9, 24, generator=gen, requires_grad=True)
    # expert 5 unused, expert 2 taken by most tokens
    ids = torch.tensor([[2, 0], [2, 1], [3, 2], [2, 4], [0, 2], [1, 3], [2, 0], [4, 2], [2, 3]])
    weights = torch.rand(9, 2, generator=gen)
    got = experts(x, ids, weights)
    want = per_token_reference(experts, x, ids, weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.square().sum().backward()
    grad = x.grad.clone()
    x.grad = None
    want.square().sum().backward()
    torch.testing.assert_close(grad, x.grad, rtol=1e-5, atol=1e-6)


def test_torch_experts_take_no_tokens():
    experts = TorchExperts(4, 8, 16)
    got = experts(torch.zeros(0, 8), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert got.shape == (0, 8)
