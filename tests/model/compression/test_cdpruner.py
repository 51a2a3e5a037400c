"""CDPruner: relevance, kernel and greedy MAP worked by hand on small views, the released
`encode_images` restated with loops (faithful mode, and each crop's image cells in anyres mode),
the count rules of both modes and budgets, and the model's glue.

Features are named where the sequence matters: value `100 * view + cell` in the last feature
channel, newline -1, so a sequence reads as the list of cells the language model receives.
"""

import json
import math
import os
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image
from transformers import CLIPModel

from llava.eval import model_vqa_loader, run_llava
from llava.eval.jsonl import read_jsonl
from llava.mm_utils import get_anyres_image_grid_shape, process_images
from llava.model.builder import load_pretrained_model
from llava.model.compression import get_method
from llava.model.compression.cdpruner import (
    OFFICIAL_PINPOINTS, CDPrunerArgs, conditional_kernel, greedy_map, instruction_relevance, official_input, select,
    token_similarity, view_token_counts,
)
from llava.model.compression.common import Budget, arrange_tokens, crop_geometry, keep_mask, view_image_areas
from llava.tiny import TOWER_DIR, V16_PINPOINTS
from support import noise_image

NEWLINE = -1.0
FAITHFUL, ANYRES = CDPrunerArgs(), CDPrunerArgs(mode="anyres")
MATCHED, ANYRES_MATCHED = CDPrunerArgs(budget="matched"), CDPrunerArgs("anyres", "matched")


# --- relevance, kernel, greedy MAP by hand ------------------------------------------------------

