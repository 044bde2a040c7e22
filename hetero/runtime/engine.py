"""Continuous-batching engine: requests join and leave the running batch at every step, and
every step is one batched forward over all running sequences (one decode token each, plus
chunks of pending prompts up to a token budget), over one paged KV cache with prefix caching.

`Model.generate` steps a private engine inline; the server runs one on a background thread."""

from __future__ import annotations

import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hetero.errors import CapacityError, HeteroError, InvalidRequestError
from hetero.models.decoder import CausalLM
from hetero.runtime.batch import ForwardBatch, SequenceSlice
from hetero.runtime.grammar import (
    CLOSING_MARGIN_TOKENS,
    Grammar,
    apply_token_masks,
    closing_token,
    fill_token_masks,
)
from hetero.runtime.kv_cache import KVCacheFullError, PagedKVCache
from hetero.runtime.sampling import Sampler, SamplingParams
from hetero.runtime.stopping import StopStrings
from hetero.tokenizer import StreamDecoder, Tokenizer

# Python's GIL switch interval while an engine thread runs. The thread drops the GIL around every
# torch op and kernel call; whenever another thread (a server's event loop writing streamed
# chunks) held it, the engine waited out the interval to get it back: at the default 5 ms, 16
# streams on the bench model took ~300 ms a step in the server against ~215 ms alone, at 0.2 ms
# ~213 ms. Set process-wide by `Engine.start`, never raised.
SWITCH_INTERVAL_S = 0.0002
STEP_TOKENS = 512  # tokens per batched forward; longer prompts are prefilled in chunks
# With `glue_threads`, steps of at most this many tokens over histories of at most this many
# run torch's ops on that many threads (larger ones: attention over a long context, prefill
# matmuls, keep torch's setting)
GLUE_STEP_TOKENS = 16
GLUE_HISTORY_TOKENS = 4096


