"""How long running streams stall while a request with many images is prefilled.

Every engine step is one token for each decoding stream, so a step that runs the vision tower holds
every stream up for as long as it takes. A step encodes only the images its prefill chunk reaches,
so the step's token budget (``--max-batch-tokens``) bounds its vision work too. Measured in one run:
``--streams`` text requests decode; then one request with ``--images`` images (different ones, as a
scanned document's pages are) arrives. Printed side by side: the steps until that request's first
token (the longest is the streams' worst pause), and all its images through the vision tower in one
call, which one step held before images were encoded chunk by chunk.

    python benchmarks/image_stall.py                                  # tiny model on this machine
    python benchmarks/image_stall.py --shape 3b --device cuda --images 16
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import torch

try:
    from benchmarks.load import engine_model, picture, sync
except ImportError:  # run as a script from benchmarks/
    from load import engine_model, picture, sync  # type: ignore[no-redef]

from localvl.cli import apply_cpu_threads
from localvl.conversation import Conversation, GenerationRequest, SamplingParams, Text, Turn
from localvl.engine.local import EngineConfig, LocalEngine
from localvl.media.images import load_image


def pages(count: int, side: int) -> Conversation:
    images = [load_image(picture(7_000 + i, side), "image/png", f"page{i}") for i in range(count)]
    return Conversation([Turn("user", [*images, Text("Summarise these pages.")])])


async def measure(engine: LocalEngine, streams: int, document: Conversation) -> dict[str, Any]:
    steps: list[tuple[float, float]] = []  # (start, ms) of every step
    run = engine.runner.run
    device = engine.model.device

    def timed(batch: Any) -> Any:
        start = time.perf_counter()
        out = run(batch)
        sync(device)
        steps.append((start, (time.perf_counter() - start) * 1000))
        return out

    engine.runner.run = timed  # type: ignore[method-assign]
    text = Conversation([Turn("user", [Text("Tell me a long story. " * 20)])])
    started = asyncio.Event()

    async def stream(i: int) -> None:
        s = await engine.submit(GenerationRequest(f"s{i}", text, SamplingParams(max_tokens=100_000, temperature=0)))
        async for _ in s:
            started.set()

    tasks = [asyncio.ensure_future(stream(i)) for i in range(streams)]
    await started.wait()
    await asyncio.sleep(0.2)  # every stream decoding
    submitted = time.perf_counter()
    s = await engine.submit(GenerationRequest("doc", document, SamplingParams(max_tokens=1, temperature=0)))
    async for _ in s:
        pass
    first_token = time.perf_counter()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    before = [ms for start, ms in steps if start < submitted][-20:]
    during = [ms for start, ms in steps if submitted <= start < first_token]
    return {"decode_ms": statistics.median(before), "steps": len(during), "longest_ms": max(during),
            "ttft_ms": (first_token - submitted) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "3b"], default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--image", type=int, default=448, help="side of the square images, px")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="default: the engine's for the device")
    args = parser.parse_args()
    loaded = engine_model(args.shape, args.device, args.dtype)
    apply_cpu_threads(loaded.model.device.type, None)  # as `localvl serve` does
    engine = LocalEngine(loaded, EngineConfig(max_batch_tokens=args.max_batch_tokens))
    document = pages(args.images, args.image)
    prompt = engine.renderer.render(document)
    tokens = int(prompt.input_ids.numel())

    async def session() -> dict[str, Any]:
        await engine.start()
        try:
            await measure(engine, args.streams, pages(2, args.image))  # warm-up (other images)
            return await measure(engine, args.streams, document)
        finally:
            await engine.stop()

    result = asyncio.run(session())
    device = engine.model.device
    engine.model.encode_images(prompt.pixel_values, prompt.image_grid_thw)  # cached now: warm, as in a step
    sync(device)
    start = time.perf_counter()
    engine.model.encode_images(prompt.pixel_values, prompt.image_grid_thw)
    sync(device)
    tower_ms = (time.perf_counter() - start) * 1000
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{args.shape} on {name}: {args.streams} streams decoding; then one request of {args.images} images of "
          f"{args.image}px ({tokens} prompt tokens), step budget {engine.scheduler.max_batch_tokens} tokens")
    print(f"  decode step before it: {result['decode_ms']:.1f} ms (median)")
    print(f"  its prefill: {result['steps']} steps, the longest {result['longest_ms']:.1f} ms; its TTFT {result['ttft_ms']:.0f} ms")
    print(f"  all {args.images} images through the vision tower in one call: {tower_ms:.1f} ms "
          f"({tower_ms / result['longest_ms']:.2f}x the longest step)")


if __name__ == "__main__":
    main()
