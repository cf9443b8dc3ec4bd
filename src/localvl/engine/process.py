"""The engine in a process of its own: the HTTP server's work never waits for the engine's GIL.

In one process, the engine thread (stepping the model: mostly Python on a CPU, kernel launches on
a GPU) and the server's threads (HTTP, JSON, base64, image preprocessing, streaming) take turns on
one interpreter lock. Here the server process keeps the front end (``frontend.py``: render, check,
plan) and the engine process holds the model, the KV cache and the engine thread, as vLLM and
SGLang split them. Between them, two pipes of pickled messages:

- to the engine: ``submit`` (an ``Admission``: token ids, pixels, sampling), ``abort``, ``stop``;
- from it: ``ready``/``failed`` once at start, an ``ack`` per submit (or the error that refused
  it), and after each engine step one ``events`` message with every request's events of that
  step, finished-request records for metrics, and now and then the engine's counters.

If the engine process dies, every open stream ends with an error and ``alive`` turns false (the
server's /ready then answers 503). If it stops answering (a stuck kernel, a deadlock), ``responsive``
turns false after ``UNRESPONSIVE_AFTER`` seconds (``--engine-hang-timeout``) and /ready and new
requests answer 503 until it answers again; requests it has not yet acknowledged are bounded by the
engine's ``max_queue`` (529 past it), so a hung engine cannot pile up rendered prompts here.

One thread of the server writes the command pipe: a hung engine process leaves the pipe full (an
image or two fill it), and a write to a full pipe blocks; on the event loop, that would freeze
every route of the server with it.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import struct
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable

import anyio
import numpy

from localvl.conversation import Conversation, GenerationRequest
from localvl.engine import affinity
from localvl.engine.bridge import Job, Outbox, Stream
from localvl.engine.events import Event, Finished, RequestRecord
from localvl.engine.frontend import Frontend
from localvl.engine.protocol import ModelInfo
from localvl.errors import EngineDiedError, InternalError, LocalvlError, OverloadedError, ServiceUnavailableError

logger = logging.getLogger(__name__)

STATS_INTERVAL = 0.1  # seconds between counter updates while the engine is busy
STOP_GRACE = 5.0  # seconds ``stop`` gives the engine process (its step in progress) before killing it
# Seconds of silence after which the engine process counts as hung (/ready 503). Its engine thread
# reports after every step and every ``IDLE_REPORT`` seconds while idle, so silence means one step
# running this long: far above a CPU prefill chunk of a large model or a recompile (seconds), far
# below --request-timeout (600 s by default), which ends the requests a hung engine holds anyway.
UNRESPONSIVE_AFTER = 60.0


_HEAD = struct.Struct("!QI")  # pickle length, number of out-of-band buffers (then one "!Q" size each)


def _write(connection: Connection, message: Any) -> None:
    """One message: a header, its pickle, then each large buffer in it (an image's pixels) as it
    lies in memory.

    Pickle protocol 5 hands out-of-band buffers (NumPy arrays; ``PromptState`` sends its tensors
    as arrays) to ``buffer_callback`` instead of copying them into the pickle; measured here, an
    in-band 448 px image (4.8 MB of float32 pixels) cost ~11 ms of the server's CPU per request to
    pickle and write, most of it copies. Both ends are this module's, so the framing is its own,
    on the pipe's descriptor: ``Connection.recv_bytes_into`` reads through intermediate copies.
    """
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    views = [buffer.raw() for buffer in buffers]
    sizes = struct.pack(f"!{len(views)}Q", *(view.nbytes for view in views))
    fd = connection.fileno()
    _write_all(fd, memoryview(_HEAD.pack(len(data), len(views)) + sizes + data))
    for view in views:
        _write_all(fd, view)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


def _read(connection: Connection) -> Any:
    fd = connection.fileno()
    length, count = _HEAD.unpack(_read_exact(fd, _HEAD.size))
    sizes = struct.unpack(f"!{count}Q", _read_exact(fd, 8 * count)) if count else ()
    data = _read_exact(fd, length)
    # Straight from the pipe into uninitialised memory, the lock released while the kernel copies:
    # the engine thread keeps stepping while an image arrives (through recv_bytes_into it took
    # ~4 ms of this thread's time per 448 px image, most of it with the interpreter lock held).
    buffers = [numpy.empty(size, dtype=numpy.uint8) for size in sizes]  # writable, as tensors on it must be
    for buffer in buffers:
        _read_into(fd, memoryview(buffer))
    return pickle.loads(data, buffers=buffers)


def _read_exact(fd: int, size: int) -> bytearray:
    buffer = bytearray(size)
    _read_into(fd, memoryview(buffer))
    return buffer


def _read_into(fd: int, view: memoryview) -> None:
    while view:
        count = os.readv(fd, [view])
        if count == 0:
            raise EOFError("the pipe was closed")
        view = view[count:]


def _widen(connection: Connection) -> None:
    """A bigger pipe buffer (Linux): an image crosses in a few writes instead of ~75 of 64 KiB."""
    try:
        import fcntl

        fcntl.fcntl(connection.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
    except (ImportError, AttributeError, OSError):  # another OS, or a lower limit: the default works too
        pass


class EngineStartError(RuntimeError):
    """The engine process could not load the model or start; the message says why."""


class _PipeOutbox(Outbox):
    """The engine process's outbox: a step's events go down the pipe as one message."""

    def __init__(self, send: Callable[[Any], None]) -> None:
        super().__init__()
        self._send = send
        self._events: list[tuple[str, Event | LocalvlError]] = []
        self._records: list[RequestRecord] = []
        self._stats: Callable[[], dict[str, int]] | None = None
        self._idle: Callable[[], bool] = lambda: True
        self._stats_at = 0.0

    def watch(self, stats: Callable[[], dict[str, int]], idle: Callable[[], bool]) -> None:
        self._stats, self._idle = stats, idle

    def add(self, job: Job, item: Event | LocalvlError) -> None:
        self._events.append((job.id, item))

    def record(self, record: RequestRecord) -> None:
        self._records.append(record)

    def flush(self) -> None:
        now = time.monotonic()
        # Counters ride along every STATS_INTERVAL, and whenever the engine is idle (it goes idle,
        # and then every IDLE_REPORT s), so the server's view never stays stale at "running" and
        # its silence means a hung engine, never an idle one.
        stats = None
        if self._stats is not None and (now - self._stats_at >= STATS_INTERVAL or self._idle()):
            stats, self._stats_at = self._stats(), now
        if not self._events and not self._records and stats is None:
            return
        events, self._events = self._events, []
        records, self._records = self._records, []
        self._send(("events", events, records, stats))


def _serve(
    load: Callable[[], Any],
    config: Any,
    cpu_threads: int | None,
    cpu_affinity: bool,
    log_level: str,
    commands: Connection,
    replies: Connection,
) -> None:
    """The engine process: load the model, run the engine thread, answer the server's messages."""
    # Ctrl-C in a terminal and systemd's stop signal reach every process of the group: the server
    # drains its requests and then stops this process down the pipe (or, if the server dies, the
    # pipe's end stops it). Dying at the signal would fail the very requests the drain waits for.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from localvl.cli import apply_cpu_threads, configure_logging
    from localvl.engine.local import LocalEngine

    configure_logging(log_level)
    lock = threading.Lock()

    def send(message: Any) -> None:
        try:
            with lock:
                _write(replies, message)
        except OSError:  # the server is gone: nobody to tell; reading its end stops this process
            pass

    outbox = _PipeOutbox(send)
    try:
        loaded = load()
        server_cpus = None
        parts = affinity.split(affinity.available(), cpu_threads) if cpu_affinity and loaded.model.device.type == "cpu" else None
        if parts is not None:
            engine_cpus, server_cpus = parts
            affinity.pin_process(engine_cpus)
            cpu_threads = len(engine_cpus)
        apply_cpu_threads(loaded.model.device.type, cpu_threads)
        engine = LocalEngine(loaded, config, outbox)
    except Exception as error:  # the server prints it: a load error's message says what to do
        from localvl.models.loader import ModelLoadError

        send(("failed", str(error) if isinstance(error, ModelLoadError) else f"{type(error).__name__}: {error}"))
        return
    outbox.watch(engine.stats, lambda: len(engine.scheduler) == 0)
    engine.observers.append(outbox.record)
    engine.start_thread()
    if server_cpus is not None:
        # This thread reads the server's messages and makes images' pixels of their bytes: on the
        # server's cores, off the engine thread's, which it started above with the engine's.
        os.sched_setaffinity(0, server_cpus)
    send(("ready", engine.info, engine.facts, server_cpus, engine.stats()))  # counters for /metrics from the start
    while True:
        try:
            message = _read(commands)
        except (EOFError, OSError):  # the server is gone
            message = ("stop",)
        kind = message[0]
        if kind == "submit":
            admission = message[1]
            try:
                matcher = engine.constraints.matcher(admission.grammar) if admission.grammar is not None else None
                engine.admit(admission, matcher, outbox)
            except LocalvlError as error:
                send(("ack", admission.id, error))
            except Exception as error:  # a bug: this request fails, the engine goes on
                logger.error("admitting a request failed: %s", type(error).__name__)
                logger.debug("admission failure", exc_info=True)
                send(("ack", admission.id, InternalError("the engine could not take this request")))
            else:
                send(("ack", admission.id, None))
        elif kind == "abort":
            engine.abort(message[1])
        elif kind == "stop":
            engine.stop_thread()
            send(("stopped",))
            return


@dataclass(eq=False)
class _Remote:
    """A request the engine process is working on, as the server sees it."""

    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event | LocalvlError]
    ack: asyncio.Future[LocalvlError | None]
    unacknowledged_since: float | None = None  # when it was sent, until its ack arrives


