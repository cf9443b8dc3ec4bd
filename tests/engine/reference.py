"""The reference every engine output is compared with: the stock model's own greedy generate()."""

from __future__ import annotations

import torch


def reference_tokens(loaded, prompt, max_new_tokens: int, **generate) -> list[int]:
    """Greedy ``model.generate`` on a rendered prompt, never producing embedding-padding ids."""
    inputs = {"input_ids": prompt.input_ids[None], "attention_mask": torch.ones_like(prompt.input_ids)[None]}
    if prompt.pixel_values is not None:
        inputs.update(pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw)
        inputs["mm_token_type_ids"] = (prompt.input_ids == loaded.model.config.image_token_id).int()[None]
    inputs = {name: value.to(loaded.model.device) for name, value in inputs.items()}
    padding = list(range(len(loaded.tokenizer), loaded.model.config.get_text_config().vocab_size))
    out = loaded.model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, suppress_tokens=padding or None, **generate
    )
    return out[0, prompt.input_ids.numel() :].tolist()


def reference_text(loaded, prompt, max_new_tokens: int) -> tuple[str, int, bool]:
    """(text, output token count, ended with an end-of-turn token)."""
    tokens = reference_tokens(loaded, prompt, max_new_tokens)
    ended = bool(tokens) and tokens[-1] in loaded.eos_token_ids
    return loaded.tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), ended
