"""LangChain's ``ChatAnthropic`` (and ``ChatOpenAI``) against localvl: tool binding, forced calls, streaming,
structured output, images."""

from __future__ import annotations

from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, ConfigDict, Field

from tests.e2e.conftest import API_KEY
from tests.helpers import image_b64

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


class Forecast(BaseModel):
    """A forecast for one city."""

    model_config = ConfigDict(extra="forbid")  # additionalProperties: false, so the grammar closes the object
    city: str = Field(max_length=12)
    sky: Literal["clear", "cloudy", "rain"]


def test_structured_output_by_a_forced_tool_parses_into_the_model(chat):
    # Random weights write nonsense; the forced call's grammar is what makes it a Forecast.
    forecast = chat.with_structured_output(Forecast, method="function_calling").invoke("Forecast for Paris?")
    assert isinstance(forecast, Forecast)


def test_a_base64_image_block_is_counted_in_usage_metadata(chat):
    from langchain_core.messages import HumanMessage

    text_only = chat.invoke([HumanMessage(content=[{"type": "text", "text": "what is this?"}])]).usage_metadata
    image = {"type": "image", "base64": image_b64(), "mime_type": "image/png"}
    with_image = chat.invoke([HumanMessage(content=[image, {"type": "text", "text": "what is this?"}])]).usage_metadata
    assert with_image["input_tokens"] > text_only["input_tokens"]
    assert with_image["total_tokens"] == with_image["input_tokens"] + with_image["output_tokens"]


def test_chat_openai_structured_output_and_forced_tools_parse(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    chat = langchain_openai.ChatOpenAI(model="tiny-vl", base_url=server.url + "/v1", api_key=API_KEY, max_tokens=300,
                                       max_retries=0, timeout=60)
    assert isinstance(chat.with_structured_output(Forecast, method="json_schema").invoke("Forecast?"), Forecast)
    assert isinstance(chat.with_structured_output(Forecast, method="function_calling").invoke("Forecast?"), Forecast)
    message = chat.bind_tools([WEATHER], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert message.tool_calls and message.response_metadata["finish_reason"] == "tool_calls"
    for call in message.tool_calls:
        jsonschema.validate(call["args"], WEATHER["input_schema"])
