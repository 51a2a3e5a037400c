"""VisPruner: important tokens by [CLS] attention plus the released duplicate removal on the rest,
worked by hand on side-4 and side-6 views (one round, two rounds with the re-sorted list of Q3, the
crash and loss cases of Q1), the released `encode_images` restated with loops and compared on
random inputs with ties, the budget rules over 200 random image sizes, the model's glue on the
tiny checkpoint with the official input, and one run of the loader runner.

Views are named (`100 * view + cell`, D = 1), so a sequence reads as the list of cells sent. The
similarity features of the hand cases are 2-D unit vectors given by an angle in degrees: the
cosine of two cells is the cosine of their angular distance, so "most duplicated" reads as
"nearest in angle".
"""

import math
import random
from fractions import Fraction

import pytest
import torch

from llava.mm_utils import get_anyres_image_grid_shape, process_images
from llava.model.compression import get_method, parse_method_args
from llava.model.compression.common import Budget, arrange_tokens, crop_geometry, keep_mask, view_image_areas
from llava.model.compression.vispruner import (
    FEATURES, IMPORTANCE, VisPrunerArgs, official_input, released_gather_raises, removal_plan, select, split_counts,
    surviving_tokens, view_token_counts,
)
from llava.tiny import V16_PINPOINTS
from support import noise_image

NEWLINE = -1.0
FAITHFUL, ANYRES, FIXED = VisPrunerArgs(), VisPrunerArgs(mode="anyres"), VisPrunerArgs(survivor_gather="fixed")


def _named_views(views, side):
    cells = torch.arange(side * side, dtype=torch.float32)
    return torch.stack([100 * view + cells for view in range(views)])[..., None]


def _by_attention(order, side):
    """`[1, P]` attention falling along `order` (first = most attended), every other cell below."""
    attention = torch.zeros(1, side * side)
    for rank, cell in enumerate(order):
        attention[0, cell] = 1.0 - rank / 100
    return attention


def _angles(degrees, side):
    """`tower_features` `[1, 1 + P, 2]`: a [CLS] row, then cell c at angle `degrees.get(c, 0)`."""
    radians = torch.tensor([math.radians(degrees.get(cell, 0)) for cell in range(side * side)], dtype=torch.float64)
    patches = torch.stack([radians.cos(), radians.sin()], dim=-1)
    return torch.cat([torch.tensor([[3.0, 4.0]], dtype=torch.float64), patches])[None]


def _single_view(attention, features, side, tokens, args=FAITHFUL):
    """Kept cells (raster) of one view with `tokens` kept (`--visual-tokens` on a single view)."""
    geometry = crop_geometry((side * 14, side * 14), (0, 0), side, unpad=False)
    selection = select(_named_views(1, side), {IMPORTANCE: attention, FEATURES: features}, geometry,
                       Budget.resolve(geometry, visual_tokens=tokens), args)
    return selection, arrange_tokens(_named_views(1, side), selection, None)[:, 0].int().tolist()


# --- by hand -------------------------------------------------------------------------------------

def test_one_round_drops_the_a_tokens_nearest_to_b():
    # One side-4 view, T = 12, rho = 0.5: T_imp = 6, T_div = 6. Attention ranks the cells
    # 5, 10, 0, 15, 6, 9 (important), then the residual 1, 2, 3, 4, 7, 8, 11, 12, 13, 14 in that
    # order: A = its positions 0, 2, ... = cells 1, 3, 7, 11, 13; B = cells 2, 4, 8, 12, 14 at
    # 0, 40, 80, 120, 160 degrees. One round (R = 10, r = min(8, 10 - 6) = 4): A cells 1, 3, 7, 11
    # lie 1, 2, 3, 4 degrees from a B cell, cell 13 (140) 20 degrees from both neighbours, so the
    # four near ones go and 13 survives with all of B.
    order = [5, 10, 0, 15, 6, 9, 1, 2, 3, 4, 7, 8, 11, 12, 13, 14]
    degrees = {2: 0, 4: 40, 8: 80, 12: 120, 14: 160, 1: 1, 3: 42, 7: 83, 11: 124, 13: 140}
    selection, sent = _single_view(_by_attention(order, 4), _angles(degrees, 4), 4, 12)
    assert sent == sorted([5, 10, 0, 15, 6, 9] + [13] + [2, 4, 8, 12, 14])
    assert selection.extra == dict(view_tokens=[12], important_tokens=[6], diverse_tokens=[6])


