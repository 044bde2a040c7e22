"""The generation loop for one sequence: chunked prefill into the paged KV cache, then one token
per step until EOS, a stop string, max_new_tokens or the end of the context window."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hetero.models.decoder import CausalLM
from hetero.runtime.batch import ForwardBatch, SequenceSlice
from hetero.runtime.kv_cache import PagedKVCache
from hetero.runtime.sampling import Sampler, SamplingParams
from hetero.runtime.stopping import StopStrings
from hetero.tokenizer import StreamDecoder, Tokenizer

PREFILL_CHUNK_TOKENS = 512


@dataclass
class GenerationResult:
    token_ids: list[int]  # completion tokens (a final EOS token excluded)
    text: str  # completion text, cut before a matched stop string
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    prompt_tokens: int
    prefill_tok_s: float
    decode_tok_s: float
    stop_string: str | None = None


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    eos_token_ids: frozenset[int] = frozenset()


def run_generation(
    net: CausalLM,
    kv: PagedKVCache,
    tokenizer: Tokenizer,
    request: GenerationRequest,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Generate for one request; `on_text` receives each new piece of text as it is final."""
    sampler = Sampler(request.sampling)
    decoder = StreamDecoder(tokenizer)
    stops = StopStrings(list(request.stop))
    prompt = request.prompt_ids
    seq = kv.new_sequence()
    pieces: list[str] = []

    def emit(text: str) -> None:
        if text:
            pieces.append(text)
            if on_text is not None:
                on_text(text)

    try:
        kv.reserve(seq, len(prompt) + request.max_new_tokens)
        with torch.inference_mode():
            start = time.perf_counter()
            logits = prefill(net, kv, seq, prompt)
            prefill_s = time.perf_counter() - start
            output: list[int] = []
            finish = "length"
            decode_start = time.perf_counter()
            decode_steps = 0
            while len(output) < request.max_new_tokens:
                token = sampler(logits, prompt, output)
                if token in request.eos_token_ids:
                    finish = "stop"
                    break
                output.append(token)
                emit(stops.push(decoder.push(token)))
                if stops.matched is not None:
                    finish = "stop"
                    break
                if len(output) == request.max_new_tokens:
                    break
                logits = step(net, kv, seq, len(prompt) + len(output) - 1, token)
                decode_steps += 1
            decode_s = time.perf_counter() - decode_start
        if stops.matched is None:
            emit(stops.push(decoder.flush()))
            emit(stops.flush())
    finally:
        kv.free(seq)
    return GenerationResult(
        token_ids=output,
        text="".join(pieces),
        finish_reason=finish,
        prompt_tokens=len(prompt),
        prefill_tok_s=len(prompt) / prefill_s if prefill_s > 0 else 0.0,
        decode_tok_s=decode_steps / decode_s if decode_steps and decode_s > 0 else 0.0,
        stop_string=stops.matched,
    )


def prefill(net: CausalLM, kv: PagedKVCache, seq: int, prompt: list[int]) -> torch.Tensor:
    """Run the prompt through the model in chunks; return the last position's logits [vocab]."""
    ids = torch.tensor(prompt, dtype=torch.long)
    logits = None
    for begin in range(0, len(prompt), PREFILL_CHUNK_TOKENS):
        chunk = ids[begin : begin + PREFILL_CHUNK_TOKENS]
        batch = ForwardBatch([SequenceSlice(seq, begin, len(chunk))], kv)
        logits = net(chunk, batch, logit_rows=torch.tensor([len(chunk) - 1]))
    return logits[0].float()


def step(net: CausalLM, kv: PagedKVCache, seq: int, position: int, token: int) -> torch.Tensor:
    batch = ForwardBatch([SequenceSlice(seq, position, 1)], kv)
    return net(torch.tensor([token]), batch, logit_rows=torch.tensor([0]))[0].float()
