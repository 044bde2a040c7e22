"""Constrained decoding: a grammar (a JSON schema, or a Lark grammar that embeds schemas) compiled
once per request shape by llguidance, one matcher per stream, and a token mask per step for all
constrained streams of a batch at once (bench/results/grammar-mask.md measured the engines)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import llguidance
import numpy as np
import torch

from hetero.errors import InvalidRequestError
from hetero.tokenizer import Tokenizer

# JSON laid out as json.dumps writes it (and chat templates render tool calls), with no other
# whitespace: a model (a random-weight one above all) could otherwise fill its token budget
# with spaces and never close the object.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


# Tokens that end JSON soonest. When a stream's token budget runs low, the engine takes the first
# of these the grammar allows (EOS first, then what closes the innermost open string, object or
# array, then the shortest values and separators, a lone space last for the one JSON_OPTIONS
# puts after ":" and ",") instead of the model's choice, so a string is
# closed and then its object rather than cut off at max_tokens. Where none is allowed (a required
# key's letters, an enum) the grammar leaves the model one path anyway.
CLOSERS = {"{": "}", "[": "]"}
VALUE_TEXTS = ("0", "null", '"', '": ', ": ", ":", ", ", ",", " 0", " ")
CLOSING_MARGIN_TOKENS = 48  # a budget this low starts the closing


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar for one tokenizer; `matcher()` starts a stream's walk through it."""

    tokenizer: llguidance.LLTokenizer
    source: str  # llguidance's grammar text
    eos_ids: tuple[int, ...]
    closing_ids: dict[str, int]  # the single token of each of CLOSERS' and VALUE_TEXTS' texts

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
        self.eos_ids = tuple(sorted(eos_token_ids))
        texts = [*CLOSERS.values(), *VALUE_TEXTS]
        single = {text: self.tokenizer.tokenize_str(text) for text in texts}
        self.closing_ids = {text: ids[0] for text, ids in single.items() if len(ids) == 1}

    def json_schema(self, schema: dict[str, Any]) -> Grammar:
        """A grammar for JSON text matching `schema` ({"type": "object"} for any object)."""
        text = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        return self._compiled(text)

    def lark(self, grammar: str) -> Grammar:
        """A Lark grammar; `%json {schema}` embeds a JSON schema (laid out as JSON_OPTIONS says
        when the schema carries them under "x-guidance", as `lark_json` writes it)."""
        return self._compiled(llguidance.LLMatcher.grammar_from_lark(grammar))

    def _compile(self, source: str) -> Grammar:
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            source, self.tokenizer
        )
        if failed:
            reason = " ".join("; ".join(messages).split())  # one line (regex errors draw carets)
            raise InvalidRequestError(f"the schema cannot be compiled: {reason}")
        return Grammar(self.tokenizer, source, self.eos_ids, self.closing_ids)


_executor: llguidance.LLExecutor | None = None


def lark_json(schema: dict[str, Any]) -> str:
    """`schema` as a Lark `%json` rule body, laid out as JSON_OPTIONS says."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


def fill_token_masks(matchers: list[llguidance.LLMatcher], vocab_size: int) -> torch.Tensor:
    """The allowed tokens of each matcher's next step, computed in parallel by llguidance:
    [len(matchers), ceil(vocab / 32)] int32, bit j of word i set when token 32 i + j is allowed."""
    global _executor
    if _executor is None:
        _executor = llguidance.LLExecutor()
    masks = torch.full((len(matchers), (vocab_size + 31) // 32), -1, dtype=torch.int32)
    # llguidance.torch's wrapper would do the same, but importing it compiles a torch kernel
    # (over a second at start-up) the CPU path never uses
    row_bytes = masks.shape[1] * masks.element_size()
    pairs = [(m, i) for i, m in enumerate(matchers)]
    _executor.unsafe_compute_mask_ptr(pairs, masks.data_ptr(), row_bytes, len(matchers))
    return masks


def closing_token(grammar: Grammar, mask: torch.Tensor, text: str) -> int | None:
    """mask: [ceil(vocab / 32)] int32, a stream's allowed tokens; text: its answer so far ->
    the token that ends its JSON soonest among those allowed, or None."""
    in_string, open_brackets = json_nesting(text)
    if in_string:
        order = ['"']
    else:
        order = [CLOSERS[open_brackets[-1]]] if open_brackets else []
        order += VALUE_TEXTS
    ids = [*grammar.eos_ids, *(grammar.closing_ids.get(t) for t in order)]
    for token in ids:
        if token is not None and int(mask[token // 32]) >> (token % 32) & 1:
            return token
    return None


def json_nesting(text: str) -> tuple[bool, list[str]]:
    """Whether `text` (JSON, perhaps inside other text) ends inside a string, and the brackets
    still open there, outermost first."""
    in_string = escaped = False
    brackets: list[str] = []
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in CLOSERS:
            brackets.append(char)
        elif char in "}]" and brackets:
            brackets.pop()
    return in_string, brackets


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