def test_relevance_is_the_negated_mean_cosine_min_max_normalised():
    # Two text segments along x and y. Cells (any length: only directions count):
    #   x: cos (1, 0), mean -cos = -0.5;   y: (0, 1), -0.5;   -x: (-1, 0), +0.5;
    #   x+y: (s, s) with s = 1/sqrt(2), -s.
    # min = -s, max = 0.5, so r = (raw + s + 1e-6) / (0.5 + s).
    text = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    cells = torch.tensor([[[5.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [4.0, 4.0]]])
    relevance = instruction_relevance(cells, text, torch.ones(1, 4, dtype=torch.bool))
    s = 1 / math.sqrt(2)
    expected = [(raw + s + 1e-6) / (0.5 + s) for raw in (-0.5, -0.5, 0.5, -s)]
    assert torch.allclose(relevance[0], torch.tensor(expected), atol=1e-6)
    # The cell pointing away from the text is the most relevant (Q4); the most aligned the least.
    assert relevance[0].argmax() == 2 and relevance[0].argmin() == 3


def test_relevance_min_max_spans_the_offered_cells_of_all_views():
    text = torch.tensor([[1.0, 0.0]])
    # Raw relevance -cos, with s = 1/sqrt(2): view 0 holds 0, s, -s; view 1 holds -1 and 1 (the
    # extremes, not offered: padding in anyres mode) and 0. Over the offered cells min -s, max s.
    cells = torch.tensor([[[0.0, 1.0], [-1.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0]]])
    offered = torch.tensor([[True, True, True], [False, False, True]])
    relevance = instruction_relevance(cells, text, offered)
    s = 1 / math.sqrt(2)
    expected = [(raw + s + 1e-6) / (2 * s) for raw in (0.0, s, -s, 0.0)]
    assert torch.allclose(relevance[offered], torch.tensor(expected), atol=1e-6)


def test_relevance_without_spread_is_uniform_not_nan():
    # Every cell equally far from the text: the released division by zero (Q6 guard).
    offered = torch.ones(2, 3, dtype=torch.bool)
    relevance = instruction_relevance(torch.ones(2, 3, 2), torch.tensor([[1.0, 0.0]]), offered)
    assert torch.equal(relevance, torch.ones(2, 3))


def test_similarity_is_the_cosine_of_the_projected_features_and_a_zero_vector_is_not_nan():
    views = torch.tensor([[[3.0, 0.0], [1.0, 1.0], [0.0, 0.0]]])
    similarity = token_similarity(views)
    s = 1 / math.sqrt(2)
    assert torch.allclose(similarity[0], torch.tensor([[1.0, s, 0.0], [s, 1.0, 0.0], [0.0, 0.0, 0.0]]), atol=1e-6)
    assert token_similarity(views.half()).dtype == torch.float32


def test_kernel_scales_similarity_by_both_relevances():
    similarity = torch.tensor([[[1.0, 0.5], [0.5, 1.0]]])
    relevance = torch.tensor([[2.0, 3.0]])
    assert torch.equal(conditional_kernel(similarity, relevance), torch.tensor([[[4.0, 3.0], [3.0, 9.0]]]))


def _kernel(relevance, similarity):
    return conditional_kernel(torch.tensor([similarity]), torch.tensor([relevance]))


def test_greedy_map_prefers_a_less_relevant_token_that_adds_a_new_direction():
    # a: r = 1; b: r = 0.9 but S(a, b) = 0.9; c: r = 0.5, orthogonal to both.
    # Step 1: d = r^2 = (1, 0.81, 0.25): a. Step 2: d_i = r_i^2 (1 - S(i, a)^2):
    # b = 0.81 * 0.19 = 0.1539, c = 0.25: c, although b is the more relevant (top-k would take b).
    kernel = _kernel([1.0, 0.9, 0.5], [[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert greedy_map(kernel, torch.ones(1, 3, dtype=torch.bool), 3).tolist() == [[0, 2, 1]]


def test_greedy_map_takes_the_best_of_each_direction_before_any_duplicate():
    # Four one-hot directions; cells 0-3 share direction x (the four most relevant), cells 4, 5
    # direction y, cell 6 z, cell 7 w. Once a direction is taken its other cells add nothing
    # (gain r^2 (1 - 1) = 0), so the picks are the best of x, then of y, z, w by relevance.
    directions = [0, 0, 0, 0, 1, 1, 2, 3]
    relevance = [0.95, 1.0, 0.9, 0.85, 0.5, 0.6, 0.3, 0.4]
    similarity = [[float(row == col) for col in directions] for row in directions]
    picks = greedy_map(_kernel(relevance, similarity), torch.ones(1, 8, dtype=torch.bool), 4)
    assert picks.tolist() == [[1, 5, 7, 6]]


def test_greedy_map_never_picks_an_ineligible_cell_and_guards_a_used_up_rank():
    # Rank 1: every cell the same direction. After the first pick every gain is 0 (the released
    # code would take sqrt(0) and then NaN); the guard goes on with the largest residual gain,
    # distinct cells only, and cell 1 (ineligible) is never picked although it is the most relevant.
    kernel = _kernel([0.5, 1.0, 0.8, 0.7], [[1.0] * 4] * 4)
    picks = greedy_map(kernel, torch.tensor([[True, False, True, True]]), 3)
    assert picks[0, 0] == 2 and sorted(picks[0].tolist()) == [0, 2, 3]


def test_views_are_independent_and_batched():
    generator = torch.Generator().manual_seed(0)
    kernels = []
    for _ in range(3):
        features = torch.randn(10, 4, generator=generator)
        kernels.append(conditional_kernel(token_similarity(features[None]), torch.rand(1, 10, generator=generator))[0])
    eligible = torch.rand(3, 10, generator=generator) > 0.2
    together = greedy_map(torch.stack(kernels), eligible, 4)
    for view in range(3):
        assert torch.equal(together[view], greedy_map(kernels[view][None], eligible[view:view + 1], 4)[0])


# --- the released encode_images, restated with loops ---------------------------------------------

def released_picks(kernel, steps):
    """Greedy MAP as the released `encode_images` does it, one view at a time with Python loops:
    `d = diag(L)`; each step `j = argmax d`, `e = (L[j] - sum_t c_t[j] c_t) / sqrt(d_j)`,
    `d -= e^2`, `d_j = -inf`; the picks sorted."""
    picks = []
    for view_kernel in kernel:
        gains = view_kernel.diagonal().clone()
        factors, chosen = [], []
        for _ in range(steps):
            j = int(torch.argmax(gains))
            chosen.append(j)
            residual = view_kernel[j].clone()
            for factor in factors:
                residual -= factor[j] * factor
            factor = residual / torch.sqrt(gains[j])
            factors.append(factor)
            gains -= factor**2
            gains[j] = -math.inf
        picks.append(sorted(chosen))
    return picks


def released_kernel(projected, image_embeds, text_embeds):
    """`L` of the released code over all views of the call: cosine of the projected features
    (normalised in their dtype, then float32), negated mean cosine to the text segments, min-max
    over every cell of every view."""
    normalised = (projected / projected.norm(dim=-1, keepdim=True)).float()
    similarity = normalised @ normalised.transpose(1, 2)
    image = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = (-(image @ text.t())).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    return relevance[:, :, None] * similarity * relevance[:, None, :]


def _random_inputs(seed, views, side, segments, duplicates=True, dtype=torch.float32):
    """Projected features, CLIP patch embeddings and text embeddings; with `duplicates` every
    fourth cell copies the cell before it (exact ties in relevance and in gain)."""
    generator = torch.Generator().manual_seed(seed)
    projected = torch.randn(views, side * side, 64, generator=generator)
    image_embeds = torch.randn(views, side * side, 8, generator=generator)
    if duplicates:
        projected[:, 3::4] = projected[:, 2::4]
        image_embeds[:, 3::4] = image_embeds[:, 2::4]
    text_embeds = torch.randn(segments, 8, generator=generator)
    return projected.to(dtype), image_embeds, text_embeds


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("segments", [1, 3])
@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.1])
def test_faithful_mode_keeps_the_released_picks(seed, segments, ratio):
    side = 6
    projected, image_embeds, text_embeds = _random_inputs(seed, 5, side, segments)
    geometry = crop_geometry((1000, 700), (2, 2), side, unpad=False)  # the official input
    selection = select(projected, {"patch_embeds": image_embeds, "instruction_embeds": text_embeds}, geometry,
                       Budget.resolve(geometry, ratio), FAITHFUL)
    steps = round(side * side * ratio)
    expected = released_picks(released_kernel(projected, image_embeds, text_embeds), steps)
    kept = keep_mask(selection)
    assert [torch.nonzero(view).flatten().tolist() for view in kept] == expected
    assert selection.extra == dict(view_tokens=[steps] * 5)


def test_faithful_mode_keeps_the_released_picks_on_half_precision_features():
    projected, image_embeds, text_embeds = _random_inputs(7, 5, 6, 2, dtype=torch.float16)
    geometry = crop_geometry((600, 600), (2, 2), 6, unpad=False)
    selection = select(projected, {"patch_embeds": image_embeds, "instruction_embeds": text_embeds}, geometry,
                       Budget.resolve(geometry, 0.25), FAITHFUL)
    expected = released_picks(released_kernel(projected, image_embeds, text_embeds), 9)
    assert [torch.nonzero(view).flatten().tolist() for view in keep_mask(selection)] == expected


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("size", [(800, 200), (300, 900), (1000, 700)])
def test_anyres_mode_runs_the_released_dpp_on_each_crops_image_cells(seed, size):
    """Each view's DPP restricted to its image cells is the released greedy MAP on the kernel's
    image-cell block, with the relevance min-max taken over the image cells of every view."""
    side = 6
    grid = get_anyres_image_grid_shape(size, V16_PINPOINTS, 336)
    geometry = crop_geometry(size, grid, side, unpad=True)
    projected, image_embeds, text_embeds = _random_inputs(seed, 1 + grid[0] * grid[1], side, 2)
    budget = Budget.resolve(geometry, 0.25)
    selection = select(projected, {"patch_embeds": image_embeds, "instruction_embeds": text_embeds}, geometry,
                       budget, ANYRES)
    counts = view_token_counts(geometry, budget, ANYRES)
    areas = view_image_areas(geometry, "cpu")
    # The released relevance on the image cells alone, all views concatenated.
    cells = [torch.nonzero(area).flatten() for area in areas]
    image = torch.cat([embeds[index] for embeds, index in zip(image_embeds, cells)])
    text = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    raw = (-((image / image.norm(dim=-1, keepdim=True)) @ text.t())).mean(dim=-1)
    relevance = ((raw - raw.min() + 1e-6) / (raw.max() - raw.min())).split([len(index) for index in cells])
    kept = keep_mask(selection)
    for view, index in enumerate(cells):
        if counts[view] == 0:
            assert not kept[view].any()
            continue
        normalised = (projected[view, index] / projected[view, index].norm(dim=-1, keepdim=True)).float()
        block = relevance[view][:, None] * (normalised @ normalised.t()) * relevance[view][None, :]
        expected = [int(index[pick]) for pick in released_picks(block[None], counts[view])[0]]
        assert torch.nonzero(kept[view]).flatten().tolist() == sorted(expected)


# --- the sequence, worked by hand ------------------------------------------------------------------

def _hand_sequence(size, grid, side, ratio, args, relevance_rank, directions):
    """The named sequence CDPruner sends for hand-built inputs: the projected features of cell
    (v, i) point along `directions[v][i]` (one-hot among 8), its CLIP embedding makes its raw
    relevance `relevance_rank[v][i]` (higher = more relevant), one text segment along x."""
    geometry = crop_geometry(size, grid, side, unpad=args.mode == "anyres")
    views = len(directions)
    projected = torch.nn.functional.one_hot(torch.tensor(directions), 8).float()             # [V, P, 8]
    # Embedding (-a, sqrt(1 - a^2)) has cosine -a with the text x: raw relevance a.
    rank = torch.tensor(relevance_rank, dtype=torch.float32)
    level = rank / (rank.max() + 1)
    embeds = torch.stack([-level, (1 - level**2).sqrt()], dim=-1)
    signals = {"patch_embeds": embeds, "instruction_embeds": torch.tensor([[1.0, 0.0]])}
    selection = select(projected, signals, geometry, Budget.resolve(geometry, ratio), args)
    names = (100 * torch.arange(views)[:, None] + torch.arange(side * side)).float()[..., None]
    newline = torch.tensor([NEWLINE]) if geometry.unpad else None
    return selection, arrange_tokens(names, selection, newline)[:, 0].tolist()


# 800x200 on a 2x1 grid of side-4 crops: the canvas is 4 rows x 8 columns; unpadded, the image holds
# rows 1-2 (new height int(200 * 8 / 800) = 2), so each crop has the 8 image cells 4..11.
# Every view: cells 0-7 point along direction 0, cells 8-15 along directions 1..8 cycling (8 % 8 = 0
# for cell 15); relevance = the cell's number (cell 15 the most relevant), except as noted.
HAND_DIRECTIONS = [[0] * 8 + [1, 2, 3, 4, 5, 6, 7, 0] for _ in range(3)]
HAND_RELEVANCE = [list(range(16)) for _ in range(3)]


def test_faithful_sends_t_diverse_tokens_per_view_in_raster_order_without_newlines():
    # R = 0.25: T = round(16 / 4) = 4 in every view, padding cells eligible. Each view: cell 15
    # first (the most relevant, direction 0); direction 0 is then used up (cells 0-7 gain nothing)
    # and every other cell brings a new direction, so the next most relevant follow: 14, 13, 12.
    selection, sequence = _hand_sequence((800, 200), (2, 1), 4, 0.25, FAITHFUL, HAND_RELEVANCE, HAND_DIRECTIONS)
    # Thumbnail 12..15; canvas row 3 (crop cells 12-15 are the bottom row of each crop): left 112..115,
    # then right 212..215.
    assert sequence == [12, 13, 14, 15, 112, 113, 114, 115, 212, 213, 214, 215]
    assert selection.extra == dict(view_tokens=[4, 4, 4])


def test_diversity_beats_relevance_within_a_direction():
    # Same views, but the eight direction-0 cells 0-7 are now the most relevant (ranks 20-27,
    # cells 8-15 ranks 0-7): only one of them is kept (the best, cell 7). Cell 15 (rank 7) is
    # direction 0 too and adds nothing, so the next picks are 14 (dir 7), 13 (dir 6), 12 (dir 5),
    # although the direction-0 cells 0-6 are all more relevant than any of them (top-k would keep 4-7).
    relevance = [[20 + cell for cell in range(8)] + list(range(8)) for _ in range(3)]
    _, sequence = _hand_sequence((800, 200), (2, 1), 4, 0.25, FAITHFUL, relevance, HAND_DIRECTIONS)
    assert sequence[:4] == [7, 12, 13, 14]


def test_anyres_keeps_only_image_cells_with_newlines():
    # R = 0.25, N_van = 16 + 8 + 8 = 32, V = 3: T = int(0.25 * 32 / 3) = 2 per view. The crops offer
    # cells 4..11 only: the best is 11 (dir 4), then 10 (dir 3). The thumbnail keeps 15, 14.
    # Rows 1 and 2 are the image rows, each ends with a newline; the kept cells lie in row 2
    # (crop cells 8..11), left crop first.
    selection, sequence = _hand_sequence((800, 200), (2, 1), 4, 0.25, ANYRES, HAND_RELEVANCE, HAND_DIRECTIONS)
    assert sequence == [14, 15, NEWLINE, 110, 111, 210, 211, NEWLINE]
    assert selection.extra == dict(view_tokens=[2, 2, 2])


def test_a_single_view_keeps_its_t_in_raster_order():
    _, sequence = _hand_sequence((300, 300), (0, 0), 4, 0.25, FAITHFUL, HAND_RELEVANCE[:1], HAND_DIRECTIONS[:1])
    assert sequence == [12, 13, 14, 15]


def test_full_budget_keeps_every_cell_of_the_input_it_gets():
    faithful, sequence = _hand_sequence((800, 200), (2, 1), 4, 1.0, FAITHFUL, HAND_RELEVANCE, HAND_DIRECTIONS)
    assert faithful.keeps_all and len(sequence) == 3 * 16 and NEWLINE not in sequence  # the official "2880" row
    anyres, sequence = _hand_sequence((800, 200), (2, 1), 4, 1.0, ANYRES, HAND_RELEVANCE, HAND_DIRECTIONS)
    assert anyres.keeps_all and len(sequence) == 16 + 16 + 2


# --- the count rules ---------------------------------------------------------------------------------

def _geometry(size, args, side=24):
    pinpoints = official_input(args).get("image_grid_pinpoints", V16_PINPOINTS)
    grid = get_anyres_image_grid_shape(size, pinpoints, 336)
    return crop_geometry(size, grid, side, unpad=args.mode == "anyres")


def _counts(size, ratio=None, args=FAITHFUL, visual_tokens=None):
    geometry = _geometry(size, args)
    return view_token_counts(geometry, Budget.resolve(geometry, ratio, visual_tokens), args)


@pytest.mark.parametrize("ratio, per_view", [(1 / 9, 64), (1 / 18, 32), (2 / 9, 128), (0.25, 144), (0.1, 58)])
def test_paper_budget_is_the_papers_table(ratio, per_view):
    """Spec (d): the paper's 320 / 160 / 640 tokens are T = 64 / 32 / 128 on each of 5 views."""
    for size in [(672, 672), (1000, 700), (300, 1000), (3000, 200)]:  # every image on the 2x2 grid (Q1)
        assert _counts(size, ratio) == [per_view] * 5


def test_counts_by_hand_for_both_modes_and_budgets():
    # 1000x700 on the model's 2x2 grid: 34 image rows of 48, each crop 17 x 24 = 408 image cells,
    # N_van = 576 + 4 * 408 = 2208; the forced grid is the same 2x2, so matched uses 2208 too.
    assert _counts((1000, 700), 0.1) == [58] * 5                                            # round(57.6)
    assert _counts((1000, 700), 0.1, ANYRES) == [44] * 5                                    # int(220.8 / 5)
    assert _counts((1000, 700), 0.1, MATCHED) == [45, 44, 44, 44, 44]                       # 221 shared evenly
    # anyres matched: 221 shared as 576 : 408 : 408 : 408 : 408 -> 57.65, 40.84 x 4.
    assert _counts((1000, 700), 0.1, ANYRES_MATCHED) == [57, 41, 41, 41, 41]
    # N = 320 tokens: T = round(320 / 5) = 64 (faithful), int(320 / 5) = 64 (anyres), exactly 320 (matched).
    assert _counts((1000, 700), visual_tokens=320) == [64] * 5
    assert _counts((1000, 700), visual_tokens=320, args=ANYRES) == [64] * 5
    assert sum(_counts((1000, 700), visual_tokens=321, args=ANYRES_MATCHED)) == 321


def test_anyres_caps_each_crop_at_its_image_cells():
    # 2000x60 on the model's 3x1 grid: image rows [11, 13) of 24, 48 cells per crop; N_van = 720.
    # R = 0.5: T = int(360 / 4) = 90 per view, each crop capped at 48: 234 of the 360 budgeted.
    assert crop_geometry((2000, 60), (3, 1), 24).valid_counts == [48, 48, 48]
    assert _counts((2000, 60), 0.5, ANYRES) == [90, 48, 48, 48]
    assert _counts((2000, 60), 0.5, ANYRES_MATCHED) == [288, 24, 24, 24]  # matched: 360 as 576 : 48 : 48 : 48
    # 2000x20: no crop holds an image row; in faithful mode every view keeps T all the same.
    assert _counts((2000, 20), 0.5, ANYRES) == [int(Fraction(1, 2) * 576 / 4), 0, 0, 0]
    assert _counts((2000, 20), 0.5) == [288] * 5


@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 5000), height=st.integers(1, 5000),
       ratio=st.sampled_from([0.5, 0.25, 1 / 9, 0.1, 0.05, 0.01]))