def test_two_rounds_pair_along_the_re_sorted_list_not_in_space():
    # One side-6 view, T = 25, rho = 0.65: T_imp = int(16.25) = 16, T_div = 9. Attention falls
    # with the cell index: cells 0..15 are important, the residual is 16..35 in that order.
    # Round 1 (R = 20, r = 8): A = even cells 16..34, B = odd cells 17..35 at the angles below.
    # A's distances to the nearest B cell: 16: 1, 18: 2, 20: 3, 22: 4, 24: 5, 26: 6, 28: 7,
    # 32: 6 (to 163), 30 (96): 10 (to 86), 34 (122): 12 (to 110). The eight nearest go; the two
    # survivors lead the new list by score (30 before 34), then B:
    #   [30, 34, 17, 19, 21, 23, 25, 27, 29, 31, 33, 35].
    # Round 2 (R = 12, r = min(8, 12 - 9) = 3): A = positions 0, 2, ... = 30, 17, 21, 25, 29, 33;
    # B = 34, 19, 23, 27, 31, 35. Distances: 30 (96): 14 (to 110); 17 (0): 20; 21 (41): 21;
    # 25 (86): 23; 29 (135): 13 (to 34 at 122, now in B); 33 (163): 12. The three nearest, 33, 29
    # and 30, go; 17, 21, 25 survive. Kept: 0..15, then 17, 21, 25 and B.
    b_cells = {17: 0, 19: 20, 21: 41, 23: 63, 25: 86, 27: 110, 29: 135, 31: 150, 33: 163, 35: 175}
    a_cells = {16: 1, 18: 22, 20: 44, 22: 67, 24: 81, 26: 116, 28: 142, 30: 96, 32: 157, 34: 122}
    args = VisPrunerArgs(important_ratio=0.65)
    _, sent = _single_view(_by_attention(range(36), 6), _angles(b_cells | a_cells, 6), 6, 25, args)
    assert sent == sorted([*range(16), 17, 21, 25, 34, 19, 23, 27, 31, 35])


def test_where_the_released_gather_raises_every_survivor_is_kept():
    # One side-4 view, T = 15, rho = 0.2: T_imp = 3, T_div = 12. Attention falls with the cell
    # index: 0, 1, 2 important, residual 3..15 (R = 13, odd). One round, r = min(8, 1) = 1:
    # A = cells 3, 5, ..., 15 (7), B = cells 4, 6, ..., 14. The released line gathers the six
    # survivors with a grid of width 13 // 2 - 1 = 5 and raises (Q1); here (`fixed`) all six are kept.
    # Cell 9 sits 1 degree from B cell 10, every other A cell 20 degrees from its nearest B cell.
    degrees = {cell: 20 * cell for cell in range(3, 16)} | {9: 201}
    selection, sent = _single_view(_by_attention(range(16), 4), _angles(degrees, 4), 4, 15,
                                   VisPrunerArgs(important_ratio=0.2))
    assert sent == [cell for cell in range(16) if cell != 9]
    assert _released_outcome(15, 0.2, 16) == "raises"


