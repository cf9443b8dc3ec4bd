"""Qwen3.5's XML tool calls under a grammar: what a forced call may and may not be."""

import llguidance
import llguidance.hf
import pytest

from localvl.conversation import Tool, ToolChoice
from localvl.models.tiny import build_tokenizer
from localvl.prompt.grammar import TagIds, request_grammar
from localvl.prompt.outputs import parse_tool_call

WEATHER = Tool("get_weather", "w", {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "note": {"type": ["string", "null"]},
        "code": {"type": "string", "pattern": "^[A-Z]{2}$"},
    },
    "required": ["city", "days"],
})


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("tiny")


def accepts(tokenizer, grammar: str, body: str) -> bool:
    """Whether the whole ``<tool_call>`` block, token by token, is what the grammar admits."""
    ll = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=[tokenizer.eos_token_id or 0])
    matcher = llguidance.LLMatcher(ll, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    tags = TagIds.of(tokenizer)
    ids = [tags.tool_open, *tokenizer.encode(body, add_special_tokens=False), tags.tool_close]
    return all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()


def call(*parameters: tuple[str, str], name: str = "get_weather") -> str:
    return f"\n<function={name}>\n" + "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in parameters) + "</function>\n"


def test_a_forced_xml_call_is_held_to_its_schema(tokenizer):
    grammar = request_grammar([WEATHER], ToolChoice("any", parallel=False), (), None, TagIds.of(tokenizer), False, xml=True)
    whole = call(("city", "St-Denis\nX"), ("days", "3"), ("unit", "celsius"), ("note", "null"), ("code", "FR"))
    assert accepts(tokenizer, grammar, whole)
    assert parse_tool_call(whole.strip(), {WEATHER.name: WEATHER.input_schema}).input == {
        "city": "St-Denis\nX", "days": 3, "unit": "celsius", "note": None, "code": "FR"}
    assert accepts(tokenizer, grammar, call(("city", "Paris"), ("days", "7")))  # optional ones left out
    for wrong in (
        call(("city", "a much longer name"), ("days", "3")),  # maxLength
        call(("city", "Paris"), ("days", "9")),  # maximum
        call(("city", "Paris"), ("days", "three")),  # not an integer
        call(("city", "Paris")),  # a required parameter missing
        call(("city", "Paris"), ("days", "3"), ("unit", "kelvin")),  # not in the enum
        call(("city", "Paris"), ("days", "3"), ("code", "FRA")),  # the pattern
        call(("days", "3"), ("city", "Paris")),  # out of the schema's order
        call(("city", "Paris"), ("days", "3"), name="get_time"),  # no such tool
    ):
        assert not accepts(tokenizer, grammar, wrong), wrong


def test_a_tool_not_held_takes_any_parameters(tokenizer):
    other = Tool("note", None, {"type": "object", "properties": {"text": {"type": "string", "format": "email"}}})
    grammar = request_grammar([other, WEATHER], ToolChoice("auto"), ("get_weather",), None, TagIds.of(tokenizer), False, xml=True)
    assert accepts(tokenizer, grammar, call(("anything", "at all\n{}"), ("n", "1"), name="note"))
    assert not accepts(tokenizer, grammar, call(("city", "Paris"), ("days", "9")))  # the strict one is held


def test_a_strict_string_the_xml_form_cannot_hold_is_refused(tokenizer):
    email = Tool("mail", None, {"type": "object", "properties": {"to": {"type": "string", "format": "email"}}})
    with pytest.raises(ValueError, match="'to'"):
        request_grammar([email], ToolChoice("auto"), ("mail",), None, TagIds.of(tokenizer), False, xml=True)
    # not strict, a forced call's value is any text
    assert request_grammar([email], ToolChoice("any"), (), None, TagIds.of(tokenizer), False, xml=True)


def forced(tokenizer, tool, strict=False):
    return request_grammar([tool], ToolChoice("any"), (tool.name,) if strict else (), None, TagIds.of(tokenizer), False, xml=True)


@pytest.mark.parametrize("schema, reason", [
    ({"type": "string", "enum": ["a", "</parameter>"]}, "enum"),
    ({"type": "string", "pattern": "^(?=a)a+$"}, "string schema"),  # a lookahead llguidance cannot take
    ({"type": "string", "minLength": 5, "maxLength": 3}, "string schema"),
])
def test_a_value_the_xml_form_cannot_hold_refuses_a_strict_tool_and_frees_another(tokenizer, schema, reason):
    tool = Tool("f", None, {"type": "object", "properties": {"v": schema}, "required": ["v"]})
    with pytest.raises(ValueError, match=reason):
        forced(tokenizer, tool, strict=True)
    assert accepts(tokenizer, forced(tokenizer, tool), call(("v", "anything"), name="f"))


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"v": {"type": "integer"}}, "required": 1e308},
    {"type": "object", "properties": {"v": {"type": "integer"}}, "required": True},
    {"type": "object", "properties": {"v": {"anyOf": 5}}, "required": ["v"]},
    {"type": "object", "properties": {"v": {"oneOf": True}}, "required": ["v"]},
    {"type": "object", "properties": {"v": {"type": "string", "minLength": [5]}}, "required": ["v"]},
    {"type": "object", "properties": {"v": {"type": "string", "maxLength": {}}}, "required": ["v"]},
])
def test_a_schema_malformed_where_the_xml_form_reads_it_refuses_a_strict_tool_and_frees_another(tokenizer, schema):
    # (a TypeError here was the API's 500; a ValueError is its 400)
    tool = Tool("f", None, schema)
    with pytest.raises(ValueError):
        forced(tokenizer, tool, strict=True)
    assert accepts(tokenizer, forced(tokenizer, tool), call(("v", "1"), name="f"))


