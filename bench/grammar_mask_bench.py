"""Cost of a JSON-schema grammar's token mask per decode step, on a 151936-token vocabulary (the
bench model's width), for each grammar engine installed: compile time per schema, then the mask
time per token for 1 and 16 streams walking a valid answer token by token, and the time to
apply the masks to a [streams, vocab] logits batch.

The demo tokenizer has 2000 real tokens (the bench model pads its vocabulary), so the mask is
measured on a Qwen-style byte-level BPE trained here to 151936 tokens on the Python standard
library's source: a real merge table of the right size, cached in --cache.

    .venv/bin/python bench/grammar_mask_bench.py --cache /tmp/grammar-bench
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.trainers import BpeTrainer

from hetero.demo_tokenizer import CONTROL_TOKENS, QWEN_SPLIT_PATTERN
from hetero.runtime.grammar import apply_token_masks

VOCAB = 151936
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
ANSWER = json.dumps(
    {
        "name": "Ada Lovelace",
        "age": 36,
        "tags": ["mathematician", "writer"],
        "address": {"city": "London", "zip": "W1"},
    }
)


def train_tokenizer(cache: Path) -> Path:
    path = cache / "tokenizer.json"
    if path.is_file():
        return path
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="replace") for p in sorted(stdlib.rglob("*.py"))]
    tokenizer = BackendTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=VOCAB - len(CONTROL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, normalized=False) for t in CONTROL_TOKENS])
    cache.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


def bench_llguidance(tokenizer_json: str, eos: int, answer: list[int], streams: int) -> dict:
    import llguidance
    import llguidance.torch as llt

    start = time.perf_counter()
    tok = llguidance.LLTokenizer(tokenizer_json, n_vocab=VOCAB, eos_token=eos)
    tokenizer_s = time.perf_counter() - start
    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    matchers = [llguidance.LLMatcher(tok, grammar) for _ in range(streams)]
    compile_s = (time.perf_counter() - start) / streams
    executor = llguidance.LLExecutor()
    mask = llt.allocate_token_bitmask(streams, VOCAB)
    steps = []
    for token in answer:
        start = time.perf_counter()
        llt.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], mask)
        steps.append(time.perf_counter() - start)
        for m in matchers:
            assert m.consume_token(token), m.get_error()
    return {"tokenizer_s": tokenizer_s, "compile_s": compile_s, "steps": steps, "mask": mask}


def bench_xgrammar(tokenizer_json: str, eos: int, answer: list[int], streams: int) -> dict:
    import xgrammar

    backend = BackendTokenizer.from_str(tokenizer_json)
    vocab = [backend.id_to_token(i) or "" for i in range(VOCAB)]
    start = time.perf_counter()
    info = xgrammar.TokenizerInfo(
        vocab, vocab_type=xgrammar.VocabType.BYTE_LEVEL, vocab_size=VOCAB, stop_token_ids=[eos]
    )
    compiler = xgrammar.GrammarCompiler(info)
    tokenizer_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    compile_s = time.perf_counter() - start
    matchers = [xgrammar.GrammarMatcher(compiled) for _ in range(streams)]
    mask = xgrammar.allocate_token_bitmask(streams, VOCAB)
    steps = []
    for token in answer:
        start = time.perf_counter()
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(mask, i)
        steps.append(time.perf_counter() - start)
        for m in matchers:
            assert m.accept_token(token)
    return {"tokenizer_s": tokenizer_s, "compile_s": compile_s, "steps": steps, "mask": mask}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/grammar-bench"))
    args = parser.parse_args()
    path = train_tokenizer(args.cache)
    tokenizer_json = path.read_text()
    backend = BackendTokenizer.from_str(tokenizer_json)
    eos = backend.token_to_id("<|im_end|>")
    answer = backend.encode(ANSWER).ids + [eos]
    print(f"vocabulary {backend.get_vocab_size()} tokens; answer {len(answer)} tokens")
    print("| engine | streams | tokenizer set-up s | compile ms | mask ms/step (median) |")
    print("|---|---|---|---|---|")
    for name, bench in [("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)]:
        for streams in (1, 16):
            try:
                r = bench(tokenizer_json, eos, answer, streams)
            except ImportError:
                print(f"| {name} | - | not installed | | |")
                break
            print(
                f"| {name} | {streams} | {r['tokenizer_s']:.2f} | {1e3 * r['compile_s']:.1f} "
                f"| {median_ms(r['steps']):.3f} |"
            )
    logits = torch.randn(16, VOCAB)
    masks = torch.full((16, (VOCAB + 31) // 32), -1, dtype=torch.int32)
    applies = []
    for _ in range(20):
        start = time.perf_counter()
        apply_token_masks(logits.clone(), masks)
        applies.append(time.perf_counter() - start)
    print(f"applying 16 masks to [16, {VOCAB}] float32 logits: {median_ms(applies):.3f} ms")
    print(f"(python {sys.version.split()[0]}, torch {torch.__version__}, numpy {np.__version__})")


if __name__ == "__main__":
    main()
