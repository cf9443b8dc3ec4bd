"""Engine v1 against the stock ``model.generate``, side by side, on one request.

Measures, for the same prompt (one image + text) and the same greedy decode of N tokens:
time to first token and time per output token, for localvl's LocalEngine and for transformers'
generate(); and checks that both produce the same tokens. Runs anywhere:

    python benchmarks/engine_v1.py                          # tiny random model, CPU or GPU
    python benchmarks/engine_v1.py --shape 3b --device cuda # Qwen2.5-VL-3B-shaped random weights, bf16
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image as PILImage

from localvl.conversation import Conversation, GenerationRequest, Image, SamplingParams, Text, Turn
from localvl.engine.events import Finished
from localvl.engine.local import LocalEngine
from localvl.models.loader import LoadedModel, load_model, pick_dtype
from localvl.models.tiny import build_tiny_model

# Qwen2.5-VL-3B-Instruct's published dimensions.
SHAPE_3B = {
    "text": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=128000,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
    "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                   patch_size=14, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
}


def build(shape: str, device: str, dtype: str, workdir: Path) -> LoadedModel:
    folder = build_tiny_model(workdir / "tiny", "qwen2_5_vl", "tiny", max_merged_patches=256)
    loaded = load_model(str(folder), device=device, dtype=dtype)
    if shape == "tiny":
        return loaded
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig

    small = loaded.model.config
    config = Qwen2_5_VLConfig(
        text_config={**SHAPE_3B["text"], "eos_token_id": list(loaded.eos_token_ids), "tie_word_embeddings": False},
        vision_config=SHAPE_3B["vision"],
        image_token_id=small.image_token_id, video_token_id=small.video_token_id,
        vision_start_token_id=small.vision_start_token_id, vision_end_token_id=small.vision_end_token_id,
        tie_word_embeddings=False,
    )
    torch_dtype = pick_dtype(dtype, loaded.model.device.type)
    with torch.device(loaded.model.device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch_dtype, attn_implementation="sdpa").eval()
    model.generation_config = loaded.model.generation_config
    return dataclasses.replace(loaded, model=model, context_length=32768)


def conversation(loaded: LoadedModel, side: int) -> Conversation:
    picture = PILImage.effect_mandelbrot((side, side), (-2, -1.5, 1, 1.5), 64).convert("RGB")
    image = Image(picture, "image/png", "bench")
    return Conversation([Turn("user", [image, Text("Read this invoice and list the total, due date and supplier. " * 4)])])


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_generate(loaded: LoadedModel, conv: Conversation, tokens: int) -> tuple[list[int], float, float]:
    engine = LocalEngine(loaded)
    prompt = engine.renderer.render(conv)
    device = loaded.model.device
    inputs = {
        "input_ids": prompt.input_ids[None].to(device),
        "attention_mask": torch.ones_like(prompt.input_ids)[None].to(device),
        "mm_token_type_ids": (prompt.input_ids == loaded.model.config.image_token_id).int()[None].to(device),
        "pixel_values": prompt.pixel_values.to(device),
        "image_grid_thw": prompt.image_grid_thw.to(device),
    }
    padding = list(range(len(loaded.tokenizer), loaded.model.config.get_text_config().vocab_size))
    kwargs = dict(do_sample=False, suppress_tokens=padding, eos_token_id=None, pad_token_id=0)
    loaded.model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
    sync(device.type)
    start = time.perf_counter()
    loaded.model.generate(**inputs, max_new_tokens=1, min_new_tokens=1, **kwargs)
    sync(device.type)
    first = time.perf_counter() - start
    start = time.perf_counter()
    out = loaded.model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)
    sync(device.type)
    total = time.perf_counter() - start
    ids = out[0, prompt.input_ids.numel() :].tolist()
    return ids, first, (total - first) / max(1, tokens - 1)


async def run_engine(loaded: LoadedModel, conv: Conversation, tokens: int) -> tuple[list[int], float, float, int]:
    """TTFT: submit to the first sampled token; then the mean time per further token."""
    quiet = dataclasses.replace(loaded, eos_token_ids=frozenset())
    engine = LocalEngine(quiet)
    produced: list[int] = []
    stamps: list[float] = []
    decode = engine.runner.decode

    def recording_decode(token_id, *args, **kwargs):  # called right after each token is sampled
        sync(loaded.model.device.type)
        stamps.append(time.perf_counter())
        produced.append(token_id)
        return decode(token_id, *args, **kwargs)

    engine.runner.decode = recording_decode
    await engine.start()
    try:
        warm = await engine.submit(GenerationRequest("warm", conv, SamplingParams(max_tokens=2, temperature=0)))
        [event async for event in warm]
        produced.clear()
        stamps.clear()
        start = time.perf_counter()
        stream = await engine.submit(GenerationRequest("bench", conv, SamplingParams(max_tokens=tokens, temperature=0)))
        events = [event async for event in stream]
    finally:
        await engine.stop()
    assert isinstance(events[-1], Finished) and len(stamps) == tokens
    return produced, stamps[0] - start, (stamps[-1] - stamps[0]) / max(1, tokens - 1), stream.input_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "3b"], default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--image", type=int, default=448, help="side of the square test image, px")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        loaded = build(args.shape, args.device, args.dtype, Path(tmp))
        conv = conversation(loaded, args.image)
        ref_ids, ref_first, ref_step = run_generate(loaded, conv, args.tokens)
        ids, first, step, prompt_tokens = asyncio.run(run_engine(loaded, conv, args.tokens))
    same = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), min(len(ids), len(ref_ids)))
    device = loaded.model.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {
        "shape": args.shape, "device": name, "dtype": str(loaded.model.dtype).removeprefix("torch."),
        "prompt_tokens": prompt_tokens, "output_tokens": args.tokens,
        "generate_ttft_ms": round(ref_first * 1000, 2), "generate_ms_per_token": round(ref_step * 1000, 3),
        "engine_ttft_ms": round(first * 1000, 2), "engine_ms_per_token": round(step * 1000, 3),
        "engine_speedup_per_token": round(ref_step / step, 3) if step else None,
        "identical_leading_tokens": same,
    }
    print(f"{args.shape} on {name} ({result['dtype']}), prompt {prompt_tokens} tokens (one {args.image}px image), "
          f"{args.tokens} greedy tokens")
    print(f"  {'':22}{'TTFT ms':>10}{'ms/token':>10}")
    print(f"  {'model.generate':22}{result['generate_ttft_ms']:>10}{result['generate_ms_per_token']:>10}")
    print(f"  {'localvl engine v1':22}{result['engine_ttft_ms']:>10}{result['engine_ms_per_token']:>10}")
    print(f"  engine / generate time per token: {1 / result['engine_speedup_per_token']:.2f}x; "
          f"identical leading tokens: {same} of {args.tokens}")
    print("  (the engine's TTFT includes rendering the prompt and processing the image; generate's does not)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
