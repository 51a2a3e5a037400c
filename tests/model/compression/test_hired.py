"""HiRED: the budget split and the per-view top-k worked by hand on side-4 views, the official
sequence (H2's swapped canvas, H3's dropped padding, no newlines), the corrections, a restatement
of the released functions compared on random inputs with ties, the budget rule on random image
sizes, and the model's glue on the tiny checkpoint.

Features are named: value `100 * view + cell` (D = 1; `1000 * view + cell` for side-24 views),
newline -1, so a sequence reads as the list of cells the language model receives.
"""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from llava.mm_utils import get_anyres_image_grid_shape, process_images
from llava.model.compression import get_method, parse_method_args
from llava.model.compression.common import Budget, arrange_tokens, crop_geometry, keep_mask, view_image_areas
from llava.model.compression.hired import HiREDArgs, crop_budgets, select, thumbnail_partition
from llava.tiny import V16_PINPOINTS
from support import noise_image

NEWLINE = -1.0
FIRST, PENULTIMATE = "cls_attn_heads_first", "cls_attn_heads_penultimate"


def _named_views(num_views, side, base=100):
    """`[V, P, 1]`: cell `p` of view `v` named `base * v + p` (`base` 1000 for side-24 views)."""
    cells = torch.arange(side * side, dtype=torch.float32)
    return torch.stack([base * view + cells for view in range(num_views)])[..., None]


def _heads(scores):
    """`[V, P]` scores as two heads `[V, 2, P]` that sum back to them (HiRED sums its heads)."""
    return torch.stack([scores * 0.25, scores * 0.75], dim=1)


def _run(size, grid, side, first, penultimate, args=HiREDArgs(), ratio=None, visual_tokens=None, layout="official"):
    """The selection and the named sequence, on the geometry the glue builds (spatial_unpad)."""
    geometry = crop_geometry(size, grid, side, unpad=True)
    views = _named_views(first.shape[0], side)
    selection = select(views, {FIRST: _heads(first), PENULTIMATE: _heads(penultimate)}, geometry,
                       Budget.resolve(geometry, ratio, visual_tokens), args)
    newline = torch.tensor([NEWLINE])
    return selection, arrange_tokens(views, selection, newline, layout)[:, 0].int().tolist()


# --- by hand: a square 2x2 grid of side-4 crops, no padding -------------------------------------
# 672x672 on 2x2: the 8x8 canvas is all image. V = 5, P = 16; R = 0.25: total = int(5 * 16 * 0.25)
# = 20, full = min(int(20 * 0.5), 16) = 10, sub = min(20 - 10, 64) = 10; int(16 * 0.5) = 8 marks.
# Layer 0 marks the thumbnail cells 0, 1, 2, 3 (row 0), 4, 5 (row 1), 10, 11 (row 2).
SQUARE_FIRST = torch.ones(5, 16)
SQUARE_FIRST[0, [0, 1, 2, 3, 4, 5, 10, 11]] = 2.0
# Layer 22 ranks every view's cells by their number: view v keeps its highest-numbered cells.
SQUARE_PENULTIMATE = torch.arange(16.0).expand(5, 16).clone()


def test_bands_split_the_crop_budget_and_each_view_keeps_its_top_k():
    # Bands (H1): 4 runs of 4 cells = thumbnail rows 0..3, holding 4, 2, 2, 0 marks:
    # b = int([4, 2, 2, 0] / 8 * 10) = [5, 2, 2, 0] (2.5 -> 2: one token lost, H4).
    # Thumbnail: cells 6..15. Crop 1 (top left) keeps 11..15, crops 2 and 3 keep 14, 15.
    # Canvas rows: row 2 holds crop 1's 11 (its local row 2); row 3 its 12..15 then crop 2's 14, 15;
    # row 7 crop 3's 14, 15. No newline anywhere.
    selection, sequence = _run((672, 672), (2, 2), 4, SQUARE_FIRST, SQUARE_PENULTIMATE, ratio=0.25)
    assert selection.extra == dict(total_budget=20, full_budget=10, sub_budget=10, crop_budgets=[5, 2, 2, 0])
    assert sequence == [*range(6, 16), 111, 112, 113, 114, 115, 214, 215, 314, 315]
    assert selection.geometry.unpad  # a square grid: the model's own geometry


