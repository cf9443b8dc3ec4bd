"""mrope_positions on small, hand-computed prompts."""

from __future__ import annotations

import pytest
import torch

from localvl.engine.positions import mrope_positions

IMG = 99  # the image token id in these prompts


def positions(ids, grids=None, merge=2):
    grid_tensor = None if grids is None else torch.tensor(grids)
    pos, delta = mrope_positions(ids, grid_tensor, IMG, merge)
    return pos.tolist(), delta


def test_text_only_is_arange_on_all_three_axes_with_zero_delta():
    pos, delta = positions([5, 6, 7, 8])
    assert pos == [[0, 1, 2, 3]] * 3
    assert delta == 0


def test_returns_long_tensor_of_shape_three_by_length():
    pos, _ = mrope_positions([5, IMG, IMG, IMG, IMG, 6], torch.tensor([[1, 4, 4]]), IMG, 2)
    assert pos.shape == (3, 6)
    assert pos.dtype == torch.long


def test_empty_prompt():
    pos, delta = positions([])
    assert pos == [[], [], []]
    assert delta == 0


def test_one_image_between_text():
    # grid (1, 4, 6) with merge 2 -> 1 x 2 x 3 = 6 image tokens, starting at position 2
    pos, delta = positions([1, 2] + [IMG] * 6 + [3, 4], [[1, 4, 6]])
    assert pos == [
        [0, 1, 2, 2, 2, 2, 2, 2, 5, 6],  # time
        [0, 1, 2, 2, 2, 3, 3, 3, 5, 6],  # height
        [0, 1, 2, 3, 4, 2, 3, 4, 5, 6],  # width
    ]
    # text after the image continues at 2 + max(1, 2, 3) = 5; 10 tokens end at position 7
    assert delta == 7 - 10


def test_image_at_the_start_of_the_prompt():
    pos, delta = positions([IMG] * 4 + [7], [[1, 4, 4]])
    assert pos == [
        [0, 0, 0, 0, 2],
        [0, 0, 1, 1, 2],
        [0, 1, 0, 1, 2],
    ]
    assert delta == 3 - 5


def test_image_at_the_end_of_the_prompt():
    pos, delta = positions([7] + [IMG] * 2, [[1, 2, 4]])
    assert pos == [
        [0, 1, 1],
        [0, 1, 1],
        [0, 1, 2],
    ]
    assert delta == (1 + 2) - 3


def test_two_images_each_take_their_own_grid_in_order():
    pos, delta = positions([IMG] + [7] + [IMG] * 4 + [8], [[1, 2, 2], [1, 4, 4]])
    assert pos == [
        [0, 1, 2, 2, 2, 2, 4],
        [0, 1, 2, 2, 3, 3, 4],
        [0, 1, 2, 3, 2, 3, 4],
    ]
    assert delta == 5 - 7


def test_adjacent_images_are_split_by_their_grids():
    pos, _ = positions([IMG] * 2 + [IMG] * 2, [[1, 2, 4], [1, 4, 2]])
    assert pos == [
        [0, 0, 2, 2],
        [0, 0, 2, 3],
        [0, 1, 2, 2],
    ]


def test_temporal_grid_advances_the_time_axis():
    # t = 2 frames of 1 x 2 merged patches
    pos, delta = positions([IMG] * 4, [[2, 2, 4]])
    assert pos == [
        [0, 0, 1, 1],
        [0, 0, 0, 0],
        [0, 1, 0, 1],
    ]
    assert delta == 2 - 4


def test_merge_size_one():
    pos, _ = positions([IMG] * 6, [[1, 2, 3]], merge=1)
    assert pos == [
        [0, 0, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 1],
        [0, 1, 2, 0, 1, 2],
    ]


def test_delta_places_later_tokens_after_the_prompt():
    ids = [1, 2] + [IMG] * 6 + [3, 4]
    pos, delta = mrope_positions(ids, torch.tensor([[1, 4, 6]]), IMG, 2)
    # the next token (index len(ids)) continues one past the largest position used
    assert len(ids) + delta == int(pos.max()) + 1


def test_tensor_input_ids_with_batch_dimension_are_flattened():
    ids = torch.tensor([[1, 2] + [IMG] * 6 + [3, 4]])
    from_tensor, delta_tensor = mrope_positions(ids, torch.tensor([[1, 4, 6]]), IMG, 2)
    from_list, delta_list = positions([1, 2] + [IMG] * 6 + [3, 4], [[1, 4, 6]])
    assert from_tensor.tolist() == from_list
    assert delta_tensor == delta_list


def test_more_image_tokens_than_grids_is_an_error():
    with pytest.raises(ValueError):
        positions([1] + [IMG] * 4 + [2] + [IMG] * 4, [[1, 4, 4]])


def test_image_tokens_without_any_grid_is_an_error():
    with pytest.raises(ValueError):
        positions([1, IMG, 2], None)


def test_grids_left_over_is_an_error():
    with pytest.raises(ValueError):
        positions([1] + [IMG] * 4 + [2], [[1, 4, 4], [1, 4, 4]])


def test_grids_with_a_text_only_prompt_is_an_error():
    with pytest.raises(ValueError):
        positions([1, 2, 3], [[1, 4, 4]])


def test_image_token_run_shorter_than_its_grid_is_an_error():
    with pytest.raises(ValueError):
        positions([1, IMG, IMG, 2], [[1, 4, 6]])  # the grid needs 6 image tokens
