"""Generation on the demo model: stopping (EOS, stop strings, length, context end), streaming,
seeded sampling, and the prompt checks."""

from __future__ import annotations

import pytest

import hetero
from hetero.demo import write_demo
from hetero.runtime.stopping import StopStrings


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return hetero.load(write_demo(tmp_path_factory.mktemp("demo")), progress=False)


def test_streamed_text_equals_result_text(demo):
    pieces: list[str] = []
    result = demo.generate("Experts run on the CPU", max_new_tokens=24, on_text=pieces.append)
    assert "".join(pieces) == result.text
    assert result.text == demo.tokenizer.decode(result.token_ids)
    assert len(result.token_ids) == 24 and result.finish_reason == "length"
    assert result.prefill_tok_s > 0 and result.decode_tok_s > 0


def test_eos_token_stops_generation_and_is_not_returned(demo):
    first = demo.generate("hello", max_new_tokens=3).token_ids
    demo.tokenizer.eos_token_ids.add(first[1])
    try:
        result = demo.generate("hello", max_new_tokens=10)
    finally:
        demo.tokenizer.eos_token_ids.discard(first[1])
    assert result.token_ids == first[:1]
    assert result.finish_reason == "stop"


def test_stop_string_cuts_the_text_before_it(demo):
    full = demo.generate("the runtime", max_new_tokens=30)
    stop = full.text[10:14]
    assert stop and full.text.find(stop) == 10
    pieces: list[str] = []
    result = demo.generate("the runtime", max_new_tokens=30, stop=[stop], on_text=pieces.append)
    assert result.finish_reason == "stop" and result.stop_string == stop
    assert result.text == full.text[:10]
    assert "".join(pieces) == result.text


def test_same_seed_gives_the_same_sample(demo):
    a = demo.generate("x", max_new_tokens=16, temperature=1.0, seed=3)
    b = demo.generate("x", max_new_tokens=16, temperature=1.0, seed=3)
    c = demo.generate("x", max_new_tokens=16, temperature=1.0, seed=4)
    assert a.token_ids == b.token_ids != c.token_ids


def test_generation_ends_at_the_context_window(demo, monkeypatch):
    monkeypatch.setattr(type(demo.config), "context_limit", property(lambda self: 20))
    result = demo.generate(list(range(5, 15)), max_new_tokens=100)
    assert len(result.token_ids) == 10 and result.finish_reason == "length"


def test_prompt_longer_than_context_is_refused(demo):
    too_long = [5] * demo.config.max_position_embeddings
    with pytest.raises(hetero.PromptTooLongError, match="max_position_embeddings"):
        demo.generate(too_long, max_new_tokens=1)
    with pytest.raises(hetero.PromptTooLongError):
        demo.logits(too_long)


def test_bad_prompts_are_refused(demo):
    with pytest.raises(hetero.InvalidRequestError, match="empty"):
        demo.generate([], max_new_tokens=1)
    with pytest.raises(hetero.InvalidRequestError, match="vocabulary"):
        demo.generate([demo.config.vocab_size + 5], max_new_tokens=1)
    with pytest.raises(hetero.InvalidRequestError, match="max_new_tokens"):
        demo.generate("hi", max_new_tokens=-1)


def test_chat_prompt_uses_the_template(demo):
    ids = demo.encode_chat([{"role": "user", "content": "hi"}])
    text = demo.tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>user\nhi<|im_end|>") and text.endswith("assistant\n")


@pytest.mark.parametrize("cuts", [[1], [3, 5], [2, 4, 6, 9]])
def test_stop_strings_hold_back_partial_matches(cuts):
    text = "abcSTOPdef"
    chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    stops = StopStrings(["STOP", "xyz"])
    emitted = ""
    for chunk in chunks:
        emitted += stops.push(chunk)
        assert "S" not in emitted
        if stops.matched:
            break
    assert emitted == "abc" and stops.matched == "STOP"


def test_stop_strings_release_held_text_at_the_end():
    stops = StopStrings(["STOP"])
    assert stops.push("abcST") == "abc"
    assert stops.flush() == "ST"
