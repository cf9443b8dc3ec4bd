"""The official ``anthropic`` SDK against a running ``localvl serve`` — only the base URL changed."""

from __future__ import annotations

import asyncio
import json
import threading

import anthropic
import httpx
import pytest

from localvl.engine.stops import MAX_STOP_CHARS, MAX_STOPS
from tests.e2e.conftest import API_KEY
from tests.helpers import image_b64, prompt_tokens

STOP_REASONS = {"end_turn", "max_tokens", "stop_sequence", "model_context_window_exceeded"}
USER = [{"role": "user", "content": "Describe a cat in one sentence."}]


def image_message(fmt: str, media_type: str, text: str = "What is in this image?") -> list[dict]:
    block = {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": image_b64(fmt, size=(120, 80))}}
    return [{"role": "user", "content": [block, {"type": "text", "text": text}]}]


def text_of(message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def test_create_returns_a_well_formed_message(client):
    message = client.messages.create(model="claude-sonnet-4-5", max_tokens=12, messages=USER)
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == "claude-sonnet-4-5"
    assert message.stop_reason in STOP_REASONS
    assert all(block.type == "text" and block.text for block in message.content)
    assert 0 < message.usage.output_tokens <= 12 and prompt_tokens(message.usage) > 0
    assert message.usage.cache_read_input_tokens >= 0 and message.usage.cache_creation_input_tokens >= 0


def test_async_client_creates_and_streams(async_client):
    async def main():
        message = await async_client.messages.create(model="tiny-vl", max_tokens=8, messages=USER, extra_body={"temperature": 0})
        async with async_client.messages.stream(model="tiny-vl", max_tokens=8, messages=USER, extra_body={"temperature": 0}) as stream:
            pieces = [text async for text in stream.text_stream]
            final = await stream.get_final_message()
        return message, pieces, final

    message, pieces, final = asyncio.run(main())
    assert "".join(pieces) == text_of(final) == text_of(message)  # greedy: the same answer both ways
    assert final.usage == message.usage


@pytest.mark.parametrize("fmt, media_type", [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("GIF", "image/gif"), ("WEBP", "image/webp")])
def test_each_image_format_is_read_and_counted_in_full(client, fmt, media_type):
    messages = image_message(fmt, media_type)
    message = client.messages.create(model="tiny-vl", max_tokens=6, messages=messages)
    counted = client.messages.count_tokens(model="tiny-vl", messages=messages).input_tokens
    text_only = client.messages.count_tokens(model="tiny-vl", messages=[{"role": "user", "content": "What is in this image?"}])
    assert prompt_tokens(message.usage) == counted
    assert counted > text_only.input_tokens + 4  # the image's merged patches, not a token or two


def test_stream_helper_text_equals_final_message(client):
    with client.messages.stream(model="tiny-vl", max_tokens=20, messages=USER) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text_of(final)
    assert final.stop_reason in STOP_REASONS and final.usage.output_tokens <= 20


def test_raw_stream_event_order_and_indices(client):
    events = list(client.messages.create(model="tiny-vl", max_tokens=10, messages=USER, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    start = events[0].message
    assert start.content == [] and start.stop_reason is None and start.usage.input_tokens > 0
    body = kinds[1:-2]
    if body:
        assert body[0] == "content_block_start" and body[-1] == "content_block_stop"
        assert set(body[1:-1]) <= {"content_block_delta"}
        assert all(e.index == 0 for e in events if hasattr(e, "index"))
        assert all(e.delta.text for e in events if e.type == "content_block_delta")
    delta = events[-2]
    assert delta.delta.stop_reason in STOP_REASONS and delta.usage.output_tokens <= 10


def test_stop_sequences_end_the_answer_before_them(client):
    full = text_of(client.messages.create(model="tiny-vl", max_tokens=40, messages=USER, extra_body={"temperature": 0}))
    assert len(full) > 6
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    message = client.messages.create(model="tiny-vl", max_tokens=40, messages=USER, stop_sequences=[stop], extra_body={"temperature": 0})
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop
    assert text_of(message) == full[: full.find(stop)]


def test_stop_sequences_past_their_bounds_are_a_400(client):
    """Every stop is matched at every step: a request may not make each step of the batch slow."""
    for stops, words in (([f"s{k}" for k in range(MAX_STOPS + 1)], "at most"), (["x" * (MAX_STOP_CHARS + 1)], "characters")):
        with pytest.raises(anthropic.BadRequestError) as refused:
            client.messages.create(model="tiny-vl", max_tokens=5, messages=USER, stop_sequences=stops)
        assert refused.value.body["error"]["type"] == "invalid_request_error" and words in refused.value.message
    at_bounds = [f"{k:03d}" + "x" * (MAX_STOP_CHARS - 3) for k in range(MAX_STOPS)]
    assert client.messages.create(model="tiny-vl", max_tokens=5, messages=USER, stop_sequences=at_bounds).type == "message"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"messages": USER},
        {"messages": USER, "system": "You are terse."},
        {"messages": USER, "system": [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}]},
        {"messages": [*USER, {"role": "assistant", "content": "Sure:"}, {"role": "user", "content": "go on"}]},
        {"messages": [*USER, {"role": "system", "content": "Answer in French."}]},
        {"messages": [*USER, {"role": "assistant", "content": "The cat"}]},
        {"messages": image_message("PNG", "image/png")},
        # text quoting Qwen's control tokens is text: it neither ends the turn nor counts as an image
        {"messages": [{"role": "user", "content": "What do <|image_pad|> and <|im_end|><|im_start|>system mean?"}]},
    ],
    ids=["plain", "system-string", "system-blocks", "multi-turn", "system-in-messages", "prefill", "image", "control-tokens"],
)
def test_count_tokens_equals_usage(client, kwargs):
    message = client.messages.create(model="tiny-vl", max_tokens=4, **kwargs)
    assert client.messages.count_tokens(model="tiny-vl", **kwargs).input_tokens == prompt_tokens(message.usage)


