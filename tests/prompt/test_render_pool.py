import concurrent.futures

from localvl.conversation import Conversation, Text, Turn
from localvl.media.images import load_image
from localvl.prompt.render import Renderer
from tests.helpers import image_bytes


def test_parallel_renders_with_a_processor_pool_equal_serial_ones(loaded_model):
    loaded = loaded_model("qwen2_5_vl")
    serial = Renderer(loaded.processor)
    pooled = Renderer(loaded.processor, workers=3)
    convs = [
        Conversation([Turn("user", [load_image(image_bytes("PNG", size=(40 + 9 * i, 50)), "image/png", str(i)), Text(f"q{i} " * i)])])
        for i in range(12)
    ]
    with concurrent.futures.ThreadPoolExecutor(6) as workers:
        results = list(workers.map(pooled.render, convs))
    for conv, got in zip(convs, results):
        want = serial.render(conv)
        assert got.input_ids.tolist() == want.input_ids.tolist()
        assert got.image_grid_thw.tolist() == want.image_grid_thw.tolist()
        assert (got.pixel_values == want.pixel_values).all()
