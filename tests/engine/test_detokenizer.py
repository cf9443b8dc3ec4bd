"""IncrementalDetokenizer on a real byte-level BPE tokenizer (the tiny Qwen2 vocabulary)."""

from __future__ import annotations

import random

import pytest

from localvl.engine.detokenizer import IncrementalDetokenizer

REPLACEMENT = "\ufffd"

TEXTS = {
    "english": "Hello, world! How are you doing today?",
    "chinese": "你好，世界。今天天气很好，我们去公园散步吧。",
    "emoji": "😀👍🏽 family: 👨\u200d👩\u200d👧 ok 🎉",
    "mixed": "mixed 中文 and English 😀 — naïve café, 3 × 4 = 12\n\ttabbed",
}


@pytest.fixture(scope="module")
def tok():
    from localvl.models.tiny import build_tokenizer

    return build_tokenizer("tiny")


@pytest.fixture(scope="module")
def im_end(tok):
    return tok.convert_tokens_to_ids("<|im_end|>")


def stream(tok, ids, skip=()):
    detok = IncrementalDetokenizer(tok, skip)
    return [detok.add(i) for i in ids], detok.flush()


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_streamed_text_concatenates_to_the_original(tok, name):
    text = TEXTS[name]
    deltas, tail = stream(tok, tok.encode(text))
    assert "".join(deltas) + tail == text


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_valid_text_is_fully_released_before_flush(tok, name):
    deltas, tail = stream(tok, tok.encode(text := TEXTS[name]))
    assert tail == ""
    assert "".join(deltas) == text


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_deltas_never_hold_a_replacement_character(tok, name):
    deltas, _ = stream(tok, tok.encode(TEXTS[name]))
    assert all(REPLACEMENT not in delta for delta in deltas)


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_empty_delta_only_while_a_character_is_incomplete(tok, name):
    text = TEXTS[name]
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    shown = ""
    for k, token in enumerate(ids):
        delta = detok.add(token)
        shown += delta
        incomplete = tok.decode(ids[: k + 1]).endswith(REPLACEMENT)
        assert (delta == "") == incomplete, (k, delta)
        assert text.startswith(shown)


def test_texts_really_split_characters_across_tokens(tok):
    # Guards the tests above: the vocabulary must actually cut some characters in two.
    ids = tok.encode(TEXTS["emoji"])
    assert any(tok.decode(ids[: k + 1]).endswith(REPLACEMENT) for k in range(len(ids)))


def test_skipped_ids_produce_no_text(tok, im_end):
    detok = IncrementalDetokenizer(tok, skip_token_ids=[im_end])
    assert detok.add(im_end) == ""
    assert detok.flush() == ""


def test_skipped_ids_between_text_tokens_leave_the_text_intact(tok, im_end):
    ids = tok.encode("a 😀 b")
    with_specials = [im_end]
    for token in ids:
        with_specials += [token, im_end]
    deltas, tail = stream(tok, with_specials, skip=[im_end])
    assert "".join(deltas) + tail == "a 😀 b"


def test_special_ids_not_skipped_are_spelled_out(tok, im_end):
    deltas, tail = stream(tok, tok.encode("hi") + [im_end])
    assert "".join(deltas) + tail == "hi<|im_end|>"


def test_truncated_multibyte_character_is_released_by_flush_as_replacement(tok):
    ids = tok.encode("x😀")
    assert tok.decode(ids[:-1]).endswith(REPLACEMENT)  # the last token completes the emoji
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids[:-1]]
    assert "".join(deltas) == "x"
    assert detok.flush() == REPLACEMENT


def test_flush_with_nothing_fed_is_empty(tok):
    assert IncrementalDetokenizer(tok).flush() == ""


def test_flush_twice_releases_nothing_the_second_time(tok):
    detok = IncrementalDetokenizer(tok)
    for token in tok.encode("x😀")[:-1]:
        detok.add(token)
    assert detok.flush() == REPLACEMENT
    assert detok.flush() == ""


@pytest.mark.parametrize("pool", ["bytes", "whole_vocab"])
def test_random_ids_concatenate_to_the_whole_decode(tok, pool):
    # Random ids are mostly invalid UTF-8; byte-level tokens (the first 256 ids) stress that most.
    rng = random.Random(20240611)
    size = 256 if pool == "bytes" else len(tok)
    for _ in range(400):
        ids = [rng.randrange(size) for _ in range(rng.randint(1, 24))]
        deltas, tail = stream(tok, ids)
        assert "".join(deltas) + tail == tok.decode(ids), ids


def test_the_direct_decoder_spells_what_the_tokenizer_does(tok):
    from localvl.engine.detokenizer import decoder

    class Wrapped:  # not a tokenizers-backed class: decoded through its own decode
        def decode(self, ids, **kwargs):
            return tok.decode(ids, **kwargs)

    direct, wrapped = decoder(tok), decoder(Wrapped())
    assert direct.__code__ is not wrapped.__code__  # the tiny tokenizer takes the direct path
    rng = random.Random(7)
    for _ in range(200):  # special tokens included: spelled out, as decode does without skipping
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 12))]
        expected = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert direct(ids) == expected == wrapped(ids)


def test_token_bytes_concatenate_to_the_text(loaded_model):
    from localvl.engine.detokenizer import token_bytes

    tokenizer = loaded_model("qwen2_5_vl").tokenizer
    text = "Héllo, wörld — 你好 ✓ tabs\tand\nnewlines"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(token_bytes(tokenizer, i) for i in ids) == text.encode("utf-8")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert token_bytes(tokenizer, im_end) == b"<|im_end|>"


def test_stray_bytes_on_end_are_released_and_never_decoded_whole_at_every_step(tok):
    # 0x80 alone is a continuation byte with nothing to continue: the text never completes.
    from localvl.models.byte_level import bytes_to_unicode

    stray = tok.convert_tokens_to_ids(bytes_to_unicode()[0x80])
    assert tok.decode([stray]) == REPLACEMENT
    detok = IncrementalDetokenizer(tok)
    decoded = []
    real = detok._decode
    detok._decode = lambda ids: decoded.append(len(ids)) or real(ids)
    released = "".join(detok.add(stray) for _ in range(2000)) + detok.flush()
    assert released == REPLACEMENT * 2000
    assert max(decoded) <= 2 * 16  # before: the whole run, up to 2,000 tokens, at every step
    # a real character split over byte tokens still comes out whole
    ids = tok.encode("a😀b")
    deltas, tail = stream(tok, ids)
    assert "".join(deltas) + tail == "a😀b" and REPLACEMENT not in "".join(deltas)