def _deliver(batch: list[tuple[asyncio.Queue[Event | LocalvlError], Event | LocalvlError]]) -> None:
    for events, item in batch:
        events.put_nowait(item)


def _acknowledge(ack: asyncio.Future[LocalvlError | None], error: LocalvlError | None) -> None:
    if not ack.done():
        ack.set_result(error)


class ProcessEngine:
    """An ``Engine`` whose model runs in a child process; rendering stays in this one."""

    def __init__(
        self,
        load: Callable[[], Any],
        processor: Callable[[], Any],
        config: Any,
        *,
        cpu_threads: int | None = None,
        cpu_affinity: bool = False,
        log_level: str = "info",
        start_timeout: float = 3600.0,
        stop_timeout: float = STOP_GRACE,
        unresponsive_after: float = UNRESPONSIVE_AFTER,
    ) -> None:
        """Start the engine process and wait until its model is loaded.

        ``load`` (run in the engine process, so it must pickle: a module-level function or a
        ``functools.partial`` of one) returns the ``LoadedModel``; ``processor`` (run here) returns
        the same folder's processor. Raises ``EngineStartError`` if the model cannot be loaded.
        With ``cpu_affinity`` and a model on the CPU, the engine process takes ``cpu_threads`` cores
        (default: all but one) and this process keeps the rest (``affinity.py``) until ``stop``,
        which kills the engine process if it has not stopped in ``stop_timeout`` seconds.
        ``responsive`` turns false once the engine process has been silent ``unresponsive_after``
        seconds.
        """
        self.config = config
        self.stop_timeout = stop_timeout
        self.unresponsive_after = unresponsive_after
        self.observers: list[Callable[[RequestRecord], None]] = []
        # Called (on the reply reader's thread) if the engine process dies unasked: `localvl serve`
        # shuts down then, and exits with status 1 so a supervisor restarts it.
        self.on_death: Callable[[], None] | None = None
        self._requests: dict[str, _Remote] = {}
        self._stats: dict[str, int] = {}
        self._outgoing: queue.SimpleQueue[Any] = queue.SimpleQueue()  # the command writer's; None ends it
        self._heard = time.monotonic()  # when the engine process last said anything
        self._silent = False  # as last logged
        self._running = False
        self._stopping = False
        self._dead = False
        self._died = False
        context = multiprocessing.get_context("spawn")  # fork would copy this process's threads' state
        command_out, self._commands = context.Pipe(duplex=False)
        self._replies, reply_in = context.Pipe(duplex=False)
        _widen(self._commands)
        self._process = context.Process(
            target=_serve, args=(load, config, cpu_threads, cpu_affinity, log_level, command_out, reply_in),
            name="localvl-engine", daemon=True,
        )
        self._process.start()
        command_out.close()
        reply_in.close()
        message = self._first_reply(start_timeout)
        if message[0] != "ready":
            self._process.join(5)
            raise EngineStartError(message[1])
        self._info: ModelInfo = message[1]
        self.facts = message[2]
        self._stats = message[4]
        self._cpus_before: list[int] | None = None
        if message[3] is not None:  # the engine pinned itself to the other cores
            self._cpus_before = affinity.available()
            affinity.pin_process(message[3])
            logger.info("model on the CPU: the engine process runs on cores %s, the server on %s",
                        sorted(set(self._cpus_before) - set(message[3])), message[3])
        self.frontend = Frontend(processor(), self.facts)
        self.renderer = self.frontend.renderer
        self._heard = time.monotonic()  # loading took its time: silence counts from now
        self._reader = threading.Thread(target=self._read, name="localvl-engine-replies", daemon=True)
        self._reader.start()
        self._writer = threading.Thread(target=self._write_commands, name="localvl-engine-commands", daemon=True)
        self._writer.start()

    def _first_reply(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while not self._replies.poll(0.2):
            if not self._process.is_alive():
                return ("failed", f"the engine process exited with status {self._process.exitcode} while loading")
            if time.monotonic() > deadline:
                self._process.kill()
                return ("failed", f"the engine process did not load the model in {timeout:.0f} s")
        try:
            return _read(self._replies)
        except (EOFError, OSError):
            return ("failed", f"the engine process exited with status {self._process.exitcode} while loading")

    # ------------------------------------------------------------------ Engine protocol

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def alive(self) -> bool:
        return not self._dead and self._process.is_alive()

    @property
    def died(self) -> bool:
        """The engine process ended without being asked to."""
        return self._died

    @property
    def responsive(self) -> bool:
        """The engine process has said something in the last ``unresponsive_after`` seconds, and
        acknowledged every request sent longer ago (its reader of the server's messages can hang
        apart from its engine thread). False for a hung process; /ready answers 503 meanwhile."""
        now = time.monotonic()
        limit = self.unresponsive_after
        silent = now - self._heard > limit or any(
            remote.unacknowledged_since is not None and now - remote.unacknowledged_since > limit
            for remote in list(self._requests.values())
        )
        if silent != self._silent:
            self._silent = silent
            if silent:
                logger.error("the engine process has not answered for %g s: not ready until it does", limit)
            else:
                logger.warning("the engine process answers again")
        return not silent

    def stats(self) -> dict[str, int]:
        """The engine's counters as of its last report (at most ~0.1 s old while it is busy)."""
        return dict(self._stats)

    async def start(self) -> None:
        self._running = True

    async def stop(self) -> None:
        self._running = False
        if self._stopping:
            return
        self._stopping = True
        # Stopping ends every request anyway (503), so a hung engine process is not worth waiting
        # for: the drain has already spent --shutdown-timeout, and the service manager's patience
        # is counted from the signal.
        self._send(("stop",))
        await anyio.to_thread.run_sync(self._process.join, self.stop_timeout)
        if self._process.is_alive():
            logger.error("the engine process did not stop in %g s; killing it", self.stop_timeout)
            self._process.kill()
            await anyio.to_thread.run_sync(self._process.join, 10)
        await anyio.to_thread.run_sync(self._reader.join, 10)
        self._outgoing.put(None)  # a write still blocked on the pipe failed when the process ended
        await anyio.to_thread.run_sync(self._writer.join, 10)
        if self._cpus_before:  # the engine's cores are free again
            affinity.pin_process(self._cpus_before)

    async def count_tokens(self, conversation: Conversation) -> int:
        return await self.frontend.count_tokens(conversation)

    async def submit(self, request: GenerationRequest) -> Stream:
        if not self._running or not self.alive:
            raise ServiceUnavailableError("the engine is not running")
        # A hung engine process reads nothing: every request sent it would wait, holding its
        # rendered prompt and pixels, until the client or --request-timeout gives up.
        if not self.responsive:
            raise ServiceUnavailableError("the engine is not answering; retry shortly", headers={"retry-after": "5"})
        unread = sum(1 for remote in list(self._requests.values()) if remote.unacknowledged_since is not None)
        if unread >= self.config.max_queue:  # the engine process refuses past this many waiting anyway
            raise OverloadedError("the server is overloaded; retry shortly", headers={"retry-after": "1"})
        # Images cross the pipe as bytes, an eighth of their pixels: the engine process makes
        # the pixels as it reads them, on the server's cores, off this process's GIL.
        admission = await self.frontend.prepare(request, compact=True)
        loop = asyncio.get_running_loop()
        remote = _Remote(loop, asyncio.Queue(), loop.create_future(), time.monotonic())
        self._requests[admission.id] = remote
        if self._dead:  # the reader has failed every request it knew of: no ack would ever come
            self._requests.pop(admission.id, None)
            raise ServiceUnavailableError("the engine is not running")
        self._send(("submit", admission))
        try:
            error = await remote.ack
        except BaseException:  # cancelled: the client left, or the route's deadline passed
            self.abort(admission.id)
            raise
        if error is not None:
            self._requests.pop(admission.id, None)
            raise error
        return Stream(admission.id, len(admission.ids), remote.events, self.abort, self.config.stream_interval)

    def abort(self, request_id: str) -> None:
        if self._requests.pop(request_id, None) is not None:
            self._send(("abort", request_id))

    # ------------------------------------------------------------------ the pipes

    def _send(self, message: Any) -> None:
        """Queue a message for the engine process; returns at once, whatever the pipe's state."""
        self._outgoing.put(message)

    def _write_commands(self) -> None:
        """The command writer's thread, the pipe's only writer: a hung engine process that leaves
        the pipe full blocks this thread alone. One queue keeps the order in which messages were
        sent, so an abort never overtakes its own submit."""
        broken = False
        while (message := self._outgoing.get()) is not None:
            if broken:  # the engine process is gone: the reader fails the requests, aborts are moot
                continue
            if message[0] == "submit" and message[1].id not in self._requests:
                # Given up before its turn (a client gone while a hung engine held the pipe): not
                # worth the pipe; the abort behind it is for an id the engine never saw, a no-op.
                continue
            try:
                _write(self._commands, message)
            except OSError:
                broken = True
            except Exception as error:  # could not pickle (a bug): nothing was written; this request fails
                logger.error("sending a message to the engine process failed: %s", type(error).__name__)
                logger.debug("send failure", exc_info=True)
                remote = self._requests.get(message[1].id) if message[0] == "submit" else None
                if remote is not None:
                    self._call(remote.loop, _acknowledge, remote.ack, InternalError("the engine could not take this request"))

    def _read(self) -> None:
        """The reply reader's thread: hand each step's events to their event loops in one call each."""
        while True:
            try:
                message = _read(self._replies)
            except (EOFError, OSError):
                break
            self._heard = time.monotonic()
            kind = message[0]
            if kind == "events":
                _, events, records, stats = message
                # Counters and records first: whoever sees a request end sees them up to date.
                if stats is not None:
                    self._stats = stats
                for record in records:
                    for observe in self.observers:
                        try:
                            observe(record)
                        except Exception as error:  # metrics must never fail a request
                            logger.error("request observer failed: %s", type(error).__name__)
                self._dispatch(events)
            elif kind == "ack":
                _, request_id, error = message
                remote = self._requests.get(request_id)
                if remote is not None:
                    remote.unacknowledged_since = None
                    self._call(remote.loop, _acknowledge, remote.ack, error)
            elif kind == "stopped":
                break
        self._dead = True
        self._died = not self._stopping
        if self._died:
            self._process.join(5)
            logger.error("the engine process stopped unexpectedly (exit status %s)", self._process.exitcode)
        self._fail_all()
        if self.died and self.on_death is not None:
            self.on_death()

    def _dispatch(self, events: list[tuple[str, Event | LocalvlError]]) -> None:
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Event | LocalvlError], Event | LocalvlError]]] = {}
        for request_id, item in events:
            remote = self._requests.get(request_id)
            if remote is None:  # aborted meanwhile
                continue
            if isinstance(item, (Finished, LocalvlError)):
                self._requests.pop(request_id, None)
            batches.setdefault(remote.loop, []).append((remote.events, item))
        for loop, batch in batches.items():
            self._call(loop, _deliver, batch)

    def _fail_all(self) -> None:
        error: LocalvlError = (
            ServiceUnavailableError("the server is shutting down") if self._stopping
            else EngineDiedError("the engine stopped while generating this response")
        )
        for request_id, remote in list(self._requests.items()):
            self._requests.pop(request_id, None)
            self._call(remote.loop, _acknowledge, remote.ack, error)
            self._call(remote.loop, _deliver, [(remote.events, error)])

    @staticmethod
    def _call(loop: asyncio.AbstractEventLoop, function: Callable[..., None], *args: Any) -> None:
        try:
            loop.call_soon_threadsafe(function, *args)
        except RuntimeError:  # that event loop is gone: nobody is listening
            pass
