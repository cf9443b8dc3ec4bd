"""The engine in its own process: the same answers as the model alone, and every way a request or
the process itself can end."""

import asyncio
import fcntl
import functools
import os
import signal
import struct
import termios
import threading
import time

import pytest

from localvl.conversation import Conversation, GenerationRequest, SamplingParams, Text, Turn
from localvl.engine.affinity import available
from localvl.engine.events import Finished, TextDelta
from localvl.engine.local import EngineConfig
from localvl.engine.process import EngineStartError, ProcessEngine
from localvl.errors import EngineDiedError, InvalidRequestError, OverloadedError, ServiceUnavailableError
from localvl.models.loader import load_frontend_processor, load_model
from tests.conftest import TEST_DEVICE
from tests.engine.test_batching import assert_matches_reference, collect, image, mixed_conversations


def start(folder, cpu_affinity=False, **config) -> ProcessEngine:
    config.setdefault("kv_cache_memory", 32 << 20)
    load = functools.partial(load_model, str(folder), device=TEST_DEVICE, dtype="float32")
    return ProcessEngine(load, functools.partial(load_frontend_processor, str(folder)), EngineConfig(**config),
                         cpu_threads=1, cpu_affinity=cpu_affinity, log_level="warning")


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = start(model_dir("qwen2_5_vl"))
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.stop())


def story(i: int = 0) -> Conversation:
    return Conversation([Turn("user", [Text(f"{i} Write a very long story.")])])


def test_concurrent_requests_with_images_equal_the_model_alone(engine, loaded_model):
    convs = mixed_conversations(8)

    async def body():
        return await asyncio.gather(*[collect(engine, c, f"mix{i}") for i, c in enumerate(convs)])

    results = asyncio.run(body())
    assert_matches_reference(loaded_model("qwen2_5_vl"), convs, results)
    assert engine.info.model_type == "qwen2_5_vl"


def test_a_compiled_decoder_in_the_engine_process_answers_as_the_model_alone(model_dir, loaded_model):
    """As `localvl serve --compile` runs it: compiled (and warmed up) in the engine's own process."""
    engine = start(model_dir("qwen2_5_vl"), compile=True)
    convs = mixed_conversations(4)

    async def body():
        await engine.start()
        try:
            results = await asyncio.gather(*[collect(engine, c, f"compiled{i}") for i, c in enumerate(convs)])
            await asyncio.sleep(0.3)  # the counters come back with the engine's next report
            return results, engine.stats()
        finally:
            await engine.stop()

    results, stats = asyncio.run(body())
    assert stats["compiled"] == 1
    assert_matches_reference(loaded_model("qwen2_5_vl"), convs, results)


def test_counts_and_records_come_back_from_the_engine_process(engine):
    records = []
    engine.observers.append(records.append)
    try:
        text, finished = asyncio.run(collect(engine, story(), "counted", max_tokens=5))
    finally:
        engine.observers.remove(records.append)
    assert finished.usage.input_tokens + finished.usage.cache_creation_input_tokens + finished.usage.cache_read_input_tokens == asyncio.run(engine.count_tokens(story()))
    assert [r.output_tokens for r in records] == [finished.usage.output_tokens]
    stats = engine.stats()
    assert stats["steps"] > 0 and stats["running"] == 0 and stats["failures"] == 0


