"""Loading a Qwen-VL model folder (local path or hub id) the way a transformers user would."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localvl.engine.qwen_vl import SUPPORTED_MODEL_TYPES
from localvl.engine.sampling import ResolvedSampling

logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


ATTENTION_CHOICES = ("auto", "sdpa", "flash_attention_2", "eager")
QUANTIZE_CHOICES = ("4bit", "8bit")
# Qwen text-only families: a common mistake is to point localvl at the text model of a VL release.
TEXT_MODEL_TYPES = ("qwen", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")
# What transformers needs to load a checkpoint quantized with each method (transformers 5.x).
QUANTIZATION_PACKAGES: dict[str, tuple[str, ...]] = {
    "awq": ("gptqmodel", "accelerate"),
    "gptq": ("optimum", "gptqmodel", "accelerate"),
    "bitsandbytes": ("bitsandbytes", "accelerate"),
    "compressed-tensors": ("compressed_tensors",),
    "fp8": ("accelerate",),
}
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


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

    if device.startswith("cuda") and not torch.cuda.is_available():
        # else torch's own assertion ("Torch not compiled with CUDA enabled") is all a user sees
        raise ModelLoadError(
            f"--device {device}: no CUDA device is available to this torch {torch.__version__} (a CPU-only build, "
            "or no GPU or driver). Install the CUDA build of torch, or use --device cpu (or auto)."
        )
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


def model_context(text_config: Any) -> int:
    """The longest context the model's positions reach: ``max_position_embeddings``, or as far as a
    rope scaling in its config stretches them (the YaRN entry Qwen's model cards have users add for
    long inputs: ``original_max_position_embeddings`` × ``factor``)."""
    base = int(getattr(text_config, "max_position_embeddings", None) or 32768)
    rope = getattr(text_config, "rope_parameters", None) or {}
    factor = rope.get("factor") if isinstance(rope, dict) else None
    if factor and rope.get("rope_type") in ("yarn", "linear", "dynamic", "longrope"):
        original = rope.get("original_max_position_embeddings") or base
        return max(base, int(original * float(factor)))
    return base


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


def check_folder(folder: str | Path) -> dict[str, Any]:
    """Refuse, with a message saying what to do, a folder localvl cannot serve; return its config.

    Checked before transformers is asked, because its own errors for these cases name internals
    (a missing key, an unknown class) rather than the problem.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{folder} has no config.json: it is not a model folder (give --model a Qwen-VL folder "
                             "or a hub id such as Qwen/Qwen2.5-VL-3B-Instruct)")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as error:
        raise ModelLoadError(f"{config_path} is not valid JSON: {error}") from None
    model_type = config.get("model_type")
    if model_type in TEXT_MODEL_TYPES:
        raise ModelLoadError(
            f"{folder} is a text model ({model_type!r}); localvl serves Qwen-VL, the vision-language models "
            f"({', '.join(SUPPORTED_MODEL_TYPES)}), e.g. Qwen/Qwen2.5-VL-7B-Instruct"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{folder} is a {model_type!r} model; localvl serves Qwen vision-language models "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if not any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise ModelLoadError(f"{folder} has no weights (*.safetensors or *.bin): the download may be incomplete; "
                             "pull it again (`localvl pull MODEL`)")
    for path in sorted(folder.glob("*.json")):
        if path.name != "config.json" and path.stat().st_size < 1 << 20:  # not tokenizer.json's megabytes
            try:
                json.loads(path.read_text())
            except ValueError as error:
                raise ModelLoadError(f"{path} is not valid JSON ({error}): copy the whole model folder, or pull it "
                                     "again") from None
    index = next(iter(folder.glob("*.index.json")), None)
    if index is not None:
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing:
            raise ModelLoadError(f"{folder} lacks {len(missing)} of its {len(shards)} weight files ({missing[0]}, ...): "
                                 "the download is incomplete; pull it again (`localvl pull MODEL`) to resume")
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        _check_weights_file(path)
    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").is_file():
        raise ModelLoadError(f"{folder} has no tokenizer (tokenizer.json or vocab.json): copy the whole model "
                             "folder, or pull it again")
    if not (folder / "preprocessor_config.json").is_file() and not (folder / "processor_config.json").is_file():
        raise ModelLoadError(f"{folder} has no image processor (preprocessor_config.json): copy the whole model "
                             "folder, or pull it again")
    quantization = config.get("quantization_config")
    if quantization:
        method = str(quantization.get("quant_method", "")).lower()
        missing = [name for name in QUANTIZATION_PACKAGES.get(method, ()) if importlib.util.find_spec(name) is None]
        if missing:
            raise ModelLoadError(
                f"{folder} is a {method.upper()}-quantized checkpoint, which needs {', '.join(missing)}: "
                f"pip install {' '.join(missing)} (its kernels usually need a CUDA GPU)"
            )
    return config


