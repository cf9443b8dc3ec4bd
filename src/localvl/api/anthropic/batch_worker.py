"""The worker that answers Message Batches: claims requests from the store, runs each as a Message
at background priority (interactive requests overtake it in the engine), writes its result.

At most ``batch_concurrency`` requests of this server are in the engine at once. Claims are renewed
while their requests run; a server killed mid-request leaves claims that lapse and are done again
(on SQLite, which one server uses, a restarted server takes its old claims back at once).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
from typing import Any

from localvl.api.anthropic.errors import error_body
from localvl.api.anthropic.schemas import MessagesRequest
from localvl.api.anthropic.stream import collect_message
from localvl.api.middleware import new_id
from localvl.api.validation import parse_value
from localvl.engine.sequence import BACKGROUND
from localvl.errors import (
    EngineDiedError, InternalError, InvalidRequestError, LocalvlError, OverloadedError, ServiceUnavailableError,
)
from localvl.store.batches import BatchStore, Claimed

logger = logging.getLogger(__name__)

IDLE_POLL_S = 0.25  # how often an idle worker looks for new batch requests
SWEEP_S = 30.0
# Failures of the server, not of the request (the engine full, stopping, or dead): the claim goes
# back and the request is done again later, here or after a restart, never recorded as errored.
NOT_THE_REQUESTS_FAULT = (OverloadedError, ServiceUnavailableError, EngineDiedError)


class BatchWorker:
    def __init__(self, state: Any) -> None:
        self.state = state
        self.settings = state.settings
        self.id = "worker_" + secrets.token_hex(8)
        self.wake = asyncio.Event()  # set when a batch is created: no need to wait for the next poll
        self._running: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._paused = False

    def pause(self) -> None:
        """Claim nothing more (the server is draining); requests already running go on."""
        self._paused = True

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="localvl-batches")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        running = list(self._running.values())
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    async def _loop(self) -> None:
        store: BatchStore | None = None
        last_sweep = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                if store is None:
                    if not await self._has_store():
                        await self._idle()
                        continue
                    store = await self.state.store.batches()
                    if store.database.engine.dialect.name == "sqlite":
                        await store.reclaim_all()  # one server per SQLite file: old claims are this server's own
                if loop.time() - last_sweep > min(SWEEP_S, store.lease_s / 3):
                    await store.renew(self.id, list(self._running))
                    await store.sweep(dt.timedelta(seconds=self.settings.batch_retention))
                    # The store's one background loop: expired uploads go here too.
                    await (await self.state.store.files()).sweep_expired()
                    last_sweep = loop.time()
                room = 0 if self._paused else self.settings.batch_concurrency - len(self._running)
                claimed = await store.claim(self.id, room) if room > 0 else []
                for item in claimed:
                    key = (item.batch_id, item.position)
                    self._running[key] = loop.create_task(self._answer(store, item))
                    self._running[key].add_done_callback(lambda _, key=key: self._done(key))
                if not claimed:
                    await self._idle()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the store was unreachable, say: try again shortly
                logger.error("batch worker: %s", type(error).__name__)
                await asyncio.sleep(1.0)

    def _done(self, key: tuple[str, int]) -> None:
        self._running.pop(key, None)
        self.wake.set()  # room for another: claim it now, not at the next poll

    async def _has_store(self) -> bool:
        """The store is opened by the first batch request, not by the worker."""
        return self.state.store.opened

    async def _idle(self) -> None:
        try:
            await asyncio.wait_for(self.wake.wait(), IDLE_POLL_S)
        except TimeoutError:
            pass
        self.wake.clear()

    async def _answer(self, store: BatchStore, item: Claimed) -> None:
        try:
            status, result = await self._run(store, item)
        except asyncio.CancelledError:
            # A dying engine process stops the server too, whose drain may cancel this before its
            # EngineDiedError arrives: the request was in flight all the same, and counts as tried.
            died = bool(getattr(self.state.engine, "died", False))
            await asyncio.shield(store.release(self.id, item.batch_id, item.position, attempted=died))
            raise
        except NOT_THE_REQUESTS_FAULT as error:
            await store.release(self.id, item.batch_id, item.position, attempted=isinstance(error, EngineDiedError))
            await asyncio.sleep(1.0)
            return
        if not await store.finish(self.id, item.batch_id, item.position, status, result):
            logger.warning("batch request %s/%d was taken over before it finished", item.batch_id, item.position)

    async def _run(self, store: BatchStore, item: Claimed) -> tuple[str, dict[str, Any]]:
        from localvl.api.anthropic.routes import start_message  # the same path as POST /v1/messages

        owner = await store.owner_of(item.batch_id)
        try:
            body = parse_value(MessagesRequest, item.params, "params")
            if body.stream:
                raise InvalidRequestError("params.stream: streaming is not supported in message batches")
            self.state.model_names.require(body.model)
            message_id = new_id("msg_")
            stream, output = await start_message(self.state, owner, body, message_id, priority=BACKGROUND)
            message = await collect_message(stream, output)
        except NOT_THE_REQUESTS_FAULT:
            raise
        except LocalvlError as error:
            envelope = error_body(error, new_id("req_"))
            return "errored", {"type": "errored", "error": envelope}
        except Exception as error:  # a bug: errored, as POST /v1/messages answers a 500, not claimed again forever
            logger.error("batch request %s/%d failed: %s", item.batch_id, item.position, type(error).__name__)
            logger.debug("batch request failure", exc_info=True)
            envelope = error_body(InternalError("the server failed while answering this request"), new_id("req_"))
            return "errored", {"type": "errored", "error": envelope}
        return "succeeded", {"type": "succeeded", "message": message}
