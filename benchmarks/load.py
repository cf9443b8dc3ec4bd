"""Load through the HTTP API: localvl's engine against the seed's one-model.generate-per-request, in one run.

The workload is the seed article's: one image (448x448 by default, a different one per request and
per concurrency level, so neither the image cache nor the prefix cache helps) and ~100 text tokens per request, a fixed number of output tokens
(end-of-turn tokens are ignored so every request produces exactly that many). Measured side by side:

- the naive baseline: ``model.generate`` per request, one after another (no HTTP: its best case),
  half its requests before the engine's levels and half after, pooled;
- the engine through a real server (uvicorn, Anthropic streaming API), at each concurrency level;
- decode time per step by batch size, the vision tower's images/s, and the TTFT of a second turn
  about the same image against the first.

    python benchmarks/load.py                                   # tiny model on this machine
    python benchmarks/load.py --shape 3b --concurrency 1,16,64  # Qwen2.5-VL-3B-shaped, random bf16 (GPU)
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import dataclasses
import functools
import logging
import io
import json
import multiprocessing
import os
import random
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image as PILImage

from localvl.cli import apply_cpu_threads, engine_config
from localvl.engine import affinity
from localvl.conversation import Conversation, Text, Turn
from localvl.engine.local import LocalEngine
from localvl.engine.process import ProcessEngine
from localvl.engine.qwen_vl import QwenVLRunner
from localvl.engine.vision_graphs import VisionGraphs
from localvl.models.loader import LoadedModel
from localvl.settings import Settings

try:
    from benchmarks import client
    from benchmarks.models import build
except ImportError:  # run as a script from the benchmarks folder
    import client  # type: ignore[no-redef]
    from models import build  # type: ignore[no-redef]

FOLLOW_UP = [{"role": "user", "content": "And which line item is the most expensive?"}]
QUESTION = "Read this invoice and list the total, the due date, the supplier and every line item with its price. "


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def picture(seed: int, side: int) -> bytes:
    rng = random.Random(seed)
    image = PILImage.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@dataclasses.dataclass
class Request:
    png: bytes
    text: str

    def body(self, tokens: int, history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                              "data": base64.b64encode(self.png).decode()}}
        first = {"role": "user", "content": [image, {"type": "text", "text": self.text}]}
        return {"model": "bench", "max_tokens": tokens, "stream": True, "temperature": 0,
                "messages": [first, *(history or [])]}

    def conversation(self) -> Conversation:
        from localvl.media.images import load_image

        return Conversation([Turn("user", [load_image(self.png, "image/png", "bench"), Text(self.text)])])


def engine_model(shape: str, device: str, dtype: str, family: str = "qwen2_5_vl") -> LoadedModel:
    """The benchmark's model, with no end-of-turn token: every request makes exactly --tokens tokens."""
    with tempfile.TemporaryDirectory() as tmp:
        loaded = build(shape, device, dtype, Path(tmp), family=family)
    return dataclasses.replace(loaded, eos_token_ids=frozenset())


def server_cpu(engine: Any) -> float:
    """CPU seconds the server has used: this process, and the engine's process if it has one."""
    seconds = time.process_time()
    process = getattr(engine, "_process", None)
    if process is not None:
        fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        seconds += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return seconds


# The load generator's process makes a level's request bodies, as JSON, before the level starts
# (PNG-encoding the images is seconds of CPU; serialising one ~2 ms), and keeps them: neither the
# server nor the clients it stands in for spend time on them while the clock runs.
_prepared: dict[int, list[bytes]] = {}


def prepare_level(count: int, side: int, seed: int, tokens: int) -> int:
    _prepared[seed] = [json.dumps(r.body(tokens)).encode() for r in workload(count, side, seed=seed)]
    return seed


def run_level(url: str, seed: int, concurrency: int) -> dict[str, float]:
    return client.run_load(url, _prepared.pop(seed), concurrency)


def workload(count: int, side: int, seed: int = 0) -> list[Request]:
    return [Request(picture(seed + i, side), f"Request {i}. " + QUESTION * 4) for i in range(count)]


# ---------------------------------------------------------------- the seed's approach