def test_an_odd_residual_with_one_survivor_loses_it_as_released():
    # One side-4 view, T = 13, rho = 0.7: T_imp = int(9.1) = 9, T_div = 4; residual cells 9..15
    # (R = 7). One round, r = min(8, 3) = 3: A = cells 9, 11, 13, 15, B = 10, 12, 14. Cells 11, 13,
    # 15 lie 1, 2, 3 degrees from a B cell and go; cell 9 survives, but the released grid has
    # width 7 // 2 - 3 = 0 and loses it (Q1): 12 tokens. `fixed` keeps it: 13.
    degrees = {9: 0, 10: 40, 11: 41, 12: 80, 13: 82, 14: 120, 15: 123}
    attention, features = _by_attention(range(16), 4), _angles(degrees, 4)
    official, sent = _single_view(attention, features, 4, 13, VisPrunerArgs(important_ratio=0.7))
    assert sent == [*range(9), 10, 12, 14] and official.extra["diverse_tokens"] == [3]
    fixed, sent = _single_view(attention, features, 4, 13, VisPrunerArgs(important_ratio=0.7, survivor_gather="fixed"))
    assert sent == [*range(10), 10, 12, 14] and fixed.extra["view_tokens"] == [13]
    assert _released_outcome(13, 0.7, 16) == "loses 1"


