"""Hit rates of the dynamic expert cache's policies (hetero/runtime/expert_cache.py) on routing
traces recorded while a model generates: each MoE layer's decode steps replayed through a pool
of N slots, static (the hot set profiled on the first half of the prompts), LRU and score
(decayed use counts), both seeded with that hot set; measured on the other half's decode steps
(prefill steps only teach the pool). Random-weight models route with little locality: their
figures are a floor, not a forecast.

    .venv/bin/python bench/expert_cache_bench.py demo --new-tokens 48 --slots 4,8
"""

from __future__ import annotations

import argparse
import os
import platform

import numpy as np
import torch

import hetero
from hetero.runtime.expert_cache import POLICIES, ExpertSlots
from hetero.runtime.routing_recorder import record_routing

PROMPTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "In 1905 Einstein published four papers that changed physics forever.",
    "Add two cups of flour, one egg and a pinch of salt, then stir well.",
    "SELECT name, count(*) FROM orders GROUP BY name ORDER BY 2 DESC;",
    "The committee will meet on Tuesday to discuss the budget for next year.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "import numpy as np\nx = np.linspace(0, 1, 100)\nprint(x.mean())",
]


def record(model, prompts: list[str], new_tokens: int) -> dict[int, list[np.ndarray]]:
    """Each MoE layer's routing steps (expert ids [tokens, top_k]) over the prompts in turn."""
    with record_routing(model.net, model.name) as recorder:
        for prompt in prompts:
            model.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True)
    return {layer: r.steps for layer, r in recorder.layers.items()}


def hot_set(steps: list[np.ndarray], num_experts: int, slots: int) -> list[int]:
    counts = np.bincount(np.concatenate([s.reshape(-1) for s in steps]), minlength=num_experts)
    return np.argsort(-counts, kind="stable")[:slots].tolist()


def decode_hit_rate(steps: list[np.ndarray], slots: ExpertSlots) -> float:
    hits = pairs = 0
    for ids in steps:
        hit = slots.access(ids)
        if ids.shape[0] == 1:  # a decode step
            hits, pairs = hits + int(hit.sum()), pairs + hit.size
    return hits / pairs if pairs else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="demo")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--slots", default="4,8", help="experts per layer the pool holds")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = hetero.load(args.model, progress=False)
    experts = model.config.num_experts if hasattr(model.config, "num_experts") else None
    half = len(PROMPTS) // 2
    train = record(model, PROMPTS[:half], args.new_tokens)
    test = record(model, PROMPTS[half:], args.new_tokens)
    layer0 = next(iter(test.values()))
    top_k = layer0[0].shape[1]
    experts = experts or int(max(s.max() for steps in test.values() for s in steps)) + 1
    print(
        f"{model.name}: {len(test)} MoE layers, {experts} experts, top-{top_k}; "
        f"{len(PROMPTS) - half} prompts x {args.new_tokens} decode steps measured; "
        f"{platform.machine()}, {os.cpu_count()} cores"
    )
    print("| slots per layer | " + " | ".join(POLICIES) + " |")
    print("|---|" + "---|" * len(POLICIES))
    for n in (int(s) for s in args.slots.split(",")):
        rates = {}
        for policy in POLICIES:
            per_layer = [
                decode_hit_rate(
                    steps, ExpertSlots(experts, n, policy, hot_set(train[i], experts, n))
                )
                for i, steps in test.items()
            ]
            rates[policy] = float(np.mean(per_layer))
        uniform = n / experts
        cells = " | ".join(f"{rates[p]:.1%}" for p in POLICIES)
        print(f"| {n} of {experts} (uniform routing: {uniform:.0%}) | {cells} |")


if __name__ == "__main__":
    main()
