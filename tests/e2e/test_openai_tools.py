"""Tools, structured output and reasoning through the official ``openai`` SDK."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.e2e.conftest import API_KEY

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}], ids=["required", "named"])
def test_forced_tool_calls_validate_and_finish_with_tool_calls(oai, choice):
    for seed in range(3):
        completion = oai.chat.completions.create(model="tiny-vl", messages=ASK, tools=[WEATHER], tool_choice=choice,
                                                 temperature=1.0, seed=seed, max_tokens=300, parallel_tool_calls=False)
        message = completion.choices[0].message
        assert completion.choices[0].finish_reason == "tool_calls"
        assert message.content is None and len(message.tool_calls) == 1
        call = message.tool_calls[0]
        assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


@pytest.mark.parametrize("max_tokens", [2, 8])
def test_a_tool_call_cut_off_by_max_tokens_leaves_no_markup_in_content(oai, max_tokens):
    completion = oai.chat.completions.create(model="tiny-vl", messages=ASK, tools=[WEATHER], tool_choice="required",
                                             max_tokens=max_tokens, temperature=0)
    choice = completion.choices[0]
    assert choice.finish_reason == "length" and not choice.message.content
    assert all(call.function.name == "get_weather" for call in choice.message.tool_calls or [])


def test_a_tool_call_cut_off_by_max_tokens_keeps_its_arguments_as_written(oai):
    """As OpenAI's API (and a streaming client adding up the fragments) has it: the arguments are
    the text written before the cut, unclosed, so a longer cut extends a shorter one; never a
    JSON object closed to pass for a whole call."""
    ask = dict(model="tiny-vl", messages=ASK, tools=[WEATHER], tool_choice="required", temperature=1.0, seed=0,
               parallel_tool_calls=False)
    whole = oai.chat.completions.create(**ask, max_tokens=300)
    assert whole.choices[0].finish_reason == "tool_calls"
    written = whole.usage.completion_tokens  # a seeded sample: a shorter limit cuts this very answer
    cuts = []
    for max_tokens in (written // 2, written - 3):
        choice = oai.chat.completions.create(**ask, max_tokens=max_tokens).choices[0]
        chunks = list(oai.chat.completions.create(**ask, max_tokens=max_tokens, stream=True))
        streamed = "".join(d.function.arguments or "" for c in chunks if c.choices
                           for d in c.choices[0].delta.tool_calls or [] if d.function)
        assert choice.finish_reason == "length" and chunks[-1].choices[0].finish_reason == "length"
        arguments = "".join(c.function.arguments for c in choice.message.tool_calls or [])
        assert streamed == arguments
        cuts.append(arguments)
        # an agent loop sends the cut call back, as OpenAI's API takes it: what it holds so far is rendered
        history = ASK + [choice.message.model_dump(exclude_none=True)] + [
            {"role": "tool", "tool_call_id": call.id, "content": "cut off"} for call in choice.message.tool_calls or []]
        assert oai.chat.completions.create(model="tiny-vl", messages=history, tools=[WEATHER], max_tokens=2).choices
    assert cuts[1].startswith(cuts[0]) and len(cuts[1]) > len(cuts[0])


def test_streamed_tool_call_arguments_concatenate_to_the_final_arguments(oai):
    stream = oai.chat.completions.create(model="tiny-vl", messages=ASK, tools=[WEATHER], tool_choice="required",
                                         temperature=1.0, seed=7, max_tokens=300, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
                call["id"] = call["id"] or delta.id
                call["name"] = call["name"] or (delta.function.name if delta.function else None)
                call["arguments"] += (delta.function.arguments or "") if delta.function else ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and sorted(calls) == list(range(len(calls)))
    for call in calls.values():
        assert call["id"].startswith("call_") and call["name"] == "get_weather"
        jsonschema.validate(json.loads(call["arguments"]), WEATHER["function"]["parameters"])


def test_a_tool_round_trip_is_accepted(oai):
    first = oai.chat.completions.create(model="tiny-vl", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=300)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    second = oai.chat.completions.create(model="tiny-vl", messages=history, tools=[WEATHER], max_tokens=8)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


@pytest.mark.parametrize("strict", [True, False])
def test_json_schema_and_json_object_outputs_parse(oai, strict):
    schema = {"type": "object", "properties": {"total": {"type": "number"}, "paid": {"type": "boolean"}},
              "required": ["total", "paid"], "additionalProperties": False}
    response_format = ({"type": "json_schema", "json_schema": {"name": "invoice", "schema": schema, "strict": True}}
                       if strict else {"type": "json_object"})
    finished = 0
    for seed in range(4):
        completion = oai.chat.completions.create(model="tiny-vl", messages=ASK, response_format=response_format,
                                                 temperature=1.0, seed=seed, max_tokens=600)
        if completion.choices[0].finish_reason == "length":  # json_object admits any object: random keys can run long
            assert not strict
            continue
        finished += 1
        value = json.loads(completion.choices[0].message.content)
        assert isinstance(value, dict)
        if strict:
            jsonschema.validate(value, schema)
    assert finished >= 2


def test_the_sdk_parse_helper_returns_a_typed_object(oai):
    pydantic = pytest.importorskip("pydantic")

    class Invoice(pydantic.BaseModel):
        total: float
        paid: bool

    completion = oai.chat.completions.parse(model="tiny-vl", messages=ASK, response_format=Invoice, max_tokens=300,
                                            temperature=1.0, seed=3)
    assert isinstance(completion.choices[0].message.parsed, Invoice)


def test_reasoning_comes_as_reasoning_content(thinking_server):
    client = openai.OpenAI(base_url=thinking_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    completion = client.chat.completions.create(model="tiny-vl", messages=ASK, max_tokens=24, temperature=1.0, seed=1,
                                                reasoning_effort="high")
    message = completion.choices[0].message
    reasoning = (message.model_extra or {}).get("reasoning_content")
    assert reasoning and "<think>" not in reasoning and "<think>" not in (message.content or "")
    plain = client.chat.completions.create(model="tiny-vl", messages=ASK, max_tokens=8, reasoning_effort="none")
    assert "reasoning_content" not in (plain.choices[0].message.model_extra or {})


def test_a_streamed_line_break_character_leaves_every_chunk_on_one_line(server):
    # JSON may carry U+2028, U+2029 and NEL raw; httpx's iter_lines (str.splitlines) ends a line at each.
    value = "a\u2028b\u2029c\x85d"
    function = {"name": "say", "parameters": {"type": "object", "properties": {"word": {"enum": [value]}},
                                              "required": ["word"], "additionalProperties": False}}
    body = {"model": "tiny-vl", "max_tokens": 40, "stream": True, "tools": [{"type": "function", "function": function}],
            "tool_choice": "required", "parallel_tool_calls": False, "messages": [{"role": "user", "content": "say it"}]}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {API_KEY}"}, timeout=60) as response:
        chunks = [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: {")]
    arguments = "".join(call["function"].get("arguments") or "" for chunk in chunks for choice in chunk["choices"]
                        for call in choice["delta"].get("tool_calls") or [])
    assert json.loads(arguments) == {"word": value}
