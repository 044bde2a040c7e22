"""The tokenizer in GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`): rebuilt as a
`tokenizers` BPE for reading (llama.cpp's "gpt2" byte-level model, or its "llama" SentencePiece
model with merges ranked by score), and extracted from a tokenizer.json-backed `Tokenizer` for
writing (byte-level only)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gguf import Keys, TokenType
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from hetero.errors import ModelFormatError, UnsupportedModelError
from hetero.tokenizer import DEFAULT_TEMPLATE, Tokenizer


@dataclass(frozen=True)
class PreTokenizer:
    """A `tokenizer.ggml.pre` value: the Split regexes of the original tokenizer.json (applied
    in order before the byte-level mapping), its normaliser, and llama.cpp's ignore_merges."""

    splits: tuple[str, ...]
    nfc: bool = False
    ignore_merges: bool = False


_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK_V3 = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_DEEPSEEK_LLM = (
    r"[\r\n]",
    r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}+",
)
# GPT-2's own split, which the byte-level pre-tokenizer applies when use_regex is on
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "qwen2": PreTokenizer((_QWEN2,), nfc=True),
    "deepseek-r1-qwen": PreTokenizer((_QWEN2,), nfc=True),
    "llama-bpe": PreTokenizer((_LLAMA3,), ignore_merges=True),
    "llama3": PreTokenizer((_LLAMA3,), ignore_merges=True),
    "deepseek-v3": PreTokenizer(_DEEPSEEK_V3),
    "deepseek-llm": PreTokenizer(_DEEPSEEK_LLM),
    "gpt-2": PreTokenizer((_GPT2,)),
    "default": PreTokenizer((_GPT2,)),
}

SPACE_PIECE = "\u2581"  # SentencePiece's "▁", which stands for a space in its pieces

# tokens llama.cpp treats as end of generation whatever eos_token_id says (llama-vocab.cpp)
END_OF_GENERATION_TOKENS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "<|end_of_text|>",
    "<｜end▁of▁sentence｜>",
)
ROLE_IDS = {
    "bos_token": Keys.Tokenizer.BOS_ID,
    "eos_token": Keys.Tokenizer.EOS_ID,
    "unk_token": Keys.Tokenizer.UNK_ID,
    "pad_token": Keys.Tokenizer.PAD_ID,
}


def tokenizer_from_gguf(metadata: dict[str, Any], source: str) -> Tokenizer:
    """The `Tokenizer` a GGUF file describes: encodes as the tokenizer it was made from, and
    as llama.cpp does."""
    model = metadata.get(Keys.Tokenizer.MODEL)
    tokens = metadata.get(Keys.Tokenizer.LIST)
    if model is None or tokens is None:
        raise ModelFormatError(
            f"{source} has no tokenizer (tokenizer.ggml.model / tokens); hetero needs one to "
            "turn text into ids"
        )
    if (hf_json := metadata.get(Keys.Tokenizer.HF_JSON)) is not None:
        backend = BackendTokenizer.from_str(hf_json)
    elif model == "gpt2":
        backend = _byte_level_bpe(metadata, tokens, source)
    elif model == "llama":
        backend = _sentencepiece_bpe(metadata, tokens, source)
    else:
        raise UnsupportedModelError(
            f"{source} has a {model!r} tokenizer; hetero reads the GGUF tokenizers 'gpt2' "
            "(byte-level BPE) and 'llama' (SentencePiece BPE)"
        )
    special = {
        role: tokens[token_id]
        for role, key in ROLE_IDS.items()
        if (token_id := metadata.get(key)) is not None and 0 <= token_id < len(tokens)
    }
    types = _token_types(metadata, tokens)
    eos_ids = {
        int(metadata[key])
        for key in (Keys.Tokenizer.EOS_ID, Keys.Tokenizer.EOT_ID, Keys.Tokenizer.EOM_ID)
        if metadata.get(key) is not None
    }
    eos_ids |= {
        i
        for i, (token, kind) in enumerate(zip(tokens, types, strict=True))
        if kind == TokenType.CONTROL and token in END_OF_GENERATION_TOKENS
    }
    return Tokenizer(backend, special, chat_templates(metadata), eos_ids, source=source)


