"""Driving a stock transformers Qwen-VL model piece by piece.

The engine does not call ``generate``: it runs the vision tower (several images of several
requests in one call), and steps the text decoder itself over a packed batch of tokens from many
sequences, with positions it computed per request and the paged attention of ``kv_cache.py``.
Everything specific to a Qwen-VL family is in this module, keyed by model_type.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from localvl.engine import linear_attention
from localvl.engine.kv_cache import ATTENTION_NAME, AttentionBatch, PagedKVCache, PrefillChunk, current_batch, register_attention, stepping
from localvl.engine.varlen import VARLEN_NAME, one_tower_call, register_varlen_attention
from localvl.models.patches import Patches

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
# Qwen3-VL adds vision features to the hidden states of its first decoder layers ("deepstack").
DEEPSTACK_MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe")
# Vision towers with learned position embeddings, resampled to each image's grid.
INTERPOLATED_MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")

logger = logging.getLogger(__name__)


@dataclass
class PromptInputs:
    """What the processor made of a rendered prompt."""

    input_ids: torch.Tensor  # [L]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None  # [images, 3]
    image_keys: tuple[str, ...] = ()  # content hash of each image, in prompt order
    patches: list[Patches] | None = None  # instead of pixel_values: each image's, before the arithmetic


@dataclass
class ImageFeatures:
    """The vision tower's output for one image: what replaces its tokens' embeddings."""

    embeds: torch.Tensor  # [tokens, hidden]
    deepstack: list[torch.Tensor] | None = None  # deepstack families: per injected layer [tokens, hidden]

    @property
    def nbytes(self) -> int:
        tensors = [self.embeds, *(self.deepstack or [])]
        return sum(t.numel() * t.element_size() for t in tensors)


def patches_as_matmul(conv: torch.nn.Module) -> None:
    """Run the vision tower's patch embedding, a Conv3d whose kernel is its stride applied to inputs
    exactly one kernel in size, as the matrix product it is.

    Same weights, same result (to rounding); measured on this project's CPU machine (2026-11-26),
    16 images of 448 px: 56 ms as a convolution, 28 ms as a matmul. GPU convolution libraries are
    no better at this shape, and the module stays a Conv3d, so the stock code around it is unchanged.
    """
    if not isinstance(conv, torch.nn.Conv3d):
        return
    if conv.kernel_size != conv.stride or any(conv.padding) or conv.groups != 1 or any(d != 1 for d in conv.dilation):
        return

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.linear(x.flatten(1), conv.weight.flatten(1), conv.bias)
        return out.view(*out.shape, 1, 1, 1)

    conv.forward = forward  # type: ignore[method-assign]


class QwenVLRunner:
    def __init__(self, model: Any, *, compile: bool = False) -> None:
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
        # A hybrid decoder's linear-attention layers, which the engine steps from per-sequence state.
        self.linear = linear_attention.linear_layers(model)
        linear_attention.install(self.linear, _current_linear)
        patches_as_matmul(self.visual.patch_embed.proj)
        register_attention()
        register_varlen_attention()
        # The text decoder's attention layers, compiled or as they are (``set_compiled``);
        # ``warm_up`` compiles them before the first request can wait on it. A hybrid decoder's
        # linear-attention layers step per-sequence state from Python and stay as they are.
        self._compiled_layers: list[tuple[Any, Any]] = []
        self.compiled = False
        if compile:
            # Every model in a process shares the layers' code object, whose graphs dynamo caps at
            # 8: each model needs two (one token, several), and several engines (tests) more.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            layers = self.language_model.layers
            self._compiled_layers = [(layers[i], torch.compile(layers[i].forward, dynamic=True)) for i in self.attention_layers]
            self.set_compiled(True)
        self._warming = False

    def set_compiled(self, on: bool) -> None:
        """Run each decoder layer through torch.compile, or as it is.

        Compiled (shapes dynamic), a layer's small ops (norms, rotary embedding, activations) are
        fused into a few kernels and the paged attention stays an opaque op. The layers are
        compiled one by one, not the decoder whole: they are one code whose only difference, the
        layer index the attention reads, is traced as a dynamic int, so dynamo and inductor compile
        one layer's graph for all of them. On this project's CPU machine a 36-layer decoder (the
        3B's depth) took 185.5 s to compile whole and 10.5 s layer by layer (2026-11-27); on an
        H100 the whole 3B did not finish within 150 s.
        """
        for layer, compiled in self._compiled_layers:
            if on:
                layer.forward = compiled
            else:
                layer.__dict__.pop("forward", None)  # the class's forward again
        self.compiled = on and bool(self._compiled_layers)

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
    def hybrid(self) -> bool:
        """Whether the decoder has linear-attention layers (``linear_attention.py``)."""
        return bool(self.linear)

    @property
    def attention_layers(self) -> list[int]:
        """The decoder layers that keep keys and values in the paged cache."""
        return [i for i in range(int(self.text_config.num_hidden_layers)) if i not in self.linear]

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def image_tokens(self, grid: tuple[int, int, int]) -> int:
        t, h, w = grid
        return t * h * w // (self.spatial_merge_size**2)

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor, grids: torch.Tensor) -> list[ImageFeatures]:
        """Run the vision tower once over several images (patches concatenated in ``grids`` order)."""
        grids = grids.cpu()
        pixels = pixel_values.to(self.device, self.visual.dtype)
        pooled, deepstack = self.tower(pixels, grids.to(self.device), self.vision_layout(grids))
        return self.image_features(pooled, deepstack, grids)

    def tower(
        self, pixels: torch.Tensor, grids: torch.Tensor, layout: dict[str, Any], groups: list[Any] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """The vision tower on device-ready inputs: ``pixels`` and ``grids`` on the model's device
        and ``layout`` from ``vision_layout``. Its features for the language model, and Qwen3-VL's
        deepstack features. ``groups`` keeps ``varlen.py``'s grouping of the layout's segments
        across calls (``vision_graphs.py``); by default it is kept for this call only.
        """
        with self._attention_kernels(), self._varlen_vision(), one_tower_call(groups):
            out = self.visual(pixels, grid_thw=grids, return_dict=True, **layout)
        return out.pooler_output, list(out.deepstack_features) if self.deepstack else None

    def image_features(
        self, pooled: torch.Tensor, deepstack: list[torch.Tensor] | None, grids: torch.Tensor
    ) -> list[ImageFeatures]:
        """A tower call's output split into each image's features, in the decoder's dtype."""
        sizes = [self.image_tokens(tuple(int(x) for x in grid)) for grid in grids]
        dtype = self.dtype
        embeds = pooled.to(dtype).split(sizes)
        if deepstack is None:
            return [ImageFeatures(e) for e in embeds]
        layers = [f.to(dtype).split(sizes) for f in deepstack]
        return [ImageFeatures(e, [layer[i] for layer in layers]) for i, e in enumerate(embeds)]

    @torch.inference_mode()
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(ids.to(self.device))

    @torch.inference_mode()
    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        attention: AttentionBatch,
        visual_mask: torch.Tensor | None = None,
        deepstack: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run one packed step: ``embeds [tokens, hidden]`` at ``positions [3, tokens]`` → hidden states."""
        kwargs: dict[str, Any] = {}
        if self.deepstack and visual_mask is not None and deepstack is not None:
            kwargs["visual_pos_masks"] = visual_mask.unsqueeze(0)
            kwargs["deepstack_visual_embeds"] = deepstack
        # A dict mask tells Qwen2/2.5-VL the masks are made; the paged attention needs none.
        masks = {"full_attention": None, "sliding_attention": None, "linear_attention": None}
        # Past the warm-up, a step the compiled graphs do not cover runs eagerly rather than make
        # its requests wait for a compilation (seconds; minutes for a large model on a CPU).
        stance = torch.compiler.set_stance("eager_on_recompile") if self.compiled and not self._warming else contextlib.nullcontext()
        with self._attention_kernels(), self._paged(), stepping(attention), stance:
            out = self.language_model(
                inputs_embeds=embeds.unsqueeze(0),
                position_ids=positions.unsqueeze(1),
                attention_mask=None if self.deepstack else masks,
                use_cache=False,
                **kwargs,
            )
        return out.last_hidden_state[0]

    @torch.inference_mode()
    def warm_up(self, cache: PagedKVCache) -> None:
        """Compile the decoder now for both kinds of step it will see, not on a request's time: a
        single token (sizes 0 and 1 are never dynamic) and several. Each runs as a short prefill
        into the pool's scratch block, which only padding uses. On failure (no C++ compiler for
        inductor, say) the decoder runs as it is.
        """
        if not self.compiled:
            return
        hidden = int(self.text_config.hidden_size)
        size, scratch = cache.block_size, cache.scratch_block
        self._warming = True
        try:
            # The layer index as a dynamic int: one graph for every layer (``set_compiled``).
            with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
                for tokens in (1, 2):
                    slots = scratch * size + torch.arange(tokens, device=self.device) % size
                    chunk = PrefillChunk(0, tokens, torch.full((-(-tokens // size),), scratch, device=self.device), tokens)
                    embeds = torch.zeros(tokens, hidden, dtype=self.dtype, device=self.device)
                    positions = torch.arange(tokens, device=self.device).repeat(3, 1)  # contiguous, as a step's
                    self.forward(embeds, positions, AttentionBatch(cache, slots, prefills=[chunk]))
        except Exception as error:  # never fatal: the uncompiled decoder computes the same thing
            logger.warning("decoder compilation failed, running it uncompiled (%s: %s)", type(error).__name__, error)
            self.set_compiled(False)
        finally:
            self._warming = False

    def vision_layout(self, grids: torch.Tensor) -> dict[str, Any]:
        """What the vision tower works out from the images' grids (patch positions, the packed
        segments of images and of Qwen2.5-VL's windows, Qwen3-VL's position-embedding taps), made
        here on the CPU by transformers' own helpers and handed in precomputed, as the tower allows.

        Left to the tower, they are made from the grids on the model's device and read back to the
        host mid-call (``tolist``, ``item``): on a GPU each read waits for the queue to drain. The
        segment boundaries stay on the CPU for ``varlen.py``, which reads them; real flash-attention
        takes them on the device.
        """
        from transformers import vision_utils

        visual, device = self.visual, self.device
        segments_on_device = self._real_flash()
        layout: dict[str, Any] = {"position_ids": vision_utils.get_vision_position_ids(grids, visual.spatial_merge_size).to(device)}
        segments = {"cu_seqlens": vision_utils.get_vision_cu_seqlens(grids)}
        if self.model_type == "qwen2_5_vl":
            index, segments["cu_window_seqlens"] = vision_utils.get_vision_window_index(
                grids, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size, patch_size=visual.patch_size
            )
            layout["window_index"] = index.to(device)
        if self.model_type in INTERPOLATED_MODEL_TYPES:  # its learned position embeddings, resampled to each grid
            indices, weights = vision_utils.get_vision_interpolation_indices_and_weights(
                grids, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
                align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.config.spatial_merge_size,
            )
            layout["interp_indices"], layout["interp_weights"] = indices.to(device), weights.to(device)
        for name, bounds in segments.items():
            longest = "max_seqlen" if name == "cu_seqlens" else "max_window_seqlen"
            layout[longest] = int((bounds[1:] - bounds[:-1]).max())
            layout[name] = bounds.to(device) if segments_on_device else bounds
        return layout

    def _real_flash(self) -> bool:
        implementation = self.visual.config._attn_implementation
        return implementation is not None and "flash" in implementation and implementation != VARLEN_NAME

    @contextlib.contextmanager
    def _varlen_vision(self) -> Iterator[None]:
        """Give the vision tower the batched variable-length attention, unless it has real flash-attention."""
        if self._real_flash():
            yield
            return
        config = self.visual.config
        previous = config._attn_implementation
        config._attn_implementation = VARLEN_NAME
        try:
            yield
        finally:
            config._attn_implementation = previous

    @contextlib.contextmanager
    def _paged(self) -> Iterator[None]:
        """Point the decoder's attention at the paged function for this call only.

        The stock model stays usable as itself (``generate`` in tests and benchmarks) in between.
        """
        config = self.text_config
        previous = config._attn_implementation
        config._attn_implementation = ATTENTION_NAME
        try:
            yield
        finally:
            config._attn_implementation = previous

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


def _current_linear() -> Any:
    batch = current_batch()
    return batch.linear if batch is not None else None