def test_a_request_the_engine_refuses_raises_at_submit(engine):
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(unclosed"}}, "required": ["a"]}

    async def body():
        request = GenerationRequest("bad", story(), SamplingParams(max_tokens=5, temperature=0), output_schema=schema)
        with pytest.raises(InvalidRequestError):
            await engine.submit(request)
        return await collect(engine, story(), "after", max_tokens=3)  # the engine goes on

    _, finished = asyncio.run(body())
    assert finished.usage.output_tokens == 3


def test_closing_a_stream_frees_its_place_in_the_engine(engine):
    async def body():
        stream = await engine.submit(GenerationRequest("long", story(), SamplingParams(max_tokens=30000, temperature=1)))
        await stream.__anext__()
        await stream.aclose()
        for _ in range(200):  # the counters come back at least every 0.1 s while it works
            await asyncio.sleep(0.02)
            if engine.stats()["running"] == 0:
                return True
        return False

    assert asyncio.run(body())


def test_the_signals_a_terminal_or_systemd_sends_the_whole_group_leave_the_engine_running(engine):
    async def body():
        stream = await engine.submit(GenerationRequest("sig", story(), SamplingParams(max_tokens=40, temperature=0)))
        await stream.__anext__()
        os.kill(engine._process.pid, signal.SIGINT)
        os.kill(engine._process.pid, signal.SIGTERM)
        return [event async for event in stream]

    events = asyncio.run(body())
    assert isinstance(events[-1], Finished) and engine.alive  # not an error: the engine went on


def test_stopping_ends_open_streams_and_a_dead_engine_fails_them(model_dir):
    async def stopped():
        engine = start(model_dir("qwen2_5_vl"))
        await engine.start()
        stream = await engine.submit(GenerationRequest("s", story(), SamplingParams(max_tokens=30000, temperature=1, seed=1)))
        await stream.__anext__()
        await engine.stop()
        with pytest.raises(ServiceUnavailableError):
            async for _ in stream:
                pass
        assert not engine.alive

    async def killed():
        engine = start(model_dir("qwen2_5_vl"))
        await engine.start()
        stream = await engine.submit(GenerationRequest("k", story(), SamplingParams(max_tokens=30000, temperature=1, seed=1)))
        assert isinstance(await stream.__anext__(), TextDelta)
        os.kill(engine._process.pid, signal.SIGKILL)
        with pytest.raises(EngineDiedError):  # the server's failure, not the request's: a batch does it again
            async for event in stream:
                assert not isinstance(event, Finished)
        assert not engine.alive
        with pytest.raises(ServiceUnavailableError):
            await engine.submit(GenerationRequest("later", story(), SamplingParams(max_tokens=3)))
        await engine.stop()

    asyncio.run(stopped())
    asyncio.run(killed())


def test_a_hung_engine_process_lets_a_submit_be_cancelled_and_is_killed_at_stop(model_dir):
    """SIGSTOP stands in for a hung engine process (a stuck kernel, a deadlock): no ack comes back.
    The submit waiting for it can still be given up (the route's deadline does that), and ``stop``
    kills the process after its grace instead of waiting a minute."""
    engine = start(model_dir("qwen2_5_vl"))
    engine.stop_timeout = 0.5
    pid = engine._process.pid

    async def body():
        await engine.start()
        os.kill(pid, signal.SIGSTOP)
        request = GenerationRequest("hung", story(), SamplingParams(max_tokens=5))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(engine.submit(request), 1)
        assert engine._requests == {}  # taken back: its ack, if one ever came, goes nowhere
        await asyncio.wait_for(engine.stop(), 60)  # bounds the test if stop waited on the process

    try:
        asyncio.run(body())
        assert engine._process.exitcode == -signal.SIGKILL and not engine.alive
    finally:
        if engine._process.is_alive():
            os.kill(pid, signal.SIGCONT)
            engine._process.kill()


def unread(engine: ProcessEngine) -> tuple[int, int]:
    """Bytes waiting in the command pipe, and its capacity (Linux)."""
    fd = engine._commands.fileno()
    waiting = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
    return waiting, fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)


async def until(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} in {timeout} s"
        await asyncio.sleep(0.05)


def test_a_hung_engine_process_with_a_full_pipe_never_blocks_the_event_loop(model_dir):
    """SIGSTOP stands in for a hung engine process; image requests fill the command pipe behind it.
    Giving them up (a client gone, a deadline) aborts them on the event loop: a write to the full
    pipe there would freeze every route of the server. Once it runs again, the engine works
    through the backlog (each abort after its submit) and goes on."""
    engine = start(model_dir("qwen2_5_vl"))
    pid = engine._process.pid
    frozen = threading.Event()

    def thaw() -> None:  # bounds the test if something blocked on the pipe: the writes go through then
        frozen.set()
        os.kill(pid, signal.SIGCONT)

    watchdog = threading.Timer(120, thaw)
    pictures = [image(k, size=(640, 480)) for k in range(4)]  # ~115 KB down the pipe per request

    async def body():
        await engine.start()
        os.kill(pid, signal.SIGSTOP)
        watchdog.start()
        conv = Conversation([Turn("user", [*pictures, Text("Describe these.")])])
        submits = [asyncio.create_task(engine.submit(GenerationRequest(f"img{i}", conv, SamplingParams(max_tokens=5))))
                   for i in range(16)]
        await until(lambda: unread(engine)[0] >= unread(engine)[1] - (64 << 10), "a full pipe")
        assert not any(task.done() for task in submits)
        for task in submits:  # each cancelled submit aborts its request, on this event loop
            task.cancel()
        results = await asyncio.gather(*submits, return_exceptions=True)
        assert all(isinstance(result, asyncio.CancelledError) for result in results)
        assert engine._requests == {} and not engine._outgoing.empty()  # the aborts wait behind the writer
        os.kill(pid, signal.SIGCONT)
        text, finished = await collect(engine, story(), "after", max_tokens=3)
        assert finished.usage.output_tokens == 3
        await until(lambda: engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0, "idle again")

    try:
        asyncio.run(asyncio.wait_for(body(), 300))
        assert not frozen.is_set(), "the event loop blocked on the full pipe"
    finally:
        watchdog.cancel()
        if engine._process.is_alive():
            os.kill(pid, signal.SIGCONT)
        asyncio.run(engine.stop())