def test_count_tokens_with_the_real_qwen_vocabulary(qwen_vocab_server):
    client = anthropic.Anthropic(base_url=qwen_vocab_server.url, api_key=API_KEY, max_retries=0)
    for messages in (USER, image_message("JPEG", "image/jpeg")):
        message = client.messages.create(model="tiny-vl", max_tokens=4, messages=messages)
        assert client.messages.count_tokens(model="tiny-vl", messages=messages).input_tokens == prompt_tokens(message.usage)
    # Qwen3-VL's system-free prompt "<|im_start|>user\nHello, world!<|im_end|>\n<|im_start|>assistant\n"
    # is, in real Qwen ids, [151644, 872, 198, 9707, 11, 1879, 0, 151645, 198, 151644, 77091, 198].
    # (adaptive: the template's default; left out, thinking is off, which this tiny template, shaped
    # like a switchable one, writes as an empty <think> block that Qwen3-VL's own would not)
    hello = client.messages.count_tokens(model="tiny-vl", messages=[{"role": "user", "content": "Hello, world!"}],
                                         thinking={"type": "adaptive"})
    assert hello.input_tokens == 12


def test_a_30k_token_prompt_works_in_bounded_memory(qwen_vocab_server):
    client = anthropic.Anthropic(base_url=qwen_vocab_server.url, api_key=API_KEY, max_retries=0, timeout=300)
    long = "The quick brown fox jumps over the lazy dog near the riverbank. " * 2150
    messages = [{"role": "user", "content": long}]
    counted = client.messages.count_tokens(model="tiny-vl", messages=messages).input_tokens
    assert 29_000 < counted < 32_000
    message = client.messages.create(model="tiny-vl", max_tokens=3, messages=messages)
    assert prompt_tokens(message.usage) == counted
    # Full-prompt logits alone would be 30k x 151,936 floats = 18 GB; a 30k x 30k mask 3.6 GB.
    assert qwen_vocab_server.peak_rss_bytes() < 3 * 1024**3


def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-vl"]
    assert models.data[0].type == "model" and models.data[0].created_at.tzinfo is not None
    assert client.models.retrieve("tiny-vl").id == "tiny-vl"
    assert client.models.retrieve("claude-haiku-4-5").id == "claude-haiku-4-5"


def test_errors_map_to_the_sdk_exception_classes(server, client):
    bad_key = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        bad_key.messages.create(model="tiny-vl", max_tokens=5, messages=USER)
    assert caught.value.body["error"]["type"] == "authentication_error"
    assert caught.value.request_id and caught.value.request_id.startswith("req_")
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="gpt-4o", max_tokens=5, messages=USER)
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("llama-3-70b")
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="tiny-vl", max_tokens=-1, messages=USER)
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="tiny-vl", max_tokens=5, messages=[])
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="tiny-vl", max_tokens=5, messages=[{"role": "assistant", "content": "hi"}])
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="tiny-vl", max_tokens=5, messages=image_message("PNG", "image/jpeg"))
    corrupt = [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image_b64("PNG")[:80]}}]}]
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="tiny-vl", max_tokens=5, messages=corrupt)
    with pytest.raises(anthropic.BadRequestError):  # stream=True errors before the stream begins
        client.messages.create(model="tiny-vl", max_tokens=-5, messages=USER, stream=True)


def test_a_body_over_32_mb_is_request_too_large(client):
    huge = [{"role": "user", "content": "x" * (33 * 1024 * 1024)}]
    with pytest.raises(anthropic.RequestTooLargeError) as caught:
        client.messages.create(model="tiny-vl", max_tokens=5, messages=huge)
    assert caught.value.body["error"]["type"] == "request_too_large"


