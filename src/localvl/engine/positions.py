"""M-RoPE positions for one request, computed when it is admitted.

Qwen-VL models rotate each token by three positions (time, height, width). Text tokens advance
all three together; the tokens of an image take their grid coordinates, offset by the position
where the image starts, and the text after it continues from the largest of them plus one.
The stock models keep the offset (``rope_deltas``) on the module, shared by every request — a
batching engine must not, so positions are computed here, per request.
"""

from __future__ import annotations

from typing import Sequence

import torch


def mrope_positions(
    input_ids: Sequence[int] | torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    image_token_id: int,
    spatial_merge_size: int,
) -> tuple[torch.Tensor, int]:
    """Return ``(positions [3, L], delta)``; a token at index ``i >= L`` sits at ``i + delta``."""
    ids = torch.as_tensor(input_ids, dtype=torch.long).flatten()
    length = ids.numel()
    grids = [] if image_grid_thw is None else [tuple(int(x) for x in row) for row in image_grid_thw]
    pieces: list[torch.Tensor] = []
    is_image = (ids == image_token_id).tolist()
    start = 0  # the next position to hand out
    i = 0
    image = 0
    while i < length:
        if is_image[i]:
            if image >= len(grids):
                raise ValueError("more image tokens than image grids")
            t, h, w = grids[image]
            h, w = h // spatial_merge_size, w // spatial_merge_size
            count = t * h * w
            if i + count > length or not all(is_image[i : i + count]):
                raise ValueError(f"image {image} has a grid of {count} tokens but fewer image tokens in the prompt")
            tt = torch.arange(t).repeat_interleave(h * w)
            hh = torch.arange(h).repeat_interleave(w).repeat(t)
            ww = torch.arange(w).repeat(t * h)
            pieces.append(torch.stack([tt, hh, ww]) + start)
            start += max(t, h, w)
            i += count
            image += 1
        else:
            j = i
            while j < length and not is_image[j]:
                j += 1
            pieces.append(torch.arange(start, start + j - i).expand(3, -1))
            start += j - i
            i = j
    if image != len(grids):
        raise ValueError(f"{len(grids)} image grids but {image} images in the prompt")
    positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
    return positions, start - length
