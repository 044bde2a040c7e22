"""The tokenizer in GGUF metadata: written from a tokenizer.json and rebuilt from the metadata,
it encodes and decodes as the original does, keeps special tokens, EOS ids and chat templates,
and refuses tokenizers it cannot reproduce."""

from __future__ import annotations

import pytest
from gguf import Keys
from tokenizers import processors

from hetero.demo_tokenizer import CHAT_TEMPLATE, write_demo_tokenizer
from hetero.errors import UnsupportedModelError
from hetero.loading.gguf_tokenizer import gguf_tokenizer_metadata, tokenizer_from_gguf
from hetero.tokenizer import Tokenizer

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
    with pytest.raises(UnsupportedModelError, match="'llama' tokenizer"):
        tokenizer_from_gguf({**metadata, Keys.Tokenizer.MODEL: "llama"}, "x.gguf")
