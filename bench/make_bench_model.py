"""Write the bench model: Qwen3-30B-A3B's geometry (hidden 2048, 32 q / 4 kv heads of 128,
768-wide experts, top-8, vocab 151936), scaled down in layers and experts to fit this machine,
as bf16 safetensors with random weights and the demo tokenizer. `--shared-expert SIZE` adds a
shared expert of that width behind a sigmoid gate, as Qwen2-MoE has (Qwen3 has none): the
model is then a qwen2_moe (q/k/v biases, no q/k norms) of the same geometry.

    .venv/bin/python bench/make_bench_model.py /tmp/bench-qwen3moe --layers 4 --experts 32
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from hetero.demo import random_weights
from hetero.demo_tokenizer import write_demo_tokenizer
from hetero.models import qwen_moe


def bench_config(layers: int, experts: int, shared_expert: int = 0) -> dict:
    shared = {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "shared_expert_intermediate_size": shared_expert,
    }
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_experts": experts,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "eos_token_id": 151645,
        **(shared if shared_expert else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--shared-expert", type=int, default=0, help="its width; 0: none")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    write_demo_tokenizer(args.out)
    raw = bench_config(args.layers, args.experts, args.shared_expert)
    (args.out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    with torch.device("meta"):
        net = qwen_moe.build(qwen_moe.parse_config(raw))
    tensors = random_weights(net, seed=0, dtype=torch.bfloat16)
    save_file(tensors, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    size = sum(t.numel() * 2 for t in tensors.values())
    print(f"{args.out}: {size / 2**30:.2f} GiB of bf16 weights")


if __name__ == "__main__":
    main()
