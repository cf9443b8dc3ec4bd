"""A prompt's state as the engine gets it: in this process, or pickled down an engine process's pipe."""

import pickle

import torch

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
    assert torch.equal(compact.pixels(), full.pixel_values)

    ids, spans, state = prepare_prompt(full, image_id, merge)
    compact_ids, compact_spans, compact_state = prepare_prompt(compact, image_id, merge)
    assert (compact_ids, compact_spans, compact_state.keys) == (ids, spans, state.keys)
    sent = pickle.dumps(compact_state, protocol=5)
    assert len(sent) * 4 < len(pickle.dumps(state, protocol=5))
    received = pickle.loads(sent)  # as the engine process reads it: pixels again
    assert len(received.pixels) == 2
    for (pixels, grid), (expected, expected_grid) in zip(received.pixels, state.pixels):
        assert torch.equal(pixels, expected) and torch.equal(grid, expected_grid)
