"""Loading options: folder checks, attention choice, quantization, the image pixel budget."""

import json
import shutil
from pathlib import Path

import pytest

from localvl.media.images import load_image
from localvl.models.loader import ModelLoadError, check_folder, load_frontend_processor, load_model, pick_attention
from localvl.prompt.render import Renderer
from localvl.conversation import Conversation, Text, Turn
from tests.engine.test_local import generate, run, with_engine, conversation
from tests.helpers import image_bytes


def copy_model(model_dir, tmp_path: Path, family: str = "qwen2_5_vl") -> Path:
    target = tmp_path / "model"
    shutil.copytree(model_dir(family), target)
    return target


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_a_text_only_qwen_folder_says_it_is_a_text_model(model_dir, tmp_path):
    folder = copy_model(model_dir, tmp_path)
    edit_config(folder, model_type="qwen2")
    with pytest.raises(ModelLoadError, match="is a text model \\('qwen2'\\); localvl serves Qwen-VL"):
        load_model(str(folder))


def test_another_kind_of_model_is_refused(model_dir, tmp_path):
    folder = copy_model(model_dir, tmp_path)
    edit_config(folder, model_type="llava")
    with pytest.raises(ModelLoadError, match="'llava' model; localvl serves Qwen vision-language models"):
        check_folder(folder)


@pytest.mark.parametrize(
    "remove, message",
    [
        ("config.json", "has no config.json"),
        ("model.safetensors", "has no weights"),
        ("tokenizer.json", "has no tokenizer"),
        ("processor_config.json", "has no image processor"),
    ],
)
def test_a_folder_missing_a_part_says_which(model_dir, tmp_path, remove, message):
    folder = copy_model(model_dir, tmp_path)
    (folder / remove).unlink()
    with pytest.raises(ModelLoadError, match=message):
        load_model(str(folder))


