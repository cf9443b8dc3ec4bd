import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from localvl.models import processor as processor_module
from localvl.models.processor import image_only, load_processor
from tests.conftest import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_image_only_fallback_matches_the_stock_processor(model_dir, family, monkeypatch):
    folder = str(model_dir(family))
    reference = load_processor(folder)

    def no_torchvision(*args, **kwargs):
        raise ImportError("Qwen2VLVideoProcessor requires the Torchvision library but it was not found")

    monkeypatch.setattr(AutoProcessor, "from_pretrained", no_torchvision)
    fallback = load_processor(folder)
    assert type(fallback).__name__ == type(reference).__name__
    assert getattr(fallback, "video_processor", None) is None
    text = fallback.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], tokenize=False
    )
    picture = Image.new("RGB", (80, 50), (10, 20, 30))
    a = fallback(text=[text], images=[picture], return_tensors="pt")
    b = reference(text=[text], images=[picture], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["image_grid_thw"], b["image_grid_thw"])
    assert torch.equal(a["pixel_values"], b["pixel_values"])  # the PIL backend both ways, torchvision or not


def test_other_import_errors_are_not_swallowed(model_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise ImportError("some other library is missing")

    monkeypatch.setattr(AutoProcessor, "from_pretrained", broken)
    with pytest.raises(ImportError, match="some other library"):
        load_processor(str(model_dir("qwen2_5_vl")))


def test_image_only_keeps_the_stock_name():
    from transformers import Qwen2_5_VLProcessor

    cls = image_only(Qwen2_5_VLProcessor)
    assert cls.__name__ == "Qwen2_5_VLProcessor" and issubclass(cls, Qwen2_5_VLProcessor)
    assert "video_processor" not in cls.get_attributes()
    assert processor_module.image_only is image_only


def test_a_torchvision_image_processor_is_swapped_for_the_pil_one_with_the_fast_path(model_dir, monkeypatch):
    """Where torchvision is installed transformers picks its torchvision image backend (class
    ``Qwen2VLImageProcessor``); localvl loads the PIL one it tests everywhere. (A stand-in class of
    that name: this machine has no torchvision.)"""
    from localvl.models.patches import _FastPatches

    folder = str(model_dir("qwen2_5_vl"))
    stock = AutoProcessor.from_pretrained

    def with_torchvision_backend(*args, **kwargs):
        processor = stock(*args, **kwargs)
        processor.image_processor = type("Qwen2VLImageProcessor", (), {})()
        return processor

    monkeypatch.setattr(AutoProcessor, "from_pretrained", with_torchvision_backend)
    loaded = load_processor(folder)
    assert type(loaded.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert isinstance(loaded.image_processor, _FastPatches)
    monkeypatch.undo()
    assert loaded.image_processor.to_dict() == load_processor(folder).image_processor.to_dict()


def test_a_pixel_budget_saved_as_min_and_max_pixels_in_size_is_read(model_dir, tmp_path):
    """transformers 4.45-4.49 saved ``size: {min_pixels, max_pixels}`` (fine-tunes of that time
    carry it); transformers 5 loads it and then refused every image, so every image request was a 400."""
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(model_dir("qwen2_5_vl"), folder)
    config = json.loads((folder / "processor_config.json").read_text())
    size = config["image_processor"]["size"]
    config["image_processor"]["size"] = {"min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"]}
    (folder / "processor_config.json").write_text(json.dumps(config))
    legacy, current = load_processor(str(folder)), load_processor(str(model_dir("qwen2_5_vl")))
    picture = Image.new("RGB", (300, 200), (10, 20, 30))
    grids = [p.image_processor(images=[picture], return_tensors="pt")["image_grid_thw"] for p in (legacy, current)]
    assert torch.equal(*grids)
