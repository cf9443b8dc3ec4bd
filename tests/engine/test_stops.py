"""StopMatcher: stop sequences matched on streamed text, across chunk (token) boundaries."""

from __future__ import annotations

import random

import pytest

from localvl.engine.stops import StopMatcher


def run(stops, chunks):
    """Feed chunks the way the engine does: stop at a match, flush only when nothing matched."""
    matcher = StopMatcher(stops)
    out = ""
    for chunk in chunks:
        out += matcher.feed(chunk)
        if matcher.matched is not None:
            break
    else:
        out += matcher.flush()
    return out, matcher.matched


# ----------------------------------------------------------------------------- no stops


def test_no_stops_passes_text_through_unchanged():
    matcher = StopMatcher([])
    assert matcher.feed("hello ") == "hello "
    assert matcher.feed("wor") == "wor"
    assert matcher.feed("") == ""
    assert matcher.flush() == ""
    assert matcher.matched is None


def test_empty_stop_strings_are_ignored():
    matcher = StopMatcher(["", ""])
    assert matcher.feed("anything at all") == "anything at all"
    assert matcher.matched is None


def test_empty_stop_string_next_to_a_real_one_is_ignored():
    assert run(["", "END"], ["abc", "END", "x"]) == ("abc", "END")


# ----------------------------------------------------------------------------- matching


def test_stop_inside_one_chunk_cuts_the_text_before_it():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("hello STOP world") == "hello "
    assert matcher.matched == "STOP"


def test_stop_at_the_very_start_yields_nothing():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("STOP") == ""
    assert matcher.matched == "STOP"


def test_stop_split_across_chunks_is_matched_and_never_shown():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("hello S") == "hello "
    assert matcher.feed("T") == ""
    assert matcher.feed("O") == ""
    assert matcher.matched is None
    assert matcher.feed("P and more") == ""
    assert matcher.matched == "STOP"


def test_held_text_is_released_once_it_can_no_longer_start_a_stop():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("ST") == ""
    assert matcher.feed("AR") == "STAR"
    assert matcher.matched is None


def test_only_the_part_that_could_start_a_stop_is_held():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("abcSTO") == "abc"


def test_held_prefix_that_restarts_inside_itself_is_handled():
    # "aa" is held; "aaab" contains "aab" starting one character later.
    matcher = StopMatcher(["aab"])
    assert matcher.feed("aa") == ""
    assert matcher.feed("a") == "a"
    assert matcher.feed("b") == ""
    assert matcher.matched == "aab"


def test_earliest_match_wins():
    matcher = StopMatcher(["world", "hello"])
    assert matcher.feed("say hello world") == "say "
    assert matcher.matched == "hello"


def test_longest_match_wins_at_the_same_position():
    matcher = StopMatcher(["ab", "abc"])
    assert matcher.feed("xabcd") == "x"
    assert matcher.matched == "abc"


def test_longest_match_wins_regardless_of_stop_order():
    matcher = StopMatcher(["abc", "ab"])
    assert matcher.feed("xabcd") == "x"
    assert matcher.matched == "abc"


def test_multibyte_and_newline_stops():
    assert run(["\n\n"], ["line one\n", "\nline two"]) == ("line one", "\n\n")
    assert run(["。"], ["你好", "。再见"]) == ("你好", "。")


# ----------------------------------------------------------------------------- flush and after a match


def test_flush_releases_held_text_when_generation_ends_without_a_stop():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("done ST") == "done "
    assert matcher.flush() == "ST"
    assert matcher.matched is None


def test_flush_twice_releases_nothing_the_second_time():
    matcher = StopMatcher(["STOP"])
    matcher.feed("S")
    assert matcher.flush() == "S"
    assert matcher.flush() == ""


def test_flush_after_a_match_releases_nothing():
    matcher = StopMatcher(["STOP"])
    matcher.feed("x STOP")
    assert matcher.flush() == ""


def test_feed_after_a_match_yields_nothing():
    matcher = StopMatcher(["STOP"])
    matcher.feed("x STOP")
    assert matcher.feed("more text") == ""
    assert matcher.feed("STOP") == ""
    assert matcher.matched == "STOP"


# ----------------------------------------------------------------------------- properties


def _random_chunks(rng: random.Random, text: str) -> list[str]:
    chunks, i = [], 0
    while i < len(text):
        n = rng.randint(0, 4)  # empty chunks happen too (a token that completes no character)
        chunks.append(text[i : i + n])
        i += n
    return chunks


def _substring_free_stops(rng: random.Random, alphabet: str) -> list[str]:
    """Stops none of which is a substring of another: 'first occurrence' is then unambiguous."""
    stops: list[str] = []
    for _ in range(rng.randint(1, 3)):
        stop = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
        if all(stop not in other and other not in stop for other in stops):
            stops.append(stop)
    return stops


def test_property_output_is_text_up_to_first_stop_for_any_chunking():
    rng = random.Random(1234)
    alphabet = "ab c"
    for _ in range(3000):
        stops = _substring_free_stops(rng, alphabet)
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        found = [(text.find(s), s) for s in stops if s in text]
        if found:
            at, first = min(found)
            expected = (text[:at], first)
        else:
            expected = (text, None)
        chunks = _random_chunks(rng, text)
        assert run(stops, chunks) == expected, (stops, chunks)


def test_property_held_text_is_only_ever_a_proper_prefix_of_a_stop():
    rng = random.Random(99)
    alphabet = "abc"
    for _ in range(1000):
        stops = _substring_free_stops(rng, alphabet)
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25)))
        matcher = StopMatcher(stops)
        seen = shown = ""
        for chunk in _random_chunks(rng, text):
            seen += chunk
            shown += matcher.feed(chunk)
            if matcher.matched is not None:
                break
            assert seen.startswith(shown)
            held = seen[len(shown) :]
            assert held == "" or any(s.startswith(held) and s != held for s in stops), (stops, seen, shown)


def test_output_does_not_depend_on_chunking_when_one_stop_contains_another():
    stops = ["abcd", "bc"]
    assert run(stops, ["abcd"]) == run(stops, list("abcd"))


def test_matched_stop_does_not_depend_on_chunking_when_one_stop_prefixes_another():
    stops = ["ab", "abc"]
    assert run(stops, ["abc"]) == run(stops, ["ab", "c"])
