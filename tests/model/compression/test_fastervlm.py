"""FasterVLM: per-view top-T by layer -2's [CLS] attention, worked by hand on side-4 views, the
count rules of both modes and budgets, the spec's worked example, and the model's glue.

Features are named: value `100 * view + cell` (D = 1), newline -1, so a sequence reads as the list
of cells the language model receives.
"""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings, strategies as st

from llava.mm_utils import get_anyres_image_grid_shape, process_images
from llava.model.compression import get_method
from llava.model.compression.common import Budget, arrange_tokens, crop_geometry, keep_mask, view_image_areas
from llava.model.compression.fastervlm import FasterVLMArgs, official_input, select, view_token_counts
from llava.tiny import V16_PINPOINTS
from support import noise_image

NEWLINE = -1.0
FAITHFUL, ANYRES = FasterVLMArgs(), FasterVLMArgs(mode="anyres")


def _named_views(views, side):
    cells = torch.arange(side * side, dtype=torch.float32)
    return torch.stack([100 * view + cells for view in range(views)])[..., None]


def _scores(named, side):
    """`[V, P]` scores: `named[v]` maps cells of view v to their score, every other cell 0."""
    scores = torch.zeros(len(named), side * side)
    for view, cell_scores in enumerate(named):
        for cell, score in cell_scores.items():
            scores[view, cell] = score
    return scores


def _sequence(size, grid, side, ratio, args, scores):
    """The named sequence FasterVLM sends, on the geometry the glue builds for `args`' mode."""
    geometry = crop_geometry(size, grid, side, unpad=args.mode == "anyres")
    views = _named_views(scores.shape[0], side)
    selection = select(views, {"cls_attn_penultimate": scores}, geometry, Budget.resolve(geometry, ratio), args)
    newline = torch.tensor([NEWLINE]) if geometry.unpad else None
    return selection, arrange_tokens(views, selection, newline)[:, 0].tolist()


# 800x200 on a 2x1 grid of side-4 crops: the canvas is 4 rows x 8 columns; unpadded, the image
# holds rows 1-2 only (new height int(200 * 8 / 800) = 2, padding 1 above and below), so each
# crop has 2 x 4 = 8 image cells (cells 4..11). Each view names five scores, the rest are 0.
HAND_SCORES = [
    {2: 4.0, 13: 3.0, 6: 2.0, 9: 1.0, 0: 0.5},    # thumbnail
    {0: 9.0, 1: 8.0, 5: 7.0, 10: 6.0, 6: 5.0},    # left crop: its two best cells are padding
    {15: 9.0, 7: 8.0, 4: 7.0, 3: 6.0, 9: 5.0},    # right crop: its first and fourth are padding
]


def test_faithful_keeps_the_top_t_of_every_view_padding_included_without_newlines():
    # R = 0.25: T = round(16 / 4) = 4 in every view. Thumbnail {2, 13, 6, 9} in raster order; the
    # left crop {0, 1, 5, 10}, the right {15, 7, 4, 3}; the canvas row by row: row 0 holds left
    # 0, 1 and right 3; row 1 left 5, right 4, 7; row 2 left 10; row 3 right 15. No newline.
    selection, sequence = _sequence((800, 200), (2, 1), 4, 0.25, FAITHFUL, _scores(HAND_SCORES, 4))
    assert sequence == [2, 6, 9, 13, 100, 101, 203, 105, 204, 207, 110, 215]
    assert selection.extra == dict(view_tokens=[4, 4, 4])
    # Against the model's own vanilla sequence (unpadded: 16 + 8 + 8 image cells) that is 12 of 32.
    record = selection.accounting("official", selection.geometry.with_unpad(True))
    assert record["vanilla_image_tokens"] == 32 and record["realised_ratio"] == 12 / 32


def test_anyres_keeps_the_top_share_of_each_crops_image_cells_with_newlines():
    # R = 0.25: the thumbnail keeps round(16 / 4) = 4, each crop round(8 / 4) = 2 of its image
    # cells 4..11: left {5, 10}, right {7, 4}. Rows 1 and 2 are the image rows, each ends with a newline.
    selection, sequence = _sequence((800, 200), (2, 1), 4, 0.25, ANYRES, _scores(HAND_SCORES, 4))
    assert sequence == [2, 6, 9, 13, 105, 204, 207, NEWLINE, 110, NEWLINE]
    assert selection.extra["view_tokens"] == [4, 2, 2]


