"""The load generator's client side: streams Anthropic messages over HTTP and times them.

Kept free of torch and localvl, so it runs in its own process beside the server it measures.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

from urllib.parse import urlsplit


class Connection:
    """One keep-alive HTTP/1.1 connection, as the SDKs' connection pools keep theirs."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.netloc = parts.hostname, parts.port, parts.netloc
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, payload: bytes) -> tuple[bytes, bytes, float | None]:
        """(status, body, seconds until the first text delta arrived) of one POST."""
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        start = time.perf_counter()
        self.writer.writelines([  # not joined: that would copy the payload (~0.5 ms for an image's)
            f"POST {path} HTTP/1.1\r\nHost: {self.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode(), payload,
        ])
        head = (await self.reader.readuntil(b"\r\n\r\n")).lower()
        status = head.split(b" ", 2)[1]
        first = None
        if b"transfer-encoding: chunked" in head:
            chunks: list[bytes] = []
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                chunk = (await self.reader.readexactly(size + 2))[:-2]
                if first is None and b'"text_delta"' in chunk:
                    first = time.perf_counter() - start
                chunks.append(chunk)
            await self.reader.readuntil(b"\r\n")
            body = b"".join(chunks)
        else:
            length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            body = await self.reader.readexactly(length)
        if b"connection: close" in head:
            self.close()
        return status, body, first

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def stream_one(connection: Connection, body: dict[str, Any] | bytes, keep_text: bool = False) -> tuple[float, float, int, str]:
    """(TTFT s, total s, output tokens, text) of one streamed message; ``body`` as a dict or its JSON.

    The load generator shares the server's CPU cores, so like wrk it speaks HTTP/1.1 over a bare
    socket (an HTTP client library took ~20 ms of CPU per streamed request here) and parses only
    the events it needs: the first text delta's arrival, the final usage, errors, and the text only
    when ``keep_text``.
    """
    start = time.perf_counter()
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, content, first = await connection.post("/v1/messages", payload)
    total = time.perf_counter() - start
    if status != b"200":
        raise RuntimeError(f"HTTP {status.decode()}: {content[:300]!r}")
    tokens = 0
    text: list[str] = []
    for line in content.split(b"\n"):
        if not line.startswith(b"data: "):
            continue
        if keep_text and b'"text_delta"' in line:
            text.append(json.loads(line[6:])["delta"]["text"])
        elif line.startswith(b'data: {"type":"message_delta"'):
            tokens = json.loads(line[6:])["usage"]["output_tokens"]
        elif line.startswith(b'data: {"type":"error"'):
            raise RuntimeError(json.loads(line[6:])["error"]["message"])
    return first if first is not None else total, total, tokens, "".join(text)


async def load(url: str, bodies: list[bytes], concurrency: int) -> dict[str, float]:
    queue = list(bodies)
    results: list[tuple[float, float, int, str]] = []

    async def worker() -> None:
        connection = Connection(url)
        try:
            while queue:
                results.append(await stream_one(connection, queue.pop(0)))
        finally:
            connection.close()

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    ttfts = sorted(r[0] for r in results)
    produced = sum(r[2] for r in results)
    p99 = ttfts[min(len(ttfts) - 1, int(round(0.99 * (len(ttfts) - 1))))]
    return {"concurrency": concurrency, "requests": len(results), "seconds": elapsed,
            "requests_per_s": len(results) / elapsed, "client_cpu_ms_per_request": cpu * 1000 / len(results), "output_tokens_per_s": produced / elapsed,
            "ttft_p50_ms": statistics.median(ttfts) * 1000, "ttft_p99_ms": p99 * 1000}


async def second_turn(url: str, first_body: dict[str, Any], follow_up: dict[str, Any]) -> dict[str, float]:
    """TTFT of a first question about an image, then of a follow-up that sends the image again.

    ``follow_up`` is the first body with more turns after the first: the assistant's answer is
    put in between.
    """
    connection = Connection(url)
    try:
        first, _, _, answer = await stream_one(connection, first_body, keep_text=True)
        messages = follow_up["messages"]
        messages.insert(1, {"role": "assistant", "content": answer or "(no text)"})
        second, _, _, _ = await stream_one(connection, follow_up)
    finally:
        connection.close()
    return {"first_ttft_ms": first * 1000, "second_ttft_ms": second * 1000, "ratio": second / first}


def run_load(url: str, bodies: list[bytes], concurrency: int) -> dict[str, float]:
    return asyncio.run(load(url, bodies, concurrency))


def run_second_turn(url: str, first_body: dict[str, Any], follow_up: dict[str, Any]) -> dict[str, float]:
    return asyncio.run(second_turn(url, first_body, follow_up))
