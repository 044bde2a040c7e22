"""Chat templates render, and tokenize, exactly as transformers' apply_chat_template does: the demo
template and real-world-style templates (Llama 3, DeepSeek-R1, Mixtral, a tojson tools one)."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest
from tokenizers import AddedToken, processors

from hetero.demo_tokenizer import build_demo_tokenizer, demo_tokenizer_config
from hetero.errors import InvalidRequestError, ModelFormatError
from hetero.reasoning import prompt_opens_reasoning
from hetero.tokenizer import Tokenizer

# Llama 3 Instruct, with Llama 3.1's date line from strftime_now.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% if not date_string is defined %}{% set date_string = strftime_now('%d %b %Y') %}"
    "{% endif %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{% if loop.index0 == 0 and message['role'] == 'system' %}"
    "{% set content = content.replace('\\n\\n', '\\n\\nToday Date: ' + date_string + '\\n\\n', 1)"
    " %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

# DeepSeek-R1: system prompts gathered first, BOS from bos_token, earlier answers lose their
# reasoning, and the generation prompt opens <think>.
DEEPSEEK_R1_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='',"
    " is_first_sp=true) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}"
    "{% set ns.is_first_sp = false %}{%- else %}"
    "{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}"
    "{%- endif %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and 'tool_calls' in message %}"
    "{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls'] %}"
    "{%- if not ns.is_first %}{{'<｜Assistant｜>' + message['content'] + '<｜tool▁calls▁begin｜>"
    "<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n'"
    " + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- set ns.is_first = true -%}{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type']"
    " + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n'"
    " + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}"
    "{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}"
    "{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content']"
    " + '<｜end▁of▁sentence｜>'}}"
    "{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}"
    "{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>'"
    " + message['content'] + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}"
    "{%- else %}{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- endif %}{%- endif %}{%- endfor -%}"
    "{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)

# Mixtral-8x7B-Instruct: [INST] turns, and raise_exception unless roles alternate.
MIXTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)

# Hermes-style tools written without whitespace control, so trim_blocks/lstrip_blocks matter;
# tojson with its keyword arguments, loop controls and a {% generation %} block.
TOJSON_TEMPLATE = """{% if tools %}<|im_start|>system
You can call these tools:
{% for tool in tools %}
{{ tool | tojson }}
{% endfor %}
Schema of the first, indented: {{ tools[0] | tojson(indent=2, sort_keys=true) }}<|im_end|>
{% endif %}
{% for message in messages %}
    {% if message.role == 'debug' %}{% continue %}{% endif %}
<|im_start|>{{ message.role }}
{% if message.tool_calls %}
    {% for call in message.tool_calls %}
<tool_call>{{ call.function | tojson(separators=(',', ':')) }}</tool_call>
    {% endfor %}
{% elif message.role == 'assistant' %}
{% generation %}{{ message.content }}{% endgeneration %}
{% else %}
{{ message.content }}
{% endif %}
<|im_end|>
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def write_tokenizer_dir(
    directory: Path,
    chat_template: str | None,
    extra_special_tokens: tuple[str, ...] = (),
    bos_post_processor: bool = False,
    **config,
) -> Path:
    """The demo BPE with extra special tokens and another template / special tokens."""
    backend = build_demo_tokenizer()
    backend.add_special_tokens([AddedToken(t, normalized=False) for t in extra_special_tokens])
    if bos_post_processor:
        bos = config["bos_token"]
        bos = bos["content"] if isinstance(bos, dict) else bos
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, backend.token_to_id(bos))]
        )
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    tokenizer_config = {**demo_tokenizer_config(), "chat_template": chat_template, **config}
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


