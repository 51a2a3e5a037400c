"""GlobalCom2's pure functions on small grids, with expected values worked out by hand.

Conventions in the layout tests: features have D = 1 and value `100 * view + cell` (view 0 is
the thumbnail, crop c is view c + 1), and the newline is -1, so a sequence reads as a list of
token names.
"""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from PIL import Image

from llava.mm_utils import ONEVISION_GRID_PINPOINTS, get_anyres_image_grid_shape, unpad_image
from llava.mm_utils import process_images
from llava.model.compression import describe, get_method, parse_method_args
from llava.model.compression.common import Budget, Selection, arrange_tokens, crop_geometry
from llava.model.compression.globalcom2 import (
    SCORE_SIGNALS,
    GlobalCom2Args,
    compress_image_features,
    compress_thumbnail,
    crop_block_scores,
    crop_ratios,
    generate_scale_for_crop_features,
    interpolate_and_split_cls_attn_scores,
    select_crop_tokens,
    select_tokens,
    visual_token_count,
)
from llava.model.globalcom2_released import released_compress_image
from llava.model.llava_arch import CompressionSettings
from llava.model.multimodal_encoder.clip_encoder import negative_cosine_to_mean
from llava.tiny import V16_PINPOINTS

NEWLINE = -1.0


def _named_views(num_views, side):
    cells = torch.arange(side * side, dtype=torch.float32)
    return torch.stack([100 * view + cells for view in range(num_views)])[..., None]  # [V, P, 1]


def _names(sequence):
    return [int(value) for value in sequence[:, 0].tolist()]


def _select(scores, size, grid, ratio):
    """GlobalCom2's selection at ratio R with default arguments."""
    geometry = crop_geometry(size, grid, math.isqrt(scores.shape[1]))
    return select_tokens(scores, geometry, Budget.resolve(geometry, ratio))


# --- retention ratio and shapes -------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, 0.0, -0.25, 1.0001, 2, float("nan"), float("inf"), "0.5", None, True])
def test_bad_ratio_is_refused_naming_the_value(bad):
    with pytest.raises(ValueError, match=r"retention_ratio.*\(0, 1\]") as error:
        compress_image_features(torch.zeros(5, 16, 2), torch.zeros(5, 16), (10, 10), (2, 2), torch.zeros(2), bad)
    assert repr(bad) in str(error.value)


@pytest.mark.parametrize("features, scores, newline, expected", [
    ((4, 16, 2), (4, 16), (2,), r"\[5, P, D\]"),          # 3 crops for a 2x2 grid
    ((5, 16, 2), (5, 9), (2,), r"\[5, 16\]"),              # scores for another patch count
    ((5, 15, 2), (5, 15), (2,), r"square number"),
    ((5, 16, 2), (5, 16), (3,), r"image_newline must have shape \[2\]"),
    ((5, 16), (5, 16), (2,), r"\[1 \+ C, P, D\]"),
])
def test_shapes_that_disagree_with_the_grid_are_refused(features, scores, newline, expected):
    with pytest.raises(ValueError, match=expected):
        compress_image_features(torch.zeros(features), torch.zeros(scores), (10, 10), (2, 2), torch.zeros(newline), 0.5)


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="official, spatial"):
        compress_image_features(torch.zeros(5, 16, 2), torch.zeros(5, 16), (10, 10), (2, 2), torch.zeros(2), 0.5, layout="raster")


# --- step 1: thumbnail ------------------------------------------------------------------------

def test_thumbnail_keeps_the_best_scores_best_first():
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2, 0.7, 0.0, 0.6, 0.5])
    assert compress_thumbnail(scores, 0.5).tolist() == [1, 3, 5, 7]   # int(9 * 0.5) = 4
    assert compress_thumbnail(scores, 0.35).tolist() == [1, 3, 5]     # int(3.15) = 3


@pytest.mark.parametrize("ratio, kept", [(0.1, 57), (0.35, 201), (0.05, 28), (0.25, 144)])
def test_thumbnail_count_truncates(ratio, kept):
    assert compress_thumbnail(torch.randn(576), ratio).shape == (kept,)


# --- step 2: per-crop ratios ------------------------------------------------------------------

@pytest.mark.parametrize("grid", [(2, 2), (3, 1), (1, 2)])
def test_equal_thumbnail_scores_give_every_crop_the_ratio(grid):
    assert generate_scale_for_crop_features(torch.full((36,), 3.0), *grid, 0.25) == [0.25] * (grid[0] * grid[1])


def _expected_scales(sums, ratio, temperature=10.0):
    exps = [math.exp((value - max(sums)) / temperature) for value in sums]
    softmax = [value / (sum(exps) + 1e-8) for value in exps]
    return [min(ratio * (1 + value - sum(softmax) / len(softmax)), 1.0) for value in softmax]


def test_crop_ratios_by_hand():
    # Side 4 on a 2x1 grid: columns 0-1 feed crop 0, columns 2-3 crop 1. Sums 8 and 0.
    scores = torch.zeros(4, 4)
    scores[:, :2] = 1.0
    scales = generate_scale_for_crop_features(scores.flatten(), 2, 1, 0.5)
    assert scales == pytest.approx(_expected_scales([8.0, 0.0], 0.5), abs=1e-15)
    assert scales == pytest.approx([0.5 * (0.5 + 1 / (1 + math.exp(-0.8))), 0.5 * (0.5 + 1 / (1 + math.exp(0.8)))])
    assert sum(scales) == pytest.approx(2 * 0.5)  # the ratios average R before clipping
    # At R = 0.9 the favoured crop would get 1.07: clipped to 1.
    assert generate_scale_for_crop_features(scores.flatten(), 2, 1, 0.9)[0] == 1.0