def test_count_rules_on_random_sizes(width, height, ratio):
    """Restated from spec (d) and the module: faithful paper `round(576 R)` on each of the 5 views
    of the forced grid; anyres paper `min(c_v, floor(R N_van / V))`; matched exactly
    `round(R N_van)`, shared in proportion to the cells offered, each within them."""
    size = (width, height)
    assert get_anyres_image_grid_shape(size, OFFICIAL_PINPOINTS, 336) == (2, 2)
    exact_ratio = Fraction(ratio)
    assert _counts(size, ratio) == [round(576 * exact_ratio)] * 5
    grid = get_anyres_image_grid_shape(size, V16_PINPOINTS, 336)
    unpadded = crop_geometry(size, grid, 24)
    cells, vanilla, views = [576, *unpadded.valid_counts], unpadded.vanilla_image_tokens, 1 + grid[0] * grid[1]
    per_view = math.floor(exact_ratio * vanilla / views)
    anyres = _counts(size, ratio, ANYRES)
    assert anyres == [min(count, per_view) for count in cells]
    assert sum(anyres) <= ratio * vanilla
    matched = _counts(size, ratio, ANYRES_MATCHED)
    assert sum(matched) == round(exact_ratio * vanilla)
    assert all(0 <= kept <= count and abs(kept - sum(matched) * count / vanilla) < 1
               for kept, count in zip(matched, cells))
    forced = crop_geometry(size, (2, 2), 24).vanilla_image_tokens  # unpadded on the forced 2x2 grid
    faithful_matched = _counts(size, ratio, MATCHED)
    assert sum(faithful_matched) == round(exact_ratio * forced) and max(faithful_matched) - min(faithful_matched) <= 1