def test_crops_partition_counts_the_marks_in_each_crops_own_block():
    # partition=crops: crop (0, 0) shows thumbnail rows 0-1, cols 0-1 (marks 0, 1, 4, 5), crop
    # (0, 1) rows 0-1, cols 2-3 (2, 3), crop (1, 0) none, crop (1, 1) rows 2-3, cols 2-3 (10, 11):
    # b = int([4, 2, 0, 2] / 8 * 10) = [5, 2, 0, 2].
    selection, sequence = _run((672, 672), (2, 2), 4, SQUARE_FIRST, SQUARE_PENULTIMATE,
                               HiREDArgs(partition="crops"), ratio=0.25)
    assert selection.extra["crop_budgets"] == [5, 2, 0, 2]
    assert sequence == [*range(6, 16), 111, 112, 113, 114, 115, 214, 215, 414, 415]


def test_anyres_sends_the_same_cells_in_the_models_layout_with_newlines():
    # The same kept cells on the real canvas, a newline after each of its 8 image rows.
    selection, sequence = _run((672, 672), (2, 2), 4, SQUARE_FIRST, SQUARE_PENULTIMATE, HiREDArgs(mode="anyres"),
                               ratio=0.25)
    assert sequence == [*range(6, 16), NEWLINE, NEWLINE, 111, NEWLINE, 112, 113, 114, 115, 214, 215, NEWLINE,
                        NEWLINE, NEWLINE, NEWLINE, 314, 315, NEWLINE]
    assert selection.sequence is None and selection.extra["crop_budgets"] == [5, 2, 2, 0]


# --- by hand: H2 and H3 on a non-square grid with letterbox padding ------------------------------
# 800x200 on a 2x1 grid (2 columns, 1 row) of side-4 crops. The real canvas is 4 rows x 8 columns,
# image rows 1-2 (new height int(200 * 8 / 800) = 2, padding 1): each crop's image cells are 4..11.
# The official pack lays the crops swapped (H2): crop 0 above crop 1, 8 rows x 4 columns, and
# unpads that canvas: new height int(200 * 4 / 800) = 1, padding (8 - 1) // 2 = 3, rows [3, 5):
# crop 0's local row 3 (cells 12..15) and crop 1's local row 0 (cells 0..3), letterbox padding
# both, while every image cell of the crops is dropped.
# V = 3, R = 0.5: total = int(3 * 16 * 0.5) = 24, full = 12, sub = 12. The 8 marks: 0..5 (rows 0-1)
# and 8, 9 (rows 2-3); the bands are rows 0-1 and 2-3: b = int([6, 2] / 8 * 12) = [9, 3].
WIDE_FIRST = torch.ones(3, 16)
WIDE_FIRST[0, [0, 1, 2, 3, 4, 5, 8, 9]] = 2.0
WIDE_PENULTIMATE = torch.stack([torch.arange(16.0), torch.arange(16.0), 15 - torch.arange(16.0)])
# Thumbnail keeps 4..15; crop 0 (view 1) keeps 7..15; crop 1 (view 2) keeps 0, 1, 2.


def test_official_grid_swap_sends_padding_and_drops_the_image():
    selection, sequence = _run((800, 200), (2, 1), 4, WIDE_FIRST, WIDE_PENULTIMATE, ratio=0.5)
    assert selection.extra == dict(total_budget=24, full_budget=12, sub_budget=12, crop_budgets=[9, 3])
    # 24 selected, 19 sent: of crop 0 only 12..15, of crop 1 0, 1, 2.
    assert sequence == [*range(4, 16), 112, 113, 114, 115, 200, 201, 202]
    # Padding cells are sent, so the selection lies on the canvas without unpadding.
    assert not selection.geometry.unpad and selection.crop_kept_counts == [4, 3]
    record = selection.accounting("official", selection.geometry.with_unpad(True))
    assert record["vanilla_image_tokens"] == 16 + 8 + 8 and record["realised_ratio"] == 19 / 32
    assert record["newline_tokens"] == 0
    # The spatial layout: the same cells in raster order on the real canvas (row 0: crop 1's 0..2;
    # row 3: crop 0's 12..15), no newline.
    _, spatial = _run((800, 200), (2, 1), 4, WIDE_FIRST, WIDE_PENULTIMATE, ratio=0.5, layout="spatial")
    assert spatial == [*range(4, 16), 200, 201, 202, 112, 113, 114, 115]


