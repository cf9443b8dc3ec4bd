"""The hand-stepped decoder must equal the stock model's own generate(), for every family."""

import copy

import pytest
import torch
from PIL import Image

from localvl.engine.positions import mrope_positions
from localvl.engine.qwen_vl import QwenVLRunner
from tests.conftest import FAMILIES


def _inputs(loaded, images):
    content = []
    for _ in images:
        content += [{"type": "image"}, {"type": "text", "text": "and this one?"}]
    messages = [{"role": "user", "content": content or "hello there"}]
    text = loaded.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return loaded.processor(text=[text], images=images or None, return_tensors="pt").to(loaded.model.device)


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
    # the engine's positions are made on the CPU (runner.py); transformers' on the model's device
    assert torch.equal(positions, reference[:, 0].cpu())
    assert delta == int(deltas[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_images_of_several_requests_encode_in_one_call_as_they_do_alone(loaded_model, family):
    loaded = loaded_model(family)
    inputs = _inputs(loaded, IMAGE_SETS["two-sizes"])
    runner = QwenVLRunner(loaded.model)
    grids = inputs["image_grid_thw"]
    rows = inputs["pixel_values"].split([int(t * h * w) for t, h, w in grids.tolist()])
    together = runner.encode_images(inputs["pixel_values"], grids)
    alone = [runner.encode_images(rows[i], grids[i : i + 1])[0] for i in range(2)]
    for both, one, grid in zip(together, alone, grids.tolist()):
        assert both.embeds.shape == (runner.image_tokens(tuple(grid)), loaded.model.config.get_text_config().hidden_size)
        torch.testing.assert_close(both.embeds, one.embeds)
        assert (both.deepstack is None) == (family not in ("qwen3_vl", "qwen3_vl_moe"))
        for a, b in zip(both.deepstack or [], one.deepstack or []):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_engines_vision_call_equals_the_stock_tower(loaded_model, family):
    """Batched variable-length attention and the layout made on the CPU: the stock tower's features."""
    loaded = loaded_model(family)
    inputs = _inputs(loaded, IMAGE_SETS["two-sizes"])
    runner = QwenVLRunner(loaded.model)
    features = runner.encode_images(inputs["pixel_values"], inputs["image_grid_thw"])
    visual = loaded.model.model.visual
    assert "flash" not in (visual.config._attn_implementation or "")  # the stock path: SDPA per segment
    with torch.inference_mode():
        stock = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"], return_dict=True)
    torch.testing.assert_close(torch.cat([f.embeds for f in features]), stock.pooler_output)
    for layer, expected in enumerate(getattr(stock, "deepstack_features", None) or []):
        torch.testing.assert_close(torch.cat([f.deepstack[layer] for f in features]), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_vision_call_reads_nothing_back_from_the_device(loaded_model, family):
    """On a GPU, a value read back mid-call (``tolist``, ``item``) waits for all queued work. On
    the meta device any such read raises: the tower must run through on it."""
    loaded = loaded_model(family)
    inputs = _inputs(loaded, IMAGE_SETS["two-sizes"])
    grids = inputs["image_grid_thw"]
    runner = QwenVLRunner(copy.deepcopy(loaded.model).to("meta"))
    features = runner.encode_images(inputs["pixel_values"].to("meta"), grids)
    assert [f.embeds.shape[0] for f in features] == [runner.image_tokens(tuple(g)) for g in grids.tolist()]
    assert all(f.embeds.device.type == "meta" for f in features)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_tower_call_groups_each_set_of_segments_once(loaded_model, family, monkeypatch):
    """Every layer of a kind gets the same boundaries: grouped once per call, not once per layer."""
    from localvl.engine import varlen

    loaded = loaded_model(family)
    inputs = _inputs(loaded, IMAGE_SETS["two-sizes"])
    model = copy.deepcopy(loaded.model)
    model.model.visual.blocks.append(copy.deepcopy(model.model.visual.blocks[0]))  # a third layer
    runner = QwenVLRunner(model)
    grouped = []
    group = varlen._grouped
    monkeypatch.setattr(varlen, "_grouped", lambda bounds, device: grouped.append(bounds) or group(bounds, device))
    runner.encode_images(inputs["pixel_values"], inputs["image_grid_thw"])
    kinds = 2 if family == "qwen2_5_vl" else 1  # Qwen2.5-VL: windows, and whole images
    assert len(runner.visual.blocks) > kinds
    assert len(grouped) == kinds
    runner.encode_images(inputs["pixel_values"], inputs["image_grid_thw"])
    assert len(grouped) == 2 * kinds  # kept for one call only


def test_the_stock_model_still_generates_between_engine_steps(loaded_model):
    """The paged attention is switched on per engine call; generate() keeps plain SDPA."""
    loaded = loaded_model("qwen2_5_vl")
    QwenVLRunner(loaded.model)  # registers the paged attention
    assert loaded.model.config.get_text_config()._attn_implementation != "localvl_paged"
    inputs = _inputs(loaded, IMAGE_SETS["one"])
    out = loaded.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3 or out[0, -1] in loaded.eos_token_ids


def test_unsupported_model_type_is_refused(loaded_model):
    loaded = loaded_model("qwen2_vl")
    original = loaded.model.config.model_type
    try:
        loaded.model.config.model_type = "llava"
        with pytest.raises(ValueError, match="not a supported Qwen-VL family"):
            QwenVLRunner(loaded.model)
    finally:
        loaded.model.config.model_type = original


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])  # Qwen2/2.5-VL: none; Qwen3-VL: bias
def test_patch_embedding_as_a_matmul_equals_the_convolution(bias):
    from localvl.engine.qwen_vl import patches_as_matmul

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(3, 32, kernel_size=(2, 14, 14), stride=(2, 14, 14), bias=bias)
    patches = torch.randn(50, 3, 2, 14, 14)
    expected = conv(patches)
    patches_as_matmul(conv)
    got = conv(patches)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # anything but a kernel applied exactly once per input is left to the convolution
    overlapping = torch.nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(2, 2, 2))
    patches_as_matmul(overlapping)
    assert "forward" not in vars(overlapping)


