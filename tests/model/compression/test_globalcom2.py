"""GlobalCom2's pure functions on small grids, with expected values worked out by hand.

Conventions in the layout tests: features have D = 1 and value `100 * view + cell` (view 0 is
the thumbnail, crop c is view c + 1), and the newline is -1, so a sequence reads as a list of
token names.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from PIL import Image

from llava.mm_utils import get_anyres_image_grid_shape, unpad_image
from llava.mm_utils import process_images
from llava.model.compression.common import Budget, Selection, arrange_tokens, crop_geometry
from llava.model.compression.globalcom2 import (
    GlobalCom2Args,
    compress_image_features,
    compress_thumbnail,
    crop_ratios,
    generate_scale_for_crop_features,
    interpolate_and_split_cls_attn_scores,
    select_crop_tokens,
    select_tokens,
    visual_token_count,
)
from llava.model.globalcom2_released import released_compress_image
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
