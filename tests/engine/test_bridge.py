import asyncio

import torch

from localvl.engine.bridge import Job, Outbox, Stream
from localvl.engine.events import Finished, TextDelta, Usage
from localvl.engine.runner import PromptState
from localvl.engine.sampling import ResolvedSampling
from localvl.engine.sequence import Sequence


def job(loop, outbox):
    state = PromptState(torch.zeros(3, 2, dtype=torch.long), 0)
    return Job(state, ResolvedSampling(), (), None, False, loop, outbox)


def test_one_flush_delivers_a_steps_events_and_a_slow_reader_gets_them_merged():
    aborted = []

    async def main():
        outbox = Outbox()
        seq = Sequence("r", [1, 2], payload=job(asyncio.get_running_loop(), outbox))
        stream = Stream(seq, aborted.append)
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
        stream = Stream(seq, aborted.append)
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
