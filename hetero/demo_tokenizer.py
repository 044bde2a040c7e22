"""The demo model's tokenizer: a real byte-level BPE trained offline, in well under a second, on a
few KB of text embedded below, with Qwen3's ChatML special tokens and a Qwen3-style chat template
(system/user/assistant, tools, `enable_thinking`). Two runs write byte-identical files."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.trainers import BpeTrainer

# Control tokens (special: skipped by decode) and the reasoning tags, which Qwen3 keeps as plain
# added tokens so that decoded text still shows where the reasoning ends.
CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
REASONING_TOKENS = ("<think>", "</think>")
DEMO_SPECIAL_TOKENS = CONTROL_TOKENS + REASONING_TOKENS

TARGET_VOCAB_SIZE = 2000

# Qwen2/Qwen3's pre-tokenizer split: contractions, letter runs with one leading non-letter, single
# digits, punctuation runs, newlines and spaces.
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TRAINING_TEXT = """\
A mixture-of-experts language model replaces the dense feed-forward block of each transformer
layer with many smaller feed-forward networks, the experts, and a router that picks a few of them
for every token. The model may hold hundreds of billions of parameters, yet each token only
touches a small fraction of them. That is why a mixture-of-experts model can be fast on modest
hardware: the work per token is small, even though the weights are large.

The trouble is memory. A single consumer GPU has tens of gigabytes of fast memory, while the
experts of a large model need hundreds of gigabytes. The host has far more memory, but the CPU
reads it with less bandwidth. So we split the model: the attention layers, the router, the
shared experts and the most popular experts live on the GPU, and the cold experts stay in host
memory where the CPU computes them. Every layer, the router decides which experts each token
needs; tokens for hot experts run on the GPU, tokens for cold experts run on the CPU, and the
results are added back together with the routing weights.

Placement is a question of cost. We measure how often each expert is chosen on a calibration
prompt, how many bytes its weights take after quantisation, and how fast each device reads
memory. A small cost model then fills the GPU with the experts that save the most time per byte.
The plan respects a budget: the key-value cache for long prompts needs room too, and the
attention weights must always fit.

Decoding one token at a time is bound by memory bandwidth. Each step reads the weights of the
chosen experts once, so the speed in tokens per second is roughly the bandwidth divided by the
bytes touched per token. Quantised weights in four or eight bits cut those bytes, and kernels
that dequantise on the fly keep the arithmetic close to the data. Prefill is different: a long
prompt has many tokens per expert, the work becomes matrix multiplication, and the GPU wins, so
cold experts can be streamed to the GPU in large batches when that is cheaper than computing on
the CPU.

The runtime keeps a paged key-value cache: blocks of sixteen positions that sequences borrow and
return, so that many conversations can share the memory without copying. Prefill runs the prompt
in chunks; decoding appends one token per step until the model writes an end-of-sequence token,
a stop string, or the length limit.

A chat model reads a conversation rendered by its chat template. The system message sets the
rules, the user asks, and the assistant answers. Some models think before they answer: they
write their reasoning between think tags, then the final answer. A server streams the reasoning
and the answer separately, so a client can show or hide the thinking.

Questions people ask the demo: What is a mixture of experts? How many experts are active per
token? Why is the CPU slower than the GPU for this? How much memory does the model need? Can it
run with eight gigabytes of video memory and sixty-four gigabytes of system memory? Yes, the
placement plan will say which experts go where, and how fast it expects the decoding to be.

Hello! Hi there, thanks for asking. Good morning, good evening, please and thank you. Sure,
here is a short explanation, followed by an example and a summary. Let me think about it step by
step. First, second, third, finally. However, therefore, because, although, unless, whether.
I think the answer is correct, but we should verify it with a test before we trust it.

Quantisation stores weights in fewer bits. The block formats group thirty-two or two hundred and
fifty-six values, keep a scale and sometimes a minimum for every block, and pack the integers
tightly. A kernel unpacks a block, multiplies by the scale, and accumulates the dot product in
single precision. Brain floating point, half precision and eight-bit integers trade accuracy for
throughput; the reference implementation in double precision tells us the error budget.

The graphics processor executes thousands of threads in warps; shared memory, registers and tensor
cores decide how quickly a matrix multiplication finishes. Launch overhead matters for tiny
batches, so we capture the decode step in a graph and replay it. The processor on the host has
vector units, caches and several memory channels; a well-written kernel streams the quantised
weights once, keeps partial sums in registers and splits the rows across threads.

Transfers over the PCI Express bus are slow compared with either memory, so the scheduler
overlaps copies with computation, pins host buffers and avoids moving activations back and forth
more often than necessary. Profiling shows where the time goes: attention, routing, expert
computation, synchronisation, sampling or detokenisation.