def test_correct_grid_drops_only_the_real_padding():
    # The real canvas: rows 1 and 2. Crop 0's kept 7..11 are image (7 in row 1, 8..11 in row 2),
    # crop 1's 0..2 are padding (H3).
    selection, sequence = _run((800, 200), (2, 1), 4, WIDE_FIRST, WIDE_PENULTIMATE, HiREDArgs(grid="correct"),
                               ratio=0.5)
    assert sequence == [*range(4, 16), 107, 108, 109, 110, 111]
    assert selection.geometry.unpad and selection.crop_kept_counts == [5, 0]
    _, anyres = _run((800, 200), (2, 1), 4, WIDE_FIRST, WIDE_PENULTIMATE, HiREDArgs(mode="anyres"), ratio=0.5)
    assert anyres == [*range(4, 16), 107, NEWLINE, 108, 109, 110, 111, NEWLINE]


def test_matched_budget_spends_it_on_the_cells_sent():
    # N_van = 16 + 8 + 8 = 32: total = round(0.5 * 32) = 16, full = 8, sub = 8; b = int([6, 2] / 8 * 8)
    # = [6, 2], crop 0 capped at the 4 cells the official canvas sends from it (12..15).
    # Thumbnail 8..15; crop 0 12..15; crop 1 its two best of 0..3 by 15 - cell: 0, 1.
    selection, sequence = _run((800, 200), (2, 1), 4, WIDE_FIRST, WIDE_PENULTIMATE, HiREDArgs(budget="matched"),
                               ratio=0.5)
    assert selection.extra == dict(total_budget=16, full_budget=8, sub_budget=8, crop_budgets=[4, 2])
    assert sequence == [*range(8, 16), 112, 113, 114, 115, 200, 201]
    # With the real canvas the cells sent are each crop's 8 image cells 4..11, so b = [6, 2] fit:
    # crop 0 keeps its best six of them, 6..11, crop 1 its best two by 15 - cell, 4 and 5.
    # Canvas row 1 holds 6, 7 of crop 0 and 4, 5 of crop 1; row 2 holds 8..11 of crop 0.
    selection, sequence = _run((800, 200), (2, 1), 4, WIDE_FIRST, WIDE_PENULTIMATE,
                               HiREDArgs(grid="correct", budget="matched"), ratio=0.5)
    assert selection.extra["crop_budgets"] == [6, 2]
    assert sequence == [*range(8, 16), 106, 107, 204, 205, 108, 109, 110, 111]


def test_a_single_view_is_sent_whole():
    first = penultimate = torch.rand(1, 16)
    selection, sequence = _run((300, 300), (0, 0), 4, first, penultimate, ratio=0.1)
    assert sequence == list(range(16))  # no selection, no newline (image_newline=None)
    _, sequence = _run((300, 300), (0, 0), 4, first, penultimate, HiREDArgs(mode="anyres"), ratio=0.1)
    assert sequence == [*range(16), NEWLINE]  # the model's own single view


