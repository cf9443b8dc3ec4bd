"""Running the app under uvicorn, with a drain on SIGTERM/SIGINT.

The first signal starts the drain: ``/ready`` turns 503 (load balancers stop sending), new
requests get 503 ``overloaded_error`` with ``retry-after`` (clients retry elsewhere or later),
the batch worker claims nothing more, and running requests, streams included, get up to
``--shutdown-timeout`` seconds to finish. Requests still running then end with 503
``overloaded_error`` in their API's envelope (a stream with an ``error`` event): unfinished batch
claims are given back and the engine is stopped before uvicorn's own shutdown, which would
otherwise cancel their handlers mid-answer (a plain-text 500, a stream cut off mid-chunk). Then
uvicorn shuts down. A second signal skips the wait: running requests end with 503 at once, the
same way. A third (or any signal once they are being ended) is uvicorn's own exit.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType
from typing import Any

import uvicorn

from localvl.api.app import drain

logger = logging.getLogger(__name__)

ANSWER_TIMEOUT = 5.0  # for handlers to send the 503s of requests the drain's timeout ended


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.shutdown_timeout = shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._ending = False  # running requests are being ended with 503
        self._hurry = asyncio.Event()  # set by a second signal: stop waiting for running requests

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None or self.should_exit or self._ending:
            super().handle_exit(sig, frame)
        elif self._draining:
            # Not uvicorn's exit: that cancels the handlers (a plain-text 500, a stream cut off
            # mid-chunk). The drain ends the requests now, as its timeout would have.
            self._ending = True
            self._loop.call_soon_threadsafe(self._hurry.set)
        else:
            self._draining = True
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))  # type: ignore[union-attr]

    async def _drain(self) -> None:
        app: Any = self.config.app
        logger.info("draining: new requests are refused; waiting up to %gs for running ones", self.shutdown_timeout)
        if not await self._wait(app):
            self._ending = True
            logger.warning("%s with requests still running: they end with 503",
                           "a second signal came" if self._hurry.is_set() else "shutdown timeout passed")
            await app.state.batch_worker.stop()  # batch requests go back to their batches, not failed
            await app.state.engine.stop()  # every request left ends with 503, which its handler sends
            await drain(app, ANSWER_TIMEOUT)
        self.should_exit = True

    async def _wait(self, app: Any) -> bool:
        """``drain`` until the shutdown timeout or a second signal, whichever comes first."""
        drained = asyncio.ensure_future(drain(app, self.shutdown_timeout))
        hurry = asyncio.ensure_future(self._hurry.wait())
        await asyncio.wait((drained, hurry), return_when=asyncio.FIRST_COMPLETED)
        hurry.cancel()
        if not drained.done():
            drained.cancel()
            return False
        return drained.result()


def run(app: Any, host: str, port: int, log_level: str, shutdown_timeout: float,
        forwarded_allow_ips: list[str] | None = None) -> None:
    # uvicorn's own grace period only covers what the drain already waited for. Its access log is
    # off: it writes each request's path and query string (ids, whatever a client put there);
    # localvl.access logs the route template instead. Its own messages stay at INFO or above.
    uvicorn_level = "info" if log_level.lower() in ("debug", "trace") else log_level
    # The proxies named are believed about the scheme the client used (uvicorn's proxy headers).
    config = uvicorn.Config(app, host=host, port=port, log_level=uvicorn_level, access_log=False, timeout_graceful_shutdown=1,
                            forwarded_allow_ips=forwarded_allow_ips or ["127.0.0.1"])
    DrainingServer(config, shutdown_timeout).run()