def test_a_parameter_name_the_xml_form_cannot_write_refuses_a_strict_tool(tokenizer):
    tool = Tool("f", None, {"type": "object", "properties": {"a>b": {"type": "integer"}}})
    with pytest.raises(ValueError, match="parameter name"):
        forced(tokenizer, tool, strict=True)
    assert accepts(tokenizer, forced(tokenizer, tool), call(("x", "1"), name="f"))


def test_an_optional_string_is_held_as_text_and_null_reads_as_null(tokenizer):
    tool = Tool("f", None, {"type": "object", "properties": {
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
        "n": {"enum": [1, 2]},
    }, "required": ["note", "n"]})
    grammar = forced(tokenizer, tool, strict=True)
    assert accepts(tokenizer, grammar, call(("note", "null"), ("n", "2"), name="f"))
    assert not accepts(tokenizer, grammar, call(("note", "x"), ("n", "3"), name="f"))
    parsed = parse_tool_call(call(("note", "null"), ("n", "2"), name="f").strip(), {"f": tool.input_schema})
    assert parsed.input == {"note": None, "n": 2}


@pytest.mark.parametrize("pattern, good, bad", [
    ("cat|dog", ["hotdog", "catx"], ["bird"]),  # a search, whatever the alternation
    ("^https?:\\/\\/", ["https://x"], ["ftp://x"]),  # a slash escaped already
    ("^(a|b)$", ["a", "b"], ["ab"]),
])
def test_string_patterns_are_searched_as_json_schema_says(tokenizer, pattern, good, bad):
    tool = Tool("f", None, {"type": "object", "properties": {"s": {"type": "string", "pattern": pattern}}, "required": ["s"]})
    grammar = forced(tokenizer, tool, strict=True)
    assert all(accepts(tokenizer, grammar, call(("s", v), name="f")) for v in good)
    assert not any(accepts(tokenizer, grammar, call(("s", v), name="f")) for v in bad)


