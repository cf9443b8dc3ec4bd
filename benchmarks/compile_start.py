"""How long `--compile` adds to an engine's start, at a decoder depth of your choosing.

The tiny model's width with ``--layers`` decoder layers (36 is Qwen2.5-VL-3B's depth): the engine
started uncompiled, then compiled (warm-up included), and the graphs dynamo made. Layers are
compiled one by one and share one graph (``QwenVLRunner.set_compiled``), so the compiled start
should not grow with the depth.

    python benchmarks/compile_start.py --layers 36
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

try:
    from benchmarks.models import build
except ImportError:  # run as a script from benchmarks/
    from models import build  # type: ignore[no-redef]

from localvl.engine.local import EngineConfig, LocalEngine
from localvl.models.loader import LoadedModel


def deeper(loaded: LoadedModel, layers: int) -> LoadedModel:
    """The same model family and width with ``layers`` decoder layers (random weights)."""
    from transformers import AutoModelForImageTextToText

    config = loaded.model.config
    text = config.get_text_config()
    text.num_hidden_layers = layers
    if getattr(text, "layer_types", None):
        text.layer_types = [text.layer_types[0]] * layers
    model = AutoModelForImageTextToText.from_config(config, dtype=loaded.model.dtype, attn_implementation="sdpa").eval()
    model.generation_config = loaded.model.generation_config
    return dataclasses.replace(loaded, model=model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=36)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        loaded = deeper(build("tiny", "cpu", "float32", Path(tmp)), args.layers)
    seconds = {}
    for compile in (False, True):
        frames = torch._dynamo.utils.counters["frames"]["ok"]
        started = time.perf_counter()
        engine = LocalEngine(loaded, EngineConfig(compile=compile, kv_cache_memory=16 << 20))
        seconds[compile] = time.perf_counter() - started
        made = torch._dynamo.utils.counters["frames"]["ok"] - frames
        print(f"{args.layers} decoder layers, {'compiled' if compile else 'uncompiled'}: engine started in "
              f"{seconds[compile]:.1f} s; compiled={engine.model.compiled}; graphs made: {made}", flush=True)
    print(f"--compile added {seconds[True] - seconds[False]:.1f} s to the start")


if __name__ == "__main__":
    main()
