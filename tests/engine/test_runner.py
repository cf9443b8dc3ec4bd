"""A prompt's state as the engine gets it: in this process, or pickled down an engine process's pipe."""

import copy
import pickle

import torch

from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from localvl.conversation import Conversation, Text, Turn
from localvl.engine.runner import prepare_prompt
from localvl.media.images import load_image
from localvl.prompt.render import Renderer
from tests.helpers import image_bytes


def test_compact_render_reaches_the_engine_as_the_same_pixels_in_fewer_bytes(loaded_model):
    loaded = loaded_model("qwen2_5_vl")
    config = loaded.model.config
    image_id, merge = config.image_token_id, config.vision_config.spatial_merge_size
    pictures = [load_image(image_bytes("PNG", size=size), "image/png", "test") for size in ((90, 60), (120, 200))]
    conversation = Conversation([Turn("user", [pictures[0], Text("and"), pictures[1], Text("compare")])])
    renderer = Renderer(loaded.processor)
    full, compact = renderer.render(conversation), renderer.render(conversation, compact=True)
    assert compact.pixel_values is None and compact.patches is not None
    assert torch.equal(torch.cat([p.pixels() for p in compact.patches]), full.pixel_values)

    ids, spans, state = prepare_prompt(full, image_id, merge)
    compact_ids, compact_spans, compact_state = prepare_prompt(compact, image_id, merge)
    assert (compact_ids, compact_spans, compact_state.keys) == (ids, spans, state.keys)
    sent = pickle.dumps(compact_state, protocol=5)
    assert len(sent) * 4 < len(pickle.dumps(state, protocol=5))
    received = pickle.loads(sent)  # as the engine process reads it: pixels again
    assert len(received.pixels) == 2
    for (pixels, grid), (expected, expected_grid) in zip(received.pixels, state.pixels):
        assert torch.equal(pixels, expected) and torch.equal(grid, expected_grid)


def test_a_processor_without_the_fast_path_renders_pixels_even_when_asked_for_patches(loaded_model):
    """(The torchvision image processors, say: their own arithmetic, nothing to stop before.)"""
    loaded = loaded_model("qwen2_5_vl")
    processor = copy.deepcopy(loaded.processor)
    processor.image_processor = Qwen2VLImageProcessorPil.from_dict(processor.image_processor.to_dict())  # the stock class
    config = loaded.model.config
    picture = load_image(image_bytes("PNG", size=(90, 60)), "image/png", "test")
    rendered = Renderer(processor).render(Conversation([Turn("user", [picture, Text("what is it")])]), compact=True)
    assert rendered.patches is None and rendered.pixel_values is not None
    _, spans, state = prepare_prompt(rendered, config.image_token_id, config.vision_config.spatial_merge_size)
    received = pickle.loads(pickle.dumps(state, protocol=5))
    assert len(spans) == 1 and torch.equal(received.pixels[0][0], rendered.pixel_values)