def test_full_budget_keeps_every_cell_of_the_official_canvas():
    # R = 1: the official code selects nothing (rate < 1 is false) and packs everything: here H2's
    # rows [3, 5) of the swapped canvas, no newline. In anyres mode: vanilla LLaVA-NeXT.
    selection, sequence = _run((800, 200), (2, 1), 4, WIDE_FIRST, WIDE_PENULTIMATE, ratio=1.0)
    assert sequence == [*range(16), *range(112, 116), *range(200, 204)] and selection.extra == {}
    selection, sequence = _run((800, 200), (2, 1), 4, WIDE_FIRST, WIDE_PENULTIMATE, HiREDArgs(mode="anyres"),
                               ratio=1.0)
    assert selection.keeps_all and sequence == [*range(16), *range(104, 108), *range(204, 208), NEWLINE,
                                                *range(108, 112), *range(208, 212), NEWLINE]
    assert not HiREDArgs().keeps_everything() and HiREDArgs(mode="anyres").keeps_everything()


def test_alpha_extremes():
    # alpha = 0: the thumbnail keeps nothing; all 16 cells are marked, 8 per band: b = [12, 12] of
    # sub = 24 (total int(3 * 16 * 0.5)).
    selection, _ = _run((800, 200), (2, 1), 4, WIDE_FIRST, WIDE_PENULTIMATE, HiREDArgs(alpha=0.0), ratio=0.5)
    assert selection.extra == dict(total_budget=24, full_budget=0, sub_budget=24, crop_budgets=[12, 12])
    # alpha = 1: no mark; the official code divides 0 by 0 (H4) and fails, here the crops keep nothing.
    selection, sequence = _run((800, 200), (2, 1), 4, WIDE_FIRST, WIDE_PENULTIMATE, HiREDArgs(alpha=1.0), ratio=0.5)
    assert selection.extra == dict(total_budget=24, full_budget=16, sub_budget=8, crop_budgets=[0, 0])
    assert sequence == list(range(16))
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\].*1\.5"):
        parse_method_args("hired", ["alpha=1.5"])


def test_visual_tokens_set_the_total():
    # N = 10: total = 10, full = 5, sub = 5; b = int([6, 2] / 8 * 5) = [int(3.75), int(1.25)] = [3, 1].
    # The thumbnail keeps 11..15; crop 0's best three, 13..15, and crop 1's best, 0, are padding
    # of the real canvas (image rows 1-2), so only the thumbnail's are sent.
    selection, sequence = _run((800, 200), (2, 1), 4, WIDE_FIRST, WIDE_PENULTIMATE, visual_tokens=10,
                               args=HiREDArgs(grid="correct"))
    assert selection.extra == dict(total_budget=10, full_budget=5, sub_budget=5, crop_budgets=[3, 1])
    assert sequence == [11, 12, 13, 14, 15]


def test_partitions():
    # Bands: cell i in run i * C // P. Crops on 800x200 (image rows 1-2 of the real 4 x 8 canvas):
    # thumbnail column x maps to canvas column (2x + 1) * 8 // 8, so columns 0-1 -> crop 0, 2-3 -> crop 1.
    geometry = crop_geometry((800, 200), (2, 1), 4)
    assert thumbnail_partition(geometry, "bands", "cpu").tolist() == [0] * 8 + [1] * 8
    assert thumbnail_partition(geometry, "crops", "cpu").tolist() == [0, 0, 1, 1] * 4
    # 6x6 views on 3 crops: bands of 12 cells (2 rows each); crops of a 1x3 grid: 2 rows each too (H1
    # is harmless for grids one crop wide).
    tall = crop_geometry((200, 600), (1, 3), 6)
    assert thumbnail_partition(tall, "bands", "cpu").tolist() == thumbnail_partition(tall, "crops", "cpu").tolist()
    # A padded 2x2 canvas: 1000x500 on 2x2 side 4 keeps canvas rows [2, 6): thumbnail row r maps to
    # canvas row 2 + (2r + 1) * 4 // 8 = 2, 3, 4, 5 -> crop rows 0, 0, 1, 1.
    padded = crop_geometry((1000, 500), (2, 2), 4)
    assert padded.bounds == (2, 6, 0, 8)
    assert thumbnail_partition(padded, "crops", "cpu").view(4, 4).tolist() == [[0, 0, 1, 1]] * 2 + [[2, 2, 3, 3]] * 2


