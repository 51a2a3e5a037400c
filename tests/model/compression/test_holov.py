"""HoloV: slices, slice scores, quotas and in-slice order worked by hand on side-4 views; the
released function and its glue restated with their loops (golden, ties included); the budget
rules over random image sizes; the model's glue on the tiny checkpoint and one runner end to end.

Features are named: value `100 * view + cell` (D = 1), newline -1, so a sequence reads as the list
of cells the language model receives. Attention is given as `a = 1000 A` (the release scales it so).
"""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from llava.mm_utils import get_anyres_image_grid_shape, process_images, unpad_image
from llava.model.compression import get_method, parse_method_args
from llava.model.compression.common import Budget, Merge, arrange_tokens, crop_geometry, keep_mask
from llava.model.compression.holov import (
    HoloVArgs, allocate_tokens, flattened_cells, holov, partition_slices, select, slice_scores, token_budget,
)
from llava.tiny import V16_PINPOINTS
from support import noise_image

NEWLINE = -1.0
SIGNAL = "cls_attn_penultimate"


def _named_views(views, side):
    cells = torch.arange(side * side, dtype=torch.float32)
    return torch.stack([100 * view + cells for view in range(views)])[..., None]


def _attention(named, side, default=0.0):
    """`[V, P]` attention `A = a / 1000`: `named[v]` maps cells of view v to `a`, others get `default`."""
    scaled = torch.full((len(named), side * side), default)
    for view, cell_values in enumerate(named):
        for cell, value in cell_values.items():
            scaled[view, cell] = value
    return scaled / 1000


def _select(size, grid, side, ratio, args, attention, views=None):
    geometry = crop_geometry(size, grid, side)
    views = _named_views(attention.shape[0], side) if views is None else views
    return select(views, {SIGNAL: attention}, geometry, Budget.resolve(geometry, ratio), args), views


def _names(selection, views, layout="official"):
    newline = torch.tensor([NEWLINE], dtype=views.dtype) if selection.geometry.unpad else None
    return arrange_tokens(views, selection, newline, layout)[:, 0].tolist()


# --- the released function and its glue, restated with their loops ------------------------------

def _released_slices(count, partitions):
    """`(begin, end)` of the release's slices (`utils.py:32-50`): the first `N % Q` one token longer."""
    base, remainder = divmod(count, partitions)
    slices, start = [], 0
    for index in range(partitions):
        length = base + (1 if index < remainder else 0)
        if length > 0:
            slices.append((start, start + length))
        start += length
    return slices


def _released_weights(tokens, attention, slices):
    """The slices' weights `[S]` (`utils.py:56-104`), one slice at a time."""
    scores = []
    for begin, end in slices:
        size, attn = end - begin, attention[begin:end]
        if size == 1:
            scores.append(attn.mean())
            continue
        unit = tokens[begin:end] / (tokens[begin:end].norm(dim=1, keepdim=True) + 1e-6)
        similarity = torch.mm(unit, unit.T) * (1 - torch.eye(size))     # an fp32 mask: similarity turns fp32
        mean = similarity.sum(dim=1) / (size - 1)
        variance = ((similarity - mean[:, None]) ** 2).sum(dim=1) / (size - 1)
        scaled = attn * 1e3
        gamma = scaled.abs().mean() / (variance.abs().mean() + 1e-6)
        scores.append((scaled + 0.09 * (variance * gamma)).mean())
    scores = torch.stack(scores)
    return scores / (scores.sum() + 1e-6)


