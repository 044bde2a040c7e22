"""Tokenizer loading, encode/decode against transformers, and streaming detokenisation."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer

from hetero.demo_tokenizer import DEMO_SPECIAL_TOKENS, TRAINING_TEXT, write_demo_tokenizer
from hetero.errors import ModelFormatError
from hetero.tokenizer import StreamDecoder, Tokenizer

TEXTS = [
    "Hello experts! The router picks 8 of 128 experts per token.",
    'Mixture-of-experts on CPU+GPU: 3.14159, 1e-6, {"city": "Paris"}\n\n\tindented',
    "Emoji 🤖🧠👩‍💻 and flags 🇫🇷, CJK 混合专家模型 and 日本語のテキスト, Ünïcödé ß.",
    "<|im_start|>user\nhi<|im_end|>\n<think>\nhmm\n</think>\n\nanswer<|endoftext|>",
    "   leading and trailing spaces   ",
    "",
]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("demo_tokenizer")
    write_demo_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def demo(demo_dir) -> Tokenizer:
    return Tokenizer.from_dir(demo_dir)


@pytest.fixture(scope="module")
def reference(demo_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_dir)


def copy_tokenizer(source: Path, target: Path, **config_changes) -> Path:
    """`source`'s tokenizer files in `target`, with tokenizer_config.json keys changed."""
    target.mkdir(parents=True, exist_ok=True)
    (target / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.update(config_changes)
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


def test_demo_tokenizer_is_byte_identical_across_runs(tmp_path, demo_dir):
    vocab_size = write_demo_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (demo_dir / "tokenizer.json").read_bytes()
    config = tmp_path / "tokenizer_config.json"
    assert config.read_bytes() == (demo_dir / "tokenizer_config.json").read_bytes()
    assert vocab_size == Tokenizer.from_dir(tmp_path).vocab_size
    assert 1500 <= vocab_size <= 2100


def test_demo_tokenizer_has_chatml_special_tokens(demo):
    ids = [demo.token_to_id(token) for token in DEMO_SPECIAL_TOKENS]
    assert None not in ids
    assert all(id_ < demo.vocab_size for id_ in ids)
    assert demo.encode("<|im_start|><think>") == [ids[1], ids[3]]
    assert demo.eos_token_ids == {demo.token_to_id("<|im_end|>")}
    assert demo.bos_token_id is None
    # Control tokens vanish from decoded text; reasoning tags stay, so reasoning can be parsed.
    assert demo.decode(demo.encode("<|im_start|>hi<think>x</think><|im_end|>")) == (
        "hi<think>x</think>"
    )


def test_demo_tokenizer_learned_words_from_its_corpus(demo):
    assert len(demo.encode(" experts")) == 1
    assert len(demo.encode(TRAINING_TEXT)) < len(TRAINING_TEXT.encode()) / 3


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trips(demo, text):
    assert demo.decode(demo.encode(text), skip_special_tokens=False) == text


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_encode_and_decode_match_transformers(demo, reference, text, add_special_tokens):
    ids = demo.encode(text, add_special_tokens=add_special_tokens)
    assert ids == reference(text, add_special_tokens=add_special_tokens)["input_ids"]
    for skip in (False, True):
        assert demo.decode(ids, skip_special_tokens=skip) == reference.decode(
            ids, skip_special_tokens=skip
        )


def test_missing_tokenizer_json_is_a_model_format_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ModelFormatError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_malformed_tokenizer_config_is_a_model_format_error(tmp_path, demo_dir):
    copy_tokenizer(demo_dir, tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer.from_dir(tmp_path)


def test_eos_ids_gather_tokenizer_generation_config_and_config(tmp_path, demo_dir, demo):
    copy_tokenizer(demo_dir, tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 11}))
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == {7, 9, 11, demo.token_to_id("<|im_end|>")}


def test_special_tokens_may_be_added_token_dicts(tmp_path, demo_dir, demo):
    added_token = {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False}
    copy_tokenizer(demo_dir, tmp_path, bos_token=added_token, eos_token={"content": "<|im_end|>"})
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.bos_token_id == demo.token_to_id("<|endoftext|>")
    assert tokenizer.eos_token_ids == {demo.token_to_id("<|im_end|>")}