def test_a_silent_engine_process_is_unresponsive_until_it_answers_and_an_idle_one_is_not(model_dir):
    """/ready's view of a hung engine process (SIGSTOP): silent past ``unresponsive_after``, with a
    request unacknowledged or none at all. An idle engine reports now and then, so it stays
    responsive however long it idles. Meanwhile requests are refused, not piled up: past the
    engine's queue depth at once (529), and all of them once it counts as hung (503)."""
    engine = start(model_dir("qwen2_5_vl"), max_queue=2)
    engine.unresponsive_after = 4.0
    pid = engine._process.pid

    async def body():
        await engine.start()
        heard = engine._heard
        await until(lambda: engine._heard > heard, "a report from the idle engine")
        await asyncio.sleep(engine.unresponsive_after + 0.5)
        assert engine.responsive
        os.kill(pid, signal.SIGSTOP)
        submits = [asyncio.create_task(engine.submit(GenerationRequest(f"waits{i}", story(i), SamplingParams(max_tokens=3))))
                   for i in range(2)]
        await until(lambda: len(engine._requests) == 2, "both sent")
        with pytest.raises(OverloadedError):
            await engine.submit(GenerationRequest("third", story(), SamplingParams(max_tokens=3)))
        await until(lambda: not engine.responsive, "unresponsive")
        with pytest.raises(ServiceUnavailableError):
            await engine.submit(GenerationRequest("hung", story(), SamplingParams(max_tokens=3)))
        os.kill(pid, signal.SIGCONT)
        await until(lambda: engine.responsive, "responsive again")
        for stream in await asyncio.wait_for(asyncio.gather(*submits), 60):  # acknowledged once the engine ran again
            assert isinstance([event async for event in stream][-1], Finished)

    try:
        asyncio.run(asyncio.wait_for(body(), 300))
    finally:
        if engine._process.is_alive():
            os.kill(pid, signal.SIGCONT)
        asyncio.run(engine.stop())


def test_a_folder_the_engine_cannot_load_fails_at_start_with_the_loaders_message(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2"}')
    with pytest.raises(EngineStartError) as caught:
        start(tmp_path)
    assert "text model" in str(caught.value)


@pytest.mark.skipif(TEST_DEVICE != "cpu" or len(available()) < 2, reason="a model on the CPU, and two cores to split")
def test_on_a_cpu_the_engine_and_the_server_run_on_cores_of_their_own_until_stop(model_dir):
    before = available()
    engine = start(model_dir("qwen2_5_vl"), cpu_affinity=True)
    try:
        asyncio.run(engine.start())
        pid = engine._process.pid
        threads = {int(tid): sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")}
        # cpu_threads=1: one core for the engine thread; the rest for this process and the engine
        # process's reader of this process's messages (its main thread)
        assert before[:1] in threads.values() and threads[pid] == before[1:] and available() == before[1:]
        text, finished = asyncio.run(collect(engine, story(), "pinned", max_tokens=3))
        assert finished.usage.output_tokens == 3
    finally:
        asyncio.run(engine.stop())
    assert available() == before


def test_the_counters_arrive_before_any_request(model_dir):
    async def body():
        engine = start(model_dir("qwen2_vl"))
        await engine.start()
        try:
            return engine.stats()  # with the engine's readiness: /metrics has its gauges from the start
        finally:
            await engine.stop()

    stats = asyncio.run(body())
    assert stats["blocks_total"] > 0 and stats["running"] == 0 and stats["steps"] == 0
