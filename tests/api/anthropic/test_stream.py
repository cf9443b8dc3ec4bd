"""The SSE encoder on its own: event order, heartbeats, and failures after the stream began."""

import asyncio
import json

from localvl.api.anthropic.stream import Output, collect_message, message_events
from localvl.engine.events import Finished, TextDelta, Usage
from localvl.errors import InternalError, OverloadedError
from tests.api.fake_stream import FakeStream


def parse(frames: list[bytes]) -> list[tuple[str, dict]]:
    """The events of the stream's writes (a write may carry several whole events)."""
    events = []
    for frame in frames:
        text = frame.decode()
        assert text.endswith("\n\n")
        for event in text.removesuffix("\n\n").split("\n\n"):
            name_line, data_line = event.split("\n")
            name, data = name_line.removeprefix("event: "), json.loads(data_line.removeprefix("data: "))
            assert data["type"] == name
            events.append((name, data))
    return events


async def drain(stream, interval=10.0, stop_after=None):
    frames = []
    generator = message_events(stream, Output("msg_1", "claude-x"), interval)
    async for frame in generator:
        frames.append(frame)
        if stop_after is not None and len(frames) >= stop_after:
            await generator.aclose()
            break
    return frames


def test_event_sequence_of_a_text_answer():
    usage = Usage(input_tokens=7, output_tokens=2)
    stream = FakeStream([TextDelta("Hel"), TextDelta("lo"), Finished("eos", usage)])
    events = parse(asyncio.run(drain(stream)))
    assert [n for n, _ in events] == [
        "message_start", "ping", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop",
    ]
    assert events[0][1]["message"]["usage"]["input_tokens"] == 7
    assert events[6][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert events[6][1]["usage"]["output_tokens"] == 2
    assert stream.closed


def test_events_ready_together_go_out_in_one_write():
    stream = FakeStream([TextDelta("Hel"), TextDelta("lo"), Finished("eos", Usage(7, 2))])
    writes = [[n for n, _ in parse([frame])] for frame in asyncio.run(drain(stream))]
    assert writes == [
        ["message_start", "ping"], ["content_block_start", "content_block_delta"], ["content_block_delta"],
        ["content_block_stop", "message_delta", "message_stop"],
    ]


def test_an_answer_without_text_has_no_content_block():
    stream = FakeStream([Finished("max_tokens", Usage(7, 1))])
    names = [n for n, _ in parse(asyncio.run(drain(stream)))]
    assert names == ["message_start", "ping", "message_delta", "message_stop"]


def test_a_failure_after_the_stream_began_is_an_error_event():
    stream = FakeStream([TextDelta("partial"), OverloadedError("engine overloaded")])
    events = parse(asyncio.run(drain(stream)))
    assert events[-1] == ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "engine overloaded"}})
    stream = FakeStream([TextDelta("partial"), RuntimeError("secret content")])
    name, data = parse(asyncio.run(drain(stream)))[-1]
    assert name == "error" and data["error"]["type"] == "api_error" and "secret" not in data["error"]["message"]


def test_heartbeats_fill_silences():
    stream = FakeStream([TextDelta("a"), Finished("eos", Usage(7, 1))], delay=0.2)
    names = [n for n, _ in parse(asyncio.run(drain(stream, interval=0.03)))]
    assert names.count("ping") >= 4  # the opening ping, then at least one per silent stretch


def test_a_consumer_that_leaves_early_closes_the_generation():
    stream = FakeStream([TextDelta("a"), TextDelta("b"), TextDelta("c"), Finished("eos", Usage(7, 3))])
    asyncio.run(drain(stream, stop_after=3))
    assert stream.closed


def test_collect_message_builds_the_whole_message():
    stream = FakeStream([TextDelta("a"), TextDelta("b"), Finished("stop_sequence", Usage(7, 3), "STOP")])
    message = asyncio.run(collect_message(stream, Output("msg_1", "claude-x")))
    assert message["content"] == [{"type": "text", "text": "ab"}]
    assert message["stop_reason"] == "stop_sequence" and message["stop_sequence"] == "STOP"
    assert message["usage"]["input_tokens"] == 7 and message["usage"]["output_tokens"] == 3
    assert stream.closed


def test_collect_message_without_a_result_is_an_internal_error():
    import pytest

    with pytest.raises(InternalError):
        asyncio.run(collect_message(FakeStream([TextDelta("a")]), Output("msg_1", "claude-x")))


def test_closing_between_items_closes_the_source_at_once():
    """A client gone between two events: the source (whose closing aborts the generation) is closed
    then, not whenever the garbage collector gets to it."""
    from localvl.api.sse import with_heartbeats

    closed = []

    async def source():
        try:
            for i in range(100):
                yield i
        finally:
            closed.append(True)

    async def main():
        stream = with_heartbeats(source(), 10.0)
        assert await stream.__anext__() == 0
        await stream.aclose()
        return closed

    assert asyncio.run(main()) == [True]