def baseline(loaded: LoadedModel, engine: LocalEngine, requests: list[Request], tokens: int) -> dict[str, float]:
    """One ``model.generate`` per request, one request at a time."""
    device = loaded.model.device
    padding = list(range(len(loaded.tokenizer), loaded.model.config.get_text_config().vocab_size))
    kwargs = dict(do_sample=False, suppress_tokens=padding or None, eos_token_id=None, pad_token_id=0)

    def one(request: Request, new: int) -> None:
        prompt = engine.renderer.render(request.conversation())
        inputs = {
            "input_ids": prompt.input_ids[None].to(device),
            "attention_mask": torch.ones_like(prompt.input_ids)[None].to(device),
            "mm_token_type_ids": (prompt.input_ids == loaded.model.config.image_token_id).int()[None].to(device),
            "pixel_values": prompt.pixel_values.to(device),
            "image_grid_thw": prompt.image_grid_thw.to(device),
        }
        loaded.model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, **kwargs)
        sync(device)

    one(requests[0], 2)  # warm-up
    start = time.perf_counter()
    for request in requests:
        one(request, tokens)
    elapsed = time.perf_counter() - start
    return {"requests": len(requests), "seconds": elapsed, "requests_per_s": len(requests) / elapsed,
            "output_tokens_per_s": len(requests) * tokens / elapsed}


def halves(requests: list[Request]) -> tuple[list[Request], list[Request]]:
    """The baseline's requests to run before the engine and after it (the first half may be all)."""
    middle = (len(requests) + 1) // 2
    return requests[:middle], requests[middle:]


def spread(base: dict[str, float]) -> str:
    """How far apart a pooled baseline's halves ran, for printing; "" for a baseline run once."""
    if "after_requests_per_s" not in base:
        return ""
    return f" (before the engine {base['before_requests_per_s']:.3f}, after {base['after_requests_per_s']:.3f})"


def pooled(before: dict[str, float], after: dict[str, float] | None) -> dict[str, float]:
    """The baseline's two halves as one: all their requests over all their time."""
    if after is None:
        return before
    requests, seconds = before["requests"] + after["requests"], before["seconds"] + after["seconds"]
    return {"requests": requests, "seconds": seconds, "requests_per_s": requests / seconds,
            "output_tokens_per_s": (before["output_tokens_per_s"] * before["seconds"]
                                    + after["output_tokens_per_s"] * after["seconds"]) / seconds,
            "before_requests_per_s": before["requests_per_s"], "after_requests_per_s": after["requests_per_s"]}


# ---------------------------------------------------------------- the engine behind a real server


class InProcessServer:
    def __init__(self, engine: LocalEngine) -> None:
        import uvicorn

        from localvl.api.app import create_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        settings = Settings(served_model_name="bench", alias=["bench"], ping_interval=60, log_level="warning")
        app = create_app(settings, engine)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join()


class StepClock:
    """Times every engine step (synchronised), by the number of decoding sequences in pure-decode steps,
    and each request's time to first token as the server sees it: from ``submit`` (rendering
    included) to its first sampled token — random weights often start with tokens that print
    nothing, so the client's first text can come several steps later.
    """

    def __init__(self, engine: LocalEngine) -> None:
        self.decode: dict[int, list[float]] = {}
        self.submitted: dict[str, float] = {}
        self.first_token: dict[str, float] = {}
        # Where a level's time went: each request's submit (rendering, the queue check) until it
        # is handed to the engine thread, and the engine's steps by kind (seconds, synchronised).
        self.prepare: list[float] = []
        self.step_time = {"prefill": 0.0, "decode": 0.0}
        self.step_count = {"prefill": 0, "decode": 0}
        run = engine.runner.run
        device = engine.model.device
        submit = engine.submit
        append = engine._append

        async def clocked_submit(request: Any) -> Any:
            self.submitted[request.id] = start = time.perf_counter()
            stream = await submit(request)
            self.prepare.append(time.perf_counter() - start)
            return stream

        def clocked_append(seq: Any, token: int, *rest: Any) -> None:
            self.first_token.setdefault(seq.id, time.perf_counter())
            append(seq, token, *rest)

        engine.submit = clocked_submit  # type: ignore[method-assign]
        engine._append = clocked_append  # type: ignore[method-assign]

        def timed(batch: Any) -> Any:
            start = time.perf_counter()
            out = run(batch)
            sync(device)
            seconds = time.perf_counter() - start
            kind = "decode" if all(s.count == 1 for s in batch) else "prefill"
            if kind == "decode":
                self.decode.setdefault(len(batch), []).append(seconds)
            self.step_time[kind] += seconds
            self.step_count[kind] += 1
            return out

        engine.runner.run = timed  # type: ignore[method-assign]

    @classmethod
    def absent(cls) -> StepClock:
        """A clock that saw nothing: an engine in another process cannot be timed from here."""
        clock = cls.__new__(cls)
        clock.decode, clock.submitted, clock.first_token, clock.prepare = {}, {}, {}, []
        return clock

    def breakdown(self, seconds: float) -> dict[str, float]:
        """The level's time (``seconds`` of wall time) by where it went, since the last call."""
        if not self.prepare:
            return {}
        prepare = sorted(self.prepare)
        out = {
            "prepare_p50_ms": statistics.median(prepare) * 1000,
            "prepare_max_ms": prepare[-1] * 1000,
            "prefill_steps": self.step_count["prefill"],
            "prefill_step_s": self.step_time["prefill"],
            "decode_steps": self.step_count["decode"],
            "decode_step_s": self.step_time["decode"],
            "outside_steps_s": seconds - self.step_time["prefill"] - self.step_time["decode"],
        }
        self.prepare.clear()
        self.step_time = {"prefill": 0.0, "decode": 0.0}
        self.step_count = {"prefill": 0, "decode": 0}
        return out

    def ttft(self) -> dict[str, float]:
        """Server-side TTFT p50/p99 (ms) of the requests since the last call."""
        times = sorted(self.first_token[k] - self.submitted[k] for k in self.first_token if k in self.submitted)
        self.submitted.clear()
        self.first_token.clear()
        if not times:
            return {}
        p99 = times[min(len(times) - 1, int(round(0.99 * (len(times) - 1))))]
        return {"server_ttft_p50_ms": statistics.median(times) * 1000, "server_ttft_p99_ms": p99 * 1000}

    def median_ms(self, size: int) -> float | None:
        times = self.decode.get(size)
        return statistics.median(times) * 1000 if times else None