def test_refs_required_names_and_no_parameters_are_held(tokenizer):
    enum = Tool("f", None, {"type": "object", "properties": {"v": {"$ref": "#/$defs/V"}}, "required": ["v"],
                            "$defs": {"V": {"enum": ["1.0", "2.0"], "type": "string"}}})
    assert accepts(tokenizer, forced(tokenizer, enum, strict=True), call(("v", "1.0"), name="f"))
    assert parse_tool_call(call(("v", "1.0"), name="f").strip(), {"f": enum.input_schema}).input == {"v": "1.0"}
    unnamed = Tool("f", None, {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "b"]})
    assert accepts(tokenizer, forced(tokenizer, unnamed, strict=True), call(("a", "1"), ("b", "x"), name="f"))
    assert not accepts(tokenizer, forced(tokenizer, unnamed, strict=True), call(("a", "1"), name="f"))
    empty = Tool("f", None, {"type": "object", "properties": {}, "additionalProperties": False})
    assert accepts(tokenizer, forced(tokenizer, empty, strict=True), call(name="f"))
    assert not accepts(tokenizer, forced(tokenizer, empty, strict=True), call(("x", "1"), name="f"))


LOOPS = [
    {"$ref": "#"},
    {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a", "description": "only a name for itself"}}},
    {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}, "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}},
]


@pytest.mark.parametrize("schema", LOOPS)
def test_a_schema_that_is_only_a_name_for_itself_is_refused(tokenizer, schema):
    """llguidance compiles such a schema to a grammar that admits nothing: the answer came back empty."""
    with pytest.raises(ValueError, match="refers only to itself"):
        request_grammar([], ToolChoice("auto"), (), schema, TagIds.of(tokenizer), False)


def test_a_strict_tool_whose_parameter_is_only_a_name_for_itself_is_refused(tokenizer):
    tool = Tool("loop", None, {"type": "object", "properties": {"v": {"$ref": "#/$defs/a"}}, "required": ["v"],
                               "$defs": {"a": {"$ref": "#/$defs/a"}}})
    with pytest.raises(ValueError, match="refers only to itself"):
        request_grammar([tool], ToolChoice("auto"), ("loop",), None, TagIds.of(tokenizer), False)
    # a forced call to it, not strict, is held to a JSON object, as a schema llguidance cannot take is
    assert '"arguments": {"type": "object"}' in request_grammar([tool], ToolChoice("any"), (), None, TagIds.of(tokenizer), False)


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"child": {"$ref": "#"}}},  # a tree: a node may have no child
    {"type": "object", "properties": {"n": {"$ref": "#/$defs/N"}}, "$defs": {"N": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/N"}]}}},
    {"$ref": "#/$defs/a", "$defs": {"a": {"type": "string"}}},
])
def test_a_schema_whose_refs_lead_somewhere_is_taken(tokenizer, schema):
    assert request_grammar([], ToolChoice("auto"), (), schema, TagIds.of(tokenizer), False)


def test_a_forced_call_after_an_opened_think_thinks_first_only_when_thought_is_allowed(tokenizer):
    """A template that opens <think> whatever it is told (Qwen3-VL-Thinking): a forced call not
    asked to think closes the thinking at once, empty; asked to think, it may think first."""
    tags = TagIds.of(tokenizer)
    ll = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=[tokenizer.eos_token_id or 0])
    body = tokenizer.encode(call(("city", "Paris"), ("days", "3")), add_special_tokens=False)

    def admits(thought: bool, thinking: str) -> bool:
        grammar = request_grammar([WEATHER], ToolChoice("any", parallel=False), (), None, tags, True, xml=True, thought=thought)
        matcher = llguidance.LLMatcher(ll, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
        ids = [*tokenizer.encode(thinking, add_special_tokens=False), tags.think_close, tags.tool_open, *body, tags.tool_close]
        return all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()

    assert admits(True, "let me see\n") and admits(True, "")
    assert admits(False, "\n") and admits(False, "")
    assert not admits(False, "let me see\n")