def _byte_level_bpe(metadata: dict[str, Any], tokens: list[str], source: str) -> BackendTokenizer:
    pre_name = metadata.get(Keys.Tokenizer.PRE) or "default"
    if pre_name not in PRE_TOKENIZERS:
        raise UnsupportedModelError(
            f"{source} uses the pre-tokenizer {pre_name!r}; hetero knows "
            f"{', '.join(sorted(PRE_TOKENIZERS))}"
        )
    pre = PRE_TOKENIZERS[pre_name]
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get(Keys.Tokenizer.MERGES) or []]
    backend = BackendTokenizer(
        models.BPE(_vocab(tokens, source), merges, ignore_merges=pre.ignore_merges, fuse_unk=False)
    )
    if pre.nfc:
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in pre.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    _add_tokens(backend, tokens, _token_types(metadata, tokens))
    add_bos = bool(metadata.get(Keys.Tokenizer.ADD_BOS))
    post = _post_processor(metadata, tokens, add_bos)
    backend.post_processor = post or processors.ByteLevel(trim_offsets=False)
    return backend


def _sentencepiece_bpe(
    metadata: dict[str, Any], tokens: list[str], source: str
) -> BackendTokenizer:
    """llama.cpp's "llama" vocabulary (SentencePiece BPE: Llama 2, Mistral, Mixtral). Spaces are
    "▁", and one is prefixed to the text and to each run after a special token, as llama.cpp
    and the models' own tokenizer.json do; characters outside the vocabulary fall back to the
    <0xXX> byte tokens."""
    scores = metadata.get(Keys.Tokenizer.SCORES)
    if scores is None or len(scores) != len(tokens):
        raise ModelFormatError(
            f"{source}: its 'llama' (SentencePiece) tokenizer needs tokenizer.ggml.scores, one "
            "per token, to rank merges; the file is incomplete, convert the model again"
        )
    types = _token_types(metadata, tokens)
    unk_id = metadata.get(Keys.Tokenizer.UNK_ID)
    backend = BackendTokenizer(
        models.BPE(
            _vocab(tokens, source),
            _merges_by_score(tokens, scores, types),
            unk_token=tokens[unk_id] if unk_id is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    space_prefix = bool(metadata.get(Keys.Tokenizer.ADD_PREFIX, True))
    spaces = normalizers.Replace(" ", SPACE_PIECE)
    steps = [decoders.Replace(SPACE_PIECE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        spaces = normalizers.Sequence([normalizers.Prepend(SPACE_PIECE), spaces])
        steps.append(decoders.Strip(" ", 1, 0))
    backend.normalizer = spaces
    backend.decoder = decoders.Sequence(steps)
    _add_tokens(backend, tokens, types)
    # llama.cpp adds BOS to SentencePiece text unless the file says not to
    add_bos = bool(metadata.get(Keys.Tokenizer.ADD_BOS, True))
    if post := _post_processor(metadata, tokens, add_bos):
        backend.post_processor = post
    return backend


def _merges_by_score(
    tokens: list[str], scores: list[float], types: list[int]
) -> list[tuple[str, str]]:
    """SentencePiece BPE joins the adjacent pair whose joined piece scores highest. As ranked
    merges: every split of a normal token into two normal tokens, the best-scoring token's
    first (ties by id)."""
    normal = {token for token, kind in zip(tokens, types, strict=True) if kind == TokenType.NORMAL}
    ranked = sorted(
        (-score, i, token[:cut], token[cut:])
        for i, (token, score) in enumerate(zip(tokens, scores, strict=True))
        if token in normal
        for cut in range(1, len(token))
        if token[:cut] in normal and token[cut:] in normal
    )
    return [(left, right) for *_, left, right in ranked]


def _token_types(metadata: dict[str, Any], tokens: list[str]) -> list[int]:
    return metadata.get(Keys.Tokenizer.TOKEN_TYPE) or [TokenType.NORMAL] * len(tokens)


def _vocab(tokens: list[str], source: str) -> dict[str, int]:
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ModelFormatError(f"{source}: tokenizer.ggml.tokens has duplicate tokens")
    return vocab


def _add_tokens(backend: BackendTokenizer, tokens: list[str], types: list[int]) -> None:
    # Matched in the raw text before the model sees it, as llama.cpp partitions text: control
    # and unknown tokens are special (skipped by decode), user-defined ones are not.
    special = (TokenType.CONTROL, TokenType.UNKNOWN)
    backend.add_special_tokens(
        [
            AddedToken(tokens[i], normalized=False, special=True)
            for i, kind in enumerate(types)
            if kind in special
        ]
    )
    backend.add_tokens(
        [
            AddedToken(tokens[i], normalized=False, special=False)
            for i, kind in enumerate(types)
            if kind == TokenType.USER_DEFINED
        ]
    )


def _post_processor(
    metadata: dict[str, Any], tokens: list[str], add_bos: bool
) -> processors.TemplateProcessing | None:
    bos, eos = metadata.get(Keys.Tokenizer.BOS_ID), metadata.get(Keys.Tokenizer.EOS_ID)
    add_bos = add_bos and bos is not None
    add_eos = bool(metadata.get(Keys.Tokenizer.ADD_EOS)) and eos is not None
    if not (add_bos or add_eos):
        return None
    head = [f"{tokens[bos]}:0"] if add_bos else []
    tail = [f"{tokens[eos]}:0"] if add_eos else []
    used = {tokens[i]: i for i in ((bos,) if add_bos else ()) + ((eos,) if add_eos else ())}
    return processors.TemplateProcessing(
        single=[*head, "$A:0", *tail],
        pair=[*head, "$A:0", *tail, *head, "$B:1", *tail],
        special_tokens=list(used.items()),
    )


def chat_templates(metadata: dict[str, Any]) -> dict[str, str]:
    templates = {}
    if (default := metadata.get(Keys.Tokenizer.CHAT_TEMPLATE)) is not None:
        templates[DEFAULT_TEMPLATE] = default
    for name in metadata.get(Keys.Tokenizer.CHAT_TEMPLATES) or []:
        key = Keys.Tokenizer.CHAT_TEMPLATE_N.format(name=name)
        if key in metadata:
            templates[name] = metadata[key]
    return templates


# ---- writing ----------------------------------------------------------------------------------


def gguf_tokenizer_metadata(tokenizer: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """`tokenizer.*` keys for a byte-level BPE tokenizer (what llama.cpp's converter writes),
    with `vocab_size` tokens (ids past the tokenizer's are "[PAD{id}]", unused)."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not _is_byte_level(spec.get("pre_tokenizer")):
        raise UnsupportedModelError(
            f"{tokenizer.source}: only byte-level BPE tokenizers can be written to GGUF so far"
        )
    pre_name = _pre_tokenizer_name(spec)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(TokenType.UNUSED)] * vocab_size
    for token, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = token, int(TokenType.NORMAL)
    for added in spec.get("added_tokens") or []:
        i, content = added["id"], added["content"]
        if i < vocab_size:
            looks_special = content.startswith("<|") and content.endswith("|>")
            control = added.get("special") or looks_special
            tokens[i] = content
            types[i] = int(TokenType.CONTROL if control else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    out: dict[str, Any] = {
        Keys.Tokenizer.MODEL: "gpt2",
        Keys.Tokenizer.PRE: pre_name,
        Keys.Tokenizer.LIST: tokens,
        Keys.Tokenizer.TOKEN_TYPE: types,
        Keys.Tokenizer.MERGES: merges,
    }
    for role, key in ROLE_IDS.items():
        token = tokenizer.special_tokens.get(role)
        if token is not None and (token_id := tokenizer.token_to_id(token)) is not None:
            out[key] = token_id
    probe_plain = tokenizer.encode("a")
    probe = tokenizer.encode("a", add_special_tokens=True)
    out[Keys.Tokenizer.ADD_BOS] = len(probe) > len(probe_plain) and probe[0] != probe_plain[0]
    out[Keys.Tokenizer.ADD_EOS] = len(probe) > len(probe_plain) and probe[-1] != probe_plain[-1]
    templates = dict(tokenizer.chat_templates)
    if DEFAULT_TEMPLATE in templates:
        out[Keys.Tokenizer.CHAT_TEMPLATE] = templates.pop(DEFAULT_TEMPLATE)
    if templates:
        out[Keys.Tokenizer.CHAT_TEMPLATES] = sorted(templates)
        for name, template in templates.items():
            out[Keys.Tokenizer.CHAT_TEMPLATE_N.format(name=name)] = template
    return out


def _is_byte_level(pre: dict[str, Any] | None) -> bool:
    parts = (pre or {}).get("pretokenizers") or [pre or {}]
    return any(p.get("type") == "ByteLevel" for p in parts)


def _pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """The `tokenizer.ggml.pre` name whose splits equal those of a tokenizer.json."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers") or [pre]
    splits = tuple(p["pattern"]["Regex"] for p in parts if p.get("type") == "Split")
    if not splits and any(p.get("type") == "ByteLevel" and p.get("use_regex") for p in parts):
        return "gpt-2"
    for name, known in PRE_TOKENIZERS.items():
        if known.splits == splits:
            return name
    raise UnsupportedModelError(
        f"the tokenizer's pre-tokenizer splits {splits!r} match none that llama.cpp knows "
        f"({', '.join(PRE_TOKENIZERS)}); it cannot be written to GGUF faithfully"
    )