def test_crop_budgets_are_float32_and_truncated():
    # 3 crops, 9 marks split 3/3/3 of sub = 10: 1/3 in float32 times 10 -> 3 each, one lost (H4);
    # a cap below the share wins without redistribution.
    thumbnail = torch.zeros(18)
    thumbnail[[0, 1, 2, 6, 7, 8, 12, 13, 14]] = 1.0
    bands = torch.arange(18) * 3 // 18
    assert crop_budgets(thumbnail, bands, 3, 10, 0.5, [18] * 3) == [3, 3, 3]
    assert crop_budgets(thumbnail, bands, 3, 10, 0.5, [18, 1, 18]) == [3, 1, 3]


# --- the released functions, restated, on random inputs with ties --------------------------------

def _hf_unpad(canvas_height, canvas_width, image_hw):
    """HF's `unpad_image` on a canvas: the rows and columns kept, `image_hw` = (height, width)."""
    original_height, original_width = image_hw
    if original_width / original_height > canvas_width / canvas_height:
        new_height = int(original_height * (canvas_width / original_width))
        padding = (canvas_height - new_height) // 2
        return range(padding, canvas_height - padding), range(canvas_width)
    new_width = int(original_width * (canvas_height / original_height))
    padding = (canvas_width - new_width) // 2
    return range(canvas_height), range(padding, canvas_width - padding)


def _released(features, first_heads, penultimate_heads, image_hw, rows_cols, rate, alpha, swap=True):
    """`HiRED_token_selection` (with `HiRED_sub_img_budgets`) then `pack_HiRED_image_features`
    with `image_newline=None`, for one image: features `[V, P, D]` -> the sequence `[M, D]`.
    `rows_cols`: what HF's `get_anyres_image_grid_shape` returns; the released code unpacks it as
    (width, height) (H2); `swap=False` is our correction."""
    num_views, num_patches = features.shape[:2]
    side = math.isqrt(num_patches)
    if num_views == 1:
        return features[0]
    width, height = rows_cols if swap else rows_cols[::-1]
    top = first_heads.sum(dim=1)            # layer 0, heads summed
    bottom = penultimate_heads.sum(dim=1)   # layer 22
    mask = torch.zeros(num_views, num_patches, dtype=torch.bool)
    if rate < 1.0:
        total = int(num_views * num_patches * rate)
        full = min(int(total * alpha), num_patches)
        sub = min(total - full, (num_views - 1) * num_patches)
        mask[0, bottom[0].topk(full, largest=True).indices] = True
        if sub > 0:
            marks = torch.zeros(num_patches, dtype=torch.bool)
            marks[top[0].topk(int(num_patches * (1 - alpha)), largest=True).indices] = True
            per_chunk = marks.reshape(height, width, -1).sum(dim=-1).reshape(-1)
            budgets = torch.clamp((per_chunk / per_chunk.sum() * sub).int(), max=num_patches)
            for crop, budget in enumerate(budgets.tolist()):
                mask[crop + 1, bottom[crop + 1].topk(budget, largest=True).indices] = True
    else:
        mask[:] = True
    # The crops viewed as (height, width) crops of side x side, laid on one canvas, unpadded, read row by row.
    rows, columns = _hf_unpad(height * side, width * side, image_hw)
    kept = mask.tolist()
    tokens = [features[0][mask[0]]]
    for y in rows:
        for x in columns:
            crop, cell = (y // side) * width + x // side, (y % side) * side + x % side
            if kept[1 + crop][cell]:
                tokens.append(features[1 + crop, cell][None])
    return torch.cat(tokens)


def _tied_heads(num_views, generator, dtype, num_patches=576):
    """Per-head scores `[V, 2, P]` drawn from 4 levels, so head sums tie often."""
    return (torch.randint(0, 4, (num_views, 2, num_patches), generator=generator) / 8).to(dtype)


@settings(max_examples=120, deadline=None)
@given(width=st.integers(1, 5000), height=st.integers(1, 5000),
       rate=st.one_of(st.sampled_from([0.5, 0.4, 0.2, 0.1, 0.05, 0.01]), st.floats(0.001, 0.999)),
       alpha=st.sampled_from([0.5, 0.25, 0.75, 0.0]), grid_choice=st.sampled_from(["official", "correct"]),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]), seed=st.integers(0, 10**6))