def test_last_block_takes_the_remainder():
    # Side 5 on a 2x1 grid: blocks are 2 columns wide, so column 4 belongs to crop 1.
    scores = torch.zeros(5, 5)
    scores[:, 4] = 1.0
    scales = generate_scale_for_crop_features(scores.flatten(), 2, 1, 0.5)
    assert scales == pytest.approx(_expected_scales([0.0, 5.0], 0.5), abs=1e-15)


def test_non_finite_scores_are_refused():
    with pytest.raises(ValueError, match="NaN or inf"):
        generate_scale_for_crop_features(torch.tensor([1.0, float("nan"), 0.0, 0.0]), 2, 1, 0.5)


# --- step 3: geometry and the interpolation split ---------------------------------------------

def test_letterboxed_landscape_geometry_and_split():
    # 1000x700 on 2x2, side 4: an 8x8 canvas; new_h = int(700 * 8 / 1000) = 5, pad 1 -> rows [1, 7).
    geometry = crop_geometry((1000, 700), (2, 2), 4)
    assert geometry.bounds == (1, 7, 0, 8)
    assert geometry.crop_boxes == ((1, 0, 3, 4), (1, 0, 3, 4), (0, 0, 3, 4), (0, 0, 3, 4))
    scores = torch.randn(16)
    resized = F.interpolate(scores.view(1, 1, 4, 4), size=(6, 8), mode="bilinear", align_corners=False)[0, 0]
    pieces = interpolate_and_split_cls_attn_scores(scores, 8, 6, 2, 2, geometry.crop_dimensions)
    expected = [resized[0:3, 0:4], resized[0:3, 4:8], resized[3:6, 0:4], resized[3:6, 4:8]]
    assert all(torch.equal(piece, block.flatten()) for piece, block in zip(pieces, expected))


def test_pillarboxed_portrait_geometry_and_split():
    # 700x1000 on 2x2, side 4: new_w = 5, pad 1 -> columns [1, 7); edge crops are 3 wide.
    geometry = crop_geometry((700, 1000), (2, 2), 4)
    assert geometry.bounds == (0, 8, 1, 7)
    assert geometry.crop_boxes == ((0, 1, 4, 3), (0, 0, 4, 3), (0, 1, 4, 3), (0, 0, 4, 3))
    scores = torch.randn(16)
    resized = F.interpolate(scores.view(1, 1, 4, 4), size=(8, 6), mode="bilinear", align_corners=False)[0, 0]
    pieces = interpolate_and_split_cls_attn_scores(scores, 6, 8, 2, 2, geometry.crop_dimensions)
    expected = [resized[0:4, 0:3], resized[0:4, 3:6], resized[4:8, 0:3], resized[4:8, 3:6]]
    assert all(torch.equal(piece, block.flatten()) for piece, block in zip(pieces, expected))


def test_row_offset_follows_the_first_crop_of_each_row():
    # 250x1000 on a 3x2 grid, side 4: columns [5, 7) only, inside the middle crop column. The
    # first crop of each row is all padding, so the released split never advances the row
    # offset (quirk Q9): the bottom-middle crop reads the same rows as the top-middle one.
    geometry = crop_geometry((250, 1000), (3, 2), 4)
    assert geometry.crop_dimensions == [(0, 0), (2, 4), (0, 0), (0, 0), (2, 4), (0, 0)]
    scores = torch.randn(16)
    resized = F.interpolate(scores.view(1, 1, 4, 4), size=(8, 2), mode="bilinear", align_corners=False)[0, 0]
    pieces = interpolate_and_split_cls_attn_scores(scores, 2, 8, 3, 2, geometry.crop_dimensions)
    assert torch.equal(pieces[4], resized[0:4, 0:2].flatten()) and torch.equal(pieces[4], pieces[1])
    assert [piece.numel() for piece in pieces] == [0, 8, 0, 0, 8, 0]


def test_empty_image_area():
    # 5000x2: new_h = int(2 * 8 / 5000) = 0, so no canvas row holds image.
    geometry = crop_geometry((5000, 2), (2, 2), 4)
    assert geometry.valid_counts == [0, 0, 0, 0] and len(geometry.newline_rows("raster")) == 0
    assert [piece.numel() for piece in interpolate_and_split_cls_attn_scores(torch.randn(16), 0, 0, 2, 2, geometry.crop_dimensions)] == [0] * 4


# --- step 4: per-crop top-k -----------------------------------------------------------------

def test_crop_top_k_adds_normalised_local_and_global_scores():
    # One full 2x2 crop keeping 2 tokens. local/|local| + global/|global| =
    # [0, 0, .71, .71] + [0, .45, 0, .89] = [0, .45, .71, 1.60]: cells 3 and 2 win.
    geometry = crop_geometry((10, 10), (1, 1), 2)
    local = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    keep, counts = select_crop_tokens(local, [torch.tensor([0.0, 1.0, 0.0, 2.0])], geometry, [2])
    assert counts == [2] and keep.tolist() == [[False, False, True, True]]


def test_crop_top_k_maps_packed_indices_to_real_cells():
    # 1000x600 on 2x2, side 2: rows [1, 3), so the top crops hold image in their row 1 only.
    # Crop 0's packed list is (cells 2, 3); the global score decides: packed 1 = cell 3 wins.
    geometry = crop_geometry((1000, 600), (2, 2), 2)
    assert geometry.crop_boxes == ((1, 0, 1, 2), (1, 0, 1, 2), (0, 0, 1, 2), (0, 0, 1, 2))
    local = torch.ones(4, 4)
    global_scores = [torch.tensor([0.0, 1.0])] * 4
    keep, counts = select_crop_tokens(local, global_scores, geometry, [1, 1, 1, 0])
    assert keep.tolist() == [[False, False, False, True], [False, False, False, True],
                             [False, True, False, False], [False, False, False, False]]


# --- step 5: layouts --------------------------------------------------------------------------