def scratch_cache(runner, block_size):
    from localvl.engine.kv_cache import PagedKVCache

    text = runner.text_config
    return PagedKVCache(
        num_layers=text.num_hidden_layers, num_blocks=2, block_size=block_size, kv_heads=text.num_key_value_heads,
        head_dim=text.hidden_size // text.num_attention_heads, dtype=runner.dtype, device=runner.device,
    )


@pytest.mark.parametrize("block_size", [1, 16])
def test_the_warm_up_steps_fit_the_scratch_block(loaded_model, block_size, caplog):
    """Its steps run through the paged attention into the scratch block alone, whatever its size
    (eagerly here: compilation itself is the compiled fidelity test's)."""
    runner = QwenVLRunner(loaded_model("qwen2_5_vl").model)
    runner.compiled = True
    cache = scratch_cache(runner, block_size)
    cache.zero_blocks(0, 2)
    before = [k[: 2 * block_size].clone() for k in cache.keys]
    runner.warm_up(cache)
    assert runner.compiled and "uncompiled" not in caplog.text
    assert all(torch.equal(k[: 2 * block_size], b) for k, b in zip(cache.keys, before))  # no allocatable block written


def test_a_decoder_that_fails_to_compile_runs_as_it_is(loaded_model, caplog):
    runner = QwenVLRunner(loaded_model("qwen2_5_vl").model, compile=True)
    layers = runner.language_model.layers

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    runner._compiled_layers[-1] = (layers[-1], broken)
    layers[-1].forward = broken
    runner.warm_up(scratch_cache(runner, 4))
    assert not runner.compiled and "running it uncompiled" in caplog.text
    assert all("forward" not in vars(layer) for layer in layers)  # every layer's own forward again


def test_past_the_warm_up_an_uncovered_step_runs_eagerly_instead_of_compiling(loaded_model):
    from localvl.engine.kv_cache import AttentionBatch, PrefillChunk

    runner = QwenVLRunner(loaded_model("qwen2_5_vl").model, compile=True)
    cache = scratch_cache(runner, 16)
    runner.warm_up(cache)
    assert runner.compiled
    compiled = dict(torch._dynamo.utils.counters["frames"])
    tokens = 3
    device = runner.device
    hidden = runner.text_config.hidden_size
    # Column-major embeddings: the warm-up's graphs do not take the first layer's input strides.
    embeds = torch.randn(hidden, tokens, generator=torch.Generator().manual_seed(0)).to(device).t()
    positions = torch.arange(tokens, device=device).expand(3, tokens)

    def step():
        slots = cache.scratch_block * 16 + torch.arange(tokens, device=device)
        chunk = PrefillChunk(0, tokens, torch.tensor([cache.scratch_block], device=device), tokens)
        return runner.forward(embeds, positions, AttentionBatch(cache, slots, prefills=[chunk]))

    got = step()
    assert dict(torch._dynamo.utils.counters["frames"]) == compiled
    runner.set_compiled(False)
    torch.testing.assert_close(got, step())