def _check_weights_file(path: Path) -> None:
    """A weights file that is a git-lfs pointer or cut short (safetensors' header and length
    disagree), refused by name: transformers' own error is a bare "header too large"."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if size < 1024 and (head + handle.read(1016)).startswith(b"version https://git-lfs"):
            raise ModelLoadError(
                f"{path.name} in {path.parent} is a git-lfs pointer, not the weights: the folder was cloned without "
                "git-lfs. Run `git lfs pull` in it, or pull the model with `localvl pull MODEL`"
            )
        if path.suffix != ".safetensors":
            return
        length = int.from_bytes(head, "little") if len(head) == 8 else size
        header = handle.read(length) if 8 + length <= size else b""
    try:
        tensors = json.loads(header)
        end = max((t["data_offsets"][1] for k, t in tensors.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError):
        end = -1
    if 8 + length + end != size:
        raise ModelLoadError(
            f"{path.name} in {path.parent} is not a whole safetensors file ({size} bytes): the download was cut "
            "short or the file is damaged. Pull the model again (`localvl pull MODEL`)"
        )


def pick_attention(attention: str, device: str) -> str:
    """flash_attention_2 where flash-attn is installed and the model is on CUDA, else SDPA.

    Inside the engine this only picks the vision tower's kernel: the engine's decoder steps always
    use its own paged attention, and a vision tower not on flash-attention gets the engine's batched
    variable-length SDPA (engine/varlen.py). It also applies to plain ``model.generate`` calls.
    """
    if attention not in ATTENTION_CHOICES:
        raise ModelLoadError(f"unknown attention {attention!r}: one of {', '.join(ATTENTION_CHOICES)}")
    if attention == "auto":
        return "flash_attention_2" if device.startswith("cuda") and _has("flash_attn") else "sdpa"
    if attention == "flash_attention_2":
        if not device.startswith("cuda"):
            raise ModelLoadError("--attention flash_attention_2 needs a CUDA device; use sdpa (or auto) on a CPU")
        if not _has("flash_attn"):
            raise ModelLoadError("--attention flash_attention_2 needs flash-attn: pip install flash-attn "
                                 "--no-build-isolation (or use --attention sdpa)")
    return attention


def _has(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def quantization_config(quantize: str | None, dtype: Any) -> Any:
    """A bitsandbytes config for ``--quantize 4bit|8bit``, or None."""
    if quantize is None:
        return None
    if quantize not in QUANTIZE_CHOICES:
        raise ModelLoadError(f"unknown --quantize {quantize!r}: one of {', '.join(QUANTIZE_CHOICES)}")
    missing = [name for name in ("bitsandbytes", "accelerate") if not _has(name)]
    if missing:
        raise ModelLoadError(f"--quantize {quantize} needs {' and '.join(missing)}: pip install {' '.join(missing)}")
    from transformers import BitsAndBytesConfig

    # The vision tower stays unquantized, as in Qwen's own AWQ releases: it is a small share of the
    # weights (~0.7 of 8 B), it sets how well images are read, and bitsandbytes' CPU 4-bit kernel
    # refuses layers narrower than its block size.
    skip = ["model.visual", "visual", "lm_head"]  # matched from the start of module names
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    # nf4 with compute in the model's dtype: the usual choice for 4-bit inference
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=skip)


def load_model(
    name_or_path: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    max_model_len: int | None = None,
    attention: str = "auto",
    quantize: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> LoadedModel:
    """Load model and processor; fail with a clear message for anything localvl cannot serve.

    ``name_or_path`` is normally a folder (``hub.resolve_model`` turns hub ids into folders); a hub
    id still goes through transformers' own resolution.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from localvl.models.processor import apply_pixel_budget, load_processor

    if os.path.isdir(name_or_path):
        check_folder(name_or_path)
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
        kind = "a text model" if config.model_type in TEXT_MODEL_TYPES else f"a {config.model_type!r} model"
        raise ModelLoadError(
            f"{name_or_path!r} is {kind}; localvl serves Qwen vision-language models "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    context = model_context(config.get_text_config())
    if max_model_len and max_model_len > context:
        # Checked before the weights load: past its positions a model's output degrades silently,
        # while /v1/models would tell clients the larger window is theirs to fill.
        raise ModelLoadError(
            f"--max-model-len {max_model_len} is beyond the {context} tokens {name_or_path!r} was made for "
            "(max_position_embeddings in its config.json): give at most that, or extend its context as its "
            "model card says (a rope_scaling of type yarn in config.json)"
        )
    context = max_model_len or context
    chosen_device = pick_device(device)
    chosen_dtype = pick_dtype(dtype, chosen_device)
    chosen_attention = pick_attention(attention, chosen_device)
    quantized = quantization_config(quantize, chosen_dtype)
    load_kwargs: dict[str, Any] = {"dtype": chosen_dtype, "attn_implementation": chosen_attention, **kwargs}
    if quantized is not None:
        load_kwargs["quantization_config"] = quantized
    if quantized is not None or getattr(config, "quantization_config", None):
        # quantized weights are placed while loading; they cannot be moved afterwards
        load_kwargs["device_map"] = {"": chosen_device}
    try:
        processor = load_processor(name_or_path, **kwargs)
        apply_pixel_budget(processor, min_pixels, max_pixels)
        require_chat_template(processor, name_or_path)
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, **load_kwargs)
    except OSError as error:
        raise ModelLoadError(f"could not load {name_or_path!r}: {error}") from None
    except ImportError as error:  # a quantization or attention backend that is not installed
        raise ModelLoadError(f"could not load {name_or_path!r}: {error}") from None
    except RuntimeError as error:
        if "mismatched" not in str(error):
            raise
        # transformers printed its load report (which weights, which shapes) just above
        raise ModelLoadError(
            f"the weights of {name_or_path!r} do not match its config.json (shapes in the load report above): "
            "the config belongs to another model or size; copy the folder whole"
        ) from None
    except ValueError as error:
        if "pixel" in str(error):
            raise ModelLoadError(f"--min-pixels/--max-pixels: {error}") from None
        raise
    if "device_map" not in load_kwargs:
        model.to(chosen_device)
    model.eval()
    torch.set_grad_enabled(False)
    logger.info(
        "loaded %s (%s) on %s as %s, attention %s%s, context %d tokens",
        name_or_path, config.model_type, chosen_device, str(chosen_dtype).removeprefix("torch."), chosen_attention,
        f", quantized {quantize}" if quantize else "", context,
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


def load_frontend_processor(
    name_or_path: str, *, revision: str | None = None, min_pixels: int | None = None, max_pixels: int | None = None
) -> Any:
    """The processor alone, as ``load_model`` prepares it: for a server whose model runs in another process."""
    from localvl.models.processor import apply_pixel_budget, load_processor

    processor = load_processor(name_or_path, **({"revision": revision} if revision else {}))
    apply_pixel_budget(processor, min_pixels, max_pixels)
    require_chat_template(processor, name_or_path)
    return processor


def require_chat_template(processor: Any, name_or_path: str) -> None:
    """Refuse a folder without a chat template: every prompt is rendered with the folder's own, so
    without one the server would start and then turn every request away as the client's fault."""
    owners = (processor, getattr(processor, "tokenizer", None))
    if not any(getattr(owner, "chat_template", None) for owner in owners):
        raise ModelLoadError(
            f"{name_or_path} has no chat template (chat_template.jinja, chat_template.json, or chat_template in "
            "tokenizer_config.json): a base model or a folder saved without it. Serve the Instruct model, or copy "
            "its chat template file into the folder"
        )

