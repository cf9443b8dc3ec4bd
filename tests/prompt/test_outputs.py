import json
import random

import pytest

from localvl.prompt.outputs import (
    OutputParser,
    TextPiece,
    ThinkingPiece,
    ToolCallPiece,
    is_json_prefix,
    parse_tool_call,
    tool_call_id,
)


def run(parser: OutputParser, text: str, pieces_of: list[int] | None = None, truncated: bool = False) -> list:
    """Feed ``text`` in random-sized pieces; merge adjacent text/thinking pieces for comparison."""
    rng = random.Random(len(text))
    out = []
    at = 0
    while at < len(text):
        size = rng.randint(1, 7)
        out += parser.feed(text[at : at + size])
        at += size
    out += parser.finish(truncated)
    merged: list = []
    for piece in out:
        if merged and type(piece) is type(merged[-1]) and not isinstance(piece, ToolCallPiece):
            merged[-1] = type(piece)(merged[-1].text + piece.text)
        else:
            merged.append(piece)
    return merged


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'


@pytest.mark.parametrize("seed", range(5))
def test_text_then_tool_calls_whatever_the_split(seed):
    text = "Let me check.\n\n" + CALL + "\n" + CALL.replace("Paris", "北京")
    parser = OutputParser(tools=True, thinking=False)
    pieces = run(parser, text)
    assert pieces == [
        TextPiece("Let me check."),
        ToolCallPiece("get_weather", {"city": "Paris", "days": 3}),
        ToolCallPiece("get_weather", {"city": "北京", "days": 3}),
    ]
    assert parser.tool_calls == 2


def test_thinking_opened_by_the_prompt_then_text():
    parser = OutputParser(tools=False, thinking=True, in_thinking=True)
    assert run(parser, "step one\nstep two\n</think>\n\nThe answer is 4.") == [
        ThinkingPiece("step one\nstep two\n"),
        TextPiece("The answer is 4."),
    ]


def test_thinking_opened_by_the_model_then_a_tool_call():
    parser = OutputParser(tools=True, thinking=True)
    assert run(parser, "<think>hmm</think>\n\n" + CALL) == [
        ThinkingPiece("hmm"),
        ToolCallPiece("get_weather", {"city": "Paris", "days": 3}),
    ]


def test_tags_are_plain_text_where_they_mean_nothing():
    text = "a <think> b " + CALL
    assert run(OutputParser(tools=False, thinking=False), text) == [TextPiece(text)]


@pytest.mark.parametrize(
    "body",
    ['{"name": "f", "arguments": {"a": 1}', "not json", '{"arguments": {}}', '{"name": "f", "arguments": [1]}'],
    ids=["unclosed-json", "not-json", "no-name", "arguments-not-an-object"],
)
def test_a_tool_call_that_does_not_parse_stays_text(body):
    text = f"x <tool_call>{body}</tool_call>"
    assert run(OutputParser(tools=True, thinking=False), text) == [TextPiece(text)]


