"""Vision-tower calls from graphs: the same features as the eager call, captured on second sight."""

import pytest
import torch

from localvl.engine.qwen_vl import QwenVLRunner
from localvl.engine.vision_graphs import VisionGraphs
from tests.conftest import FAMILIES
from tests.engine.test_qwen_vl import IMAGE_SETS, _inputs


def assert_same_features(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.embeds, b.embeds)
        assert (a.deepstack is None) == (b.deepstack is None)
        for x, y in zip(a.deepstack or [], b.deepstack or []):
            torch.testing.assert_close(x, y)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_layout_seen_twice_replays_with_the_eager_features(loaded_model, family):
    """On a CPU the graph's static buffers run eagerly; on a GPU (LOCALVL_TEST_DEVICE=cuda) it is captured."""
    loaded = loaded_model(family)
    runner = QwenVLRunner(loaded.model)
    graphs = VisionGraphs(runner)
    inputs = _inputs(loaded, IMAGE_SETS["two-sizes"])
    pixels, grids = inputs["pixel_values"], inputs["image_grid_thw"]
    want = runner.encode_images(pixels, grids)

    assert_same_features(graphs.encode(pixels, grids), want)
    assert graphs.replays == 0 and not graphs._graphs  # first sight: the eager call
    first = graphs.encode(pixels, grids)
    assert graphs.replays == 1 and len(graphs._graphs) == 1
    assert graphs._graphs[next(iter(graphs._graphs))].graph is not None or runner.device.type != "cuda"
    # Other pixels in the same layout: the replay reads its input, and earlier outputs were copied out.
    other = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(0)).to(pixels.dtype)
    assert_same_features(graphs.encode(other, grids), runner.encode_images(other, grids))
    assert_same_features(first, want)
    assert graphs.replays == 2 and not graphs.disabled


def test_large_calls_and_too_many_layouts_stay_bounded(loaded_model):
    loaded = loaded_model("qwen2_5_vl")
    runner = QwenVLRunner(loaded.model)
    inputs = _inputs(loaded, IMAGE_SETS["two-sizes"])
    pixels, grids = inputs["pixel_values"], inputs["image_grid_thw"]
    graphs = VisionGraphs(runner, max_patches=pixels.shape[0] - 1)
    for _ in range(3):
        graphs.encode(pixels, grids)
    assert graphs.replays == 0 and not graphs._graphs  # over the patch limit: always eager

    graphs = VisionGraphs(runner, max_graphs=1)
    rows = pixels.split([int(t * h * w) for t, h, w in grids.tolist()])
    for i in (0, 0, 1, 1):
        graphs.encode(rows[i], grids[i : i + 1])
    assert graphs.replays == 2 and list(graphs._graphs) == [tuple(tuple(g) for g in grids[1:].tolist())]


def test_a_failed_capture_turns_the_graphs_off_not_the_call(loaded_model, monkeypatch, caplog):
    loaded = loaded_model("qwen2_5_vl")
    runner = QwenVLRunner(loaded.model)
    graphs = VisionGraphs(runner)
    inputs = _inputs(loaded, IMAGE_SETS["two-sizes"])
    pixels, grids = inputs["pixel_values"], inputs["image_grid_thw"]

    def broken(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "_make", broken)
    for _ in range(3):
        assert_same_features(graphs.encode(pixels, grids), runner.encode_images(pixels, grids))
    assert graphs.disabled and graphs.replays == 0
    assert "vision graphs disabled" in caplog.text


def test_layouts_seen_once_are_not_remembered_without_bound(loaded_model, monkeypatch):
    from localvl.engine import vision_graphs

    monkeypatch.setattr(vision_graphs, "MAX_SEEN", 8)
    graphs = VisionGraphs(QwenVLRunner(loaded_model("qwen2_5_vl").model))
    for width in range(1, 30):
        assert graphs._graph(torch.empty(4, 1), torch.tensor([[1, 2, 2 * width]])) is None
    assert len(graphs._seen) <= 8 and not graphs._graphs
