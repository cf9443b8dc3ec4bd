"""``--request-timeout`` mechanics: one deadline for the hand-off to the engine and every event after."""

import asyncio

import pytest

from localvl.api.deadline import Deadline
from localvl.errors import RequestTimeoutError
from tests.api.fake_stream import FakeStream


class HungEngine:
    """An engine that never takes a request (as a hung engine process never acknowledges one)."""

    def __init__(self) -> None:
        self.cancelled = False

    async def submit(self, request):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled = True
            raise


def test_a_submit_the_engine_never_acknowledges_ends_with_a_timeout_error():
    engine = HungEngine()

    async def body():
        await asyncio.wait_for(Deadline(0.05).submit(engine, None), 60)  # the outer bound: the test never hangs

    with pytest.raises(RequestTimeoutError) as caught:
        asyncio.run(body())
    assert engine.cancelled  # the submit was given up, which takes the request back from the engine
    assert caught.value.status == 504 and "stream" not in caught.value.message  # streams hit it too


def test_the_stream_shares_the_deadline_its_submit_used_and_is_closed_at_it():
    silent = FakeStream([], delay=3600)

    class Engine:
        async def submit(self, request):
            return silent

    async def body():
        stream = await Deadline(0.05).submit(Engine(), None)
        await asyncio.wait_for(stream.__anext__(), 60)

    with pytest.raises(RequestTimeoutError):
        asyncio.run(body())
    assert silent.closed  # its place in the batch is freed


def test_a_deadline_already_past_refuses_the_hand_off():
    class Instant:
        async def submit(self, request):
            await asyncio.sleep(0)  # the hand-off always waits on something
            return FakeStream([])

    with pytest.raises(RequestTimeoutError):  # as when the request spent its time before reaching the engine
        asyncio.run(Deadline(0).submit(Instant(), None))
