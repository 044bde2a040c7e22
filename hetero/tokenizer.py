"""Text <-> token ids for a checkpoint directory: the `tokenizers` model from tokenizer.json, the
special tokens and EOS ids from the config files, and the chat template rendered exactly as
transformers renders it. `StreamDecoder` turns generated ids into text deltas as they arrive."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BackendTokenizer

from hetero.errors import InvalidRequestError, ModelFormatError

# The named special tokens transformers passes to every chat template (SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_ROLES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

# Names a message's reasoning travels under; templates read `reasoning_content`, gpt-oss reads
# `thinking` (transformers' _alias_reasoning_fields).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

DEFAULT_TEMPLATE = "default"
TOOL_USE_TEMPLATE = "tool_use"


class Tokenizer:
    """A checkpoint's tokenizer. `eos_token_ids` is a plain set callers may extend."""

    def __init__(
        self,
        backend: BackendTokenizer,
        special_tokens: Mapping[str, str] | None = None,
        chat_templates: Mapping[str, str] | None = None,
        eos_token_ids: Iterable[int] = (),
        source: str = "tokenizer",
    ) -> None:
        self.backend = backend
        self.special_tokens = dict(special_tokens or {})
        self.chat_templates = dict(chat_templates or {})
        self.eos_token_ids: set[int] = set(eos_token_ids)
        self.source = source

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json plus whatever of tokenizer_config.json, special_tokens_map.json,
        chat_template.jinja/.json, generation_config.json and config.json the directory has.

        tokenizer.json's post-processor alone decides whether `encode(add_special_tokens=True)`
        adds BOS/EOS: transformers 5 ignores add_bos_token/add_eos_token once tokenizer.json
        exists, and so does hetero."""
        directory = Path(path)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelFormatError(
                f"{directory}: no tokenizer.json. hetero reads the fast-tokenizer file; copy it "
                "from the model's repository, or create it with transformers: "
                "AutoTokenizer.from_pretrained(dir).save_pretrained(dir)"
            )
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # the Rust loader raises a bare Exception
            raise ModelFormatError(
                f"{tokenizer_file}: not a valid tokenizers file ({_one_line(err)})"
            ) from err

        config = _read_json_object(directory / "tokenizer_config.json")
        special_tokens = _special_tokens(config, directory)
        templates = _chat_templates(config, directory)

        eos_token_ids = _eos_ids(directory / "generation_config.json") | _eos_ids(
            directory / "config.json"
        )
        eos_token = special_tokens.get("eos_token")
        if eos_token is not None and (eos_id := backend.token_to_id(eos_token)) is not None:
            eos_token_ids.add(eos_id)
        return cls(backend, special_tokens, templates, eos_token_ids, source=str(directory))

    # ---- ids -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        bos = self.special_tokens.get("bos_token")
        return None if bos is None else self.backend.token_to_id(bos)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; `add_special_tokens` applies the post-processor (e.g. BOS)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat ----------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get(DEFAULT_TEMPLATE)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render a conversation as transformers' `apply_chat_template(tokenize=False)` does.

        Extra keyword arguments become template variables (e.g. `enable_thinking=False`) and
        override the special tokens of the same name."""
        if not messages:
            raise InvalidRequestError("cannot apply the chat template to an empty conversation")
        if tools is not None and not all(isinstance(tool, dict) for tool in tools):
            raise InvalidRequestError("tools must be JSON-schema dicts")
        template = _compile_template(self._template_source(tools))
        variables = {**self.special_tokens, **template_kwargs}
        try:
            return template.render(
                messages=[_template_message(message) for message in messages],
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except (jinja2.TemplateError, TypeError, ValueError) as err:
            raise InvalidRequestError(
                f"the chat template of {self.source} rejected the conversation: {_one_line(err)}"
            ) from err

    def _template_source(self, tools: list[dict[str, Any]] | None) -> str:
        # transformers' get_chat_template: a "tool_use" template wins when tools are given.
        if tools and TOOL_USE_TEMPLATE in self.chat_templates:
            return self.chat_templates[TOOL_USE_TEMPLATE]
        if DEFAULT_TEMPLATE in self.chat_templates:
            return self.chat_templates[DEFAULT_TEMPLATE]
        if self.chat_templates:
            raise ModelFormatError(
                f"{self.source}: the chat templates {sorted(self.chat_templates)} include no "
                f"'{DEFAULT_TEMPLATE}'; rename the one to use to '{DEFAULT_TEMPLATE}'"
            )
        raise ModelFormatError(
            f"{self.source}: no chat template (tokenizer_config.json has no chat_template and "
            "there is no chat_template.jinja); pass a raw prompt instead, or add the model's "
            "template as chat_template.jinja"
        )


class StreamDecoder:
    """Incremental detokenisation: `push` each generated id, get the new text.

    Keeps two offsets into the ids (vLLM/TGI): text is decoded from `prefix_offset`, so tokens
    whose rendering depends on their left neighbour (SentencePiece's leading space) decode as in
    the full text, and the part beyond the already emitted prefix is released only when it does
    not end in U+FFFD, i.e. inside a UTF-8 character split across byte-level tokens."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (often "", never half a character)."""
        self.ids.append(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """The text still held back at the end of the stream (a dangling partial character
        comes out as U+FFFD, as `decode` renders it)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        decode = self.tokenizer.decode
        skip = self.skip_special_tokens
        prefix_text = decode(self.ids[self.prefix_offset : self.read_offset], skip)
        new_text = decode(self.ids[self.prefix_offset :], skip)
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :]


# ---- chat templates: the jinja environment of transformers' chat_template_utils ------------


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in some
    templates; rendering keeps the body as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render_body(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Unlike jinja's own tojson: no HTML escaping, and non-ASCII stays as is.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=1)
def _template_environment() -> ImmutableSandboxedEnvironment:
    # Chat templates come with downloaded checkpoints: untrusted code, hence the sandbox.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    try:
        return _template_environment().from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ModelFormatError(
            f"the chat template is not valid Jinja (line {err.lineno}: {_one_line(err)}); "
            "fix chat_template in tokenizer_config.json or chat_template.jinja"
        ) from err


def _template_message(message: Any) -> dict[str, Any]:
    # As transformers: keys set to None are dropped (OpenAI clients send content=None with
    # tool calls) and reasoning is visible under every name templates read it by.
    if not isinstance(message, Mapping):
        raise InvalidRequestError(f"chat messages must be dicts, got {message!r}")
    message = {key: value for key, value in message.items() if value is not None}
    reasoning = next((message[key] for key in REASONING_FIELDS if key in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


# ---- reading the config files ----------------------------------------------------------------


def _read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFormatError(f"{path}: not valid JSON ({_one_line(err)})") from err
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    # Special tokens are saved as strings or as AddedToken dicts {"content": ..., "lstrip": ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(config: dict[str, Any], directory: Path) -> dict[str, str]:
    values = {role: config.get(role) for role in SPECIAL_TOKEN_ROLES}
    # transformers reads the legacy special_tokens_map.json only when tokenizer_config.json has
    # no added_tokens_decoder, and then lets it override.
    if "added_tokens_decoder" not in config:
        legacy = _read_json_object(directory / "special_tokens_map.json")
        values.update({role: legacy[role] for role in SPECIAL_TOKEN_ROLES if role in legacy})
    tokens = {role: _token_content(value) for role, value in values.items()}
    return {role: token for role, token in tokens.items() if token is not None}


def _named_templates(value: Any, origin: Path) -> dict[str, str]:
    # A chat_template is one string, or a list of {"name", "template"} (several templates).
    if value is None:
        return {}
    if isinstance(value, str):
        return {DEFAULT_TEMPLATE: value}
    if isinstance(value, list) and all(
        isinstance(item, dict) and isinstance(item.get("name"), str) and "template" in item
        for item in value
    ):
        return {item["name"]: item["template"] for item in value}
    raise ModelFormatError(
        f"{origin}: chat_template must be a string or a list of {{name, template}} objects"
    )


def _chat_templates(config: dict[str, Any], directory: Path) -> dict[str, str]:
    # Newer transformers saves templates as files, which replace the tokenizer_config.json ones:
    # chat_template.jinja (the default) and additional_chat_templates/NAME.jinja; processors
    # saved chat_template.json ({"chat_template": ...}).
    templates = _named_templates(config.get("chat_template"), directory / "tokenizer_config.json")
    json_file = directory / "chat_template.json"
    if json_file.is_file():
        templates = _named_templates(_read_json_object(json_file).get("chat_template"), json_file)
    from_files = {}
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        from_files[DEFAULT_TEMPLATE] = jinja_file.read_text(encoding="utf-8")
    for extra in sorted((directory / "additional_chat_templates").glob("*.jinja")):
        from_files[extra.name.removesuffix(".jinja")] = extra.read_text(encoding="utf-8")
    return from_files or templates


def _eos_ids(path: Path) -> set[int]:
    value = _read_json_object(path).get("eos_token_id")
    values = value if isinstance(value, list) else [value]
    if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in values):
        raise ModelFormatError(
            f"{path}: eos_token_id must be an int or a list of ints, got {value!r}"
        )
    return {v for v in values if v is not None}


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