def _released_holov(tokens, attention, partitions, budget):
    """`obananas/HoloV@1d2e65e:llava/model/utils.py:22-151` for one image, restated: tokens `[N, D]`,
    attention `[N]` fp32 -> `[budget, D]` in tokens' dtype. Its in-slice `topk` leaves ties to the
    backend (Q7); here they go to the earlier token, the rule the module states."""
    count, dim = tokens.shape
    slices = _released_slices(count, partitions)
    weights = _released_weights(tokens, attention, slices)
    quotas = (weights * budget).floor().long()
    leftover = budget - int(quotas.sum())
    if leftover > 0:
        for index in torch.topk(weights, k=min(leftover, len(weights))).indices:
            quotas[index] += 1
    rows = []
    for (begin, end), quota in zip(slices, quotas.tolist()):
        if quota <= 0:
            continue
        if quota >= end - begin:
            rows.extend(range(begin, end))
        else:
            rows.extend(sorted(range(begin, end), key=lambda row: (-float(attention[row]), row))[:quota])
    kept = tokens[rows[:budget]].float()
    return torch.cat([kept, torch.zeros(budget - kept.shape[0], dim)]).to(tokens.dtype)


def _decided_by_rounding(weights, budget):
    """Whether the quotas hang on the last bits of the weights, which the order of a float sum
    decides (between the release's backends too): some `w K` within 1e-4 of an integer, or two
    weights within 1e-6 of each other at the leftover's cut."""
    shares = weights.double() * budget
    if ((shares - shares.round()).abs() < 1e-4).any():
        return True
    leftover = budget - int(shares.floor().sum())
    ranked = weights.double().sort(descending=True).values
    return 0 < leftover < len(ranked) and bool(ranked[leftover - 1] - ranked[leftover] < 1e-6 * ranked[0])