@settings(max_examples=100, deadline=None)
@given(width=st.integers(1, 5000), height=st.integers(1, 5000), tokens=st.integers(1, 3000),
       budget=st.sampled_from(["paper", "matched"]))
def test_visual_tokens_send_about_n(width, height, tokens, budget):
    size = (width, height)
    faithful = _counts(size, visual_tokens=tokens, args=CDPrunerArgs(budget=budget))
    if tokens < 2880:
        assert sum(faithful) == tokens if budget == "matched" else faithful == [round(Fraction(tokens, 5))] * 5
    args = CDPrunerArgs("anyres", budget)
    geometry = _geometry(size, args)
    anyres = _counts(size, visual_tokens=tokens, args=args)
    if tokens < geometry.vanilla_image_tokens:
        assert sum(anyres) == tokens if budget == "matched" else sum(anyres) <= tokens


@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 5000), height=st.integers(1, 5000), ratio=st.floats(0.001, 0.999),
       mode=st.sampled_from(["faithful", "anyres"]), budget=st.sampled_from(["paper", "matched"]),
       seed=st.integers(0, 99))
def test_selection_keeps_exactly_the_counts_among_offered_cells(width, height, ratio, mode, budget, seed):
    side, args = 6, CDPrunerArgs(mode, budget)
    size = (width, height)
    pinpoints = official_input(args).get("image_grid_pinpoints", V16_PINPOINTS)
    grid = get_anyres_image_grid_shape(size, pinpoints, 336)
    geometry = crop_geometry(size, grid, side, unpad=mode == "anyres")
    projected, image_embeds, text_embeds = _random_inputs(seed, 1 + grid[0] * grid[1], side, 2,
                                                          duplicates=seed % 2 == 0)
    budget_ = Budget.resolve(geometry, ratio)
    selection = select(projected, {"patch_embeds": image_embeds, "instruction_embeds": text_embeds}, geometry,
                       budget_, args)
    kept = keep_mask(selection)
    assert kept.sum(dim=1).tolist() == view_token_counts(geometry, budget_, args)
    assert not (kept & ~view_image_areas(geometry, "cpu")).any()