def test_faithful_equals_the_released_functions(width, height, rate, alpha, grid_choice, dtype, seed):
    size = (width, height)
    grid = get_anyres_image_grid_shape(size, V16_PINPOINTS, 336)
    num_views = 1 + grid[0] * grid[1]
    generator = torch.Generator().manual_seed(seed)
    first, penultimate = _tied_heads(num_views, generator, dtype), _tied_heads(num_views, generator, dtype)
    views = _named_views(num_views, 24, 1000)
    geometry = crop_geometry(size, grid, 24, unpad=True)
    selection = select(views, {FIRST: first, PENULTIMATE: penultimate}, geometry, Budget.resolve(geometry, rate),
                       HiREDArgs(alpha=alpha, grid=grid_choice))
    ours = arrange_tokens(views, selection, torch.tensor([NEWLINE]), "official")
    released = _released(views, first, penultimate, (height, width), (grid[1], grid[0]), rate, alpha,
                         swap=grid_choice == "official")
    assert torch.equal(ours, released)
    assert selection.tokens_after("official") == released.shape[0]


# --- the budget rule over random image sizes ------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 5000), height=st.integers(1, 5000), ratio=st.floats(0.001, 0.999),
       budget=st.sampled_from(["paper", "matched"]), seed=st.integers(0, 99))
def test_budget_rule_on_random_sizes(width, height, ratio, budget, seed):
    """Restated from the spec (section 3, 5): total, full, sub; the crop budgets sum to sub less
    at most C - 1 (H4) unless capped; what is sent is full plus the kept crop cells the layout keeps."""
    size = (width, height)
    grid = get_anyres_image_grid_shape(size, V16_PINPOINTS, 336)
    crops = grid[0] * grid[1]
    geometry = crop_geometry(size, grid, 24, unpad=True)
    generator = torch.Generator().manual_seed(seed)
    signals = {FIRST: torch.rand(1 + crops, 2, 576, generator=generator),
               PENULTIMATE: torch.rand(1 + crops, 2, 576, generator=generator)}
    args = HiREDArgs(budget=budget, grid="correct")
    selection = select(_named_views(1 + crops, 24, 1000), signals, geometry, Budget.resolve(geometry, ratio), args)
    total = int((1 + crops) * 576 * ratio) if budget == "paper" else round(ratio * geometry.vanilla_image_tokens)
    full = min(int(total * 0.5), 576)
    sub = min(total - full, crops * 576)
    extra = selection.extra
    assert (extra["total_budget"], extra["full_budget"], extra["sub_budget"]) == (total, full, sub)
    caps = geometry.valid_counts if budget == "matched" else [576] * crops
    budgets = extra["crop_budgets"]
    assert all(0 <= each <= cap for each, cap in zip(budgets, caps)) and sum(budgets) <= sub
    if sub > 0 and not any(each == cap for each, cap in zip(budgets, caps)):
        # C - 1 lost to truncation, one more where the float32 shares sum just below 1.
        assert sum(budgets) >= sub - crops
    kept = keep_mask(selection)
    assert kept[0].sum() == full and selection.image_tokens == full + sum(selection.crop_kept_counts)
    if budget == "matched":  # only image cells were eligible: nothing is dropped
        assert selection.crop_kept_counts == budgets
    else:
        assert all(kept_count <= each for kept_count, each in zip(selection.crop_kept_counts, budgets))
    record = selection.accounting("official")
    assert record["newline_tokens"] == 0 and record["image_tokens"] <= record["vanilla_image_tokens"]


