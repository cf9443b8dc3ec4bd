"""The loading paths on whatever device is here: dtype and attention chosen automatically, and
each quantization the machine can run — each one loaded, then answering through the engine.

    python benchmarks/loading_check.py                 # CPU: fp32, sdpa, bitsandbytes 8/4-bit if installed
    python benchmarks/loading_check.py --device cuda   # GPU: bf16/fp16, flash-attention if installed, bitsandbytes

Prints one line per path: what was chosen, load seconds, tokens generated, and why a path was
skipped. It uses a tiny random model (no weights can be downloaded), so it checks mechanics only.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import tempfile
import time
from pathlib import Path


async def answer(loaded: object) -> int:
    from localvl.conversation import Conversation, GenerationRequest, SamplingParams, Text, Turn
    from localvl.engine.events import Finished
    from localvl.engine.local import LocalEngine

    engine = LocalEngine(loaded)  # type: ignore[arg-type]
    await engine.start()
    try:
        request = GenerationRequest("check", Conversation([Turn("user", [Text("Describe the picture.")])]),
                                    SamplingParams(max_tokens=16, temperature=0.0))
        stream = await engine.submit(request)
        async for event in stream:
            if isinstance(event, Finished):
                return event.usage.output_tokens
        return 0
    finally:
        await engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--family", default="qwen2_5_vl")
    args = parser.parse_args()

    from localvl.models.loader import ModelLoadError, load_model
    from localvl.models.tiny import build_tiny_model

    folder = Path(tempfile.mkdtemp(prefix="loading-check-"))
    build_tiny_model(folder, args.family, "tiny", seed=0)
    paths: list[tuple[str, dict[str, object], str | None]] = [
        ("auto dtype, auto attention", {}, None),
        ("flash-attention", {"attention": "flash_attention_2"}, "flash_attn"),
        ("bitsandbytes 8-bit", {"quantize": "8bit"}, "bitsandbytes"),
        ("bitsandbytes 4-bit", {"quantize": "4bit"}, "bitsandbytes"),
    ]
    for name, options, needs in paths:
        if needs and importlib.util.find_spec(needs) is None:
            print(f"{name}: skipped ({needs} is not installed)")
            continue
        started = time.perf_counter()
        try:
            loaded = load_model(str(folder), device=args.device, **options)  # type: ignore[arg-type]
        except ModelLoadError as error:
            print(f"{name}: refused: {str(error).splitlines()[0]}")
            continue
        seconds = time.perf_counter() - started
        model = loaded.model
        attention = model.config.get_text_config()._attn_implementation
        tokens = asyncio.run(answer(loaded))
        print(f"{name}: loaded in {seconds:.1f} s on {model.device} as {str(model.dtype).removeprefix('torch.')}, "
              f"vision attention {model.config.vision_config._attn_implementation}, text attention {attention}; "
              f"{tokens} tokens through the engine")


if __name__ == "__main__":
    main()
