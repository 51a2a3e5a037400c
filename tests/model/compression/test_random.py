"""The random baseline: exact per-view counts, image cells only, reproducible by seed."""

import torch
from hypothesis import given, settings, strategies as st

from llava.model.compression.common import Budget, crop_geometry, keep_mask, view_image_areas
from llava.model.compression.random import RandomArgs, select, view_counts


def _select(size, grid, ratio, seed=0, side=4):
    geometry = crop_geometry(size, grid, side)
    views = torch.zeros(1 + grid[0] * grid[1], side * side, 1)
    return select(views, {}, geometry, Budget.resolve(geometry, ratio), RandomArgs(seed))


def test_counts_follow_each_views_image_tokens():
    # 1000x600 on 2x2, side 4: new_h = int(600 * 8 / 1000) = 4, rows [2, 6) hold image, so every
    # crop has 2 x 4 = 8 image cells; vanilla = 16 + 32 = 48. R = 0.3: round(14.4) = 14 tokens,
    # shared 16:8:8:8:8 -> 4.67, 2.33 x 4; floors 4 + 2 x 4 = 12, the 2 left go to the largest
    # remainders: the thumbnail (.67), then crop 0 (.33, the lowest index of the tie).
    geometry = crop_geometry((1000, 600), (2, 2), 4)
    assert geometry.valid_counts == [8, 8, 8, 8]
    assert view_counts(geometry, Budget.resolve(geometry, 0.3)) == [5, 3, 2, 2, 2]
    selection = _select((1000, 600), (2, 2), 0.3)
    assert selection.image_tokens == 14 and selection.crop_kept_counts == [3, 2, 2, 2]
    assert int(selection.thumbnail_indices.shape[0]) == 5


def test_only_image_cells_are_drawn():
    selection = _select((1000, 600), (2, 2), 0.9)
    areas = view_image_areas(selection.geometry, "cpu")
    assert not (keep_mask(selection) & ~areas).any()


def test_reproducible_by_seed_and_different_across_seeds():
    first = keep_mask(_select((1000, 700), (2, 2), 0.25, seed=3, side=24))
    again = keep_mask(_select((1000, 700), (2, 2), 0.25, seed=3, side=24))
    other = keep_mask(_select((1000, 700), (2, 2), 0.25, seed=4, side=24))
    assert torch.equal(first, again) and not torch.equal(first, other)
    other_image = keep_mask(_select((1000, 701), (2, 2), 0.25, seed=3, side=24))
    assert not torch.equal(first, other_image)  # another image size, another draw


@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 4000), height=st.integers(1, 4000), grid_w=st.integers(1, 3), grid_h=st.integers(1, 3),
       ratio=st.floats(0.001, 1.0))
def test_kept_count_is_the_budget_for_every_size(width, height, grid_w, grid_h, ratio):
    geometry = crop_geometry((width, height), (grid_w, grid_h), 6)
    selection = _select((width, height), (grid_w, grid_h), ratio, side=6)
    assert selection.image_tokens == Budget.resolve(geometry, ratio).image_tokens
    assert int(keep_mask(selection).sum()) == selection.image_tokens
