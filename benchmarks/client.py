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


def _dechunk(body: bytes) -> bytes:
    """The payload of an HTTP/1.1 chunked body."""
    out, at = [], 0
    while True:
        eol = body.index(b"\r\n", at)
        size = int(body[at:eol].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(body[eol + 2 : eol + 2 + size])
        at = eol + 2 + size + 2


async def stream_one(url: str, body: dict[str, Any], keep_text: bool = False) -> tuple[float, float, int, str]:
    """(TTFT s, total s, output tokens, text) of one streamed message.

    The load generator shares the server's CPU cores, so like wrk it speaks HTTP/1.1 over a bare
    socket (an HTTP client library took ~20 ms of CPU per streamed request here) and parses only
    the events it needs: the first text delta's arrival, the final usage, errors, and the text only
    when ``keep_text``.
    """
    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    start = time.perf_counter()
    first = None
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(
        f"POST /v1/messages HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload
    )
    chunks: list[bytes] = []
    try:
        while data := await reader.read(1 << 16):
            if first is None and b'"text_delta"' in data:
                first = time.perf_counter() - start
            chunks.append(data)
    finally:
        writer.close()
    total = time.perf_counter() - start
    head, _, raw = b"".join(chunks).partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1]
    content = _dechunk(raw) if b"chunked" in head.lower() else raw
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


async def load(url: str, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, float]:
    queue = list(bodies)
    results: list[tuple[float, float, int, str]] = []

    async def worker() -> None:
        while queue:
            results.append(await stream_one(url, queue.pop(0)))

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
    first, _, _, answer = await stream_one(url, first_body, keep_text=True)
    messages = follow_up["messages"]
    messages.insert(1, {"role": "assistant", "content": answer or "(no text)"})
    second, _, _, _ = await stream_one(url, follow_up)
    return {"first_ttft_ms": first * 1000, "second_ttft_ms": second * 1000, "ratio": second / first}


def run_load(url: str, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, float]:
    return asyncio.run(load(url, bodies, concurrency))


def run_second_turn(url: str, first_body: dict[str, Any], follow_up: dict[str, Any]) -> dict[str, float]:
    return asyncio.run(second_turn(url, first_body, follow_up))
