"""Tools and thinking through the official ``anthropic`` SDK against a running server."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

import anthropic
import httpx
import jsonschema
import pytest

from tests.e2e.conftest import API_KEY
from tests.helpers import image_b64

WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "unit": {"enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}
CLOCK = {
    "name": "get_time",
    "description": "The time in a zone",
    "input_schema": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
                     "additionalProperties": False},
}
SCHEMAS = {t["name"]: t["input_schema"] for t in (WEATHER, CLOCK)}
ASK = [{"role": "user", "content": "What is the weather in Paris, and what time is it?"}]
GREEDY = {"temperature": 0}  # thinking tests: the same answer on every run


@pytest.fixture
def thinking_client(thinking_server):
    return anthropic.Anthropic(base_url=thinking_server.url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.mark.parametrize("seed", range(6))
def test_forced_tool_calls_validate_against_their_schemas(client, seed):
    choice = {"type": "any"} if seed % 2 else {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    message = client.messages.create(model="tiny-vl", max_tokens=300, messages=ASK, extra_body={"temperature": 1.0},
                                     tools=[WEATHER, CLOCK], tool_choice=choice)
    assert message.stop_reason == "tool_use"
    calls = [b for b in message.content if b.type == "tool_use"]
    assert calls and len(calls) == len(message.content)
    for call in calls:
        assert call.id.startswith("toolu_")
        jsonschema.validate(call.input, SCHEMAS[call.name])
    if choice["type"] == "tool":
        assert [c.name for c in calls] == ["get_weather"]


@pytest.mark.parametrize("max_tokens", [1, 3, 6, 12])
def test_a_tool_call_cut_off_by_max_tokens_is_an_incomplete_tool_use_never_markup(client, max_tokens):
    kwargs = dict(model="tiny-vl", max_tokens=max_tokens, messages=ASK, extra_body={"temperature": 0},
                  tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"})
    message = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        streamed = stream.get_final_message()
    for answer in (message, streamed):
        assert answer.stop_reason == "max_tokens"
        assert all(b.type == "tool_use" and b.name == "get_weather" for b in answer.content)
    assert [b.input for b in streamed.content] == [b.input for b in message.content]


def test_streamed_tool_input_equals_the_final_input(client):
    with client.messages.stream(model="tiny-vl", max_tokens=300, messages=ASK, extra_body={"temperature": 1.0},
                                tools=[WEATHER, CLOCK], tool_choice={"type": "any"}) as stream:
        events = list(stream)
        final = stream.get_final_message()
    starts = [e for e in events if e.type == "content_block_start"]
    assert starts and all(e.content_block.type == "tool_use" and e.content_block.input == {} for e in starts)
    assert [e.index for e in starts] == list(range(len(starts)))
    for block in final.content:
        partial = "".join(e.delta.partial_json for e in events
                          if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
                          and e.index == final.content.index(block))
        assert json.loads(partial) == block.input
    assert final.stop_reason == "tool_use"


def test_a_tool_result_with_an_image_round_trips_and_counts(client):
    call = client.messages.create(model="tiny-vl", max_tokens=300, messages=ASK, tools=[WEATHER],
                                  tool_choice={"type": "tool", "name": "get_weather"}).content[0]
    picture = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image_b64(size=(96, 64))}}

    def history(result_content):
        return ASK + [
            {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": result_content}]},
        ]

    with_image = history([{"type": "text", "text": "radar:"}, picture])
    text_only = history([{"type": "text", "text": "radar:"}])
    reply = client.messages.create(model="tiny-vl", max_tokens=8, messages=with_image, tools=[WEATHER])
    assert reply.type == "message"
    counted = client.messages.count_tokens(model="tiny-vl", messages=with_image, tools=[WEATHER]).input_tokens
    assert counted == reply.usage.input_tokens + reply.usage.cache_read_input_tokens + reply.usage.cache_creation_input_tokens
    assert counted > client.messages.count_tokens(model="tiny-vl", messages=text_only, tools=[WEATHER]).input_tokens
    error = client.messages.create(model="tiny-vl", max_tokens=8, messages=history([{"type": "text", "text": "x"}]),
                                   tools=[WEATHER], tool_choice={"type": "none"})
    assert all(b.type != "tool_use" for b in error.content)


def test_an_unanswered_call_is_refused_as_anthropic_refuses_it(client):
    call = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}
    messages = ASK + [{"role": "assistant", "content": [call]}, {"role": "user", "content": "well?"}]
    calls = (lambda: client.messages.create(model="tiny-vl", max_tokens=8, messages=messages, tools=[WEATHER]),
             lambda: client.messages.count_tokens(model="tiny-vl", messages=messages, tools=[WEATHER]))
    for send in calls:
        with pytest.raises(anthropic.BadRequestError) as caught:
            send()
        assert caught.value.body["error"]["type"] == "invalid_request_error"
        assert "Did not find 1 `tool_result` block(s) at the beginning of this message" in caught.value.body["error"]["message"]


def test_count_tokens_includes_the_tools(client):
    without = client.messages.count_tokens(model="tiny-vl", messages=ASK).input_tokens
    with_tools = client.messages.count_tokens(model="tiny-vl", messages=ASK, tools=[WEATHER, CLOCK]).input_tokens
    assert with_tools > without + 20


def test_a_json_schema_answer_validates(client):
    schema = {"type": "object", "properties": {"total": {"type": "number"}, "currency": {"enum": ["EUR", "USD"]}},
              "required": ["total", "currency"], "additionalProperties": False}
    for seed in range(3):
        message = client.messages.create(model="tiny-vl", max_tokens=200, messages=ASK, extra_body={"temperature": 1.0},
                                         output_config={"format": {"type": "json_schema", "schema": schema}})
        jsonschema.validate(json.loads(message.content[0].text), schema)


def test_thinking_blocks_are_signed_round_trip_and_tampering_is_rejected(thinking_client):
    thinking = {"type": "enabled", "budget_tokens": 1024}
    first = thinking_client.messages.create(model="tiny-vl", max_tokens=1100, thinking=thinking, messages=ASK,
                                            extra_body=GREEDY)
    block = first.content[0]
    assert block.type == "thinking" and block.thinking and block.signature
    assert all(b.type != "thinking" for b in first.content[1:])
    history = ASK + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content] or "ok"},
                     {"role": "user", "content": "And tomorrow?"}]
    again = thinking_client.messages.create(model="tiny-vl", max_tokens=4, messages=history)
    assert again.type == "message"
    history[1]["content"][0]["thinking"] = block.thinking + " (edited)"
    with pytest.raises(anthropic.BadRequestError, match="signature"):
        thinking_client.messages.create(model="tiny-vl", max_tokens=4, messages=history)
    with pytest.raises(anthropic.BadRequestError, match="signature"):  # count_tokens verifies the same way
        thinking_client.messages.count_tokens(model="tiny-vl", messages=history)
    history[1]["content"][0]["thinking"] = block.thinking
    assert thinking_client.messages.count_tokens(model="tiny-vl", messages=history).input_tokens > 0


def test_streamed_thinking_ends_with_its_signature_and_display_omitted_hides_it(thinking_client):
    thinking = {"type": "enabled", "budget_tokens": 1024}
    with thinking_client.messages.stream(model="tiny-vl", max_tokens=1100, thinking=thinking, messages=ASK,
                                         extra_body=GREEDY) as stream:
        events = list(stream)
        final = stream.get_final_message()
    deltas = [e.delta.type for e in events if e.type == "content_block_delta" and e.index == 0]
    assert deltas[0] == "thinking_delta" and deltas[-1] == "signature_delta" and deltas.count("signature_delta") == 1
    assert final.content[0].signature == [e.delta.signature for e in events if e.type == "content_block_delta"
                                          and e.delta.type == "signature_delta"][0]
    hidden = thinking_client.messages.create(model="tiny-vl", max_tokens=1100, messages=ASK, extra_body=GREEDY,
                                             thinking={**thinking, "display": "omitted"})
    assert hidden.content[0].type == "thinking" and hidden.content[0].thinking == "" and hidden.content[0].signature
    history = ASK + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in hidden.content]},
                     {"role": "user", "content": "And tomorrow?"}]
    assert thinking_client.messages.create(model="tiny-vl", max_tokens=4, messages=history).type == "message"


def test_the_sdk_tool_runner_calls_python_tools_with_valid_arguments(client):
    from anthropic import beta_tool

    seen: list[tuple[str, str]] = []

    @beta_tool
    def get_weather(city: Annotated[str, Field(max_length=12)], unit: Literal["celsius", "fahrenheit"]) -> str:
        """Current weather in a city.

        Args:
            city: the city
            unit: the temperature unit
        """
        seen.append((city, unit))
        return "sunny, 21 degrees"

    runner = client.beta.messages.tool_runner(model="tiny-vl", max_tokens=200, messages=ASK, tools=[get_weather],
                                              tool_choice={"type": "any", "disable_parallel_tool_use": True}, max_iterations=2)
    messages = list(runner)
    assert len(messages) == 2 and seen  # two model turns, the tool ran between them with what the model asked
    assert all(unit in ("celsius", "fahrenheit") and isinstance(city, str) for city, unit in seen)


class Place(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a bounded call: a random model could add keys until max_tokens

    city: Annotated[str, Field(max_length=8)]
    unit: Literal["celsius", "fahrenheit"]


def test_the_sdk_tool_runner_takes_a_pydantic_parameter(client):
    # beta_tool writes a pydantic parameter as a $ref into the schema's own $defs
    from anthropic import beta_tool

    seen: list[Place] = []

    @beta_tool
    def get_weather(place: Place) -> str:
        """Current weather at a place.

        Args:
            place: where
        """
        seen.append(place if isinstance(place, Place) else Place.model_validate(place))
        return "sunny"

    assert "$defs" in json.dumps(get_weather.to_dict())
    runner = client.beta.messages.tool_runner(model="tiny-vl", max_tokens=200, messages=ASK, tools=[get_weather],
                                              tool_choice={"type": "any", "disable_parallel_tool_use": True}, max_iterations=2)
    messages = list(runner)
    assert len(messages) == 2 and seen and all(p.unit in ("celsius", "fahrenheit") for p in seen)


def test_the_sdk_parse_helper_returns_a_typed_object(client):
    pydantic = pytest.importorskip("pydantic")

    class Reading(pydantic.BaseModel):
        celsius: int
        raining: bool

    parse = getattr(client.messages, "parse", None) or client.beta.messages.parse
    message = parse(model="tiny-vl", max_tokens=200, messages=ASK, output_format=Reading, extra_body={"temperature": 1.0})
    assert isinstance(message.parsed_output, Reading)


def test_a_lost_thread_is_the_error_the_sdk_replays_on(client):
    with pytest.raises(anthropic.NotFoundError) as lost:
        client.beta.messages.create(model="tiny-vl", max_tokens=4, messages=ASK,
                                    thread={"type": "continue", "previous_message_id": "msg_gone"})
    assert lost.value.error_code == "thread_not_found"
    first = client.beta.messages.create(model="tiny-vl", max_tokens=4, messages=ASK, thread={"type": "create"},
                                        system="be brief")
    follow = [{"role": "user", "content": "and tomorrow?"}]
    second = client.beta.messages.create(model="tiny-vl", max_tokens=4, messages=follow,
                                         thread={"type": "continue", "previous_message_id": first.id})
    reply = [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]}] if first.content else []
    unthreaded = client.messages.count_tokens(model="tiny-vl", system="be brief", messages=ASK + reply + follow)
    used = second.usage
    assert used.input_tokens + used.cache_read_input_tokens + used.cache_creation_input_tokens == unthreaded.input_tokens
    with pytest.raises(anthropic.BadRequestError) as twice:
        client.beta.messages.create(model="tiny-vl", max_tokens=4, messages=follow,
                                    thread={"type": "continue", "previous_message_id": first.id})
    assert twice.value.error_code == "thread_already_continued"


def test_a_tool_search_answered_with_tool_references_goes_on(client):
    """Claude Code's ToolSearch answers with ``tool_reference`` blocks naming ``defer_loading`` tools."""
    search = {"name": "tool_search", "description": "Find tools", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}
    tools = [search, {**WEATHER, "defer_loading": True}, {**CLOCK, "defer_loading": True}]
    call = {"type": "tool_use", "id": "toolu_search", "name": "tool_search", "input": {"q": "weather"}}
    found = [{"type": "tool_reference", "tool_name": "get_weather"}, {"type": "tool_reference", "tool_name": "get_time"}]
    messages = ASK + [{"role": "assistant", "content": [call]},
                      {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_search", "content": found}]}]
    reply = client.messages.create(model="tiny-vl", max_tokens=8, messages=messages, tools=tools,
                                   thinking={"type": "between_tools"})
    counted = client.messages.count_tokens(model="tiny-vl", messages=messages, tools=tools).input_tokens
    assert counted == reply.usage.input_tokens + reply.usage.cache_read_input_tokens + reply.usage.cache_creation_input_tokens
    # deferred tools are left out of the prompt's tool list (fewer tokens), yet stay callable
    listed = client.messages.count_tokens(model="tiny-vl", messages=ASK, tools=[search, WEATHER, CLOCK]).input_tokens
    assert client.messages.count_tokens(model="tiny-vl", messages=ASK, tools=tools).input_tokens < listed
    forced = client.messages.create(model="tiny-vl", max_tokens=200, messages=messages, tools=tools,
                                    tool_choice={"type": "tool", "name": "get_weather"})
    assert [block.name for block in forced.content if block.type == "tool_use"][:1] == ["get_weather"]
    messages[-1]["content"][0]["content"] = [{"type": "tool_reference", "tool_name": "get_stock"}]
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="tiny-vl", max_tokens=8, messages=messages, tools=tools)
    assert caught.value.body["error"]["message"].startswith("messages.2.content.0.content.0.tool_name: ")


def test_a_server_tool_is_dropped_and_forcing_it_says_why(client):
    search = {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}
    reply = client.messages.create(model="tiny-vl", max_tokens=4, messages=ASK, tools=[search, WEATHER])
    assert reply.type == "message"
    toolsets = [{"type": "mcp_toolset", "mcp_server_name": "docs"}, {"type": "computer_toolset_20260801"}]  # no names
    reply = client.beta.messages.create(model="tiny-vl", max_tokens=4, messages=ASK, tools=[*toolsets, WEATHER],
                                        mcp_servers=[{"type": "url", "url": "https://mcp.example/sse", "name": "docs"}],
                                        betas=["mcp-client-2025-11-20"])
    assert reply.type == "message"
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="tiny-vl", max_tokens=4, messages=ASK, tools=[search, WEATHER],
                               tool_choice={"type": "tool", "name": "web_search"})
    assert "server tools" in caught.value.body["error"]["message"]


def test_a_streamed_line_break_character_leaves_every_event_on_one_line(server):
    # JSON may carry U+2028, U+2029 and NEL raw; httpx's iter_lines (str.splitlines) ends a line at each.
    value = "a\u2028b\u2029c\x85d"
    tool = {"name": "say", "input_schema": {"type": "object", "properties": {"word": {"enum": [value]}},
                                            "required": ["word"], "additionalProperties": False}}
    body = {"model": "tiny-vl", "max_tokens": 40, "stream": True, "tools": [tool], "tool_choice": {"type": "any"},
            "messages": [{"role": "user", "content": "say it"}]}
    with httpx.stream("POST", server.url + "/v1/messages", json=body, headers={"x-api-key": API_KEY}, timeout=60) as response:
        events = [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]
    inputs = [json.loads(e["delta"]["partial_json"]) for e in events if e["type"] == "content_block_delta"]
    assert inputs and all(i == {"word": value} for i in inputs)