def _keep_image_area(size, side=2):
    """A selection keeping every image cell of a 2x2 grid, thumbnail cells 3 then 0."""
    geometry = crop_geometry(size, (2, 2), side)
    keep = torch.zeros(4, side * side, dtype=torch.bool)
    for crop, (top, left, height, width) in enumerate(geometry.crop_boxes):
        keep[crop].view(side, side)[top:top + height, left:left + width] = True
    return Selection(geometry, torch.tensor([3, 0]), keep, geometry.valid_counts, arrangement="packed")


def test_official_layout_of_a_letterboxed_landscape():
    # 1000x600, side 2: image rows [1, 3). Top crops' row-1 tokens are packed to cells 0, 1
    # (row 0); one newline per canvas row, 4 in all, including the rows left empty.
    selection = _keep_image_area((1000, 600))
    sequence = arrange_tokens(_named_views(5, 2), selection, torch.tensor([NEWLINE]), "official")
    assert _names(sequence) == [3, 0, 102, 103, 202, 203, -1, -1, 300, 301, 400, 401, -1, -1]


def test_spatial_layout_of_a_letterboxed_landscape():
    selection = _keep_image_area((1000, 600))
    sequence = arrange_tokens(_named_views(5, 2), selection, torch.tensor([NEWLINE]), "spatial")
    assert _names(sequence) == [0, 3, 102, 103, 202, 203, -1, 300, 301, 400, 401, -1]


def test_official_layout_scrambles_a_pillarboxed_portrait():
    # 600x1000, side 2: image columns [1, 3). Crop 0 holds cells 1, 3 and crop 1 cells 0, 2;
    # the official layout packs each into cells 0, 1, so one canvas row mixes two image rows.
    selection = _keep_image_area((600, 1000))
    official = arrange_tokens(_named_views(5, 2), selection, torch.tensor([NEWLINE]), "official")
    spatial = arrange_tokens(_named_views(5, 2), selection, torch.tensor([NEWLINE]), "spatial")
    assert _names(official) == [3, 0, 101, 103, 200, 202, -1, -1, 301, 303, 400, 402, -1, -1]
    assert _names(spatial) == [0, 3, 101, 200, -1, 103, 202, -1, 301, 400, -1, 303, 402, -1]


def test_without_unpadding_there_are_no_newlines():
    # 2x1 grid, side 2: canvas row 0 is crop 0 cells 0, 1 then crop 1 cells 0, 1; row 1 the rest.
    geometry = crop_geometry((600, 1000), (2, 1), 2, unpad=False)
    keep = torch.tensor([[True, False, False, True], [False, True, True, False]])
    selection = Selection(geometry, torch.tensor([2, 1]), keep, [2, 2], arrangement="packed")
    assert _names(arrange_tokens(_named_views(3, 2), selection, None, "official")) == [2, 1, 100, 201, 103, 202]
    assert _names(arrange_tokens(_named_views(3, 2), selection, None, "spatial")) == [1, 2, 100, 201, 103, 202]


# --- the whole image --------------------------------------------------------------------------

