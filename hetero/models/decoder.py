"""The decoder skeleton every family shares: RMSNorm, a pre-norm residual layer, and the causal
LM (embeddings -> layers -> norm -> lm_head). Tokens are flat: x is [tokens, hidden]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hetero.models.batch import Batch


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one fused op; the same float32 math as below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # normalise in float32 whatever the model dtype, as the reference implementations do
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class DecoderLayer(nn.Module):
    """x + attn(norm(x)), then h + mlp(norm(h)). `mlp` is a dense GatedMLP or a MoE block."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), batch)
        return h + self.mlp(self.post_attention_layernorm(h))


class CausalLM(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, eps: float, layers: list[nn.Module]):
        super().__init__()
        # an explicit empty weight skips random init: models are built on the meta device
        # and filled from checkpoints
        self.embed_tokens = nn.Embedding(
            vocab_size, hidden_size, _weight=torch.empty(vocab_size, hidden_size)
        )
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(hidden_size, eps)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)

    def forward(
        self,
        token_ids: torch.Tensor,
        batch: Batch,
        logit_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """token_ids: [tokens] -> logits [rows, vocab] for `logit_rows` (all tokens if None).
        Generation asks only for each sequence's last row: lm_head is the largest matmul."""
        x = self.embed_tokens(token_ids)
        for layer in self.layers:
            x = layer(x, batch)
        if logit_rows is not None:
            x = x[logit_rows]
        return self.lm_head(self.norm(x))
