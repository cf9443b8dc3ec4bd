"""Models the benchmarks run: the tiny test model, or random weights in a real model's shape."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

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


def build(shape: str, device: str, dtype: str, workdir: Path, *, vocab: str = "tiny", family: str = "qwen2_5_vl") -> LoadedModel:
    """The tiny Qwen2.5-VL folder's processor, with its own weights (tiny) or 3B-shaped random ones;
    ``family``: another tiny family instead (tiny shape only; Qwen3.5's hybrid decoder, say).

    The processor's pixel budget admits a 448x448 image whole (1,024 patches, 256 image tokens).
    """
    if shape != "tiny" and family != "qwen2_5_vl":
        raise ValueError("the 3B shape is Qwen2.5-VL's")
    folder = build_tiny_model(workdir / "tiny", family, vocab, max_merged_patches=256)
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