def _released_flatten(views, attention, image_size, grid, side):
    """The official glue (`llava_arch.py:147-236`, merge type `spatial_unpad`): the thumbnail, then
    the crop canvas unpadded and read row by row; newlines commented out. -> `[N, D]`, `[N]`."""
    if views.shape[0] == 1:
        return views[0], attention[0]
    grid_w, grid_h = grid
    canvas = views[1:].view(grid_h, grid_w, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
    canvas_attention = attention[1:].view(grid_h, grid_w, side, side).permute(0, 2, 1, 3).flatten(0, 1).flatten(1, 2)
    canvas = unpad_image(canvas, image_size).flatten(1, 2).transpose(0, 1)
    canvas_attention = unpad_image(canvas_attention[None], image_size).flatten(1, 2)[0]
    return torch.cat([views[0], canvas]), torch.cat([attention[0], canvas_attention])


# --- by hand -------------------------------------------------------------------------------------

def test_slices_are_contiguous_the_first_ones_longer_and_empty_ones_dropped():
    # 20 tokens in 6: base 3, remainder 2, so the first two slices hold 4 (the release's comment says "last").
    assert partition_slices([20], 6) == ([0, 4, 8, 11, 14, 17], [4, 4, 3, 3, 3, 3])
    assert partition_slices([5], 8) == ([0, 1, 2, 3, 4], [1, 1, 1, 1, 1])        # N < Q: three empty slices
    # Segments are sliced on their own (partition=views); an empty one (an all-padding crop) has none.
    assert partition_slices([16, 8, 0, 8], 3) == ([0, 6, 11, 16, 19, 22, 24, 27, 30], [6, 5, 5, 3, 3, 2, 3, 3, 2])


# 800x200 on a 2x1 grid of side-4 crops: the canvas is 4 rows x 8 columns; unpadded, the image
# holds rows 1-2 only, so each crop offers its cells 4..11 and N = 16 + 8 + 8 = 32.
SIZE, GRID, SIDE = (800, 200), (2, 1), 4


def test_the_flat_sequence_is_the_thumbnail_then_the_unpadded_canvas_row_by_row():
    geometry = crop_geometry(SIZE, GRID, SIDE)
    cells, segments = flattened_cells(geometry, "sequence")
    # Cell ids are view * 16 + patch: canvas row 1 is crop 0's cells 4-7 (ids 20-23) then crop 1's
    # (36-39); row 2 their cells 8-11 (24-27, 40-43).
    expected = [*range(16), *range(20, 24), *range(36, 40), *range(24, 28), *range(40, 44)]
    assert cells.tolist() == expected and segments == [32]
    cells, segments = flattened_cells(geometry, "views")
    assert cells.tolist() == [*range(16), *range(20, 28), *range(36, 44)] and segments == [16, 8, 8]
    cells, segments = flattened_cells(crop_geometry((300, 300), (0, 0), SIDE), "sequence")
    assert cells.tolist() == list(range(16)) and segments == [16]


# Q = 3 slices of the 32: positions [0, 11), [11, 22), [22, 32). Slice 1 straddles the views (Q5):
# thumbnail 11-15, crop 0's 104-107, crop 1's 204-205; slice 2 is 206-207, 108-111, 208-211.
# Padding cells get a = 50, which must never matter: they are not in the sequence.
HAND_ATTENTION = [
    {**{cell: 1.0 for cell in range(11)}, 3: 0.0, 6: 2.0,            # slice 0: sum 11, mean 1
     11: 6.0, 12: 1.0, 13: 8.0, 14: 1.0, 15: 1.0},                   # slice 1 (with the rows below): sum 44, mean 4
    {4: 1.0, 5: 9.0, 6: 5.0, 7: 1.0, 8: 1.0, 9: 1.0, 10: 3.0, 11: 1.0},
    {4: 7.0, 5: 4.0, 6: 1.0, 7: 5.0, 8: 1.0, 9: 1.0, 10: 4.0, 11: 2.0},  # slice 2: 6 + 6 + 8 = 20, mean 2
]


def test_faithful_order_by_hand():
    # The features of every slice are far from mutually orthogonal, so each score is 1.09 x its
    # mean a (module note): weights (1, 4, 2) / 7. K = int(0.25 x 32) = 8: 8 w = 1.14, 4.57, 2.29,
    # floors 1 + 4 + 2 = 7, the leftover 1 to the largest weight: quotas 1, 5, 2. Each slice is
    # partly kept, so best first: slice 0 its 6 (a = 2); slice 1 105 (9), 13 (8), 204 (7), 11 (6),
    # 106 (5); slice 2 207 (5), 210 (4). No newline.
    attention = _attention(HAND_ATTENTION, SIDE, default=0.05)
    selection, views = _select(SIZE, GRID, SIDE, 0.25, HoloVArgs(partitions=3), attention)
    assert _names(selection, views) == [6, 105, 13, 204, 11, 106, 207, 210]
    assert selection.extra == dict(budget_tokens=8, slice_lengths=[11, 11, 10], slice_quotas=[1, 5, 2],
                                   slice_kept=[1, 5, 2], zero_rows=0)
    record = selection.accounting("official")
    assert (record["tokens_after"], record["newline_tokens"], record["vanilla_image_tokens"]) == (8, 0, 32)
    assert record["realised_ratio"] == 0.25
    # The same tokens in LLaVA-NeXT's raster order with a newline per image row: mode=anyres, and
    # the spatial layout of the faithful selection.
    raster = [6, 11, 13, 105, 106, 204, 207, NEWLINE, 210, NEWLINE]
    assert _names(selection, views, "spatial") == raster
    anyres, _ = _select(SIZE, GRID, SIDE, 0.25, HoloVArgs(mode="anyres", partitions=3), attention)
    assert _names(anyres, views) == raster and anyres.sequence is None


def test_partition_by_views_slices_each_view_on_its_own():
    # Q = 2 per view: thumbnail 0-7 (mean a 1) and 8-15 (2.5), crop 0's 104-107 (4) and 108-111
    # (1.5), crop 1's 204-207 (4.25) and 208-211 (2); the means sum to 15.25. K = 8: 8 w = 0.52,
    # 1.31, 2.10, 0.79, 2.23, 1.05, floors 0 + 1 + 2 + 0 + 2 + 1 = 6, the leftover 2 to crop 1's
    # 204-207 and crop 0's 104-107: quotas 0, 1, 3, 0, 3, 1. Crop 0's third best is a tie between
    # 104 and 107 (a = 1): the earlier token, 104. Views follow one another (crop 0, then crop 1).
    attention = _attention(HAND_ATTENTION, SIDE, default=0.05)
    selection, views = _select(SIZE, GRID, SIDE, 0.25, HoloVArgs(partitions=2, partition="views"), attention)
    assert selection.extra["slice_quotas"] == [0, 1, 3, 0, 3, 1]
    assert _names(selection, views) == [13, 105, 106, 104, 204, 207, 205, 210]


# A single 4x4 view, Q = 4: each slice is one row. Row means of a: 9, 1, 1, 0.
OVERFLOW_ATTENTION = [{0: 8.0, 1: 9.0, 2: 10.0, 3: 9.0, 4: 1.0, 6: 3.0, 9: 2.0, 10: 1.0, 11: 1.0}]


def test_a_quota_beyond_its_slice_becomes_zero_rows():
    # K = int(0.75 x 16) = 12: 12 w = 9.8, 1.09, 1.09, 0; floors 11, the leftover to row 0: quotas
    # 10, 1, 1, 0. Row 0 is sent whole in raster order, rows 1 and 2 their best (cells 6 and 9),
    # and the 6 tokens row 0 could not take are zero rows (Q4), named 16.. in the sequence.
    attention = _attention(OVERFLOW_ATTENTION, SIDE)
    selection, views = _select((300, 300), (0, 0), SIDE, 0.75, HoloVArgs(partitions=4), attention)
    assert isinstance(selection, Merge) and selection.extra["slice_quotas"] == [10, 1, 1, 0]
    assert selection.sequence.tolist() == [0, 1, 2, 3, 6, 9, *range(16, 22)]
    assert torch.equal(selection.extra_features, torch.zeros(6, 1))
    assert _names(selection, views) == [0, 1, 2, 3, 6, 9] + [0.0] * 6
    record = selection.accounting("official")
    assert (record["image_tokens"], record["extra_tokens"], record["tokens_after"]) == (12, 6, 12)
    # anyres: the raster arrangement (a single view's one newline), then the zero rows.
    anyres, _ = _select((300, 300), (0, 0), SIDE, 0.75, HoloVArgs(mode="anyres", partitions=4), attention)
    assert _names(anyres, views) == [0, 1, 2, 3, 6, 9, NEWLINE] + [0.0] * 6


def test_refill_gives_the_overflow_to_the_slices_with_room():
    # Kept 4, 1, 1, 0; the 6 over go by weight (9, 1, 1, 0) to the rows with room (0, 3, 3, 4):
    # rows 1 and 2 share them equally and are then full, so rows 0-2 are sent whole.
    attention = _attention(OVERFLOW_ATTENTION, SIDE)
    selection, views = _select((300, 300), (0, 0), SIDE, 0.75, HoloVArgs(partitions=4, overflow="refill"), attention)
    assert not isinstance(selection, Merge) and selection.extra["slice_kept"] == [4, 4, 4, 0]
    assert _names(selection, views) == list(range(12))


def test_slice_scores_by_hand():
    # Three slices padded to width 3. Identical features: similarities 1 off the diagonal, mean 1,
    # and each variance (0 - 1)^2 / 2 = 0.5 from the zeroed diagonal alone (Q3), so the score is
    # mean(a) (1 + 0.09 x 0.5 / (0.5 + 1e-6)) ~ 1.09 x 2. Orthogonal features: variance 0, the score
    # is mean(a) = 2. A one-token slice scores its raw attention 0.004 (Q9).
    features = torch.tensor([[[1.0, 0.0, 0.0]] * 3, torch.eye(3).tolist(), [[5.0, 5.0, 5.0]] * 3])
    attention = torch.tensor([[0.001, 0.002, 0.003], [0.001, 0.002, 0.003], [0.004, 0.9, 0.9]])
    scores = slice_scores(features, attention, torch.tensor([3, 3, 1]))
    assert math.isclose(scores[0], 2 * (1 + 0.09 * 0.5 / (0.5 + 1e-6)), rel_tol=1e-6)
    assert math.isclose(scores[1], 2.0, rel_tol=1e-6) and math.isclose(scores[2], 0.004, rel_tol=1e-6)
    # [e1, e1, e2]: rows 0 and 1 have similarities (0, 1, 0) and (1, 0, 0): mean 0.5, variance
    # (0.25 x 3) / 2 = 0.375 each (0.25 without the diagonal); row 2 none. Mean variance 0.25.
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    scores = slice_scores(features, attention[:1], torch.tensor([3]))
    assert math.isclose(scores[0], 2 + 0.09 * 2 / (0.25 + 1e-6) * 0.25, rel_tol=1e-6)


def test_allocation_by_hand():
    # Weights 3/8, 1/8, 0, 1/2 (less the 1e-6): 5 w = 1.87, 0.62, 0, 2.5 -> 1, 0, 0, 2; the
    # leftover 2 to the two largest weights (slices 3 and 0).
    quotas, _ = allocate_tokens(torch.tensor([3.0, 1.0, 0.0, 4.0]), 5)
    assert quotas.tolist() == [2, 0, 0, 3]
    # Exact shares fall just below their integers (the 1e-6): 8 w = 1.9999995, 3.999999, 1.9999995
    # -> 1, 3, 1, and the leftover 3 restores 2, 4, 2.
    assert allocate_tokens(torch.tensor([1.0, 2.0, 1.0]), 8)[0].tolist() == [2, 4, 2]
    # No score at all: every quota 0, the leftover (5) gives at most one per slice.
    assert allocate_tokens(torch.zeros(2), 5)[0].tolist() == [1, 1]


def test_zero_budget_sends_nothing():
    attention = _attention(OVERFLOW_ATTENTION, SIDE)
    selection, views = _select((300, 300), (0, 0), SIDE, 0.05, HoloVArgs(partitions=4), attention)  # int(0.8) = 0
    assert selection.kept_cells == 0 and _names(selection, views) == []


# --- golden: the released function and glue on random inputs -------------------------------------

@settings(max_examples=150, deadline=None)
@given(count=st.integers(1, 300), partitions=st.sampled_from([1, 2, 3, 16, 40]), share=st.floats(0.0, 1.0),
       dim=st.sampled_from([1, 3, 16]), levels=st.sampled_from([4, 50, 0]), seed=st.integers(0, 2**16))
def test_holov_equals_the_released_function(count, partitions, share, dim, levels, seed):
    """Random sequences (N < 2Q included: one-token slices), attention with many ties (`levels`
    values) or none (0), every K from 0 to N."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(count, dim, generator=generator)
    attention = torch.rand(count, generator=generator) / 100
    if levels:
        attention = torch.randint(0, levels, (count,), generator=generator) / 1000
    budget = int(share * count)
    plan = holov(tokens, attention, torch.arange(count), [count], partitions, budget)
    ours = torch.cat([tokens[plan.cells], torch.zeros(plan.zero_rows, dim)])
    # Tied attention gives slices equal means, hence weights equal but for their last bits, which
    # the order of a float sum decides: only such a close call may tell the two apart.
    weights = _released_weights(tokens, attention, _released_slices(count, partitions))
    assert torch.equal(ours, _released_holov(tokens, attention, partitions, budget)) or \
        _decided_by_rounding(weights, budget)


@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 3000), height=st.integers(1, 3000), ratio=st.floats(0.01, 1.0),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2**16))
def test_the_official_sequence_equals_the_released_glue_and_function(width, height, ratio, dtype, seed):
    """Side-6 views of random images, fp32 and fp16 (similarities in the feature dtype, Q8),
    attention in the tower dtype with ties: the official layout is the released output."""
    size, side = (width, height), 6
    grid = get_anyres_image_grid_shape(size, V16_PINPOINTS, 336)
    generator = torch.Generator().manual_seed(seed)
    views = torch.randn(1 + grid[0] * grid[1], side * side, 8, generator=generator).to(dtype)
    attention = (torch.randint(0, 40, views.shape[:2], generator=generator) / 2000).to(dtype)
    geometry = crop_geometry(size, grid, side)
    selection = select(views, {SIGNAL: attention}, geometry, Budget.resolve(geometry, ratio), HoloVArgs())
    sequence = arrange_tokens(views, selection, torch.full((8,), -1.0, dtype=dtype), "official")
    flat_views, flat_attention = _released_flatten(views, attention.float(), size, grid, side)
    budget = int(ratio * geometry.vanilla_image_tokens)
    weights = _released_weights(flat_views, flat_attention, _released_slices(flat_views.shape[0], 16))
    expected = _released_holov(flat_views, flat_attention, 16, budget)
    assert sequence.dtype == dtype and (torch.equal(sequence, expected) or _decided_by_rounding(weights, budget))


# --- the budget rules ----------------------------------------------------------------------------

def test_budgets_by_hand():
    # 1000x700 on 2x2: 34 image rows of 48, N = 576 + 1632 = 2208.
    geometry = crop_geometry((1000, 700), (2, 2), 24)
    image, paper = HoloVArgs(), HoloVArgs(budget="paper")
    assert token_budget(geometry, Budget.resolve(geometry, 0.25), image) == 552
    assert token_budget(geometry, Budget.resolve(geometry, 0.1), image) == 220              # int(220.8)
    assert token_budget(geometry, Budget.resolve(geometry, 1 / 9), paper) == 320            # the paper's row
    assert token_budget(geometry, Budget.resolve(geometry, 0.5), paper) == 1440
    assert token_budget(geometry, Budget.resolve(geometry, 0.9), paper) == 2208             # 2592 capped at N
    assert token_budget(geometry, Budget.resolve(geometry, visual_tokens=300), paper) == 300
    assert token_budget(geometry, Budget.resolve(geometry, visual_tokens=10**6), image) == 2208


@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 5000), height=st.integers(1, 5000),
       ratio=st.sampled_from([1.0, 0.5, 0.25, 1 / 9, 0.1, 0.05, 0.01]), tokens=st.integers(1, 3000),
       partition=st.sampled_from(["sequence", "views"]))
def test_budget_rules_on_random_sizes(width, height, ratio, tokens, partition):
    """K = int(R N) (image), min(N, round(2880 R)) (paper), min(tokens, N); the image is sent as
    exactly K tokens (zero rows included), no newline, realised ratio K / N."""
    size = (width, height)
    grid = get_anyres_image_grid_shape(size, V16_PINPOINTS, 336)
    geometry = crop_geometry(size, grid, 24)
    count = 576 + sum(height * width for _, _, height, width in geometry.crop_boxes)
    budget = Budget.resolve(geometry, ratio)
    assert token_budget(geometry, budget, HoloVArgs()) == int(ratio * count)
    assert token_budget(geometry, budget, HoloVArgs(budget="paper")) == min(count, round(ratio * 2880))
    assert token_budget(geometry, Budget.resolve(geometry, visual_tokens=tokens), HoloVArgs()) == min(tokens, count)
    views = torch.randn(1 + grid[0] * grid[1], 576, 2, generator=torch.Generator().manual_seed(width))
    selection = select(views, {SIGNAL: torch.rand(views.shape[:2])}, geometry, budget, HoloVArgs(partition=partition))
    record = selection.accounting("official")
    assert record["image_tokens"] == record["tokens_after"] == int(ratio * count) and record["newline_tokens"] == 0
    assert record["realised_ratio"] == int(ratio * count) / count
    assert keep_mask(selection).sum() == selection.kept_cells == int(ratio * count) - selection.extra["zero_rows"]


@pytest.mark.parametrize("size", [(1000, 700), (20, 2000), (5000, 2), (336, 336), (1, 1)])
@pytest.mark.parametrize("args", [HoloVArgs(partition="views", overflow="refill"), HoloVArgs(mode="anyres")])
def test_corrections_keep_the_budget_and_anyres_is_vanilla_at_a_full_budget(size, args):
    grid = get_anyres_image_grid_shape(size, V16_PINPOINTS, 336)
    geometry = crop_geometry(size, grid, 24)
    views = _named_views(1 + grid[0] * grid[1], 24)
    signals = {SIGNAL: torch.rand(views.shape[:2], generator=torch.Generator().manual_seed(1))}
    for ratio in (0.9, 0.25, 0.01):
        selection = select(views, signals, geometry, Budget.resolve(geometry, ratio), args)
        assert selection.image_tokens == int(ratio * geometry.vanilla_image_tokens)
        if args.overflow == "refill":
            assert selection.extra["zero_rows"] == 0
    full = select(views, signals, geometry, Budget.resolve(geometry, 1.0), args)
    assert full.keeps_all == (args.mode == "anyres")


def test_arguments_and_registration():
    method = get_method("holov")
    assert method.needs == {SIGNAL} and method.stage == "pre-llm" and method.input_changes(HoloVArgs()) == {}
    assert parse_method_args("holov", ["partitions=4", "partition=views", "budget=paper", "mode=anyres"]) == HoloVArgs(
        mode="anyres", partitions=4, partition="views", budget="paper")
    with pytest.raises(ValueError, match="partitions must be a whole number >= 1, got 0"):
        parse_method_args("holov", ["partitions=0"])
    # The faithful order needs the signal even at a full budget; anyres is then vanilla, unlooked.
    assert method.signals_for(HoloVArgs(), budget_keeps_all=True) == {SIGNAL}
    assert method.signals_for(HoloVArgs(mode="anyres"), budget_keeps_all=True) == frozenset()


# --- through the model ---------------------------------------------------------------------------


def test_the_model_sends_the_released_sequence_from_the_towers_signal(tiny, model):
    _, _, processor = tiny
    image = noise_image((1000, 700), 5)
    pixel_values = process_images([image], processor, model.config)
    model.set_compression(0.25, method="holov")
    with torch.no_grad():
        sequence, = model.encode_image_sequences(pixel_values, [image.size])
        features, signals = model.encode_images(pixel_values[0], {SIGNAL})
    record = model.last_accounting[0]
    grid = get_anyres_image_grid_shape(image.size, model.config.image_grid_pinpoints, 336)
    flat_features, flat_attention = _released_flatten(features, signals[SIGNAL].float(), image.size, grid, 24)
    assert flat_features.shape[0] == 2208
    assert torch.equal(sequence, _released_holov(flat_features, flat_attention, 16, 552))
    assert record["tokens_after"] == record["image_tokens"] == 552 and record["newline_tokens"] == 0
    assert record["vanilla_image_tokens"] == 2208 and record["tokens_before"] == 2208 + 34
    assert record["realised_ratio"] == 0.25 and record["budget_tokens"] == 552 and len(record["slice_quotas"]) == 16


def test_the_model_asks_the_tower_for_the_signal_also_at_a_full_budget(model):
    model.set_compression(1.0, method="holov")
    assert model.compression_settings().signals == {SIGNAL}
    model.set_compression(1.0, method="holov", method_args=["mode=anyres"])
    assert model.compression_settings().signals == frozenset()


def test_the_loader_runs_holov_end_to_end(loader_answers):
    for row in loader_answers([(80, 50), (300, 40)], "--method", "holov", "--method-arg", "partitions=8",
                              "--retention-ratio", "0.1", colour_step=90):
        meta = row["metadata"]
        image = meta["images"][0]
        assert meta["method"] == "holov" and meta["method_args"] == dict(vars(HoloVArgs(partitions=8)))
        assert meta["visual_tokens"] == image["tokens_after"] == image["budget_tokens"] == image["image_tokens"]
        assert image["newline_tokens"] == 0 and len(image["slice_quotas"]) == 8
        assert image["budget_tokens"] == int(0.1 * image["vanilla_image_tokens"])
