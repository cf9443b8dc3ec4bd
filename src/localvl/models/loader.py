"""Loading a Qwen-VL model folder (local path or hub id) the way a transformers user would."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from localvl.engine.qwen_vl import SUPPORTED_MODEL_TYPES
from localvl.engine.sampling import ResolvedSampling

logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    name_or_path: str
    model_type: str
    context_length: int
    eos_token_ids: frozenset[int]
    sampling_defaults: ResolvedSampling = field(default_factory=ResolvedSampling)

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer


def pick_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype != "auto":
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def sampling_defaults(generation_config: Any) -> ResolvedSampling:
    """The folder's recommended sampling; values it leaves unset take the Messages API's defaults."""
    if generation_config is None:
        return ResolvedSampling()
    values = generation_config.to_diff_dict()
    # transformers applies the repetition penalty with or without sampling
    repetition = float(values.get("repetition_penalty") or 1.0)
    if values.get("do_sample") is False:
        return ResolvedSampling(temperature=0.0, repetition_penalty=repetition)
    if not values.get("do_sample"):
        return ResolvedSampling(repetition_penalty=repetition)
    return ResolvedSampling(
        temperature=float(values.get("temperature", 1.0)),
        top_p=float(values.get("top_p", 1.0)),
        top_k=int(values.get("top_k", 0) or 0),
        repetition_penalty=repetition,
    )


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config.get_text_config()):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def load_model(
    name_or_path: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    max_model_len: int | None = None,
) -> LoadedModel:
    """Load model and processor; fail with a clear message for anything localvl cannot serve."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from localvl.models.processor import load_processor

    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    try:
        config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as error:
        where = "folder" if os.path.isdir(name_or_path) else "model id"
        raise ModelLoadError(
            f"could not read the config of {where} {name_or_path!r}: {error}\n"
            "Give --model a folder holding a Qwen-VL checkpoint, or a hub id such as "
            "Qwen/Qwen2.5-VL-3B-Instruct (downloading needs network access to the hub)."
        ) from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{name_or_path!r} is a {config.model_type!r} model; localvl serves Qwen vision-language models "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    chosen_device = pick_device(device)
    chosen_dtype = pick_dtype(dtype, chosen_device)
    try:
        processor = load_processor(name_or_path, **kwargs)
        model = AutoModelForImageTextToText.from_pretrained(
            name_or_path, dtype=chosen_dtype, attn_implementation="sdpa", **kwargs
        )
    except OSError as error:
        raise ModelLoadError(f"could not load {name_or_path!r}: {error}") from None
    model.to(chosen_device)
    model.eval()
    torch.set_grad_enabled(False)
    context = int(getattr(config.get_text_config(), "max_position_embeddings", 32768))
    if max_model_len:
        context = max_model_len
    logger.info(
        "loaded %s (%s) on %s as %s, context %d tokens",
        name_or_path, config.model_type, chosen_device, str(chosen_dtype).removeprefix("torch."), context,
    )
    return LoadedModel(
        model=model,
        processor=processor,
        name_or_path=name_or_path,
        model_type=config.model_type,
        context_length=context,
        eos_token_ids=_eos_ids(model, processor.tokenizer),
        sampling_defaults=sampling_defaults(getattr(model, "generation_config", None)),
    )