def _vanilla(views, size, grid, newline):
    """LLaVA-NeXT's sequence (upstream's channel-first ops) for any side."""
    grid_w, grid_h = grid
    side = math.isqrt(views.shape[1])
    canvas = views[1:].view(grid_h, grid_w, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
    canvas = unpad_image(canvas, size)
    canvas = torch.cat([canvas, newline[:, None, None].expand(*canvas.shape[:-1], 1)], dim=-1)
    return torch.cat([views[0], canvas.flatten(1, 2).transpose(0, 1)])


@pytest.mark.parametrize("size", [(1000, 700), (700, 1000), (800, 500), (1, 1), (5000, 2)])
@pytest.mark.parametrize("layout", ["official", "spatial"])
def test_ratio_one_is_vanilla_llava_next(size, layout):
    views, scores, newline = torch.randn(5, 36, 8), torch.randn(5, 36), torch.randn(8)
    ours = compress_image_features(views, scores, size, (2, 2), newline, 1.0, layout=layout)
    assert torch.equal(ours, _vanilla(views, size, (2, 2), newline))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtype_is_kept_and_tokens_are_copied_exactly(dtype):
    views = _named_views(5, 24).to(dtype).expand(-1, -1, 4).contiguous()
    scores = torch.randn(5, 576).to(dtype)
    out = compress_image_features(views, scores, (1000, 700), (2, 2), torch.full((4,), NEWLINE, dtype=dtype), 0.25)
    assert out.dtype == dtype
    inputs = set(views[..., 0].flatten().tolist()) | {NEWLINE}
    assert set(out[:, 0].tolist()) <= inputs


def test_official_worked_example_of_the_spec():
    # 1000x700 on 2x2 (side 24): rows [7, 41) hold image, 408 tokens per crop. At R = 0.25:
    # 144 thumbnail tokens, int(408 * r_c) per crop, 48 newlines.
    views, scores = torch.randn(5, 576, 4), torch.randn(5, 576) * 2 + 5
    selection = _select(scores, (1000, 700), (2, 2), 0.25)
    assert selection.geometry.valid_counts == [408] * 4
    kept = [int(408 * ratio) for ratio in generate_scale_for_crop_features(scores[0], 2, 2, 0.25)]
    out = compress_image_features(views, scores, (1000, 700), (2, 2), torch.zeros(4), 0.25)
    assert out.shape[0] == 144 + sum(kept) + 48 == selection.tokens_after("official")
    assert selection.accounting("official")["tokens_before"] == 576 + 34 * 49 == 2242


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("seed", range(6))
def test_official_layout_equals_the_released_code(dtype, seed):
    """Element for element, ties included: fp16 logits tie often at side 24."""
    generator = torch.Generator().manual_seed(seed)
    size = [(1000, 700), (700, 1000), (800, 500), (1200, 300), (336, 336), (400, 1100)][seed]
    grid = get_anyres_image_grid_shape(size, V16_PINPOINTS, 336)
    views = torch.randn(1 + grid[0] * grid[1], 576, 16, generator=generator).to(dtype)
    scores = (torch.randn(views.shape[:2], generator=generator) * 2 + 5).to(dtype)
    newline = torch.randn(16, generator=generator).to(dtype)
    ratio = [0.1, 0.25, 0.5, 0.75, 0.9, 0.35][seed]
    ours = compress_image_features(views, scores, size, grid, newline, ratio)
    released = released_compress_image(views, scores, size, grid, newline, ratio, cast_to_fp16=dtype == torch.float16)
    assert ours.dtype == released.dtype and torch.equal(ours, released)


@pytest.mark.parametrize("size", [(1, 1), (20, 2000), (2000, 20), (5000, 2), (2, 5000), (300, 10)])
@pytest.mark.parametrize("layout", ["official", "spatial"])
def test_extreme_sizes_never_raise(size, layout):
    grid = get_anyres_image_grid_shape(size, V16_PINPOINTS, 336)
    views, scores = torch.randn(1 + grid[0] * grid[1], 576, 2), torch.randn(1 + grid[0] * grid[1], 576)
    selection = _select(scores, size, grid, 0.25)
    out = compress_image_features(views, scores, size, grid, torch.zeros(2), 0.25, layout=layout)
    assert out.shape[0] == selection.tokens_after(layout)


# --- properties over random sizes, grids and ratios -------------------------------------------

@settings(max_examples=80, deadline=None)
@given(side=st.integers(2, 6), grid_w=st.integers(1, 3), grid_h=st.integers(1, 3),
       width=st.integers(1, 3000), height=st.integers(1, 3000),
       ratio=st.floats(0.01, 1.0), layout=st.sampled_from(["official", "spatial"]), seed=st.integers(0, 2**16))
def test_properties(side, grid_w, grid_h, width, height, ratio, layout, seed):
    generator = torch.Generator().manual_seed(seed)
    num_views, num_patches = 1 + grid_w * grid_h, side * side
    views = _named_views(num_views, side)
    scores = torch.randn(num_views, num_patches, generator=generator)
    out = compress_image_features(views, scores, (width, height), (grid_w, grid_h), torch.tensor([NEWLINE]), ratio, layout=layout)
    names = _names(out)
    tokens = [name for name in names if name != NEWLINE]

    # Token count (behaviour spec §9; `spatial` ends image rows only; R = 1 is vanilla).
    geometry = crop_geometry((width, height), (grid_w, grid_h), side)
    top, bottom, left, right = geometry.bounds
    if ratio == 1.0:
        expected = num_patches + (bottom - top) * (right - left + 1)
    else:
        scales = generate_scale_for_crop_features(scores[0], grid_w, grid_h, ratio)
        newlines = grid_h * side if layout == "official" else bottom - top
        expected = int(num_patches * ratio) + sum(int(n * s) for n, s in zip(geometry.valid_counts, scales)) + newlines
    assert len(names) == expected

    # No token twice; each is an input token (a thumbnail patch or an image-area crop cell).
    assert len(set(tokens)) == len(tokens)
    image_cells = set(range(num_patches))
    for crop, (box_top, box_left, box_height, box_width) in enumerate(geometry.crop_boxes):
        image_cells |= {100 * (crop + 1) + (box_top + y) * side + box_left + x for y in range(box_height) for x in range(box_width)}
    assert set(tokens) <= image_cells

    # Spatial: thumbnail in raster order, crop tokens in canvas raster order, a newline per row.
    if layout == "spatial" or ratio == 1.0:
        thumbnail = [name for name in tokens if name < 100]
        assert thumbnail == sorted(thumbnail)
        crop_part = names[len(thumbnail):]
        rows, row = [], []
        for name in crop_part:
            if name == NEWLINE:
                rows.append(row)
                row = []
            else:
                crop, cell = divmod(name, 100)
                row.append(((crop - 1) // grid_w * side + cell // side, (crop - 1) % grid_w * side + cell % side))
        assert row == [] and len(rows) == bottom - top
        for index, row in enumerate(rows):
            assert all(y == top + index for y, _ in row) and [x for _, x in row] == sorted(x for _, x in row)


# --- ablations (arguments; defaults are the released behaviour above) ---------------------------

def _ablation(cls_scores, size, grid, ratio, layout="official", **arguments):
    geometry = crop_geometry(size, grid, math.isqrt(cls_scores.shape[1]))
    selection = select_tokens(cls_scores, geometry, Budget.resolve(geometry, ratio), GlobalCom2Args(**arguments))
    views = _named_views(cls_scores.shape[0], math.isqrt(cls_scores.shape[1]))
    return selection, _names(arrange_tokens(views, selection, torch.tensor([NEWLINE]), layout))


def test_alpha_half_is_the_released_sum_and_the_ends_are_one_score():
    # One full 2x2 crop keeping 2 tokens. Normalised local [0, 0, .71, .71], global [0, .45, 0, .89].
    geometry = crop_geometry((10, 10), (1, 1), 2)
    local, global_scores = torch.tensor([[0.0, 0.0, 1.0, 1.0]]), [torch.tensor([0.0, 1.0, 0.0, 2.0])]
    assert select_crop_tokens(local, global_scores, geometry, [2], 0.5)[0].tolist() == [[False, False, True, True]]
    # local only: cells 2 and 3 tie at .71 (topk keeps both); global only: 3 (.89) then 1 (.45).
    assert select_crop_tokens(local, global_scores, geometry, [2], 0.0)[0].tolist() == [[False, False, True, True]]
    assert select_crop_tokens(local, global_scores, geometry, [2], 1.0)[0].tolist() == [[False, True, False, True]]
    # alpha = 0.9: .1 * local + .9 * global = [0, .40, .07, .87]: cells 3 and 1.
    assert select_crop_tokens(local, global_scores, geometry, [2], 0.9)[0].tolist() == [[False, True, False, True]]


@pytest.mark.parametrize("seed", range(4))
def test_scores_local_and_global_equal_alpha_zero_and_one(seed):
    scores = torch.randn(5, 576, generator=torch.Generator().manual_seed(seed))
    for named, alpha in (("local", 0.0), ("global", 1.0)):
        by_name, _ = _ablation(scores, (1000, 700), (2, 2), 0.25, scores=named)
        by_alpha, _ = _ablation(scores, (1000, 700), (2, 2), 0.25, alpha=alpha)
        assert torch.equal(by_name.crop_keep_mask, by_alpha.crop_keep_mask)
    default, _ = _ablation(scores, (1000, 700), (2, 2), 0.25)
    half, _ = _ablation(scores, (1000, 700), (2, 2), 0.25, alpha=0.5)
    assert torch.equal(default.crop_keep_mask, half.crop_keep_mask)


def test_allocation_modes_by_hand():
    # 4x4 thumbnail on a 2x1 grid: the left half (columns 0-1) holds score 1 per patch, the right 0,
    # except one right patch at 3. Sums: left 8, right 3; maxima: left 1, right 3.
    thumbnail = torch.zeros(4, 4)
    thumbnail[:, :2] = 1.0
    thumbnail[0, 3] = 3.0
    flat = thumbnail.flatten()
    args = dict(temperature=1.0)
    # softmax-sum: s = softmax([8, 3]) = [.99331, .00669] -> R (1 + s - .5) = .5 * [1.49331, .50669]
    ratios = crop_ratios(flat, (2, 1), 0.5, GlobalCom2Args(**args))
    assert [round(r, 4) for r in ratios] == [0.7467, 0.2533]
    # softmax-max: softmax([1, 3]) = [.1192, .8808] -> .5 * [.6192, 1.3808]
    ratios = crop_ratios(flat, (2, 1), 0.5, GlobalCom2Args(allocation="softmax-max", **args))
    assert [round(r, 4) for r in ratios] == [0.3096, 0.6904]
    # n-topk: the top int(16 * .5) = 8 patches are the 3 and seven of the eight 1s (lower index
    # first on ties): 7 left, 1 right; shares (7/8) / (8/16) = 1.75 and .25 -> .5 * [1.75, .25], clipped.
    ratios = crop_ratios(flat, (2, 1), 0.5, GlobalCom2Args(allocation="n-topk", **args))
    assert ratios == [0.875, 0.125]
    assert crop_ratios(flat, (2, 1), 0.5, GlobalCom2Args(allocation="uniform")) == [0.5, 0.5]


def test_views_thumbnail_only_and_crops_only():
    scores = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    thumbnail_only, names = _ablation(scores, (1000, 700), (2, 2), 1.0, views="thumbnail", layout="spatial")
    assert names == list(range(16)) and thumbnail_only.newline_tokens("official") == 0  # no crop, no newline
    crops_only, names = _ablation(scores, (1000, 700), (2, 2), 1.0, views="crops", layout="spatial")
    vanilla, vanilla_names = _ablation(scores, (1000, 700), (2, 2), 1.0, layout="spatial")
    assert names == vanilla_names[16:] and int(crops_only.thumbnail_indices.shape[0]) == 0
    compressed, _ = _ablation(scores, (1000, 700), (2, 2), 0.25, views="thumbnail")
    assert compressed.image_tokens == 4 and sum(compressed.crop_kept_counts) == 0


def test_drop_crop_most_and_least():
    # Thumbnail 4x4 on 2x2: block sums top-left 4, top-right 8, bottom-left 0, bottom-right 2.
    thumbnail = torch.zeros(4, 4)
    thumbnail[:2, :2], thumbnail[:2, 2:], thumbnail[2:, 2:] = 1.0, 2.0, 0.5
    scores = torch.cat([thumbnail.flatten()[None], torch.randn(4, 16)])
    most, _ = _ablation(scores, (400, 400), (2, 2), 1.0, drop_crop="most")
    least, _ = _ablation(scores, (400, 400), (2, 2), 1.0, drop_crop="least")
    assert most.crop_kept_counts == [16, 0, 16, 16] and least.crop_kept_counts == [16, 16, 0, 16]
    assert most.image_tokens == 16 + 48  # the rest is kept whole at R = 1


def test_exact_budget_by_hand():
    # 1000x700 on 2x2 at side 24: 408 image tokens per crop, vanilla 576 + 4 * 408 = 2208.
    # R = 0.25: round(552) = 552 tokens, shared in proportion to 144 and 408 r_c (uniform: 102 each)
    # -> 144 : 102 x 4 = 552 exactly.
    scores = torch.randn(5, 576, generator=torch.Generator().manual_seed(2))
    selection, _ = _ablation(scores, (1000, 700), (2, 2), 0.25, budget="exact", allocation="uniform")
    assert int(selection.thumbnail_indices.shape[0]) == 144 and selection.crop_kept_counts == [102] * 4
    released, _ = _ablation(scores, (1000, 700), (2, 2), 0.1, allocation="uniform")
    exact, _ = _ablation(scores, (1000, 700), (2, 2), 0.1, budget="exact", allocation="uniform")
    # released: int(57.6) + 4 int(40.8) = 57 + 160 = 217; exact: round(220.8) = 221.
    assert released.image_tokens == 217 and exact.image_tokens == 221


@settings(max_examples=1000, deadline=None)
@given(width=st.integers(1, 4000), height=st.integers(1, 4000), ratio=st.floats(0.001, 1.0),
       layout=st.sampled_from(["official", "spatial"]), tokens=st.one_of(st.none(), st.integers(1, 3000)))
def test_exact_budget_length_is_known_before_the_tower(width, height, ratio, layout, tokens):
    grid = get_anyres_image_grid_shape((width, height), V16_PINPOINTS, 336)
    geometry = crop_geometry((width, height), grid, 24)
    scores = torch.randn(1 + grid[0] * grid[1], 576, generator=torch.Generator().manual_seed(width * 4001 + height))
    budget = Budget.resolve(geometry, None if tokens else ratio, tokens)
    selection = select_tokens(scores, geometry, budget, GlobalCom2Args(budget="exact"))
    expected = visual_token_count((width, height), V16_PINPOINTS, None if tokens else ratio, tokens, layout)
    assert selection.tokens_after(layout) == expected
    assert selection.image_tokens == min(budget.image_tokens, geometry.vanilla_image_tokens)


def test_exact_budget_count_equals_the_models_sequence(tiny):
    tokenizer, model, processor = tiny
    model.set_compression(0.3, "spatial", method="globalcom2", method_args=["budget=exact"])
    try:
        for index, size in enumerate([(800, 500), (500, 900), (1000, 300), (20, 2000), (1600, 1200), (336, 336)]):
            image = Image.new("RGB", size, (index * 40, 90, 200 - index * 30))
            pixel_values = process_images([image], processor, model.config)
            with torch.no_grad():
                sequence, = model.encode_image_sequences(pixel_values, [size])
            assert sequence.shape[0] == visual_token_count(size, model.config.image_grid_pinpoints, 0.3,
                                                           layout="spatial")
    finally:
        model.set_compression()


# --- any side and grid (SigLIP-384: 27 x 27 views, OneVision's grids up to 6x6) --------------

def test_three_by_two_grid_on_side_four_by_hand():
    # 1200x800 on a 3x2 grid, side 4: an 8x12 canvas of exactly the image's aspect, so every crop
    # is whole (16 cells). Thumbnail scores 1000 + cell / 100, and +20 on cells 2, 3, 6, 7.
    size, grid = (1200, 800), (3, 2)
    thumbnail = 1000 + torch.arange(16, dtype=torch.float32) / 100
    thumbnail[[2, 3, 6, 7]] += 20
    # Crop c's own scores rank its cells by index (the highest last), crop 4's the other way round.
    local = torch.arange(16, dtype=torch.float32).repeat(6, 1)
    local[4] = 15 - local[4]
    selection = _select(torch.cat([thumbnail[None], local]), size, grid, 0.5)
    assert selection.geometry.valid_counts == [16] * 6
    # Thumbnail: int(16 * 0.5) = 8, best first: the +20 cells, then the highest of the rest.
    assert selection.thumbnail_indices.tolist() == [7, 6, 3, 2, 15, 14, 13, 12]
    # Shares (released partition, blocks 4 // 3 = 1 column and 4 // 2 = 2 rows wide, the last column
    # block taking columns 2-3): crop 2 holds cells 2, 3, 6, 7 (sum 4080.18), crop 5 cells 10, 11,
    # 14, 15 (4000.50), the others two cells each (about 2000). softmax(S / 10) = about [0, 0,
    # .99965, 0, 0, .00035], so r = .5 (1 + s - 1/6): .9165 for crop 2 -> int(16 r) = 14, and
    # .4167-.4168 for the rest -> 6.
    assert selection.crop_kept_counts == [6, 6, 14, 6, 6, 6]
    # Per crop the local ranking decides: normalised local scores are 1 / 35.2 = .028 apart, while
    # the interpolated thumbnail scores (1000..1020.15) differ by under 20.2 / 4020 = .005 in a crop.
    top_six, bottom_six = set(range(10, 16)), set(range(6))
    expected = [top_six, top_six, set(range(2, 16)), top_six, bottom_six, top_six]
    assert [set(torch.nonzero(row)[:, 0].tolist()) for row in selection.crop_keep_mask] == expected


def test_split_of_the_interpolated_thumbnail_on_a_three_by_two_grid_by_hand():
    # Side 4 thumbnail t(y, x) = x + 10 y resized (bilinear, no corner alignment) to the 8x12 canvas
    # of a 3x2 grid: output column j samples x = (j + .5) / 3 - .5 and row i samples y = (i + .5) / 2
    # - .5, each clamped to [0, 3]; t is affine, so the result is X(j) + 10 Y(i).
    thumbnail = (torch.arange(4.0)[None, :] + 10 * torch.arange(4.0)[:, None]).flatten()
    columns = [0, 0, 1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2, 7 / 3, 8 / 3, 3, 3]
    rows = [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3]
    canvas = torch.tensor(columns)[None, :] + 10 * torch.tensor(rows)[:, None]
    geometry = crop_geometry((1200, 800), (3, 2), 4)
    pieces = interpolate_and_split_cls_attn_scores(thumbnail, 12, 8, 3, 2, geometry.crop_dimensions)
    for crop, piece in enumerate(pieces):
        row, col = divmod(crop, 3)
        assert torch.allclose(piece, canvas[4 * row:4 * row + 4, 4 * col:4 * col + 4].flatten(), atol=1e-5)


def _released_partition_ratios(thumbnail, grid, ratio):
    """Crop ratios by the rule, patch by patch: a side-s thumbnail cut into shares of s // grid
    patches (the last share taking the remainder), the softmax of the share sums over T = 10."""
    grid_w, grid_h = grid
    side = math.isqrt(thumbnail.shape[0])
    sums = [0.0] * (grid_w * grid_h)
    for index, value in enumerate(thumbnail.tolist()):
        y, x = divmod(index, side)
        sums[min(y // (side // grid_h), grid_h - 1) * grid_w + min(x // (side // grid_w), grid_w - 1)] += value
    return _expected_scales(sums, ratio)


def test_side_27_shares_of_a_six_by_six_grid():
    # 27 // 6 = 4: five shares 4 patches wide and a last one of 27 - 20 = 7, in both directions.
    _, sizes = crop_block_scores(torch.ones(729), 6, 6)
    widths = torch.tensor([4, 4, 4, 4, 4, 7])
    assert sizes.tolist() == (widths[:, None] * widths[None, :]).flatten().tolist()


@pytest.mark.parametrize("size, grid, valid", [
    ((2304, 2304), (6, 6), 729),  # the canvas is the image: 162 x 162
    ((1152, 384), (3, 1), 729),
    ((384, 1920), (1, 5), 729),
    ((1152, 300), (3, 1), 567),   # new_h = int(300 * 81 / 1152) = 21, pad 3: rows [3, 24), 21 x 27 per crop
])
@pytest.mark.parametrize("ratio, thumbnail_kept", [(0.25, 182), (0.1, 72)])  # int(729 R)
@pytest.mark.parametrize("score", ["cls", "neg_cos_mean", "neg_attn"])
def test_side_27_counts_follow_the_rule(size, grid, valid, ratio, thumbnail_kept, score):
    assert get_anyres_image_grid_shape(size, ONEVISION_GRID_PINPOINTS, 384) == grid
    num_views = 1 + grid[0] * grid[1]
    scores = torch.randn(num_views, 729, generator=torch.Generator().manual_seed(num_views)) * 0.3 - 0.5
    args = GlobalCom2Args(score=score)
    geometry = crop_geometry(size, grid, 27)
    selection = get_method("globalcom2").select(torch.zeros(num_views, 729, 1), {args.signal: scores}, geometry,
                                                Budget.resolve(geometry, ratio), args)
    assert geometry.valid_counts == [valid] * (num_views - 1)
    assert int(selection.thumbnail_indices.shape[0]) == thumbnail_kept
    expected_ratios = _released_partition_ratios(scores[0], grid, ratio)
    assert selection.extra["crop_ratios"] == pytest.approx(expected_ratios, abs=1e-6)
    assert selection.crop_kept_counts == [int(valid * r) for r in expected_ratios]
    assert selection.crop_keep_mask.sum(dim=1).tolist() == selection.crop_kept_counts


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("size, ratio", [((2304, 2304), 0.25), ((1000, 700), 0.1), ((700, 1000), 0.5),
                                         ((1152, 300), 0.75), ((384, 1920), 0.15), ((1500, 1100), 0.25)])
def test_side_27_official_layout_equals_the_released_code(size, ratio, dtype):
    """The released logic at side 27 on OneVision's grids (6x6, 3x2, 2x3, 3x1, 1x5, 4x3), element for element."""
    grid = get_anyres_image_grid_shape(size, ONEVISION_GRID_PINPOINTS, 384)
    generator = torch.Generator().manual_seed(grid[0] * 7 + grid[1])
    views = torch.randn(1 + grid[0] * grid[1], 729, 4, generator=generator).to(dtype)
    scores = (torch.randn(views.shape[:2], generator=generator) * 2 + 5).to(dtype)
    newline = torch.randn(4, generator=generator).to(dtype)
    ours = compress_image_features(views, scores, size, grid, newline, ratio)
    released = released_compress_image(views, scores, size, grid, newline, ratio, cast_to_fp16=dtype == torch.float16)
    assert torch.equal(ours, released)


@pytest.mark.parametrize("size", [(1152, 300), (384, 1920), (1000, 700), (2304, 2304)])
def test_side_27_ratio_one_is_vanilla(size):
    grid = get_anyres_image_grid_shape(size, ONEVISION_GRID_PINPOINTS, 384)
    num_views = 1 + grid[0] * grid[1]
    views, scores, newline = torch.randn(num_views, 729, 3), torch.randn(num_views, 729), torch.randn(3)
    ours = compress_image_features(views, scores, size, grid, newline, 1.0)
    assert torch.equal(ours, _vanilla(views, size, grid, newline))


# --- the score: [CLS] logits or a [CLS]-free signal ----------------------------------------------

def _outlier_features(outliers):
    """Tower features `[16, 3]` of a 4x4 view: every patch along e0 (tilted by 0.01 * index along
    e2, so none tie) except the `outliers`, along e1. The view's mean is nearly e0, so the outliers
    have the lowest cosine to it: `neg_cos_mean` ranks them first."""
    features = torch.zeros(16, 3)
    features[:, 0], features[:, 2] = 1.0, 0.01 * torch.arange(16)
    features[outliers] = torch.tensor([0.0, 1.0, 0.0])
    return features


def _peaked(cells, low=0.0, high=1.0):
    """A `[16]` signal, `high` at `cells` and `low` elsewhere, plus 1e-3 * index against ties."""
    signal = torch.full((16,), low) + 1e-3 * torch.arange(16)
    signal[cells] = high
    return signal


# Each score's signal for a thumbnail and one crop (side 4), preferring known cells: the [CLS]
# logits peak at thumbnail cells 0, 1 and crop cells 2, 7; `neg_cos_mean` (from hand-made tower
# features) at 5, 10 and 6, 9; `neg_attn` (minus attention received: 1/16 for most patches, .01
# for the least attended) at 3, 12 and 8, 13.
SCORE_CASES = {
    "cls": (torch.stack([_peaked([0, 1], high=9.0), _peaked([2, 7], high=9.0)]), {0, 1}, {2, 7}),
    "neg_cos_mean": (negative_cosine_to_mean(torch.stack([_outlier_features([5, 10]), _outlier_features([6, 9])])),
                     {5, 10}, {6, 9}),
    "neg_attn": (torch.stack([_peaked([3, 12], -1 / 16, -0.01), _peaked([8, 13], -1 / 16, -0.01)]), {3, 12}, {8, 13}),
}


@pytest.mark.parametrize("score", list(SCORE_CASES))
def test_the_score_decides_which_tokens_are_kept(score):
    # One whole crop (400x400 on 1x1, side 4); R = 0.15 keeps int(16 R) = 2 thumbnail and 2 crop
    # tokens (a lone crop's ratio is R up to an ulp, so int(16 R) at R = 0.125 could be 1: released).
    signal, thumbnail_cells, crop_cells = SCORE_CASES[score]
    geometry = crop_geometry((400, 400), (1, 1), 4)
    budget = Budget.resolve(geometry, 0.15)
    method = get_method("globalcom2")
    kept = {}
    for scores in ("local", "global"):
        args = parse_method_args("globalcom2", [f"score={score}", f"scores={scores}"])
        # Only the chosen signal is handed over: a read of another would raise KeyError.
        selection = method.select(torch.zeros(2, 16, 1), {SCORE_SIGNALS[score]: signal}, geometry, budget, args)
        assert set(selection.thumbnail_indices.tolist()) == thumbnail_cells
        kept[scores] = set(torch.nonzero(selection.crop_keep_mask[0])[:, 0].tolist())
    # The crop's own signal (local) and the thumbnail's (global: a 4x4 map resized to the crop's
    # 4x4 canvas is itself) both come from the chosen source.
    assert kept == {"local": crop_cells, "global": thumbnail_cells}


def test_the_score_chooses_the_signal_the_tower_computes():
    method = get_method("globalcom2")
    assert method.needs == {"cls_logits_last", "neg_cos_mean", "neg_attn"}  # what it may read
    for score, signal in SCORE_SIGNALS.items():
        args = parse_method_args("globalcom2", [f"score={score}"])
        assert method.signals_for(args, budget_keeps_all=False) == {signal}
        assert method.signals_for(args, budget_keeps_all=True) == frozenset()  # vanilla, unlooked
        composed = parse_method_args("globalcom2+fastv", [f"globalcom2.score={score}"])
        assert get_method("globalcom2+fastv").signals_for(composed, budget_keeps_all=False) == {signal}
        assert CompressionSettings("globalcom2", args, 0.25, "official").signals == {signal}
    assert method.signals_for(GlobalCom2Args(), False) == {"cls_logits_last"}  # the released default
    assert "by default cls_logits_last" in describe("globalcom2")
    with pytest.raises(ValueError, match="score='cls_attn' is not one of cls, neg_cos_mean, neg_attn"):
        parse_method_args("globalcom2", ["score=cls_attn"])


# --- OneVision's downsampled canvas (shared/spec issue 15, item 3) ------------------------------------

# 600x600 on a 3x3 grid of side 2 with anyres_max_1: the 6x6 unpadded canvas is sent downsampled to 2x2
# (times = sqrt(36 / 4) = 3), so vanilla sends 4 + 4 = 8 image tokens of the 40 cells offered.
DOWNSAMPLED = crop_geometry((600, 600), (3, 3), 2, True, max_num_patches=1)


def test_budget_on_a_downsampled_canvas_keeps_r_of_what_vanilla_sends():
    assert DOWNSAMPLED.downsampled_shape == (2, 2) and DOWNSAMPLED.vanilla_image_tokens == 8
    budget = Budget.resolve(DOWNSAMPLED, 0.5)
    # N = round(0.5 * 8) = 4 of the 40 cells offered; R itself kept for rules written in R.
    assert (budget.tokens, budget.ratio, budget.sent_ratio, budget.vanilla_ratio) == (4, 4 / 40, 0.5, 0.5)
    stated = Budget.resolve(DOWNSAMPLED, visual_tokens=2)
    assert (stated.tokens, stated.vanilla_ratio) == (2, 2 / 8)
    assert Budget.resolve(DOWNSAMPLED, 1.0).keeps_all
    # A canvas sent as it is: unchanged (no sent_ratio, vanilla_ratio is the ratio).
    whole = crop_geometry((600, 600), (3, 3), 2, True, max_num_patches=9)
    assert Budget.resolve(whole, 0.5) == Budget(0.5, 40, model_vanilla_image_tokens=40)


@pytest.mark.parametrize("budget, thumbnail, crops", [
    # released: int(4 * 0.5) = 2 thumbnail tokens; each crop int(4 * 0.5 * f) with f = 4 / 36: 0.
    ("released", 2, [0] * 9),
    # exact: 4 tokens shared in proportion to 2 and nine times 4 * 0.5 / 9: thumbnail 2, then the two
    # largest remainders (equal, so the lowest crops) 1 each.
    ("exact", 2, [1, 1, 0, 0, 0, 0, 0, 0, 0]),
])
def test_counts_on_a_downsampled_canvas_by_hand(budget, thumbnail, crops):
    scores = torch.rand(10, 4, generator=torch.Generator().manual_seed(0))
    args = GlobalCom2Args(allocation="uniform", budget=budget)
    selection = select_tokens(scores, DOWNSAMPLED, Budget.resolve(DOWNSAMPLED, 0.5), args)
    assert selection.thumbnail_indices.tolist() == torch.argsort(scores[0], descending=True)[:thumbnail].tolist()
    assert selection.crop_kept_counts == crops
    assert selection.extra["crop_ratios"] == [0.5] * 9 and selection.extra["canvas_scale"] == round(1 / 9, 6)


def test_visual_token_count_on_onevision():
    count = functools.partial(visual_token_count, grid_pinpoints=ONEVISION_GRID_PINPOINTS, side=27, crop_size=384,
                              max_num_patches=9)
    # 2304x2304: 6x6 crops of 27x27 (162x162 cells, no padding) sent as 81x81. R = 1: vanilla's
    # 729 + 81 * 81 tokens and 81 newlines; R = 0.25: round(0.25 * 7290) = 1822 and a newline per
    # canvas row (6 * 27, the packed sequence).
    assert count((2304, 2304), retention_ratio=1.0) == 729 + 81 * 82
    assert count((2304, 2304), retention_ratio=0.25) == 1822 + 162
    assert count((2304, 2304), retention_ratio=0.25, layout="spatial") == 1822 + 162
    # 800x500: 3x2 crops, unpadded to 50 rows of 81 cells, not downsampled.
    assert count((800, 500), retention_ratio=1.0) == 729 + 50 * 82
    assert count((800, 500), retention_ratio=0.25) == round(0.25 * (729 + 50 * 81)) + 54