# --- registration and errors -------------------------------------------------------------------------

def test_registration_declares_the_signals_and_the_input_changes():
    method = get_method("cdpruner")
    assert method.needs == {"patch_embeds", "instruction_embeds"} and method.stage == "pre-llm"
    assert method.input_changes(FAITHFUL) == {"image_grid_pinpoints": [[672, 672]], "mm_patch_merge_type": "spatial"}
    assert method.input_changes(ANYRES) == {}


def test_bad_signal_shapes_are_clear_errors():
    geometry = crop_geometry((800, 200), (2, 1), 4, unpad=False)
    budget = Budget.resolve(geometry, 0.5)
    views = torch.zeros(3, 16, 2)
    with pytest.raises(ValueError, match=r"patch_embeds must have shape \[3, 16, E\]"):
        select(views, {"patch_embeds": torch.zeros(3, 15, 8), "instruction_embeds": torch.zeros(1, 8)}, geometry,
               budget)
    with pytest.raises(ValueError, match=r"instruction_embeds must have shape \[M, 8\]"):
        select(views, {"patch_embeds": torch.zeros(3, 16, 8), "instruction_embeds": torch.zeros(1, 7)}, geometry,
               budget)


# --- through the model -------------------------------------------------------------------------------


def _encode(model, processor, images, instructions, **settings):
    model.set_compression(**settings)
    pixel_values = process_images(images, processor, model.input_config())
    with torch.no_grad():
        sequences = model.encode_image_sequences(pixel_values, [image.size for image in images],
                                                 instructions=instructions)
    return pixel_values, sequences, list(model.last_accounting)