def test_tiny_budgets_complete_where_r_exceeds_a():
    # One side-4 view, T = 6, rho = 0.5: T_imp = 3, T_div = 3, residual cells 3..15 (R = 13).
    # Round 1: r = 8 > |A| = 7, the released grid width 6 - 8 = -2 raises (so `fixed`); every A token goes,
    # leaving B = cells 4, 6, ..., 14 (R = 6). Round 2: r = 3 = |A| (cells 4, 8, 12): B = 6, 10, 14
    # remain, whatever the features.
    features = torch.randn(1, 17, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, sent = _single_view(_by_attention(range(16), 4), features, 4, 6)
    assert sent == [0, 1, 2, 6, 10, 14]


def test_faithful_sends_every_view_in_raster_order_without_newlines():
    # 800x200 on the forced 2x2 grid of side-4 crops, no unpadding: 5 views of 16 cells, T =
    # round(16 / 2) = 8, rho = 0.5, so T_imp = T_div = 4: each view's residual of 12 shrinks to 4
    # (r = 8: all six A tokens go, where the released line raises; then r = 2 of 3, one survives).
    # The sequence is the thumbnail's kept cells, then the 8x8 canvas row by row, no newline.
    geometry = crop_geometry((800, 200), (2, 2), 4, unpad=False)
    generator = torch.Generator().manual_seed(3)
    signals = {IMPORTANCE: torch.rand(5, 16, generator=generator), FEATURES: torch.randn(5, 17, 3, generator=generator)}
    views = _named_views(5, 4)
    selection = select(views, signals, geometry, Budget.resolve(geometry, 0.5))
    kept = keep_mask(selection)
    assert kept.sum(dim=1).tolist() == [8] * 5 and selection.extra["important_tokens"] == [4] * 5
    canvas = torch.cat([torch.cat([100 * (1 + 2 * row + col) + torch.arange(16).view(4, 4) for col in range(2)], dim=1)
                        for row in range(2)])
    expected = [cell for cell in range(16) if kept[0, cell]] + [
        int(name) for name in canvas.flatten() if kept[int(name) // 100, int(name) % 100]]
    assert arrange_tokens(views, selection, None)[:, 0].int().tolist() == expected


def test_anyres_keeps_r_of_each_views_image_cells_with_newlines():
    # 800x200 on a 2x1 grid of side-4 crops, unpadded: image rows 1-2 of the 4x8 canvas, 8 image
    # cells per crop. R = 0.5: the thumbnail keeps 8 of 16, each crop 4 of its 8 image cells, of
    # which int(4 * 0.5) = 2 by attention; nothing outside the image; one newline per image row.
    # A crop's residual (6) runs r = 4 (all three A go), then R = 3, r = 1: the released gather
    # loses the one survivor there (Q1, 3 kept), so `fixed` shows the budget: 4 each.
    geometry = crop_geometry((800, 200), (2, 1), 4)
    generator = torch.Generator().manual_seed(4)
    signals = {IMPORTANCE: torch.rand(3, 16, generator=generator), FEATURES: torch.randn(3, 17, 3, generator=generator)}
    budget = Budget.resolve(geometry, 0.5)
    assert keep_mask(select(_named_views(3, 4), signals, geometry, budget, ANYRES)).sum(dim=1).tolist() == [8, 3, 3]
    args = VisPrunerArgs(mode="anyres", survivor_gather="fixed")
    selection = select(_named_views(3, 4), signals, geometry, budget, args)
    kept = keep_mask(selection)
    assert kept.sum(dim=1).tolist() == [8, 4, 4] and not (kept & ~view_image_areas(geometry, "cpu")).any()
    for view in (1, 2):  # the two most attended image cells of each crop are kept
        image_cells = torch.arange(4, 12)
        best = image_cells[signals[IMPORTANCE][view, 4:12].argsort(descending=True)[:2]]
        assert kept[view, best].all()
    sequence = arrange_tokens(_named_views(3, 4), selection, torch.tensor([NEWLINE]))[:, 0].tolist()
    assert len(sequence) == 16 + 2 and sequence.count(NEWLINE) == 2 and sequence[-1] == NEWLINE


def test_full_budget_keeps_the_whole_input():
    geometry = crop_geometry((800, 200), (2, 2), 4, unpad=False)
    signals = {IMPORTANCE: torch.rand(5, 16), FEATURES: torch.randn(5, 17, 3)}
    selection = select(_named_views(5, 4), signals, geometry, Budget.resolve(geometry, 1.0))
    assert selection.keeps_all and selection.image_tokens == 5 * 16  # the official "2880" row, at side 4


def test_rho_one_keeps_the_most_attended_only():
    attention = _by_attention([7, 3, 11, 0], 4)
    _, sent = _single_view(attention, torch.randn(1, 17, 2), 4, 4, VisPrunerArgs(important_ratio=1.0))
    assert sent == [0, 3, 7, 11]


# --- the released code, restated ---------------------------------------------------------------
#
# `encode_images` of Theia-4869/VisPruner@aefa01a (llava/model/llava_arch.py:140-186), restated
# with lists and loops: attention argsort, important prefix, then rounds on the residual list.
# The sorts are the same `argsort(descending=True)` calls on `[V, n]` tensors, and the cosines are
# recomputed from the gathered features in every round, as released.

class ReleasedLineRaises(Exception):
    pass


def _released_survivor_count(length, removed):
    """The A survivors the released gather yields: it indexes the ranked A tokens' tail
    (`ceil(R/2) - r` entries, none below zero) with a row grid of `R // 2 - r` columns, made by
    `expand`, where -1 keeps the one column and a lower size raises; the two then broadcast."""
    tail = max((length + 1) // 2 - removed, 0)
    grid = length // 2 - removed
    if grid == -1:
        grid = 1
    if grid < 0:
        raise ReleasedLineRaises
    if grid == tail or grid == 1:
        return tail
    if tail == 1:
        return grid
    raise ReleasedLineRaises


def _released_vispruner(unit, attention, tokens, rho, fixed=False):
    """Keep mask `[V, P]` of the released selection on unit features `[V, P, C]`, or
    `ReleasedLineRaises`. `fixed`: every round keeps every survivor instead."""
    num_views, num_patches, _ = unit.shape
    important_count = int(tokens * rho)
    diverse_count = tokens - important_count
    order = attention.argsort(dim=-1, descending=True)
    residual = [order[view, important_count:].tolist() for view in range(num_views)]
    while diverse_count > 0:
        length = len(residual[0])
        removed = min(8, length - diverse_count)
        if removed <= 0:
            break
        first = [row[0::2] for row in residual]
        second = [row[1::2] for row in residual]
        a = torch.stack([unit[view, cells] for view, cells in enumerate(first)])
        b = torch.stack([unit[view, cells] for view, cells in enumerate(second)])
        ranks = (a @ b.transpose(1, 2)).max(dim=-1).values.argsort(dim=-1, descending=True)
        count = max(len(first[0]) - removed, 0) if fixed else _released_survivor_count(length, removed)
        residual = [[first[view][rank] for rank in ranks[view, removed:removed + count].tolist()] + second[view]
                    for view in range(num_views)]
    keep = torch.zeros(num_views, num_patches, dtype=torch.bool)
    for view in range(num_views):
        keep[view, order[view, :important_count]] = True
        if diverse_count > 0:
            keep[view, residual[view]] = True
    return keep


def _completed(unit, attention, tokens, rho):
    """The released selection, or where the released code raises, the `fixed` one."""
    try:
        return _released_vispruner(unit, attention, tokens, rho)
    except ReleasedLineRaises:
        return _released_vispruner(unit, attention, tokens, rho, fixed=True)


def _released_outcome(tokens, rho, num_patches=576):
    """'runs', 'raises' or 'loses k' for the released code at T = `tokens` (lengths only)."""
    important = int(tokens * rho)
    diverse, length = tokens - important, num_patches - important
    while diverse > 0 and length - diverse > 0:
        removed = min(8, length - diverse)
        try:
            length = _released_survivor_count(length, removed) + length // 2
        except ReleasedLineRaises:
            return "raises"
    return "runs" if diverse == 0 or length == diverse else f"loses {diverse - length}"


def test_the_released_outcomes_are_the_specs():
    """Spec (f) Q1: T = 58 at rho 0.5 raises, 64 (0.5 and 0.75) and 32 (0.5) run, T = 14 at 0.75
    loses one token; at rho 0.5 every T with T mod 4 in {2, 3} (odd T_imp) raises."""
    assert _released_outcome(58, 0.5) == "raises"
    assert _released_outcome(64, 0.5) == _released_outcome(64, 0.75) == _released_outcome(32, 0.5) == "runs"
    assert _released_outcome(14, 0.75) == "loses 1"
    assert all(_released_outcome(tokens, 0.5) == "raises" for tokens in range(18, 576) if tokens % 4 in (2, 3))


def test_the_released_count_and_where_it_raises():
    for length in range(1, 600):
        for removed in range(1, min(8, length) + 1):
            try:
                released, raises = _released_survivor_count(length, removed), False
            except ReleasedLineRaises:
                raises = True
            assert released_gather_raises(length, removed) == raises
            if not raises:
                assert surviving_tokens(length, removed, "official") == released
            assert surviving_tokens(length, removed, "fixed") == max((length + 1) // 2 - removed, 0)


@pytest.mark.parametrize("rho, gather", [(0.5, "official"), (0.75, "official"), (0.5, "fixed"), (0.3, "official")])
def test_plan_counts_follow_the_released_lengths(rho, gather):
    for tokens in range(1, 577):
        important, diverse = split_counts([tokens], rho)
        _, final = removal_plan([576 - important[0]], diverse, gather)
        outcome = _released_outcome(tokens, rho)  # where it raises, `fixed`: T_div exactly
        lost = int(outcome.split()[1]) if outcome.startswith("loses") and gather == "official" else 0
        assert final == [diverse[0] - lost]


def _faithful(side, tokens, signals, args=FAITHFUL):
    geometry = crop_geometry((1000, 700), (2, 2), side, unpad=False)
    budget = Budget.resolve(geometry, visual_tokens=5 * tokens)  # T = round(5 T / 5) per view
    return keep_mask(select(_named_views(5, side), signals, geometry, budget, args))


def _unit(features):
    patches = features[:, 1:]
    return patches / patches.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("rho", [0.5, 0.75, 0.25, 0.0])
def test_faithful_equals_the_released_code_on_random_inputs(rho):
    """Every T of side-6 views (P = 36), fp64 features: equal where the released code runs, the
    `fixed` rounds where it raises; `fixed` equals the restatement with every survivor kept."""
    generator = torch.Generator().manual_seed(int(100 * rho))
    for tokens in range(1, 36):
        signals = {IMPORTANCE: torch.rand(5, 36, generator=generator, dtype=torch.float64),
                   FEATURES: torch.randn(5, 37, 16, generator=generator, dtype=torch.float64)}
        unit = _unit(signals[FEATURES])
        args = VisPrunerArgs(important_ratio=rho)
        assert torch.equal(_faithful(6, tokens, signals, args), _completed(unit, signals[IMPORTANCE], tokens, rho))
        fixed = VisPrunerArgs(important_ratio=rho, survivor_gather="fixed")
        assert torch.equal(_faithful(6, tokens, signals, fixed),
                           _released_vispruner(unit, signals[IMPORTANCE], tokens, rho, fixed=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_faithful_equals_the_released_code_with_ties(dtype):
    """Quantised attention (4 levels) and features of four ones among 8 dimensions (unit entries
    1/2, cosines exact multiples of 1/4 in any summation order): ties everywhere, and the sorts
    still fall as the released calls do on this backend (Q4). Side 24, the real P = 576."""
    generator = torch.Generator().manual_seed(7)
    for tokens, seed in [(64, 0), (58, 1), (32, 2), (144, 3), (6, 4)]:
        attention = torch.randint(0, 4, (5, 576), generator=generator).to(dtype) / 4
        ones = torch.rand(5, 577, 8, generator=generator).argsort(dim=-1)[..., :4]
        features = torch.zeros(5, 577, 8).scatter_(2, ones, 1.0).to(dtype)
        signals = {IMPORTANCE: attention, FEATURES: features}
        assert torch.equal(_faithful(24, tokens, signals), _completed(_unit(features), attention, tokens, 0.5))


def test_the_comparison_can_fail():
    """A selection that ignores the similarities (all of B kept, A by attention) differs."""
    generator = torch.Generator().manual_seed(9)
    signals = {IMPORTANCE: torch.rand(5, 36, generator=generator, dtype=torch.float64),
               FEATURES: torch.randn(5, 37, 16, generator=generator, dtype=torch.float64)}
    released = _completed(_unit(signals[FEATURES]), signals[IMPORTANCE], 20, 0.5)
    shuffled = dict(signals, **{FEATURES: signals[FEATURES][:, torch.randperm(37, generator=generator)]})
    assert not torch.equal(_faithful(6, 20, shuffled), released)


def test_anyres_equals_the_released_rounds_on_each_views_image_cells():
    """Views of different lengths run together, padded: each equals the released selection run
    on that view alone, restricted to its image cells (fp64, so no ties)."""
    size, side = (900, 260), 6
    grid = get_anyres_image_grid_shape(size, V16_PINPOINTS, 336)
    geometry = crop_geometry(size, grid, side)
    generator = torch.Generator().manual_seed(11)
    views = 1 + grid[0] * grid[1]
    areas = view_image_areas(geometry, "cpu")
    for ratio in (0.8, 0.5, 0.3, 0.1):
        for gather in ("official", "fixed"):
            signals = {IMPORTANCE: torch.rand(views, 36, generator=generator, dtype=torch.float64),
                       FEATURES: torch.randn(views, 37, 8, generator=generator, dtype=torch.float64)}
            args = VisPrunerArgs(mode="anyres", survivor_gather=gather)
            budget = Budget.resolve(geometry, ratio)
            kept = keep_mask(select(_named_views(views, side), signals, geometry, budget, args))
            counts = view_token_counts(geometry, budget, args)
            for view in range(views):
                cells = areas[view].nonzero()[:, 0]
                unit = _unit(signals[FEATURES][view:view + 1])[:, cells]
                attention = signals[IMPORTANCE][view:view + 1, cells]
                if gather == "fixed":
                    alone = _released_vispruner(unit, attention, counts[view], 0.5, fixed=True)
                else:
                    alone = _completed(unit, attention, counts[view], 0.5)
                expected = torch.zeros(36, dtype=torch.bool)
                expected[cells] = alone[0]
                assert torch.equal(kept[view], expected), (ratio, gather, view)


# --- the budget --------------------------------------------------------------------------------

def _counts(size, ratio=None, args=FAITHFUL, visual_tokens=None):
    pinpoints = official_input(args).get("image_grid_pinpoints", V16_PINPOINTS)
    grid = get_anyres_image_grid_shape(size, pinpoints, 336)
    geometry = crop_geometry(size, grid, 24, unpad=args.mode == "anyres")
    return geometry, view_token_counts(geometry, Budget.resolve(geometry, ratio, visual_tokens), args)


@pytest.mark.parametrize("ratio, per_view", [(0.25, 144), (0.1, 58), (64 / 576, 64), (32 / 576, 32)])
def test_paper_budget_is_round_576_r_per_view(ratio, per_view):
    assert _counts((1000, 700), ratio)[1] == [per_view] * 5
    assert _counts((2000, 100), ratio)[1] == [per_view] * 5  # forced 2x2: padding changes nothing


def test_budget_rules_over_random_image_sizes():
    """200 sizes: faithful is always the 2x2 grid with T = round(576 R) per view (matched:
    max(1, round(R N_img / 5)) with N_img the image's unpadded cells of that grid; N tokens:
    round(N / 5)); anyres keeps round(R c_v) of each view's image cells on the model's grid,
    R of the vanilla image tokens to within V/2; the split is int(T rho); every view keeps T."""
    rng = random.Random(0)
    for _ in range(200):
        size = (rng.randint(1, 5000), rng.randint(1, 5000))
        ratio = rng.choice([0.5, 0.25, 0.1, 0.05, 0.01, rng.random()])
        tokens = rng.randint(1, 3000)
        geometry, faithful = _counts(size, ratio)
        assert geometry.grid == (2, 2) and faithful == [round(576 * Fraction(ratio))] * 5
        image_cells = geometry.with_unpad(True).vanilla_image_tokens
        assert _counts(size, ratio, VisPrunerArgs(budget="matched"))[1] == [
            min(576, max(1, round(Fraction(ratio) * image_cells / 5)))] * 5
        assert _counts(size, visual_tokens=tokens)[1] == [min(576, round(Fraction(tokens, 5)))] * 5
        anyres_geometry, anyres = _counts(size, ratio, ANYRES)
        assert anyres_geometry.grid == get_anyres_image_grid_shape(size, V16_PINPOINTS, 336)
        cells = [576, *anyres_geometry.valid_counts]
        assert anyres == [round(Fraction(ratio) * count) for count in cells]
        assert abs(sum(anyres) - ratio * anyres_geometry.vanilla_image_tokens) <= len(cells) / 2
        important, diverse = split_counts(faithful, 0.5)
        assert important == [int(count * 0.5) for count in faithful]
        assert diverse == [count - kept for count, kept in zip(faithful, important)]


def test_every_view_keeps_its_count_at_random_sizes():
    rng = random.Random(1)
    for _ in range(20):
        size, ratio = (rng.randint(1, 3000), rng.randint(1, 3000)), rng.choice([0.3, 0.1, 0.02])
        for args in (FIXED, VisPrunerArgs(mode="anyres", survivor_gather="fixed")):
            geometry, counts = _counts(size, ratio, args)
            views = 1 + geometry.num_crops
            signals = {IMPORTANCE: torch.rand(views, 576), FEATURES: torch.randn(views, 577, 4)}
            selection = select(_named_views(views, 24), signals, geometry, Budget.resolve(geometry, ratio), args)
            kept = keep_mask(selection)
            assert kept.sum(dim=1).tolist() == counts == selection.extra["view_tokens"]
            assert not (kept & ~view_image_areas(geometry, "cpu")).any()


def test_arguments_and_registration():
    method = get_method("vispruner")
    assert method.needs == {IMPORTANCE, FEATURES} and method.stage == "pre-llm"
    assert method.input_changes(FAITHFUL) == {"image_grid_pinpoints": [[672, 672]], "mm_patch_merge_type": "spatial"}
    assert method.input_changes(ANYRES) == {}
    assert parse_method_args("vispruner", ["important_ratio=0.75", "survivor_gather=fixed", "budget=matched"]) == \
        VisPrunerArgs(budget="matched", important_ratio=0.75, survivor_gather="fixed")
    with pytest.raises(ValueError, match=r"important_ratio must be in \[0, 1\], got 1.5"):
        parse_method_args("vispruner", ["important_ratio=1.5"])


def test_bad_signal_shapes_are_clear_errors():
    geometry = crop_geometry((800, 200), (2, 2), 4, unpad=False)
    budget = Budget.resolve(geometry, 0.5)
    with pytest.raises(ValueError, match=r"cls_attn_penultimate must have shape \[5, 16\]"):
        select(_named_views(5, 4), {IMPORTANCE: torch.rand(5, 15), FEATURES: torch.rand(5, 17, 2)}, geometry, budget)
    with pytest.raises(ValueError, match=r"tower_features must have shape \[5, 17, C\]"):
        select(_named_views(5, 4), {IMPORTANCE: torch.rand(5, 16), FEATURES: torch.rand(5, 16, 2)}, geometry, budget)


# --- through the model ---------------------------------------------------------------------------


def test_faithful_through_the_model_is_the_released_selection_on_the_official_input(tiny, model):
    _, _, processor = tiny
    image = noise_image((1000, 300), 5)  # the model's grid is 3x1; the official input forces 2x2
    model.set_compression(0.25, method="vispruner")
    pixel_values = process_images([image], processor, model.input_config())
    assert pixel_values.shape[1] == 5
    with torch.no_grad():
        sequence, = model.encode_image_sequences(pixel_values, [image.size])
        features, signals = model.encode_images(pixel_values[0], {IMPORTANCE, FEATURES})
    record = model.last_accounting[0]
    # T = 144 per view, T_imp = 72: the released code runs; its kept set, thumbnail then canvas.
    kept = _released_vispruner(_unit(signals[FEATURES]), signals[IMPORTANCE], 144, 0.5)
    canvas = features[1:].view(2, 2, 24, 24, -1).permute(0, 2, 1, 3, 4).flatten(0, 3)
    crops = canvas[kept[1:].view(2, 2, 24, 24).permute(0, 2, 1, 3).flatten()]
    assert torch.equal(sequence, torch.cat([features[0][kept[0]], crops]))
    vanilla = crop_geometry(image.size, get_anyres_image_grid_shape(image.size, V16_PINPOINTS, 336), 24)
    assert record["tokens_after"] == record["image_tokens"] == 720 and record["newline_tokens"] == 0
    assert record["vanilla_image_tokens"] == vanilla.vanilla_image_tokens and record["grid"] == [2, 2]
    assert record["view_tokens"] == [144] * 5 and record["important_tokens"] == [72] * 5


def test_anyres_through_the_model_has_the_models_grid_and_newlines(tiny, model):
    _, _, processor = tiny
    image = noise_image((1000, 300), 6)
    model.set_compression(0.25, method="vispruner", method_args=["mode=anyres"])
    pixel_values = process_images([image], processor, model.input_config())
    with torch.no_grad():
        sequence, = model.encode_image_sequences(pixel_values, [image.size])
    record = model.last_accounting[0]
    vanilla = crop_geometry(image.size, (3, 1), 24)
    assert record["grid"] == [3, 1] and record["newline_tokens"] == vanilla.newline_count("raster")
    assert record["view_tokens"] == [144, *[round(cells / 4) for cells in vanilla.valid_counts]]
    assert sequence.shape[0] == record["tokens_after"] and torch.equal(sequence[-1], model.get_model().image_newline)


def test_the_tower_is_asked_for_the_declared_signals_only(model):
    model.set_compression(0.25, method="vispruner")
    assert model.compression_settings().signals == {IMPORTANCE, FEATURES}
    model.set_compression(1.0, method="vispruner")  # everything kept, unlooked
    assert model.compression_settings().signals == frozenset()


def test_one_run_of_the_loader_runner(loader_answers):
    for row in loader_answers([(80, 50), (300, 40)], "--method", "vispruner", "--visual-tokens", "320",
                              colour_step=90):
        meta = row["metadata"]
        image = meta["images"][0]
        assert meta["method"] == "vispruner" and meta["method_args"] == dict(vars(VisPrunerArgs()))
        # The README's "32 * 5 = 160" pattern at 64 per view: 5 views of T = 64, no newline.
        assert meta["visual_tokens"] == image["tokens_after"] == image["image_tokens"] == 320
        assert image["newline_tokens"] == 0 and image["view_tokens"] == [64] * 5 and image["grid"] == [2, 2]