Sampling turns logits into the next token: temperature, top-k, top-p and min-p filter the
distribution; repetition, presence and frequency penalties discourage loops; a seed makes the
result reproducible. Greedy decoding simply takes the most likely token. Speculative decoding
drafts several tokens with a smaller model and verifies them in one forward pass.

The command line offers generate, chat, serve, plan and bench. The server speaks an API that is
compatible with common clients: completions, chat completions, streaming events, tool calls and
usage statistics. Logs report throughput, latency, queue length, cache occupancy and errors.
Configuration comes from the checkpoint: hidden size, intermediate size, number of layers, heads,
key-value heads, head dimension, vocabulary, rotary embedding base, normalisation epsilon, number
of experts, experts per token and whether shared experts exist.

Families we support include Llama, Mistral, Mixtral, Qwen, Qwen-MoE, DeepSeek and others with
similar architecture. Weights arrive as safetensors shards or as a single GGUF file; an index maps
tensor names to files, and loading memory-maps each shard so that nothing is read twice.

Troubleshooting: if loading fails, check that the directory holds config.json, tokenizer.json
and every shard named in the index. Out-of-memory errors mean the plan was too optimistic; lower
the budget, shorten the context window, or quantise more aggressively. Slow decoding usually
means too many experts landed on the processor, or another program competes for bandwidth.
Wrong text often comes from a mismatched tokenizer, an unusual template, or corrupted downloads.

Glossary. Activation: intermediate values flowing between layers. Embedding: the table mapping
token identifiers to vectors. Logit: an unnormalised score per vocabulary entry. Softmax: the
function turning scores into probabilities. Residual: the running sum each block adds into.
Normalisation: rescaling a vector to a stable magnitude. Rotary position embedding: rotating
query and key pairs by angles that grow with position. Grouped-query attention: several query
heads sharing one key-value head. Gating: multiplying one projection by a nonlinear function of
another. Benchmark: a careful measurement, repeated, with warm-up, reported with its variance.

Everyday requests also appear: write a haiku about autumn leaves; summarise this paragraph;
translate a sentence into French or Spanish; explain recursion to a child; suggest a name for a
cat; plan a weekend trip to the mountains; compare two laptops; fix a bug in my Python script;
why is the sky blue; how do vaccines work; what happened in history on this day; recommend a
book, a movie, a recipe with tomatoes, garlic, basil and olive oil.

Numbers help: 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 4096, 0.5, 1e-6, 3.14159.
Code appears in answers too: def route(tokens): return top_k(softmax(router(tokens)), k=8)
and print("hello, world") or {"name": "get_weather", "arguments": {"city": "Paris"}}.
"""

# Qwen3's chat template, reduced to what the demo needs: system, user, assistant (with reasoning
# kept only after the last user turn), tools and tool results, and `enable_thinking=False`, which
# closes an empty reasoning block in the generation prompt.
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n'
        + 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + tool | tojson }}
    {%- endfor %}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and '
        + 'arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n'
        + '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(last_query_index=messages|length - 1, found=false) %}
{%- for message in messages[::-1] %}
    {%- if not ns.found and message.role == 'user' %}
        {%- set ns.found = true %}
        {%- set ns.last_query_index = messages|length - 1 - loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n')
                .split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning_content.strip('\n')
                + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls or [] %}
            {%- set call = tool_call.function if tool_call.function else tool_call %}
            {{- '\n' if (loop.first and content) or not loop.first else '' }}
            {{- '<tool_call>\n{"name": "' + call.name + '", "arguments": ' }}
            {{- call.arguments if call.arguments is string else call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"""


def build_demo_tokenizer() -> BackendTokenizer:
    """Train the demo BPE. Deterministic: the trainer breaks count ties by pair order."""
    tokenizer = BackendTokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = BpeTrainer(
        vocab_size=TARGET_VOCAB_SIZE,
        show_progress=False,
        # All 256 byte symbols, so any text (emoji, CJK, binary junk) round-trips.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(keepends=True), trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, normalized=False) for t in CONTROL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in REASONING_TOKENS])
    return tokenizer


def demo_tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }


def write_demo_tokenizer(out_dir: str | Path) -> int:
    """Write tokenizer.json and tokenizer_config.json to `out_dir`; return the vocabulary size
    (added tokens included), which the model's embedding must cover."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_demo_tokenizer()
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    config_text = json.dumps(demo_tokenizer_config(), indent=2, ensure_ascii=False)
    (out / "tokenizer_config.json").write_text(config_text + "\n", encoding="utf-8")
    return tokenizer.get_vocab_size(with_added_tokens=True)