def test_a_single_view_keeps_its_top_t_in_raster_order():
    scores = _scores([{11: 5.0, 3: 4.0, 14: 3.0, 0: 2.0}], 4)
    _, sequence = _sequence((300, 300), (0, 0), 4, 0.25, FAITHFUL, scores)
    assert sequence == [0, 3, 11, 14]


def test_full_budget_keeps_every_cell_of_the_input_it_gets():
    faithful, sequence = _sequence((800, 200), (2, 1), 4, 1.0, FAITHFUL, _scores(HAND_SCORES, 4))
    assert faithful.keeps_all and len(sequence) == 3 * 16 and NEWLINE not in sequence  # the official "2880" row
    anyres, sequence = _sequence((800, 200), (2, 1), 4, 1.0, ANYRES, _scores(HAND_SCORES, 4))
    assert anyres.keeps_all and len(sequence) == 16 + 16 + 2


# --- the count rules ----------------------------------------------------------------------------

def _counts(size, ratio=None, args=FAITHFUL, visual_tokens=None, side=24):
    grid = get_anyres_image_grid_shape(size, V16_PINPOINTS, 336)
    geometry = crop_geometry(size, grid, side, unpad=args.mode == "anyres")
    return view_token_counts(geometry, Budget.resolve(geometry, ratio, visual_tokens), args)


@pytest.mark.parametrize("ratio, per_view", [(0.25, 144), (0.1, 58), (0.05, 29)])
def test_paper_budget_is_the_papers_table(ratio, per_view):
    """EVAL.md's LLaVA-NeXT rows: 720, 290 and 145 tokens over 5 views (spec §5)."""
    assert _counts((672, 672), ratio) == [per_view] * 5
    assert _counts((1000, 700), ratio) == [per_view] * 5  # padding changes nothing


def test_counts_by_hand_for_both_modes_and_budgets():
    # 1000x700 on 2x2: 34 image rows of 48, each crop 17 x 24 = 408 image cells, N_van = 2208.
    assert _counts((1000, 700), 0.1, FAITHFUL) == [58] * 5                                   # round(57.6)
    assert _counts((1000, 700), 0.1, FasterVLMArgs(budget="matched")) == [44] * 5            # round(220.8 / 5)
    assert _counts((1000, 700), 0.1, ANYRES) == [58, 41, 41, 41, 41]                          # round(40.8)
    assert _counts((1000, 700), 0.1, FasterVLMArgs("anyres", "matched")) == [58, 41, 41, 41, 41]
    # N = 290 tokens: T = round(290 / 5) in faithful mode; 290 x c_v / 2208 of each view in anyres.
    assert _counts((1000, 700), visual_tokens=290) == [58] * 5
    assert _counts((1000, 700), visual_tokens=290, args=ANYRES) == [76, 54, 54, 54, 54]  # 75.65, 53.59


def test_matched_gives_every_view_at_least_one_token_within_its_cells():
    # 2000x60 on 3x1: image rows [11, 13) of 24, so 2 x 24 = 48 cells per crop; N_van = 720.
    assert crop_geometry((2000, 60), (3, 1), 24).valid_counts == [48, 48, 48]
    assert _counts((2000, 60), 0.01, ANYRES) == [6, 0, 0, 0]                               # round(0.48) = 0
    assert _counts((2000, 60), 0.01, FasterVLMArgs("anyres", "matched")) == [6, 1, 1, 1]
    assert _counts((2000, 60), 0.001, FasterVLMArgs(budget="matched")) == [1] * 4          # round(0.72 / 4) = 0
    # 2000x20: no crop holds an image row, so in anyres mode they offer nothing and keep nothing.
    assert _counts((2000, 20), 0.5, FasterVLMArgs("anyres", "matched")) == [288, 0, 0, 0]
    assert _counts((2000, 20), 0.5) == [288] * 4                                             # F2: padding crops too