def test_the_specs_worked_examples():
    """Spec sections 4 and 5 at rate 0.2, alpha 0.5."""
    generator = torch.Generator().manual_seed(0)

    def run(size, grid, grid_choice):
        views = 1 + grid[0] * grid[1]
        signals = {name: torch.rand(views, 2, 576, generator=generator) for name in (FIRST, PENULTIMATE)}
        geometry = crop_geometry(size, grid, 24)
        return select(_named_views(views, 24, 1000), signals, geometry, Budget.resolve(geometry, 0.2),
                      HiREDArgs(grid=grid_choice))

    # HiRED-20% on a 2x2 image: 576 in all, 288 for the thumbnail, 288 over the crops.
    assert run((1000, 700), (2, 2), "official").extra["total_budget"] == 576
    assert run((1000, 700), (2, 2), "official").extra["full_budget"] == 288
    # 1000x500 (h x w) portrait, 2 rows x 1 column: total int(3 * 576 * 0.2) = 345, full 172, sub 173.
    # The real canvas (48 x 24) is all image, so with the correct grid every selected token is sent.
    correct = run((500, 1000), (1, 2), "correct")
    assert (correct.extra["total_budget"], correct.extra["full_budget"], correct.extra["sub_budget"]) == (345, 172, 173)
    assert correct.image_tokens == 172 + sum(correct.extra["crop_budgets"]) >= 345 - 2  # H4: up to C lost
    # H2: the 24 x 48 canvas keeps columns [18, 30) (new width int(500 * 24 / 1000) = 12): crop 0's
    # columns 18..23 and crop 1's 0..5, whatever the budgets.
    official = run((500, 1000), (1, 2), "official")
    kept = keep_mask(official).view(3, 24, 24)
    assert not kept[1, :, :18].any() and not kept[2, :, 6:].any()
    assert official.image_tokens < 172 + sum(official.extra["crop_budgets"])
    # 300x1000 (h x w) landscape, 1 row x 3 columns: H2's 72 x 24 canvas keeps rows [32, 40)
    # (new height int(300 * 24 / 1000) = 7, padding 32), all inside crop 1, its local rows 8..15.
    official = run((1000, 300), (3, 1), "official")
    kept = keep_mask(official).view(4, 24, 24)
    assert not kept[1].any() and not kept[3].any() and not kept[2, :8].any() and not kept[2, 16:].any()
    # The correct canvas keeps rows [1, 23) of every crop (new height int(300 * 72 / 1000) = 21).
    correct = run((1000, 300), (3, 1), "correct")
    kept = keep_mask(correct).view(4, 24, 24)
    assert not kept[1:, 0].any() and not kept[1:, 23].any() and kept[1:, 1:23].any()


@pytest.mark.parametrize("size", [(1000, 700), (800, 200), (1000, 300), (500, 1000), (20, 2000), (5000, 2)])
@pytest.mark.parametrize("args", [HiREDArgs(), HiREDArgs(mode="anyres"), HiREDArgs(grid="correct", budget="matched"),
                                  HiREDArgs(mode="anyres", partition="crops", budget="matched")])
