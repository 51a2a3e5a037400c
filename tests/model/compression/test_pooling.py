"""The pooling baseline: windows split as evenly as integers allow, means of their cells,
one token per window at its top-left cell."""

import math

import torch
from hypothesis import given, settings, strategies as st

from llava.model.compression.common import Budget, Merge, arrange_tokens, crop_geometry, keep_mask
from llava.model.compression.pooling import pooling_windows, select


def test_windows_of_a_four_by_four_view_at_a_quarter():
    # side 4, R = 0.25: round(4 * 0.5) = 2 windows a side, each 2 x 2 cells.
    geometry = crop_geometry((0, 0), (0, 0), 4)
    windows, counts = pooling_windows(geometry, 0.25, "cpu")
    assert counts == [4]
    assert windows[0].view(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_uneven_windows_and_padding():
    # 1000x600 on 1x1, side 5: rows [1, 4) hold image (3 rows x 5 columns). R = 0.25:
    # round(1.5) = 2 x round(2.5) = 2 windows (Python rounds half to even); cell i of n goes to
    # window i * m // n: rows split 2 + 1, columns 3 + 2. The thumbnail: 2 x 2 windows too.
    geometry = crop_geometry((1000, 600), (1, 1), 5)
    assert geometry.crop_boxes == ((1, 0, 3, 5),)
    windows, counts = pooling_windows(geometry, 0.25, "cpu")
    assert counts == [4, 4]
    crop = (windows[1].view(5, 5) - counts[0]).tolist()
    assert crop[0] == [-counts[0] - 1] * 5 and crop[4] == [-counts[0] - 1] * 5  # padding rows: no window
    assert crop[1:4] == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1], [2, 2, 2, 3, 3]]


def test_tokens_are_window_means_at_window_corners():
    geometry = crop_geometry((0, 0), (0, 0), 4, unpad=False)
    features = torch.arange(16, dtype=torch.float32).view(1, 16, 1)
    merge = select(features, {}, geometry, Budget.resolve(geometry, 0.25))
    assert isinstance(merge, Merge)
    # Window 0 holds cells 0, 1, 4, 5: mean 2.5; window 3 holds 10, 11, 14, 15: mean 12.5.
    assert merge.features[:, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    assert merge.thumbnail_indices.tolist() == [0, 2, 8, 10]
    assert arrange_tokens(features, merge, None, "spatial")[:, 0].tolist() == [2.5, 4.5, 10.5, 12.5]


@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 4000), height=st.integers(1, 4000), grid_w=st.integers(1, 3), grid_h=st.integers(1, 3),
       ratio=st.floats(0.001, 1.0))
def test_kept_count_is_the_documented_rule_for_every_size(width, height, grid_w, grid_h, ratio):
    side = 6
    geometry = crop_geometry((width, height), (grid_w, grid_h), side)
    views = torch.randn(1 + grid_w * grid_h, side * side, 3)
    selection = select(views, {}, geometry, Budget.resolve(geometry, ratio))
    boxes = [(side, side)] + [(height_c, width_c) for _, _, height_c, width_c in geometry.crop_boxes]
    scale = math.sqrt(ratio)
    expected = sum(max(1, round(h * scale)) * max(1, round(w * scale)) for h, w in boxes if h) if ratio < 1 else \
        geometry.vanilla_image_tokens
    assert selection.image_tokens == expected == int(keep_mask(selection).sum())
    if isinstance(selection, Merge):  # every image cell is merged into exactly one token
        image_cells = int((selection.source_map >= 0).sum())
        assert image_cells == geometry.vanilla_image_tokens
        sums = torch.zeros(selection.image_tokens, 3).index_add_(
            0, selection.source_map.flatten()[selection.source_map.flatten() >= 0],
            views.flatten(0, 1)[selection.source_map.flatten() >= 0])
        sizes = torch.bincount(selection.source_map.flatten()[selection.source_map.flatten() >= 0])
        torch.testing.assert_close(selection.features, sums / sizes[:, None])
