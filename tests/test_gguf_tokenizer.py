"""The tokenizer in GGUF metadata: written from a tokenizer.json and rebuilt from the metadata,
it encodes and decodes as the original does, keeps special tokens, EOS ids and chat templates,
and refuses tokenizers it cannot reproduce. SentencePiece ("llama") vocabularies, read from a
GGUF file, encode and decode as llama.cpp's SentencePiece tokenizer (a plain reference here)."""

from __future__ import annotations

import json
import random
import re

import gguf
import pytest
from gguf import Keys, TokenType
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers, processors, trainers

from hetero.demo_tokenizer import CHAT_TEMPLATE, write_demo_tokenizer
from hetero.errors import ModelFormatError, UnsupportedModelError
from hetero.loading.gguf_checkpoint import read_gguf
from hetero.loading.gguf_tokenizer import gguf_tokenizer_metadata, tokenizer_from_gguf
from hetero.tokenizer import StreamDecoder, Tokenizer

TEXTS = [
    "The router decides which experts each token needs.",
    "  leading spaces, trailing  \n\n\tand tabs\r\n",
    "digits 1234567 3.14159 1e-6, punctuation!?... (brackets) {json: [1, 2]}",
    "héllo wörld — naïve café, 日本語のテキスト, 한국어, emoji 😀👍🏽",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\nok\n</think>\n\nyes",
    "don't won't it's I'M we'LL",
    "",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    write_demo_tokenizer(directory)
    return directory


@pytest.fixture
def original(tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


def roundtrip(tokenizer: Tokenizer, vocab_size: int | None = None) -> Tokenizer:
    metadata = gguf_tokenizer_metadata(tokenizer, vocab_size or tokenizer.vocab_size)
    return tokenizer_from_gguf(metadata, "test.gguf")


def test_gguf_tokenizer_encodes_like_tokenizer_json(original):
    rebuilt = roundtrip(original)
    for text in TEXTS:
        ids = original.encode(text)
        assert rebuilt.encode(text) == ids, text
        assert rebuilt.encode(text, add_special_tokens=True) == original.encode(
            text, add_special_tokens=True
        )
        assert rebuilt.decode(ids) == original.decode(ids)
        assert rebuilt.decode(ids, skip_special_tokens=False) == original.decode(ids, False)


def test_special_tokens_eos_and_chat_template_survive(original):
    rebuilt = roundtrip(original)
    assert rebuilt.special_tokens["eos_token"] == "<|im_end|>"
    assert rebuilt.special_tokens["pad_token"] == "<|endoftext|>"
    # eos_token_id, plus the end-of-generation tokens llama.cpp recognises by name
    assert rebuilt.eos_token_ids == {
        original.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")
    }
    assert rebuilt.chat_template == CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert rebuilt.apply_chat_template(messages) == original.apply_chat_template(messages)
    assert rebuilt.apply_chat_template(messages, enable_thinking=False).endswith("</think>\n\n")


def test_bos_post_processor_and_padded_vocab_survive(original):
    bos = "<|endoftext|>"
    original.backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, original.token_to_id(bos))]
    )
    original.special_tokens["bos_token"] = bos
    metadata = gguf_tokenizer_metadata(original, original.vocab_size + 11)
    assert metadata[Keys.Tokenizer.ADD_BOS] is True
    assert metadata[Keys.Tokenizer.LIST][-1] == f"[PAD{original.vocab_size + 10}]"
    rebuilt = tokenizer_from_gguf(metadata, "test.gguf")
    assert rebuilt.bos_token_id == original.token_to_id(bos)
    for text in TEXTS:
        assert rebuilt.encode(text, add_special_tokens=True) == original.encode(
            text, add_special_tokens=True
        )