def test_context_limits(small_context_server):
    client = anthropic.Anthropic(base_url=small_context_server.url, api_key=API_KEY, max_retries=0)
    long = [{"role": "user", "content": "word " * 200}]
    counted = client.messages.count_tokens(model="tiny-vl", messages=long).input_tokens
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="tiny-vl", max_tokens=5, messages=long)
    assert caught.value.body["error"]["message"] == f"prompt is too long: {counted} tokens > 64 maximum"
    short = [{"role": "user", "content": "hi"}]
    room = 64 - client.messages.count_tokens(model="tiny-vl", messages=short).input_tokens
    message = client.messages.create(model="tiny-vl", max_tokens=1000, messages=short, extra_body={"temperature": 0})
    # greedy on this seed's weights does not emit EOS within the room left, so the context runs out
    assert message.stop_reason == "model_context_window_exceeded"
    assert message.usage.output_tokens == room


def test_pings_are_sent_while_the_prompt_is_prefilled(server):
    payload = {"model": "tiny-vl", "max_tokens": 2, "stream": True,
               "messages": [{"role": "user", "content": "word " * 6000}]}
    response = httpx.post(server.url + "/v1/messages", json=payload, headers={"x-api-key": API_KEY}, timeout=120)
    names = [line.split(": ", 1)[1] for line in response.text.splitlines() if line.startswith("event: ")]
    first_block = names.index("message_delta") if "content_block_start" not in names else names.index("content_block_start")
    assert names[0] == "message_start"
    assert names[:first_block].count("ping") >= 2  # the opening ping, then keep-alives during prefill


def test_health_answers_during_generation_and_disconnect_stops_it(server):
    payload = {"model": "tiny-vl", "max_tokens": 30000, "stream": True, "temperature": 1,
               "messages": [{"role": "user", "content": "Write a very long story."}]}
    message_id = None
    with httpx.stream("POST", server.url + "/v1/messages", json=payload, headers={"x-api-key": API_KEY}, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and '"message_start"' in line:
                message_id = json.loads(line[6:])["message"]["id"]
            if line.startswith("data: ") and '"content_block_delta"' in line:
                break
        health = httpx.get(server.url + "/health", timeout=5)
        assert health.status_code == 200
    # the client is gone: the server aborts that generation and moves on
    after = anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=30)
    after.messages.create(model="tiny-vl", max_tokens=3, messages=USER)
    assert message_id is not None
    assert f"{message_id} aborted" in server.log()


def test_concurrent_clients_are_all_answered(client):
    results: list = []

    def ask(i: int) -> None:
        results.append(client.messages.create(model="tiny-vl", max_tokens=5, messages=[{"role": "user", "content": f"q{i}"}]))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 6 and all(m.stop_reason in STOP_REASONS for m in results)


def test_a_non_streaming_client_that_gives_up_stops_its_generation(server):
    import time

    aborted_before = server.log().count(" aborted")
    # a long prompt: its prefill outlasts the client's patience, whatever the random model says
    payload = {"model": "tiny-vl", "max_tokens": 100, "messages": [{"role": "user", "content": "word " * 12000}]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/messages", json=payload, headers={"x-api-key": API_KEY},
                   timeout=httpx.Timeout(10, read=1.0))
    deadline = time.monotonic() + 30
    while server.log().count(" aborted") == aborted_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.log().count(" aborted") == aborted_before + 1
    time.sleep(0.5)  # the handler's end: the client's leaving, not an error with a traceback
    assert "Exception in ASGI application" not in server.log() and "CancelledError" not in server.log()
    assert "the client left before its answer" in server.log()


def test_a_full_queue_is_overloaded_with_retry_after(one_at_a_time_server):
    client = anthropic.AsyncAnthropic(base_url=one_at_a_time_server.url, api_key=API_KEY, max_retries=0)
    short = [{"role": "user", "content": "hi"}]

    async def one():
        try:
            await client.messages.create(model="tiny-vl", max_tokens=1000, messages=short, extra_body={"temperature": 0})
            return None
        except anthropic.APIStatusError as error:
            return error

    async def main():
        return await asyncio.gather(*(one() for _ in range(5)))

    outcomes = asyncio.run(main())
    refused = [e for e in outcomes if e is not None]
    # One runs; one may wait (if the first was already scheduled when it came); the rest are refused.
    assert 1 <= len(refused) <= 4 and outcomes.count(None) >= 1
    for error in refused:
        assert isinstance(error, anthropic.OverloadedError) and error.status_code == 529
        assert error.body["error"]["type"] == "overloaded_error"
        assert int(error.response.headers["retry-after"]) >= 1
