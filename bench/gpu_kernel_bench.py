"""The Triton kernels (gpu_kernels/) on a GPU against torch's equivalent, in one run: achieved
GB/s (memory-bound kernels: decode attention, decode MoE, norms, RoPE) or TFLOP/s (prefill
attention, prefill MoE), with the decode attention's cache read at 32K context as a fraction
of this GPU's measured HBM ceiling (a device-to-device copy, read + write).

Shapes: Qwen3-30B-A3B (32 query heads over 4 kv heads of 128; 128 experts of 2048 x 768, top 8)
and DeepSeek-V3's MLA decode (128 heads, latent rank 512, rope 64). Random weights and caches.
Writes bench/results/gpu-kernels-<gpu>.md. Without CUDA it says so in one line and exits 2.
Run: python bench/gpu_kernel_bench.py [--quick] [--out bench/results]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 4, 128, 16
MLA_HEADS, RANK, ROPE = 128, 512, 64
HIDDEN, INTER, EXPERTS, TOP_K = 2048, 768, 128, 8
DTYPE = torch.bfloat16


@dataclass
class Case:
    name: str
    kernel: Callable[[], object]
    torch_equivalent: Callable[[], object] | None
    work: float  # bytes (unit "GB/s") or floating-point operations ("TFLOP/s")
    unit: str
    ceiling: float | None = None  # the unit's roof on this GPU, where measured


def milliseconds(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def hbm_copy_gbs() -> float:
    """Device-to-device copy of 2 GiB: bytes read + written per second, in GB/s."""
    source = torch.empty(2**30, dtype=torch.float16, device="cuda")
    target = torch.empty_like(source)
    ms = milliseconds(lambda: target.copy_(source))
    return 2 * source.numel() * source.element_size() / ms / 1e6


def paged_cache(sequences: int, tokens: int, entries: dict[str, tuple[int, ...]]):
    """Shuffled pages holding `tokens` each for `sequences` sequences: (block_tables,
    context_lens, stores {name: [*shape[:-1], rows, shape[-1]]})."""
    pages_each = -(-tokens // BLOCK_SIZE)
    pages = sequences * pages_each
    tables = torch.randperm(pages, device="cuda").to(torch.int32).view(sequences, pages_each)
    lens = torch.full((sequences,), tokens, dtype=torch.int32, device="cuda")
    rows = pages * BLOCK_SIZE
    stores = {
        name: torch.randn((*shape[:-1], rows, shape[-1]), dtype=DTYPE, device="cuda")
        for name, shape in entries.items()
    }
    return tables, lens, stores


def gathered_rows(tables: torch.Tensor, tokens: int) -> torch.Tensor:
    """[sequences, tokens] flat storage rows, as the torch backend gathers them."""
    positions = torch.arange(tokens, device="cuda")
    return tables.long()[:, positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE


def decode_cases(sequences: int, tokens: int, hbm_gbs: float) -> list[Case]:
    from gpu_kernels.mla_decode import mla_decode
    from gpu_kernels.paged_attention import paged_decode_attention

    sdpa = torch.nn.functional.scaled_dot_product_attention
    label = f"{sequences} x {tokens // 1024}K"
    tables, lens, store = paged_cache(
        sequences, tokens, {"k": (KV_HEADS, HEAD_DIM), "v": (KV_HEADS, HEAD_DIM)}
    )
    q = torch.randn((sequences, HEADS, HEAD_DIM), dtype=DTYPE, device="cuda")
    rows = gathered_rows(tables, tokens)
    scale = HEAD_DIM**-0.5

    def torch_gqa():
        k = store["k"][:, rows].transpose(0, 1)  # [seqs, kv_heads, tokens, d]
        v = store["v"][:, rows].transpose(0, 1)
        return sdpa(q[:, :, None], k, v, scale=scale, enable_gqa=True)

    gqa_bytes = sequences * tokens * KV_HEADS * 2 * HEAD_DIM * 2
    cases = [
        Case(
            f"paged decode GQA {label}",
            lambda: paged_decode_attention(
                q, store["k"], store["v"], tables, lens, BLOCK_SIZE, scale
            ),
            torch_gqa,
            gqa_bytes,
            "GB/s",
            hbm_gbs,
        )
    ]
    tables, lens, latent = paged_cache(sequences, tokens, {"latent": (RANK,), "rope": (ROPE,)})
    q_latent = torch.randn((sequences, MLA_HEADS, RANK), dtype=DTYPE, device="cuda")
    q_rope = torch.randn((sequences, MLA_HEADS, ROPE), dtype=DTYPE, device="cuda")
    rows = gathered_rows(tables, tokens)

    def torch_mla():
        c, r = latent["latent"][rows], latent["rope"][rows]  # [seqs, tokens, rank / rope]
        scores = (q_latent @ c.transpose(1, 2) + q_rope @ r.transpose(1, 2)) * 0.1
        return scores.float().softmax(-1).to(DTYPE) @ c

    cases.append(
        Case(
            f"MLA decode {label}",
            lambda: mla_decode(
                q_latent, q_rope, latent["latent"], latent["rope"], tables, lens, BLOCK_SIZE, 0.1
            ),
            torch_mla,
            sequences * tokens * (RANK + ROPE) * 2,
            "GB/s",
            hbm_gbs,
        )
    )
    return cases


def prefill_cases(sequences: int, tokens: int) -> list[Case]:
    from gpu_kernels.flash_attention import flash_attention

    sdpa = torch.nn.functional.scaled_dot_product_attention
    cases = []
    for d, dv, kv_heads in ((HEAD_DIM, HEAD_DIM, KV_HEADS), (192, 128, HEADS)):  # GQA; MLA
        q = torch.randn((sequences * tokens, HEADS, d), dtype=DTYPE, device="cuda")
        k = torch.randn((sequences * tokens, kv_heads, d), dtype=DTYPE, device="cuda")
        v = torch.randn((sequences * tokens, kv_heads, dv), dtype=DTYPE, device="cuda")
        cu = torch.arange(0, sequences + 1, dtype=torch.int32, device="cuda") * tokens
        scale = d**-0.5

        def torch_prefill(q=q, k=k, v=v, scale=scale):
            shaped = [t.view(sequences, tokens, -1, t.shape[-1]).transpose(1, 2) for t in (q, k, v)]
            return sdpa(*shaped, is_causal=True, scale=scale, enable_gqa=True)

        flops = sequences * HEADS * tokens * tokens * (d + dv)  # causal: half of 2 * 2 * L^2
        cases.append(
            Case(
                f"flash prefill d={d} dv={dv} {sequences} x {tokens}",
                lambda q=q, k=k, v=v, cu=cu, scale=scale: flash_attention(
                    q, k, v, cu, cu, tokens, scale
                ),
                torch_prefill,
                flops,
                "TFLOP/s",
            )
        )
    return cases


def random_q4_k(experts: int, rows: int, cols: int):
    """Random Q4_K blocks (any bytes are valid codes; d and dmin set small and finite)."""
    from gguf import GGMLQuantizationType as T

    from gpu_kernels.fused_moe import StoredExperts

    blocks = torch.randint(0, 256, (experts, rows, cols // 256, 144), dtype=torch.uint8)
    blocks[..., 0:4] = torch.full((experts, rows, cols // 256, 2), 1e-3).half().view(torch.uint8)
    return StoredExperts(blocks.view(experts, rows, -1).cuda(), T.Q4_K)


def moe_cases(quick: bool) -> list[Case]:
    from gpu_kernels.fused_moe import fused_moe

    gate_up = torch.randn((EXPERTS, 2 * INTER, HIDDEN), dtype=DTYPE, device="cuda") * 0.02
    down = torch.randn((EXPERTS, HIDDEN, INTER), dtype=DTYPE, device="cuda") * 0.02
    q4k = (random_q4_k(EXPERTS, 2 * INTER, HIDDEN), random_q4_k(EXPERTS, HIDDEN, INTER))
    cases = []
    for tokens in (1, 16) if quick else (1, 16, 512):
        x = torch.randn((tokens, HIDDEN), dtype=DTYPE, device="cuda")
        ids = torch.rand((tokens, EXPERTS), device="cuda").topk(TOP_K, dim=1).indices.int()
        weights = torch.full((tokens, TOP_K), 1 / TOP_K, dtype=DTYPE, device="cuda")
        used = ids.unique().numel()

        def torch_moe(x=x, ids=ids, weights=weights):
            out = torch.zeros_like(x)
            for e in ids.unique().tolist():
                token, slot = (ids == e).nonzero(as_tuple=True)
                gate, up = (x[token] @ gate_up[e].T).chunk(2, dim=-1)
                y = (torch.nn.functional.silu(gate) * up) @ down[e].T
                out.index_add_(0, token, y * weights[token, slot, None])
            return out

        decode = tokens <= 16  # decode reads the used experts' weights; prefill is compute
        flops = tokens * TOP_K * 2 * 3 * HIDDEN * INTER
        for label, (gu, dn), equivalent in (
            ("bf16", (gate_up, down), torch_moe),
            ("Q4_K", q4k, None),
        ):
            bytes_per_expert = 3 * HIDDEN * INTER * (2 if label == "bf16" else 144 / 256)
            cases.append(
                Case(
                    f"fused MoE {label} {tokens} tokens ({used} experts)",
                    lambda x=x, gu=gu, dn=dn, ids=ids, w=weights: fused_moe(x, gu, dn, ids, w),
                    equivalent,
                    used * bytes_per_expert if decode else flops,
                    "GB/s" if decode else "TFLOP/s",
                )
            )
    return cases


def elementwise_cases(tokens: int) -> list[Case]:
    from gpu_kernels.rmsnorm import add_rmsnorm
    from gpu_kernels.rope import build_cos_sin_cache, rope

    x = torch.randn((tokens, HIDDEN), dtype=DTYPE, device="cuda")
    residual = torch.randn_like(x)
    weight = torch.randn(HIDDEN, dtype=DTYPE, device="cuda")

    def torch_add_rmsnorm():
        s = x + residual
        f = s.float()
        return (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + 1e-6)).to(DTYPE) * weight, s

    q = torch.randn((tokens, HEADS, HEAD_DIM), dtype=DTYPE, device="cuda")
    k = torch.randn((tokens, KV_HEADS, HEAD_DIM), dtype=DTYPE, device="cuda")
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, HEAD_DIM, 2, device="cuda") / HEAD_DIM)
    cache = build_cos_sin_cache(inv_freq, 40960)
    positions = torch.randint(0, 40960, (tokens,), device="cuda")

    def torch_rope():
        cos, sin = cache[positions].chunk(2, dim=-1)
        cos, sin = cos[:, None].repeat(1, 1, 2), sin[:, None].repeat(1, 1, 2)

        def turn(t):
            half = t.shape[-1] // 2
            rolled = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
            return (t * cos + rolled * sin).to(DTYPE)

        return turn(q), turn(k)

    return [
        Case(
            f"add + RMSNorm {tokens} x {HIDDEN}",
            lambda: add_rmsnorm(x, residual, weight, 1e-6),
            torch_add_rmsnorm,
            4 * x.numel() * 2,  # read x, residual; write normed, sum
            "GB/s",
        ),
        Case(
            f"RoPE q+k {tokens} tokens",
            lambda: rope(q, k, positions, cache),
            torch_rope,
            2 * (q.numel() + k.numel()) * 2,
            "GB/s",
        ),
    ]


def rate(work: float, unit: str, ms: float) -> float:
    return work / ms / (1e6 if unit == "GB/s" else 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter shapes")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_kernel_bench: no CUDA device here; it runs where a GPU is lent", file=sys.stderr)
        sys.exit(2)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name()
    hbm = hbm_copy_gbs()
    cases = decode_cases(1, 32768, hbm) + decode_cases(16, 4096, hbm)
    cases += prefill_cases(2, 1024 if args.quick else 4096)
    cases += moe_cases(args.quick) + elementwise_cases(4096)
    lines = [
        f"# Triton kernels on {gpu}",
        "",
        f"`python bench/gpu_kernel_bench.py{' --quick' if args.quick else ''}`; torch "
        f"{torch.__version__}, bf16. HBM ceiling (device copy, read + write): {hbm:.0f} GB/s.",
        "",
        "| kernel | Triton ms | rate | of ceiling | torch ms | torch rate | speed-up over torch |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        ms = milliseconds(case.kernel)
        achieved = rate(case.work, case.unit, ms)
        of_ceiling = f"{achieved / case.ceiling:.0%}" if case.ceiling else ""
        if case.torch_equivalent is None:
            torch_cols = "| | |"
        else:
            torch_ms = milliseconds(case.torch_equivalent)
            torch_cols = (
                f"{torch_ms:.3f} | {rate(case.work, case.unit, torch_ms):.1f} {case.unit} | "
                f"{torch_ms / ms:.2f}x |"
            )
        row = f"| {case.name} | {ms:.3f} | {achieved:.1f} {case.unit} | {of_ceiling} | {torch_cols}"
        print(row, flush=True)
        lines.append(row)
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu-kernels-{slug}.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