def test_weights_cloned_without_git_lfs_or_cut_short_are_refused_by_name(model_dir, tmp_path):
    # transformers' own errors were a SafetensorError "header too large" / "incomplete metadata"
    folder = copy_model(model_dir, tmp_path)
    weights = folder / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 12345\n")
    with pytest.raises(ModelLoadError, match="model.safetensors .* is a git-lfs pointer.*git lfs pull"):
        load_model(str(folder))
    for cut in (whole[: len(whole) // 2], whole[:4], whole[:-1], whole + b"\0"):
        weights.write_bytes(cut)
        with pytest.raises(ModelLoadError, match="model.safetensors .* is not a whole safetensors file"):
            check_folder(folder)
    weights.write_bytes(whole)
    check_folder(folder)


def test_a_damaged_json_file_is_named(model_dir, tmp_path):
    folder = copy_model(model_dir, tmp_path)
    (folder / "tokenizer_config.json").write_text("{not json")  # was a bare JSONDecodeError traceback
    with pytest.raises(ModelLoadError, match="tokenizer_config.json is not valid JSON"):
        load_model(str(folder))


def test_weights_of_another_size_than_the_config_say_so(model_dir, tmp_path):
    folder = copy_model(model_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["intermediate_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="weights of .* do not match its config.json"):
        load_model(str(folder))


def move_chat_template(folder: Path, where: str) -> None:
    """Keep the folder's template only where ``where`` says, as published folders variously keep it."""
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    if where == "chat_template.jinja":
        (folder / "chat_template.jinja").write_text(template)
    elif where == "chat_template.json":  # Qwen2-VL / Qwen2.5-VL
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    elif where == "tokenizer_config.json":
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))


@pytest.mark.parametrize("where", ["chat_template.jinja", "chat_template.json", "tokenizer_config.json"])
def test_the_chat_template_is_read_wherever_the_folder_keeps_it(model_dir, tmp_path, where):
    folder = copy_model(model_dir, tmp_path)
    move_chat_template(folder, where)
    text = Renderer(load_frontend_processor(str(folder))).prompt_text(Conversation([Turn("user", [Text("hi")])]))
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_a_folder_without_a_chat_template_is_refused_at_load(model_dir, tmp_path, monkeypatch):
    # else the server started, then answered every request with a 400 blaming the conversation
    import transformers

    folder = copy_model(model_dir, tmp_path)
    move_chat_template(folder, "nowhere")
    with pytest.raises(ModelLoadError, match="has no chat template"):
        load_frontend_processor(str(folder))
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", lambda *a, **k: 1 / 0)
    with pytest.raises(ModelLoadError, match="has no chat template"):
        load_model(str(folder))


def test_a_sharded_folder_missing_a_shard_says_the_download_is_incomplete(model_dir, tmp_path):
    folder = copy_model(model_dir, tmp_path)
    index = {"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                            "b.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="lacks 1 of its 2 weight files .*incomplete"):
        check_folder(folder)


@pytest.mark.parametrize("method, package", [("awq", "gptqmodel"), ("gptq", "optimum")])
def test_a_quantized_checkpoint_without_its_package_names_the_package(model_dir, tmp_path, method, package):
    pytest.importorskip("accelerate")
    folder = copy_model(model_dir, tmp_path)
    edit_config(folder, quantization_config={"quant_method": method, "bits": 4})
    with pytest.raises(ModelLoadError, match=f"{method.upper()}-quantized checkpoint, which needs .*{package}.*pip install"):
        load_model(str(folder))


def test_attention_auto_is_sdpa_without_cuda_and_flash_is_refused_on_cpu():
    assert pick_attention("auto", "cpu") == "sdpa"
    assert pick_attention("eager", "cpu") == "eager"
    with pytest.raises(ModelLoadError, match="needs a CUDA device"):
        pick_attention("flash_attention_2", "cpu")
    with pytest.raises(ModelLoadError, match="unknown attention"):
        pick_attention("flash", "cpu")


def test_eager_attention_still_serves_through_the_engine(model_dir):
    loaded = load_model(str(model_dir("qwen2_vl")), dtype="float32", attention="eager")
    assert loaded.model.config._attn_implementation == "eager"
    _, events = run(with_engine(loaded, lambda engine: generate(engine, conversation(image=True), max_tokens=4)))
    assert events[-1].usage.output_tokens >= 1


def image_tokens(loaded, size) -> int:
    image = load_image(image_bytes("PNG", size=size), "image/png", "test")
    inputs = Renderer(loaded.processor).render(Conversation([Turn("user", [image, Text("hi")])]))
    return int((inputs.input_ids == loaded.model.config.image_token_id).sum())


def test_max_pixels_changes_a_big_images_token_count(model_dir):
    folder = str(model_dir("qwen2_5_vl"))
    default = load_model(folder, dtype="float32")
    budget = 28 * 28 * 64  # 64 merged patches = 64 image tokens at most
    bigger = load_model(folder, dtype="float32", max_pixels=budget)
    assert image_tokens(default, (1200, 900)) <= 16  # the tiny model's own budget
    tokens = image_tokens(bigger, (1200, 900))
    assert 16 < tokens <= 64
    smaller = load_model(folder, dtype="float32", min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 4)
    assert image_tokens(smaller, (1200, 900)) <= 4
    # and the engine runs the vision tower on what the processor made
    _, events = run(with_engine(bigger, lambda engine: generate(engine, Conversation([Turn("user", [
        load_image(image_bytes("PNG", size=(1200, 900)), "image/png", "test"), Text("hi")])]), max_tokens=2)))
    usage = events[-1].usage
    assert usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens > tokens


def test_a_pixel_budget_below_one_patch_is_refused(model_dir):
    with pytest.raises(ModelLoadError, match="below one merged patch"):
        load_model(str(model_dir("qwen2_5_vl")), max_pixels=100)
    with pytest.raises(ModelLoadError, match="above max pixels"):
        load_model(str(model_dir("qwen2_5_vl")), min_pixels=28 * 28 * 20, max_pixels=28 * 28 * 10)


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantize_on_load_with_bitsandbytes_on_cpu_serves_through_the_engine(model_dir, bits):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    import bitsandbytes as bnb

    loaded = load_model(str(model_dir("qwen2_5_vl")), dtype="float32", quantize=bits)
    layer = loaded.model.model.language_model.layers[0].mlp.gate_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt if bits == "8bit" else bnb.nn.Linear4bit)
    assert not isinstance(loaded.model.model.visual.blocks[0].attn.qkv, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))
    stream, events = run(with_engine(loaded, lambda engine: generate(engine, conversation(image=True), max_tokens=6)))
    usage = events[-1].usage
    assert usage.output_tokens >= 1 and usage.input_tokens + usage.cache_creation_input_tokens > 0