@pytest.mark.parametrize(
    "cut, expected",
    [
        ('{"name": "f", "argu', ToolCallPiece("f", {}, "")),
        ('\n{"name": "get_weather", "arguments": {"city": "Par', ToolCallPiece("get_weather", {"city": "Par"}, '{"city": "Par')),
        ('{"name": "f", "arguments": {"days": [1, 2', ToolCallPiece("f", {"days": [1, 2]}, '{"days": [1, 2')),
        ('{"name": "f", "arguments": {"a": {"b": "c\\"', ToolCallPiece("f", {"a": {"b": 'c"'}}, '{"a": {"b": "c\\"')),
        ('{"name": "f", "arguments": {"a": 1, "ke', ToolCallPiece("f", {"a": 1}, '{"a": 1, "ke')),
        ('{"name": "f", "arguments": "{\\"a', ToolCallPiece("f", {}, '{"a')),
        ('{"name": "f", "arguments": {"a": 1}}\n', ToolCallPiece("f", {"a": 1}, '{"a": 1}')),  # cut before its closing tag
        ('<function=f>\n<parameter=a>\nx\n</parameter>\n<parameter=b>\nyz', ToolCallPiece("f", {"a": "x"}, '{"a": "x"')),
        ('<function=f>\n', ToolCallPiece("f", {}, "{")),
    ],
)
def test_cut_off_inside_a_named_tool_call_returns_the_incomplete_call(cut, expected):
    # as Anthropic's API returns a tool_use block cut off by max_tokens: never Qwen's markup as text
    assert run(OutputParser(tools=True, thinking=False), "ok <tool_call>" + cut, truncated=True) == [TextPiece("ok"), expected]
    # the model ended its turn inside the call: nothing of it runs
    assert run(OutputParser(tools=True, thinking=False), "ok <tool_call>" + cut) == [TextPiece("ok")]


@pytest.mark.parametrize("cut", ["", "\n", '\n{"', '{"name": ', '{"name": "get_wea'])
def test_cut_off_before_a_tool_call_is_named_returns_no_markup(cut):
    assert run(OutputParser(tools=True, thinking=False), "ok <tool_call>" + cut, truncated=True) == [TextPiece("ok")]
    assert run(OutputParser(tools=True, thinking=False), "<tool_call>" + cut, truncated=True) == []


def test_cut_off_inside_thinking_returns_the_thinking():
    assert run(OutputParser(tools=False, thinking=True, in_thinking=True), "still thinking <") == [
        ThinkingPiece("still thinking <")
    ]


def test_arguments_as_a_json_string_are_accepted():
    call = parse_tool_call(json.dumps({"name": "f", "arguments": json.dumps({"a": [1, 2]})}))
    assert call == ToolCallPiece("f", {"a": [1, 2]})


def test_partial_tags_are_held_back_not_shown():
    parser = OutputParser(tools=True, thinking=False)
    assert parser.feed("hello <tool") == [TextPiece("hello")]  # the space waits for what follows
    assert parser.feed("_ca") == []
    assert parser.feed("t>") == [TextPiece(" <tool_cat>")]