def _released_text_embeds(clip_model, text_tower, text):
    """The released text side, restated: the tokens right-padded with 0 to a multiple of 77, each
    row through CLIP's text model, pooled at its largest id (legacy pooling), projected."""
    ids = text_tower.tokenizer(text=text, return_tensors="pt").input_ids
    padding = -ids.shape[1] % 77
    ids = torch.cat([ids, ids.new_zeros(1, padding)], dim=1).view(-1, 77)
    mask = (torch.arange(ids.numel()) < ids.numel() - padding).long().view(-1, 77)
    hidden = clip_model.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
    return clip_model.text_projection(hidden[torch.arange(ids.shape[0]), ids.argmax(dim=-1)])


def test_faithful_mode_is_the_released_code_on_the_real_towers(tiny, tiny_checkpoint, model, hook_free_copy):
    """A tall image (the model's own grid is 1x3) goes onto the forced 2x2 grid (Q1): 5 views of
    T = round(576 x 0.05) = 29 tokens, no newlines (Q2); the picks are the released code's on the
    real tower's features, CLIP image embeddings and text embeddings, restated here."""
    _, _, processor = tiny
    image, text = noise_image((300, 1000), 4), "Is there a red square next to the small green circle?"
    pixel_values, (sequence,), (record,) = _encode(model, processor, [image], [text], method="cdpruner",
                                                   retention_ratio=0.05)
    assert pixel_values.shape[1] == 5  # preprocessing followed the forced grid
    assert sequence.shape[0] == 5 * 29 == record["tokens_after"] == record["image_tokens"]
    assert record["newline_tokens"] == 0 and record["view_tokens"] == [29] * 5
    own = crop_geometry((300, 1000), get_anyres_image_grid_shape((300, 1000), V16_PINPOINTS, 336), 24)
    assert own.grid == (1, 3) and record["vanilla_image_tokens"] == own.vanilla_image_tokens  # the model's own
    assert record["tokens_before"] == own.vanilla_image_tokens + own.newline_count("raster")
    # Restated from the released code, on the tiny model's towers and the CLIP checkpoint's weights.
    tower = model.get_vision_tower()
    clip_model = CLIPModel.from_pretrained(os.path.join(tiny_checkpoint, TOWER_DIR)).eval()
    with torch.no_grad():
        features = hook_free_copy(tower.vision_tower.vision_model)(pixel_values[0],
                                                                    output_hidden_states=True).hidden_states[-2][:, 1:]
        projected = model.get_model().mm_projector(features)
        image_embeds = clip_model.visual_projection(tower.vision_tower.vision_model.post_layernorm(features).float())
        text_embeds = _released_text_embeds(clip_model, model.get_text_tower(), text)
    picks = released_picks(released_kernel(projected, image_embeds, text_embeds), 29)
    kept = torch.zeros(5, 576, dtype=torch.bool)
    for view, view_picks in enumerate(picks):
        kept[view, view_picks] = True
    canvas = projected[1:].view(2, 2, 24, 24, -1).permute(0, 2, 1, 3, 4).flatten(0, 3)
    expected = torch.cat([projected[0][kept[0]], canvas[kept[1:].view(2, 2, 24, 24).permute(0, 2, 1, 3).flatten()]])
    assert torch.allclose(sequence, expected, atol=1e-6)