@settings(max_examples=300, deadline=None)
@given(width=st.integers(1, 5000), height=st.integers(1, 5000), ratio=st.sampled_from([0.5, 0.25, 0.1, 0.05, 0.01]))
def test_count_rules_on_random_sizes(width, height, ratio):
    """Restated from the spec (§5) and the module: faithful paper `round(576 R)` on every view,
    faithful matched `max(1, round(R N_van / V))`, anyres `round(R c_v)` (matched: at least 1)."""
    size = (width, height)
    grid = get_anyres_image_grid_shape(size, V16_PINPOINTS, 336)
    views = 1 + grid[0] * grid[1]
    unpadded = crop_geometry(size, grid, 24)
    image_cells = [576, *unpadded.valid_counts]
    exact_ratio = Fraction(ratio)
    assert _counts(size, ratio) == [round(576 * exact_ratio)] * views
    assert _counts(size, ratio, FasterVLMArgs(budget="matched")) == [
        max(1, round(exact_ratio * unpadded.vanilla_image_tokens / views))] * views
    anyres = _counts(size, ratio, ANYRES)
    assert anyres == [round(cells * exact_ratio) for cells in image_cells]
    assert abs(sum(anyres) - ratio * unpadded.vanilla_image_tokens) <= views / 2  # R of the vanilla tokens
    assert _counts(size, ratio, FasterVLMArgs("anyres", "matched")) == [
        min(cells, max(1, count)) for cells, count in zip(image_cells, anyres)]


@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 5000), height=st.integers(1, 5000), tokens=st.integers(1, 3000),
       budget=st.sampled_from(["paper", "matched"]))
def test_visual_tokens_send_about_n_in_both_modes(width, height, tokens, budget):
    size = (width, height)
    grid = get_anyres_image_grid_shape(size, V16_PINPOINTS, 336)
    views = 1 + grid[0] * grid[1]
    faithful = _counts(size, visual_tokens=tokens, args=FasterVLMArgs(budget=budget))
    if tokens < 576 * views:
        assert faithful == [max(int(budget == "matched"), round(Fraction(tokens, views)))] * views
    anyres = _counts(size, visual_tokens=tokens, args=FasterVLMArgs("anyres", budget))
    vanilla = crop_geometry(size, grid, 24).vanilla_image_tokens
    if tokens < vanilla and budget == "paper":
        assert abs(sum(anyres) - tokens) <= views / 2


@settings(max_examples=100, deadline=None)
@given(width=st.integers(1, 5000), height=st.integers(1, 5000), ratio=st.floats(0.001, 0.999),
       mode=st.sampled_from(["faithful", "anyres"]), budget=st.sampled_from(["paper", "matched"]),
       seed=st.integers(0, 99))
def test_selection_keeps_exactly_the_counts_among_image_cells_and_by_score(width, height, ratio, mode, budget, seed):
    size, side, args = (width, height), 6, FasterVLMArgs(mode, budget)
    grid = get_anyres_image_grid_shape(size, V16_PINPOINTS, 336)
    geometry = crop_geometry(size, grid, side, unpad=mode == "anyres")
    scores = torch.rand(1 + grid[0] * grid[1], side * side, generator=torch.Generator().manual_seed(seed))
    selection = select(_named_views(scores.shape[0], side), {"cls_attn_penultimate": scores}, geometry,
                       Budget.resolve(geometry, ratio), args)
    kept = keep_mask(selection)
    areas = view_image_areas(geometry, "cpu")
    assert kept.sum(dim=1).tolist() == view_token_counts(geometry, Budget.resolve(geometry, ratio), args)
    assert not (kept & ~areas).any()
    for view_kept, view_area, view_scores in zip(kept, areas, scores):
        if view_kept.any() and (view_area & ~view_kept).any():  # every kept cell outscores every dropped one
            assert view_scores[view_kept].min() > view_scores[view_area & ~view_kept].max()