def test_unreadable_tokenizers_are_refused(original):
    metadata = gguf_tokenizer_metadata(original, original.vocab_size)
    with pytest.raises(UnsupportedModelError, match="pre-tokenizer 'mystery'"):
        tokenizer_from_gguf({**metadata, Keys.Tokenizer.PRE: "mystery"}, "x.gguf")
    with pytest.raises(UnsupportedModelError, match="has a 't5' tokenizer; hetero reads"):
        tokenizer_from_gguf({**metadata, Keys.Tokenizer.MODEL: "t5"}, "x.gguf")
    with pytest.raises(ModelFormatError, match="needs tokenizer.ggml.scores"):
        tokenizer_from_gguf({**metadata, Keys.Tokenizer.MODEL: "llama"}, "x.gguf")


# ---- SentencePiece ("llama") vocabularies --------------------------------------------------

SPM_CORPUS = [
    "the router decides which experts each token needs",
    "hello world, hello there; the quick brown fox jumps over the lazy dog",
    "tokens flow through the layers of the model and the experts",
    "Numbers: 12 345 6789 and punctuation! (brackets) [INST]",
] * 4
CONTROL = ["[INST]", "[/INST]"]
USER_DEFINED = ["<sep>"]
SPECIAL_TYPES = (TokenType.UNKNOWN, TokenType.CONTROL)  # matched in text, skipped by decode
ADDED_TYPES = (*SPECIAL_TYPES, TokenType.USER_DEFINED)  # matched in text
UNICODE_TEXT = "héllo wörld — naïve café, 日本語, emoji 😀👍🏽"
SPM_TEXTS = [
    "the router decides which experts each token needs",
    "Hello World",
    "thexperts routhere herouter Theexpertsrouterlayers",  # pieces compete: scores decide
    " one leading space",
    "   three leading spaces, two trailing  ",
    "line one\nline two\n\n\ttabbed\r\n",
    UNICODE_TEXT,
    "digits 1234567 3.14159",
    "[INST] what are experts? [/INST] They route tokens.</s>",
    "[INST][/INST]",
    "before<sep>after <sep> spaced",
    "a \u2581 literal metaspace",
    " ",
    "",
]


def sentencepiece_vocab() -> tuple[list[str], list[float], list[int]]:
    """A vocabulary shaped like Llama 2's (tokens, scores, types): <unk>, <s>, </s>, the 256
    byte tokens, BPE pieces learned from SPM_CORPUS best first (score -rank, as SentencePiece
    writes them; shuffled), the corpus's characters, then added control and user-defined tokens."""
    learner = BackendTokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace()
    learner.train_from_iterator(
        SPM_CORPUS, trainers.BpeTrainer(vocab_size=160, show_progress=False)
    )
    learned = json.loads(learner.to_str())["model"]
    pieces = list(dict.fromkeys(left + right for left, right in learned["merges"]))
    pieces += sorted(token for token in learned["vocab"] if len(token) == 1)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    scores = [0.0] * len(tokens)
    # stored out of score order, so that only the scores can rank the merges
    ranked = [(piece, -float(rank)) for rank, piece in enumerate(pieces)]
    random.Random(0).shuffle(ranked)
    tokens += [piece for piece, _ in ranked] + CONTROL + USER_DEFINED
    scores += [score for _, score in ranked] + [0.0] * 3
    types += [TokenType.NORMAL] * len(pieces) + [TokenType.CONTROL] * 2 + [TokenType.USER_DEFINED]
    return tokens, scores, [int(kind) for kind in types]


def spm_reference_encode(text: str, tokens, scores, types, space_prefix: bool) -> list[int]:
    """llama.cpp's llm_tokenizer_spm: split out the added tokens; prefix a space to each run
    of text at the start or after one; join the adjacent pair whose joined piece is a token of
    the highest score (leftmost on ties) until none is; spell pieces not in the vocabulary as
    byte tokens."""
    ids = {token: i for i, token in enumerate(tokens)}
    rows = zip(tokens, scores, types, strict=True)
    score = {token: s for token, s, kind in rows if kind == TokenType.NORMAL}
    added = [t for t, kind in zip(tokens, types, strict=True) if kind in ADDED_TYPES]
    pattern = "(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")"
    out, after_added = [], True
    for part in re.split(pattern, text):
        if part in added:
            out.append(ids[part])
            after_added = True
            continue
        if not part:
            continue
        symbols = list(((" " if space_prefix and after_added else "") + part).replace(" ", "▁"))
        after_added = False
        while True:
            pairs = [
                (score[joined], -i)
                for i in range(len(symbols) - 1)
                if (joined := symbols[i] + symbols[i + 1]) in score
            ]
            if not pairs:
                break
            i = -max(pairs)[1]
            symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
        for symbol in symbols:
            if symbol in ids:
                out.append(ids[symbol])
            else:
                out.extend(ids[f"<0x{b:02X}>"] for b in symbol.encode())
    return out


