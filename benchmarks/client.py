"""The load generator's client side: streams Anthropic messages over HTTP and times them.

Kept free of torch and localvl, so it runs in its own process beside the server it measures.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

import httpx


async def stream_one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> tuple[float, float, int, str]:
    """(TTFT s, total s, output tokens, text) of one streamed message."""
    start = time.perf_counter()
    first = None
    tokens = 0
    text: list[str] = []
    async with client.stream("POST", url + "/v1/messages", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event["type"] == "content_block_delta":
                if first is None:
                    first = time.perf_counter() - start
                text.append(event["delta"].get("text", ""))
            elif event["type"] == "message_delta":
                tokens = event["usage"]["output_tokens"]
            elif event["type"] == "error":
                raise RuntimeError(event["error"]["message"])
    total = time.perf_counter() - start
    return first if first is not None else total, total, tokens, "".join(text)


async def load(url: str, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, float]:
    queue = list(bodies)
    results: list[tuple[float, float, int, str]] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            results.append(await stream_one(client, url, queue.pop(0)))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    produced = sum(r[2] for r in results)
    p99 = ttfts[min(len(ttfts) - 1, int(round(0.99 * (len(ttfts) - 1))))]
    return {"concurrency": concurrency, "requests": len(results), "seconds": elapsed,
            "requests_per_s": len(results) / elapsed, "output_tokens_per_s": produced / elapsed,
            "ttft_p50_ms": statistics.median(ttfts) * 1000, "ttft_p99_ms": p99 * 1000}


async def second_turn(url: str, first_body: dict[str, Any], follow_up: dict[str, Any]) -> dict[str, float]:
    """TTFT of a first question about an image, then of a follow-up that sends the image again.

    ``follow_up`` is the first body with more turns after the first: the assistant's answer is
    put in between.
    """
    async with httpx.AsyncClient(timeout=600) as client:
        first, _, _, answer = await stream_one(client, url, first_body)
        messages = follow_up["messages"]
        messages.insert(1, {"role": "assistant", "content": answer or "(no text)"})
        second, _, _, _ = await stream_one(client, url, follow_up)
    return {"first_ttft_ms": first * 1000, "second_ttft_ms": second * 1000, "ratio": second / first}


def run_load(url: str, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, float]:
    return asyncio.run(load(url, bodies, concurrency))


def run_second_turn(url: str, first_body: dict[str, Any], follow_up: dict[str, Any]) -> dict[str, float]:
    return asyncio.run(second_turn(url, first_body, follow_up))
