"""The training forward: a batch of examples as one flat batch of sequences (each attends only
to itself), each layer and the head recomputed in the backward when activations would not fit
(torch.utils.checkpoint), and the summed cross-entropy of the target tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hetero.runtime.batch import ForwardBatch, SequenceSlice
from hetero.train.data import Example

# rows of the head computed at a time when recomputing: [256, vocab] float32 logits (150 MiB
# at a 152k vocabulary) alive instead of [tokens, vocab]
HEAD_CHUNK_ROWS = 256


def batch_loss(net: torch.nn.Module, examples: list[Example], recompute: bool) -> torch.Tensor:
    """Summed cross-entropy over the examples' target tokens (float32 scalar).
    `recompute`: keep only each layer's input and recompute the layer in the backward."""
    ids = torch.tensor([i for e in examples for i in e.ids])
    batch = ForwardBatch([SequenceSlice(None, 0, len(e.ids)) for e in examples], kv=None)
    # row r predicts token r + 1 of its sequence: every row but each sequence's last
    rows, labels = [], []
    start = 0
    for e in examples:
        for i in range(1, len(e.ids)):
            if e.targets[i]:
                rows.append(start + i - 1)
                labels.append(e.ids[i])
        start += len(e.ids)
    # autograd records from the embeddings on (they are frozen), so every frozen module, layer
    # 0's too, takes its float32 differentiable path: inference may multiply prefill tiles in
    # bfloat16 (hetero/runtime/prefill_matmul.py), which would move the loss by ~1e-3
    x = net.embed_tokens(ids).requires_grad_()
    for layer in net.layers:
        x = checkpoint(layer, x, batch, use_reentrant=False) if recompute else layer(x, batch)
    x, targets = x[torch.tensor(rows, dtype=torch.long)], torch.tensor(labels)
    if not recompute:
        return head_loss(net, x, targets)
    # the head too, a chunk of rows at a time: its logits are the largest activation
    chunks = range(0, len(rows), HEAD_CHUNK_ROWS)
    return sum(
        checkpoint(
            head_loss,
            net,
            x[i : i + HEAD_CHUNK_ROWS],
            targets[i : i + HEAD_CHUNK_ROWS],
            use_reentrant=False,
        )
        for i in chunks
    )


def head_loss(net: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """x: [rows, hidden] -> the summed cross-entropy of their next tokens `targets` [rows]."""
    return F.cross_entropy(net.lm_head(net.norm(x)).float(), targets, reduction="sum")
