"""Parity of every family with transformers on tiny random-weight models: the relative error
of the logits (float32 and bfloat16 against transformers' float32, beside transformers' own
bfloat16 run for scale) and greedy agreement.

    .venv/bin/python bench/parity_report.py > bench/results/parity.md
"""

from __future__ import annotations

import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import FAMILY_CONFIGS, make_checkpoint  # noqa: E402

import hetero  # noqa: E402


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


def main() -> None:
    print(
        f"# Parity with transformers ({platform.processor() or platform.machine()}, "
        f"torch {torch.__version__})\n"
    )
    print(
        "| model_type | float32 logits rel. error | bfloat16 logits rel. error | "
        "transformers' own bfloat16 | 32 greedy tokens equal |"
    )
    print("|---|---|---|---|---|")
    ids = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    for family in sorted(FAMILY_CONFIGS):
        with tempfile.TemporaryDirectory() as tmp:
            hf = make_checkpoint(Path(tmp), family)
            with torch.no_grad():
                reference = hf(torch.tensor([ids])).logits[0]
                hf_tokens = hf.generate(
                    torch.tensor([ids[:16]]),
                    max_new_tokens=32,
                    min_new_tokens=32,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )[0, 16:].tolist()
            f32 = hetero.load(tmp, dtype="float32", progress=False)
            bf16 = hetero.load(tmp, dtype="bfloat16", progress=False)
            f32.tokenizer.eos_token_ids.clear()
            object.__setattr__(f32.config, "eos_token_ids", ())
            tokens = f32.generate(ids[:16], max_new_tokens=32).token_ids
            with torch.no_grad():
                hf_bf16 = hf.to(torch.bfloat16)(torch.tensor([ids])).logits[0].float()
            print(
                f"| {family} | {relative_error(f32.logits(ids), reference):.1e} | "
                f"{relative_error(bf16.logits(ids), reference):.1e} | "
                f"{relative_error(hf_bf16, reference):.1e} | "
                f"{'yes' if tokens == hf_tokens else 'NO'} |"
            )


if __name__ == "__main__":
    main()