def test_bos_comes_from_the_tokenizer_json_post_processor_like_transformers(tmp_path, demo_dir):
    from transformers import AutoTokenizer

    # transformers 5 ignores add_bos_token when tokenizer.json exists: its post-processor rules.
    copy_tokenizer(demo_dir, tmp_path, bos_token="<|endoftext|>", add_bos_token=True)
    assert (
        Tokenizer.from_dir(tmp_path).encode("Hi", add_special_tokens=True)
        == (AutoTokenizer.from_pretrained(tmp_path)("Hi")["input_ids"])
    )
    backend = BackendTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    bos_id = backend.token_to_id("<|endoftext|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos_id)]
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    tokenizer = Tokenizer.from_dir(tmp_path)
    ids = tokenizer.encode("Hello experts", add_special_tokens=True)
    assert ids == [bos_id, *tokenizer.encode("Hello experts")]
    assert ids == AutoTokenizer.from_pretrained(tmp_path)("Hello experts")["input_ids"]


def test_template_list_uses_default_and_template_files_override_config(tmp_path, demo_dir):
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]
    copy_tokenizer(demo_dir, tmp_path, chat_template=named)
    assert Tokenizer.from_dir(tmp_path).chat_template == "plain"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from json"}))
    assert Tokenizer.from_dir(tmp_path).chat_template == "from json"
    (tmp_path / "chat_template.jinja").write_text("from jinja")
    assert Tokenizer.from_dir(tmp_path).chat_template == "from jinja"


def test_no_chat_template_is_none(tmp_path, demo_dir):
    copy_tokenizer(demo_dir, tmp_path, chat_template=None)
    assert Tokenizer.from_dir(tmp_path).chat_template is None


def stream_decode(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = True):
    decoder = StreamDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
    deltas = [decoder.push(token_id) for token_id in ids]
    return deltas, decoder.flush()


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_stream_decoder_deltas_join_to_decode_of_random_ids(demo, seed, skip_special_tokens):
    # Random ids are mostly invalid UTF-8 when joined: the hardest case for holding back text.
    rng = random.Random(seed)
    ids = [rng.randrange(demo.vocab_size) for _ in range(rng.randrange(1, 80))]
    deltas, tail = stream_decode(demo, ids, skip_special_tokens)
    assert "".join(deltas) + tail == demo.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_deltas_join_to_decode_without_partial_characters(demo, text):
    ids = demo.encode(text)
    deltas, tail = stream_decode(demo, ids, skip_special_tokens=False)
    assert "".join(deltas) + tail == text
    assert not any("\ufffd" in delta for delta in deltas)


def test_stream_decoder_holds_a_split_emoji_until_it_is_complete(demo):
    ids = demo.encode("🤖")
    assert len(ids) == 4  # one byte-level token per UTF-8 byte: not in the demo's merges
    deltas, tail = stream_decode(demo, ids)
    assert deltas == ["", "", "", "🤖"]
    assert tail == ""


def test_stream_decoder_flush_renders_a_dangling_partial_character(demo):
    ids = demo.encode("ok 🤖")[:-1]
    deltas, tail = stream_decode(demo, ids)
    assert "".join(deltas) == "ok "
    assert tail == "\ufffd"
    assert "".join(deltas) + tail == demo.decode(ids)


def metaspace_tokenizer() -> Tokenizer:
    """A SentencePiece-style BPE (▁ for spaces, stripped at the start of decoded text)."""
    backend = BackendTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([])
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", *byte_tokens], show_progress=False
    )
    backend.train_from_iterator(TRAINING_TEXT.splitlines(), trainer=trainer)
    return Tokenizer(backend)


def test_stream_decoder_keeps_sentencepiece_word_spaces():
    tokenizer = metaspace_tokenizer()
    text = "The router picks experts for every token 🤖 混合"
    ids = tokenizer.encode(text)
    # The byte-fallback tokens are added tokens here, hence skip_special_tokens=False.
    deltas, tail = stream_decode(tokenizer, ids, skip_special_tokens=False)
    # Each window decodes from the previous token, so "▁picks" keeps its space mid-text.
    assert "".join(deltas) + tail == tokenizer.decode(ids, skip_special_tokens=False) == text