TEMPLATE_DIRS = {
    "demo": dict(chat_template=demo_tokenizer_config()["chat_template"]),
    "llama3": dict(
        chat_template=LLAMA3_TEMPLATE,
        extra_special_tokens=(
            "<|begin_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        bos_post_processor=True,
    ),
    "deepseek_r1": dict(
        chat_template=DEEPSEEK_R1_TEMPLATE,
        extra_special_tokens=(
            "<｜begin▁of▁sentence｜>",
            "<｜end▁of▁sentence｜>",
            "<｜User｜>",
            "<｜Assistant｜>",
        ),
        bos_token={"__type": "AddedToken", "content": "<｜begin▁of▁sentence｜>", "lstrip": False},
        eos_token={"__type": "AddedToken", "content": "<｜end▁of▁sentence｜>", "lstrip": False},
        pad_token=None,
        add_bos_token=True,
        bos_post_processor=True,
    ),
    "mixtral": dict(
        chat_template=MIXTRAL_TEMPLATE,
        extra_special_tokens=("<s>", "</s>"),
        bos_token="<s>",
        eos_token="</s>",
        pad_token=None,
        bos_post_processor=True,
    ),
    "tojson": dict(chat_template=TOJSON_TEMPLATE),
}


@pytest.fixture(scope="module")
def template_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("templates")
    return {name: write_tokenizer_dir(root / name, **spec) for name, spec in TEMPLATE_DIRS.items()}


@pytest.fixture(scope="module")
def tokenizers(template_dirs):
    """name -> (hetero Tokenizer, transformers tokenizer)"""
    from transformers import AutoTokenizer

    return {
        name: (Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(path))
        for name, path in template_dirs.items()
    }


SYSTEM = {"role": "system", "content": "You are a concise assistant. Answer in one line."}
USER = {"role": "user", "content": "What is a mixture of experts?"}
ANSWER = {"role": "assistant", "content": "A layer with many FFNs and a router that picks a few."}
FOLLOW_UP = {"role": "user", "content": "  And why run cold experts on the CPU? 🤖 为什么？  "}
REASONED = {
    "role": "assistant",
    "content": "<think>\nThe user asks about MoE.\n</think>\n\nMany experts, few active.",
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city — «quoted», non-ASCII kept",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
TOOL_CALL = {
    "role": "assistant",
    "content": None,  # as OpenAI clients send it: transformers drops None-valued keys
    "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
    ],
}
TOOL_RESULT = {"role": "tool", "content": '{"temperature": 21, "unit": "C"}'}

CONVERSATIONS = {
    "system_user": [SYSTEM, USER],
    "user_only": [USER],
    "multi_turn": [SYSTEM, USER, ANSWER, FOLLOW_UP],
    "no_system_multi_turn": [USER, ANSWER, FOLLOW_UP],
    "ends_with_assistant": [SYSTEM, USER, ANSWER],
    "reasoning_history": [USER, REASONED, FOLLOW_UP],
    "reasoning_field": [USER, {**ANSWER, "reasoning_content": "Think of routers."}, FOLLOW_UP],
}

# (template, conversation, extra template arguments)
CASES = [
    *[("demo", conv, {}) for conv in CONVERSATIONS],
    ("demo", "multi_turn", {"enable_thinking": False}),
    ("demo", "reasoning_history", {"enable_thinking": True}),
    *[("llama3", conv, {}) for conv in CONVERSATIONS],
    ("llama3", "system_user", {"date_string": "26 Jul 2024"}),
    *[("deepseek_r1", conv, {}) for conv in CONVERSATIONS],
    # Mixtral's template refuses system messages.
    *[("mixtral", name, {}) for name, conv in CONVERSATIONS.items() if conv[0] != SYSTEM],
    *[("tojson", conv, {}) for conv in CONVERSATIONS],
]


def reference_ids(reference, messages, **kwargs) -> list[int]:
    # transformers 5 returns a BatchEncoding from tokenize=True; 4.x returned the ids
    out = reference.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize(("template", "conversation", "kwargs"), CASES)
def test_chat_template_renders_and_tokenizes_like_transformers(
    tokenizers, template, conversation, kwargs, add_generation_prompt
):
    ours, reference = tokenizers[template]
    messages = CONVERSATIONS[conversation]
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
    expected = reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )
    assert text == expected
    assert ours.encode(text) == reference_ids(
        reference, messages, add_generation_prompt=add_generation_prompt, **kwargs
    )


@pytest.mark.parametrize("template", ["demo", "tojson"])
def test_tools_render_through_tojson_like_transformers(tokenizers, template):
    ours, reference = tokenizers[template]
    messages = [SYSTEM, USER, TOOL_CALL, TOOL_RESULT, {"role": "debug", "content": "skipped"}]
    text = ours.apply_chat_template(messages, tools=[WEATHER_TOOL])
    assert text == reference.apply_chat_template(
        messages, tools=[WEATHER_TOOL], tokenize=False, add_generation_prompt=True
    )
    assert "Zürich" in text and "«quoted»" in text  # tojson keeps non-ASCII
    assert ours.encode(text) == reference_ids(
        reference, messages, tools=[WEATHER_TOOL], add_generation_prompt=True
    )