@pytest.mark.parametrize("layout", ["official", "spatial"])
def test_every_mode_sends_what_it_accounts_distinct_cells_of_its_geometry(size, args, layout):
    """The contract's points for the non-default arguments (the contract runs the default): the
    sequence is as long as the accounting says, its cells are distinct and lie in the selection's
    geometry, and anyres at a full budget is vanilla."""
    grid = get_anyres_image_grid_shape(size, V16_PINPOINTS, 336)
    views = 1 + grid[0] * grid[1]
    generator = torch.Generator().manual_seed(1)
    signals = {name: torch.rand(views, 2, 576, generator=generator) for name in (FIRST, PENULTIMATE)}
    geometry = crop_geometry(size, grid, 24)
    named = _named_views(views, 24, 1000)
    for ratio in (0.5, 0.1, 0.01, 1.0):
        selection = select(named, signals, geometry, Budget.resolve(geometry, ratio), args)
        sequence = arrange_tokens(named, selection, torch.tensor([NEWLINE]), layout)[:, 0]
        assert sequence.shape[0] == selection.tokens_after(layout)
        cells = sequence[sequence != NEWLINE].long()
        assert cells.unique().numel() == cells.numel() == selection.image_tokens
        in_geometry = view_image_areas(selection.geometry, "cpu")
        assert in_geometry[cells // 1000, cells % 1000].all()
    if args.mode == "anyres":  # the last ratio, 1: vanilla LLaVA-NeXT
        assert selection.keeps_all and selection.image_tokens == geometry.vanilla_image_tokens


def test_bad_signal_shape_is_a_clear_error():
    geometry = crop_geometry((800, 200), (2, 1), 4)
    with pytest.raises(ValueError, match=r"cls_attn_heads_first must have shape \[3, H, 16\]"):
        select(_named_views(3, 4), {FIRST: torch.zeros(3, 15), PENULTIMATE: torch.zeros(3, 1, 16)}, geometry,
               Budget.resolve(geometry, 0.5))


def test_registration_declares_both_signals_and_no_input_change():
    method = get_method("hired")
    assert method.needs == {FIRST, PENULTIMATE} and method.stage == "pre-llm"
    assert method.input_changes(HiREDArgs()) == {} and method.input_changes(HiREDArgs(mode="anyres")) == {}


# --- through the model ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1000, 700), (1000, 300)])
def test_the_models_sequence_is_the_released_one_on_the_towers_signals(tiny, model, size):
    _, _, processor = tiny
    image = noise_image(size, 5)
    pixel_values = process_images([image], processor, model.config)
    model.set_compression(0.2, method="hired")
    assert model.compression_settings().signals == {FIRST, PENULTIMATE}
    with torch.no_grad():
        sequence, = model.encode_image_sequences(pixel_values, [image.size])
        features, signals = model.encode_images(pixel_values[0], {FIRST, PENULTIMATE})
    record = model.last_accounting[0]
    grid = get_anyres_image_grid_shape(size, V16_PINPOINTS, 336)
    released = _released(features, signals[FIRST], signals[PENULTIMATE], size[::-1], grid[::-1], 0.2, 0.5)
    assert torch.equal(sequence, released)
    # Accounting against the model's own vanilla sequence; no newline is sent.
    vanilla = crop_geometry(size, grid, 24)
    assert record["vanilla_image_tokens"] == vanilla.vanilla_image_tokens
    assert record["tokens_before"] == vanilla.vanilla_image_tokens + vanilla.newline_count("raster")
    assert record["newline_tokens"] == 0 and record["tokens_after"] == sequence.shape[0] == record["image_tokens"]
    assert record["total_budget"] == int(len(features) * 576 * 0.2) and record["method"] == "hired"
    assert math.isclose(record["realised_ratio"], sequence.shape[0] / vanilla.vanilla_image_tokens)


def test_anyres_mode_through_the_model_has_the_models_newlines(tiny, model):
    _, _, processor = tiny
    image = noise_image((1000, 700), 5)
    pixel_values = process_images([image], processor, model.config)
    model.set_compression(0.2, method="hired", method_args=["mode=anyres"])
    with torch.no_grad():
        sequence, = model.encode_image_sequences(pixel_values, [image.size])
    record = model.last_accounting[0]
    newline = model.get_model().image_newline
    assert record["newline_tokens"] == 34 and int((sequence == newline).all(dim=1).sum()) == 34
    assert record["tokens_after"] == sequence.shape[0] and record["image_tokens"] <= 576
    model.set_compression(1.0, method="hired", method_args=["mode=anyres"])
    assert model.compression_settings().signals == frozenset()  # vanilla: no score needed


def test_end_to_end_through_the_loader_runner(loader_answers):
    rows = loader_answers([(80, 50), (300, 40)], "--method", "hired", "--retention-ratio", "0.2",
                          "--method-arg", "partition=crops", colour_step=90, max_new_tokens=1)
    assert [row["question_id"] for row in rows] == [0, 1]
    for row in rows:
        meta = row["metadata"]
        assert meta["method"] == "hired" and meta["method_args"]["partition"] == "crops"
        image = meta["images"][0]
        assert image["newline_tokens"] == 0 and meta["visual_tokens"] == image["tokens_after"]
        selected = image["full_budget"] + sum(image["crop_budgets"])
        assert image["image_tokens"] <= selected < image["vanilla_image_tokens"]
