"""Driving a stock transformers Qwen-VL model piece by piece.

The engine does not call ``generate``: it runs the vision tower, builds the prompt's input
embeddings, and steps the text decoder itself, in chunks, with positions it computed per request.
That is what lets it prefill long prompts in bounded memory, stop between steps, and (later)
batch requests. Everything specific to a Qwen-VL family is in this module, keyed by model_type.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from localvl.engine.positions import mrope_positions

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
# Qwen3-VL adds vision features to the hidden states of its first decoder layers ("deepstack").
DEEPSTACK_MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe")


@dataclass
class PromptInputs:
    """What the processor made of a rendered prompt."""

    input_ids: torch.Tensor  # [L]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None  # [images, 3]


@dataclass
class EmbeddedPrompt:
    embeds: torch.Tensor  # [L, hidden]
    positions: torch.Tensor  # [3, L]
    delta: int  # decode token i (i >= L) sits at position i + delta
    visual_mask: torch.Tensor | None = None  # [L] bool, deepstack families only
    deepstack: list[torch.Tensor] | None = None  # per injected layer: [visual tokens, hidden]

    def __len__(self) -> int:
        return int(self.embeds.shape[0])


class QwenVLRunner:
    def __init__(self, model: Any) -> None:
        model_type = model.config.model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not a supported Qwen-VL family {SUPPORTED_MODEL_TYPES}")
        self.model = model
        self.model_type = model_type
        self.text_config = model.config.get_text_config()
        self.language_model = model.model.language_model
        self.visual = model.model.visual
        self.lm_head = model.lm_head
        self.image_token_id = int(model.config.image_token_id)
        self.spatial_merge_size = int(model.config.vision_config.spatial_merge_size)
        self.deepstack = model_type in DEEPSTACK_MODEL_TYPES
        # transformers renamed past_key_values to cache in 5.2x; take whichever this one has.
        parameters = inspect.signature(self.language_model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"

    @contextlib.contextmanager
    def _attention_kernels(self) -> Iterator[None]:
        """Keep SDPA off its cuDNN backend on GPUs.

        cuDNN builds an execution plan for every new sequence length, and decoding makes a new
        length every step: measured on an H200 (2026-11-26), a tiny model's decode step took
        45.9 ms with cuDNN allowed and 1.9 ms without it.
        """
        if self.device.type != "cuda":
            yield
            return
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            yield

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.text_config)

    @torch.inference_mode()
    def embed_prompt(self, prompt: PromptInputs) -> EmbeddedPrompt:
        ids = prompt.input_ids.to(self.device)
        embeds = self.language_model.embed_tokens(ids)
        positions, delta = mrope_positions(
            prompt.input_ids, prompt.image_grid_thw, self.image_token_id, self.spatial_merge_size
        )
        visual_mask = None
        deepstack = None
        if prompt.pixel_values is not None and prompt.image_grid_thw is not None:
            with self._attention_kernels():
                out = self.visual(
                    prompt.pixel_values.to(self.device, self.visual.dtype),
                    grid_thw=prompt.image_grid_thw.to(self.device),
                    return_dict=True,
                )
            mask = ids == self.image_token_id
            features = out.pooler_output.to(embeds.dtype)
            if int(mask.sum()) != features.shape[0]:
                raise ValueError(f"{int(mask.sum())} image tokens but {features.shape[0]} image features")
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), features)
            if self.deepstack:
                visual_mask = mask
                deepstack = [f.to(embeds.dtype) for f in out.deepstack_features]
        return EmbeddedPrompt(embeds, positions.to(self.device), delta, visual_mask, deepstack)

    @torch.inference_mode()
    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: Any,
        visual_mask: torch.Tensor | None = None,
        deepstack: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run ``embeds [l, hidden]`` at ``positions [3, l]`` through the decoder; return the last hidden state."""
        kwargs: dict[str, Any] = {self._cache_kwarg: cache}
        if self.deepstack and visual_mask is not None and deepstack is not None and bool(visual_mask.any()):
            kwargs["visual_pos_masks"] = visual_mask.unsqueeze(0)
            kwargs["deepstack_visual_embeds"] = deepstack
        with self._attention_kernels():
            out = self.language_model(
                inputs_embeds=embeds.unsqueeze(0),
                position_ids=positions.unsqueeze(1),
                use_cache=True,
                **kwargs,
            )
        return out.last_hidden_state[0, -1]

    @torch.inference_mode()
    def prefill(self, prompt: EmbeddedPrompt, cache: Any, start: int, end: int) -> torch.Tensor:
        """Prefill prompt tokens ``[start, end)``; return the hidden state of the last one."""
        visual_mask = deepstack = None
        if prompt.visual_mask is not None and prompt.deepstack is not None:
            visual_mask = prompt.visual_mask[start:end]
            before = int(prompt.visual_mask[:start].sum())
            inside = int(visual_mask.sum())
            deepstack = [layer[before : before + inside] for layer in prompt.deepstack]
        return self.forward(prompt.embeds[start:end], prompt.positions[:, start:end], cache, visual_mask, deepstack)

    @torch.inference_mode()
    def decode(self, token_id: int, index: int, delta: int, cache: Any) -> torch.Tensor:
        """Feed generated token ``token_id`` sitting at sequence index ``index``."""
        embeds = self.language_model.embed_tokens(torch.tensor([token_id], device=self.device))
        positions = torch.full((3, 1), index + delta, dtype=torch.long, device=self.device)
        return self.forward(embeds, positions, cache)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