def test_anyres_mode_keeps_the_models_views_with_newlines(tiny, model):
    _, _, processor = tiny
    pixel_values, (sequence,), (record,) = _encode(model, processor, [noise_image((1000, 700), 5)], ["What is it?"],
                                                   method="cdpruner", method_args=["mode=anyres"], retention_ratio=0.25)
    # 2x2 grid, 34 image rows, N_van = 2208: T = int(0.25 x 2208 / 5) = 110 per view (crops hold 408).
    assert record["view_tokens"] == [110] * 5 and record["image_tokens"] == 550
    assert record["newline_tokens"] == 34 and sequence.shape[0] == 584
    newline = model.get_model().image_newline
    assert int((sequence == newline).all(dim=1).sum()) == 34


def test_the_instruction_conditions_the_selection_and_batched_equals_per_sample(tiny, model):
    _, _, processor = tiny
    images = [noise_image((800, 500), 1), noise_image((500, 900), 2)]
    texts = ["Where is the red square?", "How many people are standing in the room near the tall building?"]
    pixel_values, batched, accounting = _encode(model, processor, images, texts, method="cdpruner", retention_ratio=0.1)
    for index in range(2):
        with torch.no_grad():
            single, = model.encode_image_sequences(pixel_values[index:index + 1], [images[index].size],
                                                   instructions=texts[index:index + 1])
        assert torch.equal(single, batched[index]) and model.last_accounting == accounting[index:index + 1]
    with torch.no_grad():
        other, = model.encode_image_sequences(pixel_values[:1], [images[0].size], instructions=[texts[1]])
    assert other.shape == batched[0].shape and not torch.equal(other, batched[0])  # another text, other tokens


