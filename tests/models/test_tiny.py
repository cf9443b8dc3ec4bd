import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer

from localvl.engine.detokenizer import special_token_ids
from localvl.models.processor import load_processor
from localvl.models.tiny import QWEN_ADDED_TOKENS, build_tokenizer, build_tiny_model
from tests.conftest import FAMILIES
from tests.helpers import image_bytes


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_loads_with_standard_from_pretrained_and_generates(model_dir, family):
    import io

    from PIL import Image

    folder = model_dir(family)
    processor = load_processor(str(folder))
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    assert model.config.model_type == family
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    picture = Image.open(io.BytesIO(image_bytes("PNG", size=(90, 60)))).convert("RGB")
    inputs = processor(text=[text], images=[picture], return_tensors="pt")
    merged = int(inputs["image_grid_thw"].prod()) // 4
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == merged
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4 or int(out[0, -1]) in model.generation_config.eos_token_id


def test_generation_config_stops_at_im_end(model_dir):
    folder = model_dir("qwen2_5_vl")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = json.loads((folder / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in config["eos_token_id"]
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") in config["eos_token_id"]


def test_added_tokens_follow_qwen_order_and_specialness():
    tokenizer = build_tokenizer("tiny")
    ids = [tokenizer.convert_tokens_to_ids(text) for text, _ in QWEN_ADDED_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    special = special_token_ids(tokenizer)
    for (text, is_special), token_id in zip(QWEN_ADDED_TOKENS, ids):
        assert (token_id in special) == is_special, text


def test_tiny_vocabulary_round_trips_mixed_text():
    tokenizer = build_tokenizer("tiny")
    text = "Read this invoice: total ¥1,250.00 — 请阅读这张发票 🧾"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges were learned


def test_build_is_deterministic(tmp_path):
    a = build_tiny_model(tmp_path / "a", "qwen3_vl", seed=3)
    b = build_tiny_model(tmp_path / "b", "qwen3_vl", seed=3)
    for name in ("tokenizer.json", "config.json", "model.safetensors", "chat_template.jinja"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_templates_have_the_shape_of_each_family(model_dir):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "", "parameters": {}}}]
    messages = [{"role": "user", "content": "hi"}]
    qwen25 = load_processor(str(model_dir("qwen2_5_vl")))
    qwen3 = load_processor(str(model_dir("qwen3_vl")))
    assert "get_weather" not in qwen25.apply_chat_template(messages, tools=tools, tokenize=False)
    with_tools = qwen3.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert "<tools>" in with_tools and "get_weather" in with_tools
    thinking = qwen3.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert thinking.endswith("<|im_start|>assistant\n<think>\n")
    no_thinking = qwen3.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert no_thinking.endswith("<think>\n\n</think>\n\n")
    call = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"},
    ]
    rendered = qwen3.apply_chat_template(call, tokenize=False, add_generation_prompt=True)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in rendered
    assert "<tool_response>\nsunny\n</tool_response>" in rendered


def test_real_qwen_vocabulary_matches_qwen_ids(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir("qwen2_5_vl", "qwen"))
    assert tokenizer.encode("Hello, world!", add_special_tokens=False) == [9707, 11, 1879, 0]
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == 151643
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 151644
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert tokenizer.convert_tokens_to_ids("</think>") == 151668
    config = json.loads((model_dir("qwen2_5_vl", "qwen") / "config.json").read_text())
    assert config["image_token_id"] == 151655
