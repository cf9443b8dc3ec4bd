"""The hand-stepped decoder must equal the stock model's own generate(), for every family."""

import pytest
import torch
from PIL import Image

from localvl.engine.positions import mrope_positions
from localvl.engine.qwen_vl import PromptInputs, QwenVLRunner
from tests.conftest import FAMILIES


def _inputs(loaded, images):
    content = []
    for _ in images:
        content += [{"type": "image"}, {"type": "text", "text": "and this one?"}]
    messages = [{"role": "user", "content": content or "hello there"}]
    text = loaded.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return loaded.processor(text=[text], images=images or None, return_tensors="pt")


IMAGE_SETS = {
    "text": [],
    "one": [Image.new("RGB", (100, 60), (200, 10, 10))],
    "two-sizes": [Image.new("RGB", (100, 60), (200, 10, 10)), Image.new("RGB", (40, 130), (0, 90, 10))],
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("images", IMAGE_SETS, ids=list(IMAGE_SETS))
def test_positions_equal_the_models_get_rope_index(loaded_model, family, images):
    loaded = loaded_model(family)
    inputs = _inputs(loaded, IMAGE_SETS[images])
    if not IMAGE_SETS[images]:
        positions, delta = mrope_positions(inputs["input_ids"][0], None, loaded.model.config.image_token_id, 2)
        assert torch.equal(positions, torch.arange(inputs["input_ids"].shape[1]).expand(3, -1)) and delta == 0
        return
    reference, deltas = loaded.model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    positions, delta = mrope_positions(
        inputs["input_ids"][0], inputs["image_grid_thw"], loaded.model.config.image_token_id, 2
    )
    assert torch.equal(positions, reference[:, 0])
    assert delta == int(deltas[0])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("images", ["one", "two-sizes"])
@pytest.mark.parametrize("chunk", [4096, 5])
def test_chunked_prefill_and_decode_equal_generate(loaded_model, family, images, chunk):
    loaded = loaded_model(family)
    inputs = _inputs(loaded, IMAGE_SETS[images])
    steps = 12
    on_device = inputs.to(loaded.model.device)
    expected = loaded.model.generate(**on_device, max_new_tokens=steps, do_sample=False, min_new_tokens=steps)
    expected = expected[0, inputs["input_ids"].shape[1] :].tolist()

    runner = QwenVLRunner(loaded.model)
    prompt = runner.embed_prompt(PromptInputs(inputs["input_ids"][0], inputs["pixel_values"], inputs["image_grid_thw"]))
    cache = runner.new_cache()
    length = len(prompt)
    for start in range(0, length, chunk):  # chunk 5 splits images across prefill steps
        hidden = runner.prefill(prompt, cache, start, min(length, start + chunk))
    produced = []
    for i in range(steps):
        with torch.inference_mode():
            logits = runner.logits(hidden)
            logits[list(loaded.eos_token_ids)] = float("-inf")  # as min_new_tokens does
            token = int(torch.argmax(logits))
        produced.append(token)
        hidden = runner.decode(token, length + i, prompt.delta, cache)
    assert produced == expected


def test_unsupported_model_type_is_refused(loaded_model):
    loaded = loaded_model("qwen2_vl")
    original = loaded.model.config.model_type
    try:
        loaded.model.config.model_type = "llava"
        with pytest.raises(ValueError, match="not a supported Qwen-VL family"):
            QwenVLRunner(loaded.model)
    finally:
        loaded.model.config.model_type = original