def spm_reference_decode(ids, tokens, types, space_prefix: bool, skip_special: bool) -> str:
    """llama.cpp's detokenize: pieces with "▁" as a space, byte tokens as their byte, control
    tokens dropped when skipping specials, then one leading space removed."""
    data = b""
    for i in ids:
        if types[i] == TokenType.BYTE:
            data += bytes([int(tokens[i][3:5], 16)])
        elif not (skip_special and types[i] in SPECIAL_TYPES):
            data += tokens[i].replace("▁", " ").encode()
    text = data.decode(errors="replace")
    return text[1:] if space_prefix and text.startswith(" ") else text


def write_spm_gguf(path, tokens, scores, types, **extra) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for key, value in extra.items():
        getattr(writer, f"add_{key}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()


@pytest.mark.parametrize("space_prefix", [True, False])
def test_sentencepiece_gguf_encodes_and_decodes_as_llama_cpp(tmp_path, space_prefix):
    tokens, scores, types = sentencepiece_vocab()
    path = tmp_path / "spm.gguf"
    extra = {} if space_prefix else {"add_space_prefix": False}
    write_spm_gguf(path, tokens, scores, types, **extra)
    metadata, _ = read_gguf(path)
    tokenizer = tokenizer_from_gguf(metadata, str(path))
    for text in SPM_TEXTS:
        expected = spm_reference_encode(text, tokens, scores, types, space_prefix)
        ids = tokenizer.encode(text)
        assert ids == expected, (text, [tokens[i] for i in ids], [tokens[i] for i in expected])
        for skip in (True, False):
            assert tokenizer.decode(ids, skip) == spm_reference_decode(
                ids, tokens, types, space_prefix, skip
            ), text
        if not any(t in text for t in ["▁", *CONTROL, *USER_DEFINED]):
            assert tokenizer.decode(ids) == text
    # the text exercises multi-token pieces, byte fallback and the added tokens
    used = {tokens[i] for text in SPM_TEXTS for i in tokenizer.encode(text)}
    assert {"<0x0A>", "<0xF0>", "[INST]", "<sep>"} <= used
    assert any(len(token) > 3 and types[tokens.index(token)] == TokenType.NORMAL for token in used)


def test_sentencepiece_gguf_adds_bos_streams_and_keeps_special_tokens(tmp_path):
    tokens, scores, types = sentencepiece_vocab()
    path = tmp_path / "spm.gguf"
    template = "[INST] {{ messages[0]['content'] }} [/INST]"
    write_spm_gguf(path, tokens, scores, types, chat_template=template)
    metadata, _ = read_gguf(path)
    tokenizer = tokenizer_from_gguf(metadata, str(path))
    assert tokenizer.chat_template == template
    text = UNICODE_TEXT
    ids = tokenizer.encode(text)
    # llama.cpp adds BOS to SentencePiece text when the file does not say (add_bos_token)
    assert tokenizer.encode(text, add_special_tokens=True) == [1, *ids]
    assert tokenizer.special_tokens == {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    assert tokenizer.eos_token_ids == {2}
    stream = StreamDecoder(tokenizer)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == text
    no_bos = tokenizer_from_gguf({**metadata, Keys.Tokenizer.ADD_BOS: False}, str(path))
    assert no_bos.encode(text, add_special_tokens=True) == ids