def test_deepseek_tool_calls_render_like_transformers(tokenizers):
    ours, reference = tokenizers["deepseek_r1"]
    call = {
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    messages = [USER, {"role": "assistant", "content": "", "tool_calls": [call]}, TOOL_RESULT]
    text = ours.apply_chat_template(messages)
    assert text == reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_demo_generation_prompt_closes_reasoning_when_thinking_is_off(tokenizers):
    demo, _ = tokenizers["demo"]
    thinking = demo.apply_chat_template([USER])
    assert thinking.endswith("<|im_start|>assistant\n")
    assert demo.apply_chat_template([USER], enable_thinking=False) == (
        thinking + "<think>\n\n</think>\n\n"
    )


def test_prompt_opens_reasoning_for_deepseek_r1_only(tokenizers):
    assert prompt_opens_reasoning(tokenizers["deepseek_r1"][0].apply_chat_template([USER]))
    assert not prompt_opens_reasoning(tokenizers["demo"][0].apply_chat_template([USER]))
    demo_no_thinking = tokenizers["demo"][0].apply_chat_template([USER], enable_thinking=False)
    assert not prompt_opens_reasoning(demo_no_thinking)


def test_bos_token_from_template_is_not_doubled(tokenizers):
    ours, _ = tokenizers["deepseek_r1"]
    ids = ours.encode(ours.apply_chat_template([USER]))
    assert ids.count(ours.bos_token_id) == 1
    assert ids[0] == ours.bos_token_id


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([USER, USER], "Conversation roles must alternate"),
        ([SYSTEM, USER], "Conversation roles must alternate"),
        ([USER, ANSWER, USER, {"role": "tool", "content": "x"}], "Only user and assistant roles"),
    ],
)
def test_raise_exception_in_template_is_an_invalid_request(tokenizers, messages, message):
    ours, reference = tokenizers["mixtral"]
    with pytest.raises(InvalidRequestError, match=message) as raised:
        ours.apply_chat_template(messages)
    assert "\n" not in str(raised.value)
    with pytest.raises(jinja2.TemplateError, match=message):
        reference.apply_chat_template(messages, tokenize=False)


def test_template_syntax_error_is_a_model_format_error(tmp_path):
    write_tokenizer_dir(tmp_path, chat_template="{% for m in messages %}{{ m.content }")
    tokenizer = Tokenizer.from_dir(tmp_path)
    with pytest.raises(ModelFormatError, match="not valid Jinja") as raised:
        tokenizer.apply_chat_template([USER])
    assert "\n" not in str(raised.value)


def test_missing_template_is_a_model_format_error(tmp_path):
    tokenizer = Tokenizer.from_dir(write_tokenizer_dir(tmp_path, chat_template=None))
    assert tokenizer.chat_template is None
    with pytest.raises(ModelFormatError, match="no chat template"):
        tokenizer.apply_chat_template([USER])


def test_empty_conversation_is_an_invalid_request(tokenizers):
    with pytest.raises(InvalidRequestError, match="empty conversation"):
        tokenizers["demo"][0].apply_chat_template([])


def test_named_templates_pick_tool_use_for_tools_like_transformers(tmp_path):
    from transformers import AutoTokenizer

    named = [
        {"name": "default", "template": "{{ messages[0].content }}"},
        {"name": "tool_use", "template": "{{ tools | length }} tools: {{ messages[0].content }}"},
    ]
    write_tokenizer_dir(tmp_path, chat_template=named)
    ours, reference = Tokenizer.from_dir(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    for tools in (None, [WEATHER_TOOL]):
        assert ours.apply_chat_template([USER], tools=tools) == reference.apply_chat_template(
            [USER], tools=tools, tokenize=False, add_generation_prompt=True
        )


def test_chat_template_jinja_file_wins_like_transformers(tmp_path):
    from transformers import AutoTokenizer

    write_tokenizer_dir(tmp_path, chat_template="from the config", bos_token="<|endoftext|>")
    (tmp_path / "chat_template.jinja").write_text(LLAMA3_TEMPLATE)
    ours, reference = Tokenizer.from_dir(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    messages = CONVERSATIONS["multi_turn"]
    assert ours.apply_chat_template(messages) == reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