class QueueFullError(HeteroError):
    """The engine's waiting queue is full; try again later."""


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    eos_token_ids: frozenset[int] = frozenset()
    logprobs: int | None = None  # None: no logprobs; n >= 0: the chosen token's plus top n
    grammar: Grammar | None = None  # constrained decoding: only tokens the grammar allows
    adapter: str | None = None  # the LoRA adapter it runs with (a model may hold several)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class GenerationResult:
    token_ids: list[int]  # completion tokens (a final EOS token excluded)
    text: str  # completion text, cut before a matched stop string
    finish_reason: str  # "stop" (EOS or stop string), "length", or "cancelled"
    prompt_tokens: int
    completion_tokens: int  # generated tokens, a final EOS included
    cached_prompt_tokens: int  # prompt tokens served by the prefix cache
    prefill_tok_s: float
    decode_tok_s: float
    prefill_s: float = 0.0  # admission to the first token
    decode_s: float = 0.0  # first token to the last: completion_tokens - 1 steps
    stop_string: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Event:
    """What one step produced for one request. The last event has `result` set."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    result: GenerationResult | None = None
    error: str | None = None
    error_status: int = 500  # the HTTP status of `error`: 503 where capacity ran out


Listener = Callable[[Event], None]


class _Sequence:
    def __init__(self, request: Request, listener: Listener, tokenizer: Tokenizer):
        self.request = request
        self.listener = listener
        self.sampler = Sampler(request.sampling)
        self.decoder = StreamDecoder(tokenizer)
        self.stops = StopStrings(list(request.stop))
        self.matcher = request.grammar.matcher() if request.grammar is not None else None
        self.tokens = list(request.prompt_ids)  # prompt, then completion
        self.output: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.text: list[str] = []
        self.kv_seq: int | None = None
        self.computed = 0  # tokens whose KV is in the cache
        self.cached = 0
        self.cancelled = False
        self.started = self.first_token = 0.0
        self.decode_steps = 0


class Handle:
    """A submitted request; `cancel()` is safe from any thread."""

    def __init__(self, sequence: _Sequence):
        self._sequence = sequence

    def cancel(self) -> None:
        self._sequence.cancelled = True


class Engine:
    def __init__(
        self,
        net: CausalLM,
        tokenizer: Tokenizer,
        kv: PagedKVCache,
        max_running: int = 16,
        max_waiting: int = 256,
        step_tokens: int = STEP_TOKENS,
        glue_threads: int | None = None,
    ):
        """`glue_threads`: torch's intra-op threads for small steps, for models whose weights
        the CPU kernels run (`Model.glue_threads`): torch then only runs small ops between the
        kernels, and one thread spares a second pool of spinning threads beside the kernels'
        (on a loaded machine, two pools of two threads on two cores stall each other)."""
        self.net = net
        self.adapter_rows = getattr(net, "adapter_rows", None)  # a model with LoRA adapters
        self.glue_threads = glue_threads
        self.tokenizer = tokenizer
        self.kv = kv
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.step_tokens = step_tokens
        self.running: list[_Sequence] = []
        self.waiting: deque[_Sequence] = deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.prompt_tokens_total = 0
        self.completion_tokens_total = 0
        self.requests_total = 0
        self.recent_tok_s = 0.0

    # ---- submission (any thread) ----------------------------------------------------------

    def submit(self, request: Request, listener: Listener) -> Handle:
        needed = -(-(len(request.prompt_ids) + request.max_new_tokens) // self.kv.block_size)
        if needed > self.kv.num_blocks:
            raise InvalidRequestError(
                f"prompt plus max_tokens needs {needed * self.kv.block_size} tokens of KV cache; "
                f"the cache holds {self.kv.num_blocks * self.kv.block_size}"
            )
        sequence = _Sequence(request, listener, self.tokenizer)
        with self._lock:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFullError(
                    f"the server is busy ({len(self.waiting)} requests waiting); retry later"
                )
            self.waiting.append(sequence)
            self.requests_total += 1
            self._lock.notify()
        return Handle(sequence)

    # ---- background loop ------------------------------------------------------------------

    def start(self) -> None:
        """Run the engine on a thread of its own (see SWITCH_INTERVAL_S)."""
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        self._thread = threading.Thread(target=self._run, name="hetero-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self.waiting and not self.running:
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as err:  # fail the batch's requests, keep serving others
                status = 503 if isinstance(err, CapacityError) else 500
                for sequence in list(self.running):
                    self._finish(
                        sequence, "error", error=f"{type(err).__name__}: {err}", status=status
                    )

    # ---- one step -------------------------------------------------------------------------

    def step(self) -> bool:
        """Admit, run one batched forward, sample; False when there was nothing to do."""
        self._drop_cancelled()
        self._admit()
        if not self.running:
            return False
        self._forward_and_sample()
        return True

    def _drop_cancelled(self) -> None:
        with self._lock:
            for sequence in [s for s in self.waiting if s.cancelled]:
                self.waiting.remove(sequence)
        for sequence in [s for s in self.running if s.cancelled]:
            self._finish(sequence, "cancelled")

    def _admit(self) -> None:
        while len(self.running) < self.max_running:
            with self._lock:
                if not self.waiting:
                    return
                sequence = self.waiting[0]
            request = sequence.request
            seq, cached = self.kv.new_sequence(request.prompt_ids, request.adapter or "")
            try:
                self.kv.reserve(seq, len(request.prompt_ids) + request.max_new_tokens)
            except KVCacheFullError:
                self.kv.free(seq)  # wait for running sequences to free blocks
                return
            with self._lock:
                self.waiting.popleft()
            sequence.kv_seq, sequence.computed, sequence.cached = seq, cached, cached
            sequence.started = time.perf_counter()
            self.running.append(sequence)
            self.prompt_tokens_total += len(request.prompt_ids)

    def _forward_and_sample(self) -> None:
        decodes = [s for s in self.running if len(s.tokens) - s.computed == 1]
        prefills = [s for s in self.running if len(s.tokens) - s.computed > 1]
        # decodes always run; prompt chunks share what is left of the step's token budget
        budget = max(self.step_tokens - len(decodes), self.kv.block_size)
        scheduled: list[tuple[_Sequence, int]] = [(s, 1) for s in decodes]
        for sequence in prefills:
            if budget <= 0:
                break
            n = min(len(sequence.tokens) - sequence.computed, budget)
            scheduled.append((sequence, n))
            budget -= n
        ids, slices, sampled = [], [], []
        for sequence, n in scheduled:
            ids.extend(sequence.tokens[sequence.computed : sequence.computed + n])
            slices.append(SequenceSlice(sequence.kv_seq, sequence.computed, n))
            if sequence.computed + n == len(sequence.tokens):
                sampled.append((sequence, len(ids) - 1))
        rows = torch.tensor([row for _, row in sampled], dtype=torch.long)
        longest = max(s.past_len + s.new_len for s in slices)
        small = len(ids) <= GLUE_STEP_TOKENS and longest <= GLUE_HISTORY_TOKENS
        threads = torch.get_num_threads()
        start = time.perf_counter()
        try:
            if small and self.glue_threads:
                torch.set_num_threads(self.glue_threads)
            with torch.inference_mode():
                if self.adapter_rows is not None:
                    self.adapter_rows.assign([(s.request.adapter, n) for s, n in scheduled])
                batch = ForwardBatch(slices, self.kv)
                logits = self.net(torch.tensor(ids), batch, logit_rows=rows).float()
        finally:
            torch.set_num_threads(threads)
        elapsed = time.perf_counter() - start
        for sequence, n in scheduled:
            sequence.computed += n
            self.kv.commit(sequence.kv_seq, sequence.tokens[: sequence.computed])
        if sampled and elapsed > 0:
            self.recent_tok_s = len(sampled) / elapsed
        # log-normalisers of the rows that report logprobs, in one op for the batch
        lse = None
        if any(sequence.request.logprobs is not None for sequence, _ in sampled):
            lse = torch.logsumexp(logits, dim=-1)
        constrain([sequence for sequence, _ in sampled], logits)
        for i, (sequence, _) in enumerate(sampled):
            self._take_token(sequence, logits[i], None if lse is None else lse[i])

    def _take_token(
        self, sequence: _Sequence, logits: torch.Tensor, lse: torch.Tensor | None
    ) -> None:
        request = sequence.request
        now = time.perf_counter()
        if request.max_new_tokens == 0:
            self._finish(sequence, "length")
            return
        if sequence.output:
            sequence.decode_steps += 1
        else:
            sequence.first_token = now
        token = sequence.sampler(logits, request.prompt_ids, sequence.output)
        logprob = token_logprob(logits, lse, token, request.logprobs)
        self.completion_tokens_total += 1
        grammar_done = False
        if sequence.matcher is not None:
            sequence.matcher.consume_token(token)
            # a complete answer: a stop, whether or not the model writes its EOS token next
            grammar_done = sequence.matcher.is_stopped()
        if token in request.eos_token_ids:
            if logprob is not None:
                sequence.logprobs.append(logprob)
            self._finish(sequence, "stop", eos=True)
            return
        sequence.output.append(token)
        sequence.tokens.append(token)
        new_logprobs = [logprob] if logprob is not None else []
        sequence.logprobs.extend(new_logprobs)
        text = sequence.stops.push(sequence.decoder.push(token))
        sequence.text.append(text)
        if sequence.stops.matched is not None or grammar_done:
            self._finish(sequence, "stop", text=text, token=token, logprobs=new_logprobs)
        elif len(sequence.output) >= request.max_new_tokens:
            self._finish(sequence, "length", text=text, token=token, logprobs=new_logprobs)
        else:
            sequence.listener(Event(text, [token], new_logprobs))

    def _finish(
        self,
        sequence: _Sequence,
        reason: str,
        text: str = "",
        token: int | None = None,
        logprobs: list[TokenLogprob] | None = None,
        eos: bool = False,
        error: str | None = None,
        status: int = 500,
    ) -> None:
        if sequence.stops.matched is None and reason in ("stop", "length"):
            tail = sequence.stops.push(sequence.decoder.flush()) + sequence.stops.flush()
            text += tail
            sequence.text.append(tail)
        if sequence in self.running:
            self.running.remove(sequence)
        if sequence.kv_seq is not None:
            self.kv.free(sequence.kv_seq)
            sequence.kv_seq = None
        end = time.perf_counter()
        computed_prompt = len(sequence.request.prompt_ids) - sequence.cached
        prefill_s = (sequence.first_token or end) - sequence.started
        decode_s = end - sequence.first_token if sequence.first_token else 0.0
        result = GenerationResult(
            token_ids=sequence.output,
            text="".join(sequence.text),
            finish_reason=reason,
            prompt_tokens=len(sequence.request.prompt_ids),
            completion_tokens=len(sequence.output) + int(eos),
            cached_prompt_tokens=sequence.cached,
            prefill_tok_s=computed_prompt / prefill_s if prefill_s > 0 else 0.0,
            decode_tok_s=sequence.decode_steps / decode_s if decode_s > 0 else 0.0,
            prefill_s=prefill_s,
            decode_s=decode_s,
            stop_string=sequence.stops.matched,
            logprobs=sequence.logprobs,
        )
        tokens = [token] if token is not None else []
        sequence.listener(
            Event(text, tokens, logprobs or [], result=result, error=error, error_status=status)
        )


def constrain(sequences: list[_Sequence], logits: torch.Tensor) -> None:
    """logits: [len(sequences), vocab], in place: a constrained stream's row keeps only what its
    grammar allows (one mask per stream, all computed in one call), and near the end of its
    token budget only the allowed token that ends its JSON soonest."""
    rows = [i for i, sequence in enumerate(sequences) if sequence.matcher is not None]
    if not rows:
        return
    masks = fill_token_masks([sequences[i].matcher for i in rows], logits.shape[1])
    with torch.inference_mode():  # the logits are inference tensors
        logits[rows] = apply_token_masks(logits[rows], masks)
        for mask, i in zip(masks, rows, strict=True):
            sequence = sequences[i]
            left = sequence.request.max_new_tokens - len(sequence.output)
            if left > CLOSING_MARGIN_TOKENS:
                continue
            close = closing_token(sequence.request.grammar, mask, "".join(sequence.text))
            if close is not None:
                logits[i].fill_(-torch.inf)[close] = 0.0


def token_logprob(
    logits: torch.Tensor, lse: torch.Tensor | None, token: int, top_n: int | None
) -> TokenLogprob | None:
    """Log-probabilities of the model's own distribution (before sampling filters): logits
    minus their log-sum-exp `lse` (no [vocab] log_softmax written per row)."""
    if top_n is None or lse is None:
        return None
    top: list[tuple[int, float]] = []
    if top_n > 0:
        values, ids = torch.topk(logits, min(top_n, logits.shape[0]))
        top = [(int(i), float(v - lse)) for i, v in zip(ids, values, strict=True)]
        # a grammar's mask leaves fewer candidates than asked for: the rest are not candidates
        top = [(i, v) for i, v in top if math.isfinite(v)]
    value = float(logits[token] - lse)
    return TokenLogprob(token, value if math.isfinite(value) else -9999.0, top)
