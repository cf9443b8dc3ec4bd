"""Loading a model folder's processor, with or without torchvision.

Every stock Qwen-VL processor class insists on a video processor, and video processors need
torchvision, which CPU-only installs often lack. localvl only feeds images, so when torchvision is
missing it loads the same processor class without its video part.

Images go through transformers' PIL image backend either way, with the fast arithmetic of
``patches.py``: where torchvision is installed transformers would pick its torchvision backend,
whose pixels differ (by ~0.015) and which has no compact form for the engine process's pipe. One
backend everywhere is the one the tests run (CI has no torchvision), and an image is the same bits
on every machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from localvl.models.patches import STOCK_CLASSES, fast_patches


def image_only(processor_class: type) -> type:
    """A subclass of a stock processor class whose constructor takes no video processor.

    ProcessorMixin discovers its parts from the constructor's signature, so leaving
    ``video_processor`` out of it is all that is needed; the subclass keeps the base's name so
    that what it saves reads exactly like the stock processor.
    """

    def __init__(self: Any, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs: Any) -> None:
        processor_class.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(processor_class.__name__, (processor_class,), {"__init__": __init__, "__module__": processor_class.__module__})


def _processor_class_name(folder: str) -> str | None:
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = Path(folder) / name
        if path.is_file():
            value = json.loads(path.read_text()).get("processor_class")
            if value:
                return value
    return None


def load_processor(name_or_path: str, **kwargs: Any) -> Any:
    """``AutoProcessor.from_pretrained``, falling back to an image-only processor without torchvision."""
    import transformers
    from transformers import AutoConfig, AutoProcessor

    try:
        return _faster(_pil_images(AutoProcessor.from_pretrained(name_or_path, **kwargs), name_or_path, **kwargs))
    except ImportError as error:
        if "torchvision" not in str(error).lower():
            raise
    class_name = _processor_class_name(name_or_path)
    if class_name is None:
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

        model_type = AutoConfig.from_pretrained(name_or_path, **kwargs).model_type
        class_name = PROCESSOR_MAPPING_NAMES.get(model_type)
    processor_class = getattr(transformers, class_name or "", None)
    if processor_class is None:
        raise ImportError(f"cannot load the processor of {name_or_path} without torchvision (class {class_name!r})")
    return _faster(image_only(processor_class).from_pretrained(name_or_path, **kwargs))


def _pil_images(processor: Any, name_or_path: str, **kwargs: Any) -> Any:
    """The processor with the PIL sibling of a torchvision image processor transformers picked."""
    from transformers import AutoImageProcessor

    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None and f"{type(image_processor).__name__}Pil" in STOCK_CLASSES:
        processor.image_processor = AutoImageProcessor.from_pretrained(name_or_path, backend="pil", **kwargs)
    return processor


def _faster(processor: Any) -> Any:
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None:
        _read_legacy_size(image_processor)
        fast_patches(image_processor)
    return processor


def _read_legacy_size(image_processor: Any) -> None:
    """A pixel budget saved as ``size: {min_pixels, max_pixels}`` (transformers 4.45-4.49 wrote it so,
    and fine-tunes of that time carry it) read as the ``shortest_edge``/``longest_edge`` that
    transformers 5 loads it beside and then demands of every image."""
    size = dict(getattr(image_processor, "size", None) or {})
    if size.get("shortest_edge") is None and size.get("longest_edge") is None and size.get("max_pixels"):
        edges = {"shortest_edge": int(size.get("min_pixels") or 56 * 56), "longest_edge": int(size["max_pixels"])}
        image_processor.size = {**{k: v for k, v in size.items() if k not in ("min_pixels", "max_pixels")}, **edges}


def apply_pixel_budget(processor: Any, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
    """Set the image pixel budget (``--min-pixels/--max-pixels``): images are resized to fit it.

    Both the stock preprocessing and the torch arithmetic of ``patches.py`` resize through the
    image processor's ``size`` (shortest_edge = min pixels, longest_edge = max pixels), so setting it
    here is enough for every path; the ``min_pixels``/``max_pixels`` attributes older code reads are
    kept in step.
    """
    if min_pixels is None and max_pixels is None:
        return
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        raise ValueError("this processor has no image processor, so it has no pixel budget")
    size = dict(getattr(image_processor, "size", None) or {})
    low = min_pixels if min_pixels is not None else size.get("shortest_edge", getattr(image_processor, "min_pixels", 0))
    high = max_pixels if max_pixels is not None else size.get("longest_edge", getattr(image_processor, "max_pixels", 0))
    factor = int(getattr(image_processor, "patch_size", 14)) * int(getattr(image_processor, "merge_size", 2))
    if high < factor * factor:
        raise ValueError(f"max pixels {high} is below one merged patch ({factor}x{factor} = {factor * factor} pixels)")
    if low > high:
        raise ValueError(f"min pixels {low} is above max pixels {high}")
    image_processor.size = {**size, "shortest_edge": int(low), "longest_edge": int(high)}
    for name, value in (("min_pixels", low), ("max_pixels", high)):
        if hasattr(image_processor, name):
            setattr(image_processor, name, int(value))