class Occupancy:
    """How full the engine kept its batch during a level: sequences running, sampled every 10 ms
    (an engine process reports its counters every ~0.1 s), and engine steps per request.

    Requests spend time outside the engine too (the HTTP request, decoding and preprocessing the
    image, streaming the answer): with N clients, the engine runs fewer than N sequences, and a
    step's fixed cost is shared by fewer tokens.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._steps = engine.stats().get("steps", 0)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.samples.append(self.engine.stats().get("running", 0))

    def finish(self, requests: int) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        time.sleep(0.3)  # the engine process's last report of its counters
        middle = self.samples[len(self.samples) // 10 : len(self.samples) - len(self.samples) // 10] or [0]
        return {"mean_running": sum(middle) / len(middle),
                "steps_per_request": (self.engine.stats().get("steps", 0) - self._steps) / requests}


def vision_rate(engine: Any, model: QwenVLRunner, side: int, count: int) -> dict[str, float]:
    """Images per second through the vision tower, ``count`` images in one call (as one step batches them)."""
    rendered = [engine.renderer.render(r.conversation()) for r in workload(count, side, seed=10_000)]
    pixels = torch.cat([p.pixel_values for p in rendered])
    grids = torch.cat([p.image_grid_thw for p in rendered])
    device = model.device
    model.encode_images(pixels[: len(pixels) // count], grids[:1])  # warm-up
    sync(device)
    start = time.perf_counter()
    model.encode_images(pixels, grids)
    sync(device)
    elapsed = time.perf_counter() - start
    one_pixels, one_grid = pixels[: len(pixels) // count], grids[:1]
    graphs = VisionGraphs(model)

    def one_image(encode: Callable[[torch.Tensor, torch.Tensor], Any]) -> float:
        timings = []
        for _ in range(5):
            sync(device)
            started = time.perf_counter()
            encode(one_pixels, one_grid)
            sync(device)
            timings.append(time.perf_counter() - started)
        return statistics.median(timings) * 1000

    graphs.encode(one_pixels, one_grid)  # first sight: eager; the next call captures
    graphs.encode(one_pixels, one_grid)
    return {"images": count, "ms": elapsed * 1000, "images_per_s": count / elapsed,
            "one_image_ms": one_image(model.encode_images), "one_image_graph_ms": one_image(graphs.encode),
            "graph_captured": bool(graphs._graphs) and next(iter(graphs._graphs.values())).graph is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "3b"], default="tiny")
    parser.add_argument("--family", default="qwen2_5_vl", help="the tiny shape's family (e.g. qwen3_5: a hybrid decoder)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated levels; each runs --requests requests")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--baseline-requests", type=int, default=None, help="default: --requests")
    parser.add_argument("--single-requests", type=int, default=None, help="requests at concurrency 1 (default: --requests)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--image", type=int, default=448, help="side of the square images, px")
    parser.add_argument("--vision-images", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--stream-interval", type=float, default=None, help="as localvl serve's (default: its default)")
    parser.add_argument("--in-process", action="store_true",
                        help="the engine in the server's process (--no-engine-process); also times its steps")
    parser.add_argument("--cpu-threads", type=int, default=None, help="as localvl serve's (default: cores - 1)")
    parser.add_argument("--no-cpu-affinity", action="store_true", help="as localvl serve's: let the OS place both processes")
    parser.add_argument("--client-cores", choices=["server", "all"], default="server",
                        help="where the load generator runs: on the server's cores (default), as the clients on other "
                             "machines it stands in for would leave the engine's alone, or on every core")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--log-level", default="warning", help="localvl's log level (debug shows engine tracebacks)")
    args = parser.parse_args()
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("localvl").setLevel(args.log_level.upper())
    levels = [int(x) for x in args.concurrency.split(",")]

    all_cores = affinity.available()
    loaded = engine_model(args.shape, args.device, args.dtype, args.family)
    settings = Settings(stream_interval=args.stream_interval) if args.stream_interval is not None else Settings()
    config = dataclasses.replace(engine_config(settings), max_num_seqs=args.max_num_seqs, max_queue=100_000)
    # As `localvl serve` makes it (but for those two settings): by default in a process of its own,
    # with its own copy of the model (this one runs the baseline); --in-process also times its steps.
    engine: Any
    if args.in_process:
        apply_cpu_threads(loaded.model.device.type, args.cpu_threads)
        engine = LocalEngine(loaded, config)
    else:
        load = functools.partial(engine_model, args.shape, args.device, args.dtype, args.family)
        engine = ProcessEngine(load, lambda: loaded.processor, config, cpu_threads=args.cpu_threads,
                               cpu_affinity=not args.no_cpu_affinity, log_level=args.log_level)
        apply_cpu_threads(loaded.model.device.type, args.cpu_threads)
    device = loaded.model.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    requests = workload(args.requests, args.image)
    prompt_tokens = engine.renderer.count(requests[0].conversation())
    result: dict[str, Any] = {"shape": args.shape, "family": args.family, "device": name, "dtype": str(loaded.model.dtype).removeprefix("torch."),
                              "prompt_tokens": prompt_tokens, "output_tokens": args.tokens, "image": args.image}
    print(f"{args.shape} {args.family} on {name} ({result['dtype']}); each request: one {args.image}px image + text = "
          f"{prompt_tokens} prompt tokens, {args.tokens} output tokens", flush=True)

    # Half the baseline's requests before the engine's levels, half after: this machine's speed
    # drifts over minutes, and a baseline taken only first would put all of the drift in the ratio.
    first, second = halves(requests[: args.baseline_requests or args.requests])
    before = baseline(loaded, engine, first, args.tokens)
    print(f"  naive model.generate, one at a time, before the engine: {before['requests_per_s']:.3f} req/s", flush=True)

    clock = StepClock(engine) if args.in_process else StepClock.absent()
    # The load generator runs in its own process, so it does not take the server's GIL. By default
    # on the server's cores (with the model on the CPU the engine process has pinned itself to the
    # others): it stands in for clients elsewhere, which take no time from the engine's core.
    client_cores = affinity.available() if args.client_cores == "server" else all_cores
    result["client_cores"] = client_cores
    print(f"  load generator on cores {client_cores or 'any'} of {all_cores or 'any'}", flush=True)
    pool = concurrent.futures.ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn"), initializer=affinity.pin_process, initargs=(client_cores,)
    )
    with pool, InProcessServer(engine) as url:
        pool.submit(client.run_load, url, [json.dumps(r.body(4)).encode() for r in workload(2, args.image, seed=5_000)], 2).result()
        clock.ttft()
        clock.breakdown(0.0)
        rows = []
        for index, level in enumerate(levels):
            # Each level gets images of its own: with the same ones, a level would find the earlier
            # levels' images and prompts in the caches and skip the vision tower and the prefill.
            count = args.single_requests if level == 1 and args.single_requests else args.requests
            prepared = pool.submit(prepare_level, count, args.image, 1_000 * (index + 1), args.tokens).result()
            cpu = server_cpu(engine)
            occupancy = Occupancy(engine)
            row = pool.submit(run_level, url, prepared, level).result()
            row["server_cpu_ms_per_request"] = (server_cpu(engine) - cpu) * 1000 / row["requests"]
            row.update(occupancy.finish(row["requests"]))
            row.update(clock.ttft())
            rows.append(row)
            server_ttft = (f"TTFT p50 {row['server_ttft_p50_ms']:.1f} ms p99 {row['server_ttft_p99_ms']:.1f} ms "
                           if "server_ttft_p50_ms" in row else "")
            print(f"  engine, concurrency {level:>3}: {row['requests_per_s']:.3f} req/s, "
                  f"{row['output_tokens_per_s']:.1f} tok/s, {server_ttft}(first text: p50 {row['ttft_p50_ms']:.1f} ms); "
                  f"CPU time per request: server "
                  f"{row['server_cpu_ms_per_request']:.1f} ms, load generator {row['client_cpu_ms_per_request']:.1f} ms; "
                  f"the engine ran {row['mean_running']:.1f} sequences on average, "
                  f"{row['steps_per_request']:.1f} steps per request", flush=True)
            row.update(clock.breakdown(row["seconds"]))
            if "prepare_p50_ms" in row:
                print(f"    where its {row['seconds']:.2f} s went: submit to engine (rendering) p50 {row['prepare_p50_ms']:.1f} ms, "
                      f"max {row['prepare_max_ms']:.1f} ms; {row['prefill_steps']} steps with prefill {row['prefill_step_s']:.2f} s, "
                      f"{row['decode_steps']} decode steps {row['decode_step_s']:.2f} s, outside steps {row['outside_steps_s']:.2f} s",
                      flush=True)
        result["engine"] = rows
        base = pooled(before, baseline(loaded, engine, second, args.tokens) if second else None)
        result["baseline"] = base
        print(f"  naive model.generate, one at a time: {base['requests_per_s']:.3f} req/s, "
              f"{base['output_tokens_per_s']:.1f} tok/s{spread(base)}", flush=True)
        for row in rows:
            row["vs_baseline"] = row["requests_per_s"] / base["requests_per_s"]
            print(f"  engine, concurrency {row['concurrency']:>3}: {row['vs_baseline']:.2f}x the baseline", flush=True)
        follow_up = workload(1, args.image, seed=9_000)[0]
        clock.ttft()
        turn = pool.submit(client.run_second_turn, url, follow_up.body(8), follow_up.body(8, FOLLOW_UP)).result()
        firsts = sorted(clock.first_token[k] - clock.submitted[k] for k in clock.submitted)
        if len(firsts) == 2:  # server-side: the first turn is submitted first, and answers first
            order = sorted(clock.submitted, key=clock.submitted.get)  # type: ignore[arg-type]
            first_ms, second_ms = ((clock.first_token[k] - clock.submitted[k]) * 1000 for k in order)
            turn.update(server_first_ttft_ms=first_ms, server_second_ttft_ms=second_ms, server_ratio=second_ms / first_ms)
        result["second_turn"] = turn
        result["compiled"] = bool(engine.stats().get("compiled"))
    if result["compiled"]:
        print("  text decoder: compiled (torch.compile)")
    if len(rows) > 1:
        ratio = rows[-1]["requests_per_s"] / rows[0]["requests_per_s"]
        result["top_vs_lowest_concurrency"] = ratio
        print(f"  concurrency {levels[-1]} vs {levels[0]}: {ratio:.2f}x the throughput")
    if "server_ratio" in turn:
        print(f"  second turn about the same image: TTFT {turn['server_second_ttft_ms']:.1f} ms vs first "
              f"{turn['server_first_ttft_ms']:.1f} ms ({turn['server_ratio'] * 100:.0f}%)")
    print(f"  (first text at the client: {turn['second_ttft_ms']:.1f} ms vs {turn['first_ttft_ms']:.1f} ms)")
    steps = {size: clock.median_ms(size) for size in sorted(clock.decode)}
    result["decode_ms_per_step"] = steps
    shown = ", ".join(f"batch {k}: {v:.2f}" for k, v in steps.items() if k in (1, 2, 4, 8, 16, 32, 64) and v)
    print(f"  decode step, median ms: {shown or 'timed with --in-process only'}")
    result["vision"] = vision_rate(engine, QwenVLRunner(loaded.model), args.image, args.vision_images)
    print(f"  vision tower: {args.vision_images} images of {args.image}px in one call: "
          f"{result['vision']['ms']:.1f} ms = {result['vision']['images_per_s']:.1f} images/s; one image: "
          f"{result['vision']['one_image_ms']:.1f} ms, from a {'CUDA graph' if result['vision']['graph_captured'] else 'graph run eagerly'}: "
          f"{result['vision']['one_image_graph_ms']:.1f} ms")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