def test_the_specs_worked_example():
    """Spec §5: a 1000x700 image (2x2 grid, N_van = 2208) at R = 0.1 sends 290 = 13.1%."""
    geometry = crop_geometry((1000, 700), (2, 2), 24, unpad=False)  # the official input
    scores = torch.rand(5, 576, generator=torch.Generator().manual_seed(0))
    selection = select(torch.zeros(5, 576, 1), {"cls_attn_penultimate": scores}, geometry,
                       Budget.resolve(geometry, 0.1))
    record = selection.accounting("official", geometry.with_unpad(True))
    assert record["image_tokens"] == record["tokens_after"] == 290 and record["newline_tokens"] == 0
    assert record["vanilla_image_tokens"] == 2208 and round(100 * record["realised_ratio"], 1) == 13.1


def test_bad_signal_shape_is_a_clear_error():
    geometry = crop_geometry((800, 200), (2, 1), 4, unpad=False)
    with pytest.raises(ValueError, match=r"cls_attn_penultimate must have shape \[3, 16\]"):
        select(_named_views(3, 4), {"cls_attn_penultimate": torch.zeros(3, 15)}, geometry,
               Budget.resolve(geometry, 0.5))


def test_registration_declares_the_signal_and_the_input_change():
    method = get_method("fastervlm")
    assert method.needs == {"cls_attn_penultimate"} and method.stage == "pre-llm"
    assert method.input_changes(FAITHFUL) == official_input(FAITHFUL) == {"mm_patch_merge_type": "spatial"}
    assert method.input_changes(ANYRES) == {}


# --- through the model ---------------------------------------------------------------------------


def _encode(model, processor, size, **settings):
    image = noise_image(size, 5)
    pixel_values = process_images([image], processor, model.config)
    model.set_compression(**settings)
    with torch.no_grad():
        sequence, = model.encode_image_sequences(pixel_values, [image.size])
        features, signals = model.encode_images(pixel_values[0], {"cls_attn_penultimate"})
    return sequence, features, signals["cls_attn_penultimate"], model.last_accounting[0]


def test_faithful_sends_v_times_t_tokens_without_newlines_through_the_model(tiny, model):
    _, _, processor = tiny
    sequence, features, scores, record = _encode(model, processor, (1000, 700), method="fastervlm",
                                                 retention_ratio=0.25)
    assert sequence.shape[0] == 5 * 144 == record["tokens_after"] and record["newline_tokens"] == 0
    assert record["view_tokens"] == [144] * 5 and record["vanilla_image_tokens"] == 2208
    assert record["tokens_before"] == 2208 + 34 and record["realised_ratio"] == 720 / 2208
    # The released selection: topk(k=144) per view on the tower's signal, the set in raster order.
    kept = torch.zeros(5, 576, dtype=torch.bool).scatter_(1, torch.topk(scores, k=144, dim=1).indices, True)
    thumbnail = features[0][kept[0]]
    canvas = features[1:].view(2, 2, 24, 24, -1).permute(0, 2, 1, 3, 4).flatten(0, 3)
    crops = canvas[kept[1:].view(2, 2, 24, 24).permute(0, 2, 1, 3).flatten()]
    assert torch.equal(sequence, torch.cat([thumbnail, crops]))


def test_anyres_has_the_newlines_of_globalcom2s_spatial_layout(tiny, model):
    _, _, processor = tiny
    sequence, _, _, record = _encode(model, processor, (1000, 700), method="fastervlm", method_args=["mode=anyres"],
                                     retention_ratio=0.25)
    _, _, _, globalcom2 = _encode(model, processor, (1000, 700), method="globalcom2", retention_ratio=0.25,
                                  token_layout="spatial")
    newline = model.get_model().image_newline
    assert record["newline_tokens"] == globalcom2["newline_tokens"] == 34  # one per image row of the canvas
    assert int((sequence == newline).all(dim=1).sum()) == 34 and torch.equal(sequence[-1], newline)
    assert record["image_tokens"] == 144 + 4 * 102 and record["tokens_after"] == sequence.shape[0]
    assert math.isclose(record["realised_ratio"], record["image_tokens"] / 2208)


def test_the_tower_is_asked_for_the_declared_signal_only(model):
    model.set_compression(0.25, method="fastervlm")
    assert model.compression_settings().signals == {"cls_attn_penultimate"}
    model.set_compression(1.0, method="fastervlm")  # everything kept: no score is needed
    assert model.compression_settings().signals == frozenset()
