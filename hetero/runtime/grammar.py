"""Constrained decoding: a grammar (a JSON schema, or a Lark grammar that embeds schemas) compiled
once per request shape by llguidance, one matcher per stream, and a token mask per step for all
constrained streams of a batch at once (bench/results/grammar-mask.md measured the engines)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import llguidance
import llguidance.torch as llguidance_torch
import numpy as np
import torch

from hetero.errors import InvalidRequestError
from hetero.tokenizer import Tokenizer

# A grammar's JSON without optional whitespace: a model (a random-weight one above all) could
# otherwise fill its token budget with spaces and never close the object.
JSON_OPTIONS = {"whitespace_flexible": False}


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar for one tokenizer; `matcher()` starts a stream's walk through it."""

    tokenizer: llguidance.LLTokenizer
    source: str  # llguidance's grammar text

    def matcher(self) -> llguidance.LLMatcher:
        return llguidance.LLMatcher(self.tokenizer, self.source, log_level=0)


class GrammarCompiler:
    """Grammars for one model: its tokenizer converted once (about a second on a 150k vocab),
    each distinct grammar checked and kept, so repeated schemas cost nothing."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: set[int]):
        # the model's vocab may be wider than the tokenizer's: the mask covers every logit
        self.tokenizer = llguidance.LLTokenizer(
            tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=sorted(eos_token_ids)
        )
        self._compiled = lru_cache(maxsize=256)(self._compile)

    def json_schema(self, schema: dict[str, Any]) -> Grammar:
        """A grammar for JSON text matching `schema` ({"type": "object"} for any object)."""
        text = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        return self._compiled(text)

    def lark(self, grammar: str) -> Grammar:
        return self._compiled(llguidance.LLMatcher.grammar_from_lark(grammar))

    def _compile(self, source: str) -> Grammar:
        ok, messages = llguidance.LLMatcher.validate_grammar_with_warnings(source, self.tokenizer)
        if not ok:
            raise InvalidRequestError(f"the schema cannot be compiled: {'; '.join(messages)}")
        return Grammar(self.tokenizer, source)


def json_schema_text(schema: dict[str, Any]) -> str:
    return json.dumps(schema, sort_keys=True)


_executor: llguidance.LLExecutor | None = None


def fill_token_masks(matchers: list[llguidance.LLMatcher], vocab_size: int) -> torch.Tensor:
    """The allowed tokens of each matcher's next step, computed in parallel by llguidance:
    [len(matchers), ceil(vocab / 32)] int32, bit j of word i set when token 32 i + j is allowed."""
    global _executor
    if _executor is None:
        _executor = llguidance.LLExecutor()
    masks = torch.full(((len(matchers)), (vocab_size + 31) // 32), -1, dtype=torch.int32)
    llguidance_torch.fill_next_token_bitmask_par(
        _executor, [(m, i) for i, m in enumerate(matchers)], masks
    )
    return masks


def apply_token_masks(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """logits: [rows, vocab] float, masks: [rows, ceil(vocab / 32)] int32 bit masks; disallowed
    logits become -inf, in place. numpy's unpackbits reads the words' bytes little-end first,
    the order llguidance writes them in; on the CPU numpy's putmask does the rest (torch's
    masked_fill took 8 ms for 16 rows of 151936 on a loaded 2-core machine, numpy 1 ms)."""
    vocab = logits.shape[1]
    bits = np.unpackbits(masks.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    if logits.device.type == "cpu":
        np.putmask(logits.numpy(), bits == 0, -np.inf)
    else:
        banned = torch.from_numpy(bits == 0).to(logits.device, non_blocking=True)
        logits.masked_fill_(banned, -torch.inf)
    return logits