@pytest.mark.parametrize("budget", [dict(retention_ratio=0.5), dict(retention_ratio=0.25), dict(visual_tokens=300)])
def test_runs_on_the_tiny_checkpoint_at_every_budget(tiny, model, budget):
    """The contract's model check with an instruction (the contract gives none): at R = 0.5 the
    tiny model's kernel (rank at most its width, 64) is used up long before T = 288 (Q6 guard)."""
    _, _, processor = tiny
    _, (sequence,), (record,) = _encode(model, processor, [noise_image((1000, 700), 3)], ["What?"], method="cdpruner",
                                        **budget)
    assert sequence.shape[0] == record["tokens_after"] == record["image_tokens"] and not sequence.isnan().any()
    assert 0 < record["image_tokens"] < record["vanilla_image_tokens"] == 576 + 4 * 408
    assert sum(keep_mask(model.last_selections[0]).sum(dim=1).tolist()) == record["image_tokens"]


def test_without_an_instruction_it_is_one_clear_error(tiny, model):
    _, _, processor = tiny
    image = noise_image((800, 500), 1)
    model.set_compression(0.25, method="cdpruner")
    pixel_values = process_images([image], processor, model.input_config())
    with pytest.raises(ValueError, match=r"^cdpruner conditions on the instruction text \(instruction_embeds\) but no "
                                         r"instruction was given for the images: pass instructions="):
        model.encode_image_sequences(pixel_values, [image.size])
    with pytest.raises(ValueError, match="got 1 images but 2 instructions"):
        model.encode_image_sequences(pixel_values, [image.size], instructions=["a", "b"])
    model.set_compression(1.0, method="cdpruner")  # everything kept unlooked: no text needed
    assert model.encode_image_sequences(pixel_values, [image.size])[0].shape[0] == 5 * 576


def test_signals_and_the_text_tower_are_asked_for_only_when_needed(tiny_checkpoint, model):
    model.set_compression(0.25, method="cdpruner")
    settings = model.compression_settings()
    assert settings.signals == {"patch_embeds", "instruction_embeds"} and settings.needs_text_tower
    assert settings.instruction_signals == {"instruction_embeds"}
    model.get_text_tower()  # loaded, but no part of the model's modules or checkpoint
    assert not any("text_model" in key or "visual_projection" in key for key in model.state_dict())
    model.set_compression(1.0, method="cdpruner")
    assert model.compression_settings().signals == frozenset() and not model.compression_settings().needs_text_tower
    # A fresh model running another method never loads a text tower.
    _, fresh, processor, _ = load_pretrained_model(tiny_checkpoint, device="cpu")
    fresh.set_compression(0.25, method="globalcom2")
    image = noise_image((800, 500), 1)
    with torch.no_grad():
        fresh.encode_image_sequences(process_images([image], processor, fresh.config), [image.size])
    assert fresh._text_tower is None and "text_tower" not in "".join(fresh.state_dict())


def test_a_missing_text_tower_stops_the_run_before_any_answer(tiny_checkpoint, tmp_path, capsys):
    Image.new("RGB", (80, 50)).save(tmp_path / "a.png")
    base = ["--model-path", tiny_checkpoint, "--image-file", str(tmp_path / "a.png"), "--query", "What?",
            "--max-new-tokens", "1", "--method", "cdpruner"]
    with pytest.raises(SystemExit) as stop:
        run_llava.main(base + ["--text-tower", str(tmp_path / "no-clip")])
    captured = capsys.readouterr()
    assert stop.value.code == 2 and captured.out == ""
    assert captured.err.startswith("error: cdpruner needs a CLIP text tower") and "--text-tower PATH" in captured.err
    # Given explicitly, the tiny checkpoint's own CLIP works as the default does.
    assert run_llava.main(base + ["--text-tower", os.path.join(tiny_checkpoint, TOWER_DIR)]) == 0
    assert "| cdpruner R 0.25 official |" in capsys.readouterr().out


def test_end_to_end_through_the_vqa_runner(tiny_checkpoint, tmp_path):
    Image.new("RGB", (300, 1000), (200, 30, 30)).save(tmp_path / "tall.jpg")
    question = "Is the picture red?\nAnswer the question using a single word or phrase."
    (tmp_path / "q.jsonl").write_text(json.dumps({"question_id": 7, "image": "tall.jpg", "text": question}) + "\n")
    answers = tmp_path / "answers.jsonl"
    assert model_vqa_loader.main(["--model-path", tiny_checkpoint, "--question-file", str(tmp_path / "q.jsonl"),
                                  "--image-folder", str(tmp_path), "--answers-file", str(answers), "--temperature", "0",
                                  "--max_new_tokens", "1", "--method", "cdpruner", "--retention-ratio", "0.1"]) == 0
    row, = read_jsonl(answers)
    assert row["prompt"] == question and row["metadata"]["method"] == "cdpruner"
    record, = row["metadata"]["images"]
    assert record["view_tokens"] == [58] * 5 and record["tokens_after"] == row["metadata"]["visual_tokens"] == 290
    assert record["newline_tokens"] == 0 and record["grid"] == [2, 2]
