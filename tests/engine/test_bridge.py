import asyncio

import torch

from localvl.engine.bridge import Job, Outbox, Stream
from localvl.engine.events import Finished, TextDelta, ThinkingDelta, Usage
from localvl.engine.runner import PromptState
from localvl.engine.sampling import ResolvedSampling
from localvl.engine.sequence import Sequence


def job(loop, outbox):
    state = PromptState(torch.zeros(3, 2, dtype=torch.long), 0)
    return Job("r", state, ResolvedSampling(), (), None, False, loop, outbox)


def streaming(interval=0.0):
    """A request's job and its stream on the running loop: (its Sequence, the Outbox, the Stream)."""
    outbox = Outbox()
    seq = Sequence("r", [1, 2], payload=job(asyncio.get_running_loop(), outbox))
    return seq, outbox, Stream("r", 2, seq.payload.events, lambda _: None, interval=interval)


def test_one_flush_delivers_a_steps_events_and_a_slow_reader_gets_them_merged():
    aborted = []

    async def main():
        outbox = Outbox()
        seq = Sequence("r", [1, 2], payload=job(asyncio.get_running_loop(), outbox))
        stream = Stream("r", 2, seq.payload.events, aborted.append)
        for piece in ("He", "llo", " world"):
            seq.payload.emit(TextDelta(piece))
        seq.payload.emit(Finished("eos", Usage(2, 3)))
        outbox.flush()
        return [event async for event in stream]

    events = asyncio.run(main())
    assert events == [TextDelta("Hello world"), Finished("eos", Usage(2, 3))]
    assert aborted == []  # a stream read to its end aborts nothing


def test_closing_a_stream_early_aborts_its_request():
    aborted = []

    async def main():
        outbox = Outbox()
        seq = Sequence("r", [1], payload=job(asyncio.get_running_loop(), outbox))
        stream = Stream("r", 2, seq.payload.events, aborted.append)
        seq.payload.emit(TextDelta("x"))
        outbox.flush()
        await stream.__anext__()
        await stream.aclose()

    asyncio.run(main())
    assert aborted == ["r"]


def test_a_flush_to_a_closed_loop_cancels_its_requests():
    loop = asyncio.new_event_loop()
    outbox = Outbox()
    j = job(loop, outbox)
    loop.close()
    j.emit(TextDelta("x"))
    outbox.flush()
    assert j.cancelled.is_set()


def test_with_an_interval_tokens_that_come_meanwhile_go_out_as_one_delta_and_the_first_at_once():
    async def main():
        loop = asyncio.get_running_loop()
        seq, outbox, stream = streaming(interval=0.2)
        seq.payload.emit(TextDelta("a"))
        outbox.flush()
        started = loop.time()
        first = await stream.__anext__()
        first_at = loop.time() - started

        async def produce():  # one token every 20 ms, as engine steps would
            for piece in ("b", "c", "d"):
                await asyncio.sleep(0.02)
                seq.payload.emit(TextDelta(piece))
                outbox.flush()
            seq.payload.emit(ThinkingDelta("t"))  # another kind of event ends the run of text
            seq.payload.emit(Finished("eos", Usage(2, 4)))
            outbox.flush()

        producer = asyncio.create_task(produce())
        rest = [event async for event in stream]
        await producer
        return first, first_at, rest, loop.time() - started

    first, first_at, rest, total = asyncio.run(main())
    assert first == TextDelta("a") and first_at < 0.1
    assert rest == [TextDelta("bcd"), ThinkingDelta("t"), Finished("eos", Usage(2, 4))]
    assert total >= 0.2  # the second delta waited for the interval


def test_without_an_interval_a_reader_that_keeps_up_gets_every_token_as_it_comes():
    async def main():
        seq, outbox, stream = streaming()
        events = []
        for piece in ("a", "b"):
            seq.payload.emit(TextDelta(piece))
            outbox.flush()
            events.append(await stream.__anext__())
        return events

    assert asyncio.run(main()) == [TextDelta("a"), TextDelta("b")]


def test_with_an_interval_the_end_does_not_wait_for_it():
    """The last token's text and the end come in one step: both go out at once, whatever the
    interval — the client's answer is complete a step after its last token, not an interval."""

    async def main():
        loop = asyncio.get_running_loop()
        seq, outbox, stream = streaming(interval=5.0)
        seq.payload.emit(TextDelta("a"))
        outbox.flush()
        assert await stream.__anext__() == TextDelta("a")
        started = loop.time()
        seq.payload.emit(TextDelta("b"))
        seq.payload.emit(TextDelta("c"))
        seq.payload.emit(Finished("eos", Usage(2, 3)))
        outbox.flush()
        rest = [event async for event in stream]
        return rest, loop.time() - started

    rest, took = asyncio.run(main())
    assert rest == [TextDelta("bc"), Finished("eos", Usage(2, 3))]
    assert took < 1.0  # not the 5 s interval


def test_a_stream_counts_what_was_generated_read_or_not_for_a_request_that_never_finishes():
    from localvl.engine.events import ToolCallEvent

    async def main():
        seq, outbox, stream = streaming(interval=60.0)
        for item in (TextDelta("a"), TextDelta("b"), ThinkingDelta("c"), ToolCallEvent("t", "f", {}), TextDelta("d")):
            seq.payload.emit(item)
        outbox.flush()
        await asyncio.sleep(0)
        assert isinstance(await stream.__anext__(), TextDelta)  # "a" and "b" merged, the thinking held
        await stream.aclose()  # the client left: what was made but never read counts too
        return stream.generated

    assert asyncio.run(main()) == 5