def test_tool_call_ids_look_like_anthropics():
    ids = {tool_call_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(i.startswith("toolu_") and len(i) == 30 and i[6:].isalnum() for i in ids)


def test_thinking_comes_first_and_once():
    parser = OutputParser(tools=False, thinking=True, in_thinking=True)
    assert run(parser, "a</think>b <think>c</think>") == [ThinkingPiece("a"), TextPiece("b <think>c</think>")]
    parser = OutputParser(tools=False, thinking=True)
    assert run(parser, "answer <think>no</think>") == [TextPiece("answer <think>no</think>")]


@pytest.mark.parametrize("tools,thinking", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("ending", ["\t", "\n\n", "  "])
def test_an_answer_keeps_its_trailing_whitespace_whatever_the_split(tools, thinking, ending):
    """The text is the model's: the whitespace it ended with is not dropped (the stock decode keeps it)."""
    for split in ([len("Hello.")], [len("Hello.") + len(ending)], None):
        parser = OutputParser(tools=tools, thinking=thinking)
        text = "Hello." + ending
        pieces = parser.feed(text[: split[0]]) + parser.feed(text[split[0] :]) if split else parser.feed(text)
        pieces += parser.finish()
        assert "".join(p.text for p in pieces) == text and all(isinstance(p, TextPiece) for p in pieces)


def test_whitespace_after_a_tool_call_is_not_text():
    parser = OutputParser(tools=True, thinking=False)
    assert run(parser, CALL + "\n\n") == [ToolCallPiece("get_weather", {"city": "Paris", "days": 3})]


# Qwen3.5's form: XML inside the same tags, a string as written and other values as JSON.
SCHEMAS = {
    "get_weather": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "zip": {"type": "string"},
            "units": {"type": ["string", "null"]},
            "options": {"type": "object"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
    }
}
XML_CALL = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nSaint-Denis\nde la Réunion\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n<parameter=zip>\n02139\n</parameter>\n<parameter=units>\nnull\n</parameter>\n"
    '<parameter=options>\n{"hourly": true}\n</parameter>\n<parameter=tags>\n["a", "b"]\n</parameter>\n'
    "</function>\n</tool_call>"
)
XML_INPUT = {
    "city": "Saint-Denis\nde la Réunion", "days": 3, "zip": "02139", "units": None,
    "options": {"hourly": True}, "tags": ["a", "b"],
}


@pytest.mark.parametrize("seed", range(3))
def test_xml_tool_calls_are_read_by_their_schema_whatever_the_split(seed):
    text = "Let me check.\n\n" + XML_CALL + "\n" + XML_CALL.replace("<parameter=days>\n3", "<parameter=days>\n5")
    parser = OutputParser(tools=True, thinking=False, schemas=SCHEMAS)
    assert run(parser, text) == [
        TextPiece("Let me check."),
        ToolCallPiece("get_weather", XML_INPUT),
        ToolCallPiece("get_weather", {**XML_INPUT, "days": 5}),
    ]


def test_xml_values_that_do_not_fit_their_schema_stay_text():
    body = (
        "<function=get_weather>\n<parameter=days>\nthree\n</parameter>\n<parameter=options>\n[1]\n</parameter>\n"
        "<parameter=unnamed>\n42\n</parameter>\n</function>"
    )
    assert parse_tool_call(body, SCHEMAS) == ToolCallPiece("get_weather", {"days": "three", "options": "[1]", "unnamed": "42"})


def test_an_xml_call_whose_function_is_not_closed_stays_text():
    text = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</tool_call>"
    assert run(OutputParser(tools=True, thinking=False, schemas=SCHEMAS), text) == [TextPiece(text)]


def test_an_xml_call_cut_off_keeps_its_closed_parameters():
    text = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3"
    parser = OutputParser(tools=True, thinking=False, schemas=SCHEMAS)
    assert run(parser, text, truncated=True) == [ToolCallPiece("get_weather", {"city": "Paris"}, '{"city": "Paris"')]
    cut_in_name = OutputParser(tools=True, thinking=False, schemas=SCHEMAS)
    assert run(cut_in_name, "<tool_call>\n<function=get_wea", truncated=True) == []


def test_numbers_past_a_floats_range_come_back_finite():
    schemas = {"at": {"type": "object", "properties": {"lat": {"type": "number"}}}}
    xml = parse_tool_call("<function=at>\n<parameter=lat>\n-1e999\n</parameter>\n</function>", schemas)
    hermes = parse_tool_call('{"name": "at", "arguments": {"lat": 1e999, "lon": NaN, "h": -Infinity}}')
    assert xml.input == {"lat": -1.7976931348623157e308}
    assert hermes.input == {"lat": 1.7976931348623157e308, "lon": None, "h": -1.7976931348623157e308}
    json.dumps(hermes.input, allow_nan=False)  # what the API writes: strict JSON


def utf8(value) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8")  # what the API writes


def test_surrogate_escapes_come_back_as_characters_and_a_lone_half_as_u_fffd():
    # Models often write emoji as surrogate-pair escapes; whole pairs are the character, and a half
    # left alone (a pair cut by the token limit, or a model's slip) must not make the response
    # unencodable.
    whole = parse_tool_call('{"name": "f", "arguments": {"q": "\\ud83c\\udf38\\u5317"}}')
    assert whole.input == {"q": "🌸北"}
    lone = parse_tool_call('{"name": "f", "arguments": {"q": ["a\\ud83c b"], "\\udc00": 1}}')
    assert lone.input == {"q": ["a\ufffd b"], "\ufffd": 1}
    xml = parse_tool_call("<function=f>\n<parameter=q>\n[\"\\ud83c\"]\n</parameter>\n</function>",
                          {"f": {"properties": {"q": {"type": "array"}}}})
    assert xml.input == {"q": ["\ufffd"]}
    for call in (whole, lone, xml):
        utf8(call.input)


@pytest.mark.parametrize("arguments", ['{"q": "\\ud83c\\udf38\\ud83c', '"{\\"q\\": \\"\\ud83c\\udf38\\ud83c'])
def test_a_call_cut_between_the_halves_of_a_surrogate_pair_encodes(arguments):
    parser = OutputParser(tools=True, thinking=False)
    [call] = run(parser, '<tool_call>{"name": "f", "arguments": ' + arguments, truncated=True)
    utf8(call.input), utf8(call.partial)


def test_xml_values_of_untyped_enums_take_their_values_types():
    schemas = {"pick": {"type": "object", "properties": {
        "n": {"enum": [1, 2, 3]}, "b": {"enum": [True, False]}, "m": {"enum": ["a", 1, None]}, "c": {"const": 7}}}}
    body = ("<function=pick>\n<parameter=n>\n2\n</parameter>\n<parameter=b>\ntrue\n</parameter>\n"
            "<parameter=m>\nnull\n</parameter>\n<parameter=c>\n7\n</parameter>\n</function>")
    assert parse_tool_call(body, schemas).input == {"n": 2, "b": True, "m": None, "c": 7}


def test_xml_values_of_schemas_malformed_where_they_are_read_are_read_as_json():
    # anyOf/oneOf that are no lists (a client's schema may hold anything): no TypeError in the engine
    schemas = {"f": {"type": "object", "properties": {"a": {"anyOf": 5}, "o": {"oneOf": True}}}}
    body = "<function=f>\n<parameter=a>\n3\n</parameter>\n<parameter=o>\nhi\n</parameter>\n</function>"
    assert parse_tool_call(body, schemas).input == {"a": 3, "o": "hi"}


def test_xml_parameters_keep_their_names_and_end_at_their_closing_line():
    schemas = {"f": {"type": "object", "properties": {" x": {"type": "integer"}, "s": {"type": "string"}}}}
    body = ("<function=f>\n<parameter= x>\n4\n</parameter>\n<parameter=s>\nsee </parameter> here\n</parameter>\n"
            "<parameter=t>bare</parameter>\n</function>")
    assert parse_tool_call(body, schemas).input == {" x": 4, "s": "see </parameter> here", "t": "bare"}


@pytest.mark.parametrize("text", ['{"city": "Par', '{"city":', '{"ci', '{"a": 1, ', '{"a": tr', '{"a": -', '{"a": 1e-',
                                  '{"a": "x\\', '{"a": "\\u00', '{"a": [1, ', '{', '{"a": 1}'])
def test_a_cut_off_json_text_is_a_json_prefix(text):
    assert is_json_prefix(text)


@pytest.mark.parametrize("text", ["{not json", '{"a" 1', '{"a": 1}}', '{"a": x', "{,", '{"a": 1 2'])
def test_malformed_json_is_no_prefix(text):
    assert not is_json_prefix(text)


def test_a_call_nested_past_the_parsers_depth_stays_text():
    """Nesting deeper than json's recursion limit reads as malformed JSON, never as an exception
    that would fail the engine's step (and every request in it)."""
    deep = '{"name": "f", "arguments": {"a": ' + "[" * 5000 + "]" * 5000 + "}}"
    assert parse_tool_call(deep) is None
    text = "<tool_call>" + deep + "</tool_call>"
    assert run(OutputParser(tools=True, thinking=False), text) == [TextPiece(text)]
    cut = run(OutputParser(tools=True, thinking=False), "<tool_call>" + deep[:6000], truncated=True)
    assert [(c.name, c.input) for c in cut] == [("f", {})]
