import json
import random

import pytest

from localvl.prompt.outputs import (
    OutputParser,
    TextPiece,
    ThinkingPiece,
    ToolCallPiece,
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
        ('{"name": "f", "argu', ToolCallPiece("f", {})),
        ('\n{"name": "get_weather", "arguments": {"city": "Par', ToolCallPiece("get_weather", {"city": "Par"})),
        ('{"name": "f", "arguments": {"days": [1, 2', ToolCallPiece("f", {"days": [1, 2]})),
        ('{"name": "f", "arguments": {"a": {"b": "c\\"', ToolCallPiece("f", {"a": {"b": 'c"'}})),
        ('{"name": "f", "arguments": {"a": 1, "ke', ToolCallPiece("f", {"a": 1})),
        ('{"name": "f", "arguments": "{\\"a', ToolCallPiece("f", {})),
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
