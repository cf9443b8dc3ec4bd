"""LangChain's ``ChatAnthropic`` against localvl: tool binding, forced calls, streaming."""

from __future__ import annotations

import jsonschema
import pytest

from tests.e2e.conftest import API_KEY

langchain_anthropic = pytest.importorskip("langchain_anthropic")

WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}


@pytest.fixture
def chat(server):
    return langchain_anthropic.ChatAnthropic(model="claude-sonnet-4-5", base_url=server.url, api_key=API_KEY,
                                             max_tokens=300, max_retries=0, timeout=60)


def test_bind_tools_with_a_forced_call_returns_valid_tool_calls(chat):
    bound = chat.bind_tools([WEATHER], tool_choice="get_weather")
    message = bound.invoke("What is the weather in Paris?")
    assert message.tool_calls and all(call["name"] == "get_weather" for call in message.tool_calls)
    for call in message.tool_calls:
        assert call["id"].startswith("toolu_")
        jsonschema.validate(call["args"], WEATHER["input_schema"])
    assert message.response_metadata["stop_reason"] == "tool_use"


def test_streamed_chunks_add_up_to_the_tool_call(chat):
    bound = chat.bind_tools([WEATHER], tool_choice="any")
    total = None
    for chunk in bound.stream("What is the weather in Paris?"):
        total = chunk if total is None else total + chunk
    assert total is not None and total.tool_calls
    for call in total.tool_calls:
        jsonschema.validate(call["args"], WEATHER["input_schema"])


def test_streamed_text_equals_the_whole_answer(server):
    greedy = langchain_anthropic.ChatAnthropic(model="claude-sonnet-4-5", base_url=server.url, api_key=API_KEY,
                                               max_tokens=16, temperature=0, max_retries=0, timeout=60)
    whole = greedy.invoke("Hello!")
    total = None
    for chunk in greedy.stream("Hello!"):
        total = chunk if total is None else total + chunk
    assert total.text == whole.text
    assert total.usage_metadata["output_tokens"] == whole.usage_metadata["output_tokens"] > 0
