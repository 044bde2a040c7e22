"""One MoE layer's decode step on the sim lane, two cores (one per lane): the hybrid step (router,
hot and shared experts on the sim accelerator's thread while the CPU kernels run the cold ones
on the expert worker) against the accelerator's part alone and the CPU's part alone. Target:
hybrid <= 1.15x the larger part. The three are timed in turn, median of the calls.

    .venv/bin/python bench/engine_overlap_bench.py --calls 200
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numba
import torch
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
from expert_overlap_bench import interleaved_median_ms, machine  # noqa: E402

from hetero.models.experts import GatedMLP, TorchExperts  # noqa: E402
from hetero.models.moe import softmax_topk  # noqa: E402
from hetero.runtime.accelerator import open_lane  # noqa: E402
from hetero.runtime.accelerator.placed import LaneExperts, OnLane  # noqa: E402
from hetero.runtime.assembler import SplitExperts  # noqa: E402
from hetero.runtime.cpu_experts import NumbaExperts  # noqa: E402


def build(args: argparse.Namespace):
    """(x, router, split experts, cold part, hot part, shared expert, ids, weights): experts
    0..hot-1 on the lane, the rest on the CPU kernels in Q4_K; every token routes `hot` pairs
    to the lane and `cold` to the CPU (routing fixed, so the three timings do the same work)."""
    torch.manual_seed(0)
    lane = open_lane("sim", 1 << 40)
    hidden, size, experts = args.hidden, args.expert_size, args.experts
    block = TorchExperts(experts, hidden, size)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    hot = list(range(args.hot))
    cold = list(range(args.hot, experts))
    dtype = getattr(torch, args.lane_dtype)
    gate_up = torch.stack(
        [torch.cat([block[e].gate_proj.weight, block[e].up_proj.weight]) for e in hot]
    )
    down = torch.stack([block[e].down_proj.weight for e in hot])
    on_lane = LaneExperts(lane, gate_up.detach().to(dtype), down.detach().to(dtype), "hot experts")
    on_cpu = NumbaExperts.from_torch(TorchExperts.of([block[e] for e in cold]), T.Q4_K)
    on_cpu.overlap = True
    split = SplitExperts([(on_cpu, cold), (on_lane, hot)], experts)
    router = torch.nn.Linear(hidden, experts, bias=False)
    shared = GatedMLP(hidden, args.shared_size).to(dtype)
    router, shared = (
        OnLane(lane, lane.place(m, name)) for m, name in ((router, "router"), (shared, "shared"))
    )
    x = torch.randn(1, hidden)
    ids = torch.tensor([hot[: args.hot_pairs] + cold[: args.cold_pairs]])
    weights = torch.full(ids.shape, 1.0 / ids.shape[1])
    return lane, x, router, split, on_cpu, on_lane, shared, ids, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)  # Qwen3-30B-A3B's
    parser.add_argument("--expert-size", type=int, default=768)
    parser.add_argument("--shared-size", type=int, default=768)
    parser.add_argument("--experts", type=int, default=24)
    parser.add_argument("--hot", type=int, default=4, help="experts on the lane")
    parser.add_argument("--hot-pairs", type=int, default=2, help="of a token's top-k")
    parser.add_argument("--cold-pairs", type=int, default=6, help="of a token's top-k")
    parser.add_argument("--lane-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    numba.set_num_threads(1)  # the expert worker takes the submitter's: one core for the CPU
    torch.set_num_threads(1)  # the host's own glue (the sum of the parts) on that core too
    lane, x, router, split, on_cpu, on_lane, shared, ids, weights = build(args)
    cold_ids = ids[:, args.hot_pairs :] - args.hot
    hot_ids = ids[:, : args.hot_pairs]
    hot_w, cold_w = weights[:, : args.hot_pairs], weights[:, args.hot_pairs :]

    def hybrid() -> torch.Tensor:
        softmax_topk(router(x), 8, True)  # the router on the lane
        routed = split.submit(x, ids, weights)
        return (
            routed.wait()
            + shared(x.to(torch.bfloat16 if args.lane_dtype == "bfloat16" else x.dtype)).float()
        )

    def accelerator_part() -> torch.Tensor:
        softmax_topk(router(x), 8, True)
        routed = on_lane.submit(x, hot_ids, hot_w)
        return (
            routed.wait()
            + shared(x.to(torch.bfloat16 if args.lane_dtype == "bfloat16" else x.dtype)).float()
        )

    def cpu_part() -> torch.Tensor:
        return on_cpu.submit(x, cold_ids, cold_w).wait()

    with torch.inference_mode():
        for fn in (hybrid, accelerator_part, cpu_part):
            fn()  # compile, fault pages in
        ms = interleaved_median_ms(
            {"hybrid": hybrid, "accelerator part": accelerator_part, "CPU part": cpu_part},
            args.calls,
        )
    larger = max(ms["accelerator part"], ms["CPU part"])
    print(f"machine: {machine()}")
    print(
        f"one MoE layer, one token: hidden {args.hidden}, experts of {args.expert_size}, "
        f"{args.hot_pairs} pairs on the sim lane ({args.lane_dtype}) + a shared expert of "
        f"{args.shared_size}, {args.cold_pairs} pairs on the CPU kernels (Q4_K); median of "
        f"{args.calls} calls each, interleaved"
    )
    print("| step | ms |")
    print("|---|---|")
    for name, value in ms.items():
        print(f"| {name} | {value:.3f} |")
    print(f"\nhybrid / max(parts): {ms['hybrid'] / larger:.3f}x (target <= 1.15x)")
    print(
        f"hybrid / (sum of parts): {ms['hybrid'] / (ms['accelerator part'] + ms['CPU part']):.3f}x"
    )
    print(f"sim lane copies: {lane.copied_bytes}")


if __name__ == "__main__":
    main()
