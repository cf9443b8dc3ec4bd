"""Served model names and aliases: parsing, resolving, listing."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from localvl.api.model_names import Alias, ModelNames, ServedModel, parse_aliases

CREATED = datetime(2025, 1, 1, tzinfo=timezone.utc)
QWEN = ServedModel("qwen-vl", CREATED, 4096)
OTHER = ServedModel("other-vl", CREATED, 8192)


# ----------------------------------------------------------------------------- parse_aliases


def test_bare_pattern_points_at_the_default_model():
    assert parse_aliases(["claude-*"], "qwen-vl") == [Alias("claude-*", "qwen-vl")]


def test_pattern_equals_name_points_at_that_name():
    assert parse_aliases(["gpt-4o=other-vl"], "qwen-vl") == [Alias("gpt-4o", "other-vl")]


def test_whitespace_around_pattern_and_name_is_stripped():
    assert parse_aliases(["  claude-* = other-vl  "], "qwen-vl") == [Alias("claude-*", "other-vl")]


def test_order_is_kept():
    aliases = parse_aliases(["a", "b=other-vl", "c"], "qwen-vl")
    assert [a.pattern for a in aliases] == ["a", "b", "c"]


def test_only_the_first_equals_sign_separates():
    assert parse_aliases(["a=b=c"], "d") == [Alias("a", "b=c")]


def test_no_values_no_aliases():
    assert parse_aliases([], "qwen-vl") == []


@pytest.mark.parametrize("value", ["", "   ", "=qwen-vl", "claude-*=", "claude-* =  "])
def test_malformed_alias_is_an_error(value):
    with pytest.raises(ValueError):
        parse_aliases([value], "qwen-vl")


@pytest.mark.parametrize("pattern, is_glob", [("claude-*", True), ("gpt-?", True), ("m[12]", True), ("gpt-4o", False)])
def test_is_glob(pattern, is_glob):
    assert Alias(pattern, "x").is_glob is is_glob


# ----------------------------------------------------------------------------- resolve


def test_exact_served_name_resolves():
    assert ModelNames([QWEN, OTHER], []).resolve("other-vl") is OTHER


def test_glob_alias_resolves_to_its_target():
    names = ModelNames([QWEN, OTHER], [Alias("claude-*", "qwen-vl")])
    assert names.resolve("claude-sonnet-4-5") is QWEN
    assert names.resolve("claude-") is QWEN


def test_literal_alias_resolves():
    assert ModelNames([QWEN, OTHER], [Alias("gpt-4o", "other-vl")]).resolve("gpt-4o") is OTHER


def test_unknown_name_resolves_to_none():
    names = ModelNames([QWEN], [Alias("claude-*", "qwen-vl")])
    assert names.resolve("gpt-4o") is None
    assert names.resolve("") is None


def test_glob_matching_is_case_sensitive():
    assert ModelNames([QWEN], [Alias("claude-*", "qwen-vl")]).resolve("Claude-3") is None


def test_glob_must_match_the_whole_name():
    assert ModelNames([QWEN], [Alias("claude-*", "qwen-vl")]).resolve("my-claude-3") is None


def test_served_name_wins_over_an_alias_matching_it():
    names = ModelNames([QWEN, OTHER], [Alias("*-vl", "qwen-vl")])
    assert names.resolve("other-vl") is OTHER


def test_first_matching_alias_wins():
    names = ModelNames([QWEN, OTHER], [Alias("claude-3*", "other-vl"), Alias("claude-*", "qwen-vl")])
    assert names.resolve("claude-3-opus") is OTHER
    assert names.resolve("claude-4") is QWEN


def test_alias_to_an_unserved_model_is_an_error():
    with pytest.raises(ValueError):
        ModelNames([QWEN], [Alias("claude-*", "missing-model")])


def test_parsed_default_alias_to_unserved_default_is_an_error():
    with pytest.raises(ValueError):
        ModelNames([QWEN], parse_aliases(["claude-*"], "not-served"))


# ----------------------------------------------------------------------------- listed


def test_listed_has_served_names_then_literal_aliases():
    names = ModelNames([QWEN, OTHER], [Alias("claude-*", "qwen-vl"), Alias("gpt-4o", "other-vl"), Alias("m[12]", "qwen-vl")])
    assert names.listed() == [("qwen-vl", QWEN), ("other-vl", OTHER), ("gpt-4o", OTHER)]


def test_listed_does_not_repeat_a_served_name_given_as_alias():
    names = ModelNames([QWEN, OTHER], [Alias("qwen-vl", "other-vl")])
    assert [name for name, _ in names.listed()] == ["qwen-vl", "other-vl"]


def test_listed_without_aliases_is_the_served_models():
    assert ModelNames([QWEN], []).listed() == [("qwen-vl", QWEN)]
