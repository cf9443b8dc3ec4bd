"""A Qwen3.5 model (hybrid decoder, XML tool calls) through the official SDKs against a running server."""

from __future__ import annotations

import json

import anthropic
import jsonschema
import openai
import pytest

from tests.e2e.conftest import API_KEY
from tests.e2e.test_anthropic_tools import ASK, CLOCK, SCHEMAS, WEATHER
from tests.helpers import image_b64, prompt_tokens

NO_THINKING = {"type": "disabled"}  # Qwen3.5 thinks unless told not to; random weights seldom stop


@pytest.fixture
def hybrid_client(hybrid_server):
    return anthropic.Anthropic(base_url=hybrid_server.url, api_key=API_KEY, max_retries=0, timeout=120)


def test_a_streamed_answer_about_an_image_counts_as_count_tokens_says(hybrid_client):
    messages = [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image_b64()}},
        {"type": "text", "text": "What is in this image?"},
    ]}]
    with hybrid_client.messages.stream(model="tiny-vl", max_tokens=12, messages=messages) as stream:
        kinds = [event.type for event in stream]
        message = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert message.usage.output_tokens == 12 or message.stop_reason == "end_turn"
    counted = hybrid_client.messages.count_tokens(model="tiny-vl", messages=messages).input_tokens
    assert counted == prompt_tokens(message.usage)


@pytest.mark.parametrize("seed", range(3))
def test_forced_xml_tool_calls_come_back_as_tool_use_valid_for_their_schema(hybrid_client, seed):
    message = hybrid_client.messages.create(
        # Room for what a random model may write at temperature 1: parallel calls, and values for
        # parameters the open WEATHER schema does not name (300 ran out once under load).
        model="tiny-vl", max_tokens=1000, messages=ASK, tools=[WEATHER, CLOCK], thinking=NO_THINKING,
        tool_choice={"type": "any"}, extra_body={"temperature": 1.0, "seed": seed},
    )
    assert message.stop_reason == "tool_use"
    calls = [b for b in message.content if b.type == "tool_use"]
    assert calls and len(calls) == len(message.content)
    for call in calls:
        jsonschema.validate(call.input, SCHEMAS[call.name])


def test_a_tool_loop_sends_the_call_back_and_goes_on(hybrid_client):
    first = hybrid_client.messages.create(
        model="tiny-vl", max_tokens=300, messages=ASK, tools=[WEATHER], thinking=NO_THINKING,
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    )
    [call] = [b for b in first.content if b.type == "tool_use"]
    history = ASK + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18 degrees, sunny"}]},
    ]
    second = hybrid_client.messages.create(model="tiny-vl", max_tokens=8, messages=history, tools=[WEATHER], thinking=NO_THINKING)
    assert second.stop_reason in ("end_turn", "max_tokens", "tool_use")
    # the history's call is in the prompt as Qwen3.5 writes calls: more tokens than the first prompt
    assert prompt_tokens(second.usage) > prompt_tokens(first.usage)
    assert hybrid_client.messages.count_tokens(model="tiny-vl", messages=history, tools=[WEATHER],
                                               thinking=NO_THINKING).input_tokens == prompt_tokens(second.usage)


def test_openai_forced_tool_calls_have_json_arguments_valid_for_their_schema(hybrid_server):
    client = openai.OpenAI(base_url=hybrid_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    tool = {"type": "function", "function": {"name": WEATHER["name"], "parameters": WEATHER["input_schema"]}}
    completion = client.chat.completions.create(
        model="tiny-vl", max_tokens=800, messages=ASK, tools=[tool], tool_choice="required", seed=3,
        parallel_tool_calls=False,  # random weights write a geometric number of calls: one, and room for it
        extra_body={"reasoning_effort": "none"},  # thinking off
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["input_schema"])


def test_the_next_turn_resumes_where_the_first_kept_its_state(hybrid_client):
    ask = [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image_b64(color=(9, 99, 199))}},
        {"type": "text", "text": "Describe this picture in one line."},
    ]}]
    first = hybrid_client.messages.create(model="tiny-vl", max_tokens=8, messages=ask, thinking=NO_THINKING)
    said = "".join(b.text for b in first.content if b.type == "text") or "a picture"
    follow_up = ask + [{"role": "assistant", "content": said}, {"role": "user", "content": "And its colours?"}]
    second = hybrid_client.messages.create(model="tiny-vl", max_tokens=8, messages=follow_up, thinking=NO_THINKING)
    # the first turn's prompt, all but its last few tokens, is resumed rather than computed again
    assert first.usage.cache_read_input_tokens == 0 and first.usage.cache_creation_input_tokens > 0
    assert second.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens
    assert prompt_tokens(first.usage) - first.usage.cache_creation_input_tokens < 8 + 16


def test_a_forced_call_with_thinking_left_out_is_answered_without_thinking(hybrid_client):
    """Anthropic refuses thinking beside a forced call; Qwen3.5's template thinks unless told not to."""
    # One call: random weights write a geometric number of parallel calls, and the seed's draws
    # move with the numerics of whatever the server batched or cached before (one ran past 300 tokens).
    ask = dict(model="tiny-vl", messages=ASK, tools=[WEATHER, CLOCK], tool_choice={"type": "any", "disable_parallel_tool_use": True})
    message = hybrid_client.messages.create(max_tokens=800, extra_body={"temperature": 1.0, "seed": 5}, **ask)
    assert message.stop_reason == "tool_use" and all(b.type == "tool_use" for b in message.content)
    assert hybrid_client.messages.count_tokens(**ask).input_tokens == prompt_tokens(message.usage)
