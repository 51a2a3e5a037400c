"""PruMerge: outlier (or top-k) tokens, each plus the attention-weighted sum of its 32 key-neighbours, and one
extra token per view summing the rest, in CLIP space: worked by hand on small views in both modes, the
official code restated (loops, as released) and compared on random inputs with ties, the budget rules on
random image sizes, the model's glue on the tiny checkpoint and one run of the loader runner.

Tower features are named: value `100 * view + cell` (C = 1), newline -1, and the projector is the
identity, so a merged token reads as its cell's name plus the weighted names of its neighbours.
"""


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from llava.mm_utils import get_anyres_image_grid_shape, process_images
from llava.model.compression import get_method
from llava.model.compression.common import (
    Budget, arrange_tokens, crop_geometry, project_merge, selection_record,
)
from llava.model.compression.prumerge import (
    FEATURES, KEYS, SCORE, PruMergeArgs, official_input, reduction_ratio, select, top_counts,
)
from llava.tiny import V16_PINPOINTS
from support import noise_image

NEWLINE = -1.0
FAITHFUL, ANYRES = PruMergeArgs(), PruMergeArgs(mode="anyres")


def _named_features(num_views, side, dtype=torch.float64):
    """`tower_features` `[V, 1 + P, 1]`: a [CLS] row (-2, dropped by the method), then cell names."""
    cells = torch.arange(side * side, dtype=dtype)
    named = torch.stack([100 * view + cells for view in range(num_views)])[..., None]
    return torch.cat([torch.full((num_views, 1, 1), -2.0, dtype=dtype), named], dim=1)


def _scores(named, side):
    """`[V, P]` scores: `named[v]` maps cells of view v to their score, every other cell `rest`."""
    scores = torch.zeros(len(named), side * side, dtype=torch.float64)
    for view, cell_scores in enumerate(named):
        scores[view] = cell_scores.get("rest", 0.0)
        for cell, score in cell_scores.items():
            if cell != "rest":
                scores[view, cell] = score
    return scores


def _sequence(selection, views, newline=None, layout="official"):
    """The arranged tokens `[M, C]` with the identity projector; `views`: the tower features without
    their [CLS] row `[V, P, C]` (what an unmerged selection sends; a merge's tokens all come from it)."""
    return arrange_tokens(views, project_merge(selection, lambda tokens: tokens), newline, layout)


def _run(method, size, grid, side, signals, args, ratio=None, visual_tokens=None):
    geometry = crop_geometry(size, grid, side, unpad=args.mode == "anyres")
    views = signals[FEATURES][:, 1:]
    selection = method(views, signals, geometry, Budget.resolve(geometry, ratio, visual_tokens), args)
    newline = torch.tensor([NEWLINE], dtype=torch.float64) if geometry.unpad else None
    return selection, _sequence(selection, views, newline)[:, 0].tolist()


# --- by hand: one side-6 view (P = 36), faithful ---------------------------------------------------
#
# Scores: cell 7 0.5, cell 20 0.3, cell 33 0.2, every other cell 0.01. Keys (d = 2): cells 0, 1, 2
# point along -x, every other cell along +x, so a token's 32 nearest of its 35 candidates are exactly
# the 32 cells other than itself and 0, 1, 2 (cosine 1 against -1).

def _one_view_signals():
    keys = torch.zeros(1, 36, 2, dtype=torch.float64)
    keys[..., 0] = 1.0
    keys[0, :3, 0] = -1.0
    return {SCORE: _scores([{7: 0.5, 20: 0.3, 33: 0.2, "rest": 0.01}], 6), KEYS: keys,
            FEATURES: _named_features(1, 6)}


def _weighted(scores, cells):
    """`sum_j a_j x_j` over `cells` of view 0 (x_j = j)."""
    return sum(float(scores[0, cell]) * cell for cell in cells)


def test_faithful_keeps_the_top_k_best_first_each_plus_its_neighbours_then_the_extra_token():
    signals = _one_view_signals()
    scores = signals[SCORE]
    # R = 0.1: k = int(36 x 0.1) = 3 tokens, best first: 7, 20, 33; then the extra token.
    selection, sequence = _run(select, (300, 300), (0, 0), 6, signals, FAITHFUL, ratio=0.1)
    far = {0, 1, 2}
    # Token 7: 7 + the weighted sum over the 32 cells other than 7 and 0, 1, 2: 20 and 33 are kept
    # tokens and still count (P3): 7 + 0.3 x 20 + 0.2 x 33 + 0.01 x (3 + ... + 35 - 7 - 20 - 33).
    assert sequence[0] == pytest.approx(7 + 0.3 * 20 + 0.2 * 33 + 0.01 * (sum(range(3, 36)) - 60))
    assert sequence[1] == pytest.approx(20 + _weighted(scores, set(range(36)) - far - {20}))
    assert sequence[2] == pytest.approx(33 + _weighted(scores, set(range(36)) - far - {33}))
    # The extra token sums every non-kept cell, 0, 1, 2 included: 0.01 x (630 - 7 - 20 - 33) (P4).
    assert sequence[3] == pytest.approx(0.01 * (sum(range(36)) - 60))
    assert len(sequence) == 4 and selection.extra["view_tokens"] == [4]
    record = selection_record(selection, "official")
    assert record["kept"] == [[7, 20, 33]] and record["sequence"] == [7, 20, 33, 36] and record["extra_tokens"] == 1


def test_adaptive_keeps_the_iqr_outliers_of_the_view():
    # Quartiles of 33 scores 0.01 and three larger: Q1 = Q3 = 0.01, so the bound is 0.01 and the three
    # larger scores are the outliers: r = 3 / 36, k = int(36 r) = 3, the same tokens as above.
    selection, sequence = _run(select, (300, 300), (0, 0), 6, _one_view_signals(), PruMergeArgs(adaptive=True),
                               ratio=0.1)
    assert selection_record(selection, "official")["kept"] == [[7, 20, 33]]
    assert selection.extra["outlier_ratios"] == [3 / 36]
    _, fixed = _run(select, (300, 300), (0, 0), 6, _one_view_signals(), FAITHFUL, ratio=0.1)
    assert sequence == fixed


def test_adaptive_with_flat_scores_keeps_only_the_extra_token():
    signals = dict(_one_view_signals(), **{SCORE: torch.full((1, 36), 0.25, dtype=torch.float64)})
    selection, sequence = _run(select, (300, 300), (0, 0), 6, signals, PruMergeArgs(adaptive=True), ratio=0.5)
    assert selection.kept_cells == 0 and sequence == [pytest.approx(0.25 * sum(range(36)))]


# --- by hand: 800x200 on a 2x1 grid of side-4 views (V = 3, P = 16) -------------------------------
#
# The crop canvas is 4 rows x 8 columns; unpadded (anyres) the image holds canvas rows 1-2 only (new
# height int(200 * 8 / 800) = 2), so each crop has the 8 image cells 4..11. Every key is the same, so
# every other offered cell is a neighbour (min(32, offered - 1) of them).
HAND_SCORES = [
    {2: 0.4, 13: 0.3, 6: 0.2, 9: 0.1, 15: 0.05},     # thumbnail (view 0, names 0..15)
    {0: 0.9, 1: 0.8, 5: 0.5, 10: 0.25, 6: 0.125},     # left crop (names 100..115): 0 and 1 are padding
    {15: 0.9, 7: 0.5, 4: 0.25, 9: 0.125},              # right crop (names 200..215): 15 is padding
]


def _hand_signals():
    return {SCORE: _scores(HAND_SCORES, 4), KEYS: torch.ones(3, 16, 2, dtype=torch.float64),
            FEATURES: _named_features(3, 4)}


def test_anyres_merges_within_each_views_image_cells_in_raster_order_then_the_extra_tokens():
    # R = 0.25: the thumbnail keeps int(16 / 4) = 4 (2, 13, 6, 9), each crop int(8 / 4) = 2 of its image
    # cells: left 5, 10 (padding 0, 1 score higher but are not offered), right 7, 4.
    selection, sequence = _run(select, (800, 200), (2, 1), 4, _hand_signals(), ANYRES, ratio=0.25)
    # Thumbnail token i: i + the weighted names of the 15 others (only 2, 13, 6, 9, 15 weigh).
    thumb = {cell: cell + sum(score * other for other, score in HAND_SCORES[0].items() if other != cell)
             for cell in (2, 6, 9, 13)}
    assert thumb[2] == pytest.approx(2 + 0.3 * 13 + 0.2 * 6 + 0.1 * 9 + 0.05 * 15)
    # Left crop: 105 + 0.25 x 110 + 0.125 x 106, and 110 + 0.5 x 105 + 0.125 x 106; extra 0.125 x 106.
    # Right crop: 207 + 0.25 x 204 + 0.125 x 209, and 204 + 0.5 x 207 + 0.125 x 209; extra 0.125 x 209.
    # Raster: the thumbnail, then canvas row 1 (left 5, right 4, 7), newline, row 2 (left 10), newline,
    # then the extra tokens, thumbnail's (0.05 x 15) first.
    expected = [thumb[2], thumb[6], thumb[9], thumb[13],
                105 + 27.5 + 13.25, 204 + 103.5 + 26.125, 207 + 51 + 26.125, NEWLINE,
                110 + 52.5 + 13.25, NEWLINE,
                0.05 * 15, 0.125 * 106, 0.125 * 209]
    assert sequence == pytest.approx(expected)
    assert selection.extra["view_tokens"] == [5, 3, 3] and selection.extra["top_tokens"] == [4, 2, 2]
    record = selection.accounting("official")
    assert (record["image_tokens"], record["extra_tokens"], record["newline_tokens"]) == (11, 3, 2)


def test_faithful_offers_every_cell_and_sends_views_one_after_another():
    # Without unpadding every view offers its 16 cells: R = 0.25 keeps 4 per view, padding included.
    selection, sequence = _run(select, (800, 200), (2, 1), 4, _hand_signals(), FAITHFUL, ratio=0.25)
    record = selection_record(selection, "official")
    assert record["kept"] == [[2, 13, 6, 9], [0, 1, 5, 10], [15, 7, 4, 9]]
    # View by view: 4 cells then the extra token (48 + e), no newline.
    assert record["sequence"] == [2, 13, 6, 9, 48, 16, 17, 21, 26, 49, 47, 39, 36, 41, 50]
    assert NEWLINE not in sequence and len(sequence) == 15
    # Left crop, extra token: the non-kept weighted cells, here only 6: 0.125 x 106.
    assert sequence[9] == pytest.approx(0.125 * 106)
    # Spatial layout: the raster arrangement (no newline without unpadding), then the extra tokens.
    spatial = _sequence(selection, _hand_signals()[FEATURES][:, 1:], None, "spatial")[:, 0].tolist()
    assert spatial[:4] == pytest.approx([sequence[0], sequence[2], sequence[3], sequence[1]])  # 2, 6, 9, 13
    assert spatial[-3:] == pytest.approx([sequence[4], sequence[9], sequence[14]])


def test_anyres_ignores_the_padding_cells_entirely():
    signals = _hand_signals()
    _, before = _run(select, (800, 200), (2, 1), 4, signals, ANYRES, ratio=0.25)
    padding = torch.tensor([cell for cell in range(16) if not 4 <= cell < 12])
    signals[FEATURES][1:, 1 + padding] = 1e6      # crop padding features, keys and scores changed
    signals[KEYS][1:, padding] = -1.0
    signals[SCORE][1:, padding] = 5.0
    _, after = _run(select, (800, 200), (2, 1), 4, signals, ANYRES, ratio=0.25)
    assert after == before


def test_full_budget_keeps_everything_unmerged():
    faithful, sequence = _run(select, (800, 200), (2, 1), 4, _hand_signals(), FAITHFUL, ratio=1.0)
    assert faithful.keeps_all and len(sequence) == 48 and NEWLINE not in sequence
    anyres, sequence = _run(select, (800, 200), (2, 1), 4, _hand_signals(), ANYRES, visual_tokens=32)
    assert anyres.keeps_all and len(sequence) == 16 + 16 + 2


# --- the budget rules -------------------------------------------------------------------------------

def _budget(size, args, ratio=None, visual_tokens=None, side=24):
    grid = get_anyres_image_grid_shape(size, V16_PINPOINTS, 336)
    geometry = crop_geometry(size, grid, side, unpad=args.mode == "anyres")
    return geometry, Budget.resolve(geometry, ratio, visual_tokens)


@pytest.mark.parametrize("ratio, per_view", [(0.25, 145), (0.1, 58), (0.05, 29)])
def test_paper_budget_is_int_576r_plus_one_per_view(ratio, per_view):
    """Spec section 5: 10% -> int(57.6) + 1 = 58 per view, 290 for 5 views."""
    geometry, budget = _budget((1000, 700), FAITHFUL, ratio)
    assert [count + 1 for count in top_counts(geometry, reduction_ratio(geometry, budget, FAITHFUL))] == [per_view] * 5


def test_visual_tokens_count_the_extra_tokens():
    # Faithful, 5 views of 576: N = 700 keeps floor(695 x 576 / 2880) = 139 + 1 per view = 700.
    geometry, budget = _budget((1000, 700), FAITHFUL, visual_tokens=700)
    assert top_counts(geometry, reduction_ratio(geometry, budget, FAITHFUL)) == [139] * 5
    # Anyres, 576 + 4 x 408 = 2208 cells: N = 300 keeps floor(295 x 576 / 2208) = 76 and
    # floor(295 x 408 / 2208) = 54 (54.5), so 77 + 4 x 55 = 297 tokens.
    geometry, budget = _budget((1000, 700), ANYRES, visual_tokens=300)
    assert top_counts(geometry, reduction_ratio(geometry, budget, ANYRES)) == [76, 54, 54, 54, 54]
    # Fewer than the extra tokens: each view still sends its extra token (k = 0).
    geometry, budget = _budget((1000, 700), FAITHFUL, visual_tokens=3)
    assert top_counts(geometry, reduction_ratio(geometry, budget, FAITHFUL)) == [0] * 5


@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 5000), height=st.integers(1, 5000), ratio=st.sampled_from([0.5, 0.25, 0.1, 0.05, 0.01]),
       tokens=st.integers(1, 3000), rule=st.sampled_from(["paper", "matched", "anyres", "tokens", "anyres tokens"]),
       seed=st.integers(0, 99))
def test_budget_rules_on_random_sizes(width, height, ratio, tokens, rule, seed):
    """Restated from the spec (section 5) and the module: faithful paper `int(576 R) + 1` per view,
    faithful matched `int(576 r) + 1` with `r = R N_van / (V 576)`, anyres `int(c_v R)` plus an extra
    token where something is left; `--visual-tokens N`: between N - V and N in all, at least E."""
    size = (width, height)
    grid = get_anyres_image_grid_shape(size, V16_PINPOINTS, 336)
    views = 1 + grid[0] * grid[1]
    unpadded = crop_geometry(size, grid, 24)
    image_cells = [576, *unpadded.valid_counts]
    args = PruMergeArgs(mode="anyres" if "anyres" in rule else "faithful",
                        budget="matched" if rule == "matched" else "paper")
    geometry, budget = _budget(size, args, **(dict(visual_tokens=tokens) if "tokens" in rule else dict(ratio=ratio)))
    generator = torch.Generator().manual_seed(seed)
    signals = {SCORE: torch.rand(views, 576, generator=generator),
               KEYS: torch.randn(views, 576, 4, generator=generator),
               FEATURES: torch.randn(views, 577, 3, generator=generator)}
    selection = select(torch.zeros(views, 576, 1), signals, geometry, budget, args)
    assert selection.image_tokens <= geometry.vanilla_image_tokens
    if budget.keeps_all:  # N at least the cells offered
        assert selection.keeps_all and "tokens" in rule
        return
    sent = [len(cells) for cells in selection_record(selection, "official")["kept"]]
    assert sent == selection.extra["top_tokens"]
    sent = selection.extra["view_tokens"]
    if rule == "paper":
        assert sent == [int(576 * ratio) + 1] * views
    elif rule == "matched":
        assert sent == [int(576 * (ratio * unpadded.vanilla_image_tokens / (views * 576))) + 1] * views
    elif rule == "anyres":
        assert sent == [int(cells * ratio) + (0 < cells and int(cells * ratio) < cells) for cells in image_cells]
    else:
        offered = image_cells if args.mode == "anyres" else [576] * views
        extra_tokens = sum(1 for cells in offered if cells)
        assert max(tokens, extra_tokens) - views <= sum(sent) <= max(tokens, extra_tokens)


def test_matched_budget_by_hand():
    # 1000x700 on 2x2: N_van = 2208. R = 0.1: r = 220.8 / 2880 per view, int(576 r) = int(44.16) = 44.
    geometry, budget = _budget((1000, 700), PruMergeArgs(budget="matched"), 0.1)
    assert top_counts(geometry, reduction_ratio(geometry, budget, PruMergeArgs(budget="matched"))) == [44] * 5


# --- the official code, restated (loops, one view per call as HiRED's port) --------------------------

def official_complement(kept, num_patches):
    """The released `complement_idx`: `arange` with the kept positions zeroed, sorted, the first
    `len(kept)` dropped (with unique kept cells: the others, ascending)."""
    values = list(range(num_patches))
    for cell in kept:
        values[cell] = 0
    return sorted(values)[len(kept):]


def official_outlier_ratio(scores):
    """The released `outlier_dectection`: IQR upper outliers of the float32 copy, numpy percentiles."""
    values = scores.to(torch.float32).numpy().flatten()
    lower, upper = np.percentile(values, 25), np.percentile(values, 75)
    return len(np.where(values > upper + 1.5 * (upper - lower))[0]) / len(values)


def official_view(scores, keys, features, adaptive, ratio, plus=False):
    """`token_prune_merge_advanced(_plus)` on one view (B = 1): `scores` `[P]`, `keys` `[P, C_k]`,
    `features` `[P, C]`. Returns the sent cells and the tokens `[n + 1, C]` (the extra token last). The
    released stop 575 is `P - 1` here so that small views work the same way."""
    num_patches = scores.shape[0]
    if adaptive:
        ratio = official_outlier_ratio(scores)
    kept = torch.topk(scores[None], int(num_patches * ratio), dim=1, largest=True).indices[0].tolist()
    if plus:
        step = int(1 / ratio)
        if adaptive:
            top = list(kept)
            kept += [cell for cell in range(0, num_patches - 1, int(step / 3)) if cell not in top]
        else:  # the training branch: no duplicate removal (only called where there is none)
            kept += list(range(int(step / 2), num_patches - 1, step))
    rest = official_complement(kept, num_patches)
    normed = F.normalize(keys, p=2, dim=-1)
    tokens = []
    for position, cell in enumerate(kept):
        candidates = kept[:position] + kept[position + 1:] + rest
        cosines = torch.bmm(normed[cell][None, None], normed[candidates].T[None])
        nearest = torch.topk(cosines, k=32, dim=2, largest=True).indices.squeeze().tolist()
        cluster = [candidates[index] for index in nearest]
        weighted = torch.sum(features[cluster] * scores[cluster][:, None], dim=0)
        tokens.append(features[cell] + weighted)
    tokens.append(torch.sum(features[rest] * scores[rest][:, None], dim=0))
    return kept, torch.stack(tokens)


def random_signals(num_views, side, generator, width=8):
    """Scores with ties (a base of few values, some cells spiked to a few larger values, the IQR
    outliers), keys with exact ties (most cells a scaled axis vector, so cosines 0 and 1 repeat), random
    features; all float64."""
    num_patches = side * side
    scores = torch.randint(10, 14, (num_views, num_patches), generator=generator).double() / 1000
    spiked = torch.rand(num_views, num_patches, generator=generator) < 0.08
    spikes = torch.randint(4, 9, (num_views, num_patches), generator=generator).double() / 100
    scores = torch.where(spiked, spikes, scores)
    keys = torch.randn(num_views, num_patches, width, generator=generator, dtype=torch.float64)
    axis = F.one_hot(torch.randint(0, width, (num_views, num_patches), generator=generator), width).double() * 3
    keys = torch.where(torch.rand(num_views, num_patches, 1, generator=generator) < 0.7, axis, keys)
    features = torch.randn(num_views, 1 + num_patches, 5, generator=generator, dtype=torch.float64)
    return {SCORE: scores, KEYS: keys, FEATURES: features}


def official_sequence(signals, adaptive, ratio, plus=False):
    """HiRED's port: every view on its own, tokens concatenated thumbnail first; and the sent cells."""
    views = [official_view(signals[SCORE][view], signals[KEYS][view], signals[FEATURES][view, 1:], adaptive, ratio,
                           plus) for view in range(signals[SCORE].shape[0])]
    return [cells for cells, _ in views], torch.cat([tokens for _, tokens in views])


@pytest.mark.parametrize("side, size, grid", [(24, (1000, 700), (2, 2)), (6, (800, 200), (2, 1)),
                                              (24, (336, 336), (0, 0))])
@pytest.mark.parametrize("adaptive, ratio", [(False, 0.1), (False, 0.25), (False, 0.5), (True, 0.1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_faithful_equals_the_official_code_view_by_view(side, size, grid, adaptive, ratio, seed):
    signals = random_signals(1 + grid[0] * grid[1], side, torch.Generator().manual_seed(seed))
    geometry = crop_geometry(size, grid, side, unpad=False)
    views = signals[FEATURES][:, 1:]
    selection = select(views, signals, geometry, Budget.resolve(geometry, ratio), PruMergeArgs(adaptive=adaptive))
    cells, tokens = official_sequence(signals, adaptive, ratio)
    assert selection_record(selection, "official")["kept"] == cells
    assert torch.allclose(_sequence(selection, views), tokens, rtol=1e-12, atol=1e-12)


def test_the_official_comparison_can_fail():
    """The restatement tells a changed neighbour count apart (the check above is not vacuous)."""
    signals = random_signals(1, 24, torch.Generator().manual_seed(3))
    _, tokens = official_sequence(signals, False, 0.1)
    geometry = crop_geometry((336, 336), (0, 0), 24, unpad=False)
    signals[KEYS][0, 5] = -signals[KEYS][0, 5]  # one key flipped: some clusters change
    selection = select(signals[FEATURES][:, 1:], signals, geometry, Budget.resolve(geometry, 0.1), FAITHFUL)
    assert not torch.allclose(_sequence(selection, signals[FEATURES][:, 1:]), tokens)


def test_the_iqr_is_numpys_percentile():
    generator = torch.Generator().manual_seed(7)
    signals = random_signals(9, 24, generator)
    scores = torch.cat([signals[SCORE], torch.rand(9, 576, generator=generator, dtype=torch.float64) ** 6])
    geometry = crop_geometry((336, 336), (0, 0), 24, unpad=False)
    for row in scores:
        selection = select(torch.zeros(1, 576, 1), dict(signals, **{SCORE: row[None], KEYS: signals[KEYS][:1],
                                                                    FEATURES: signals[FEATURES][:1]}),
                           geometry, Budget.resolve(geometry, 0.5), PruMergeArgs(adaptive=True))
        assert selection.extra["outlier_ratios"] == [official_outlier_ratio(row)]


def test_bad_signal_shape_is_a_clear_error():
    signals = _hand_signals()
    signals[KEYS] = signals[KEYS][:, :15]
    geometry = crop_geometry((800, 200), (2, 1), 4, unpad=False)
    with pytest.raises(ValueError, match=r"keys_last must have shape \[3, 16, C\]"):
        select(torch.zeros(3, 16, 1), signals, geometry, Budget.resolve(geometry, 0.5), FAITHFUL)


def test_registration_declares_the_signals_and_the_input_change():
    method = get_method("prumerge")
    assert method.needs == {SCORE, KEYS, FEATURES} and method.stage == "pre-llm"
    assert method.input_changes(FAITHFUL) == official_input(FAITHFUL) == {"mm_patch_merge_type": "spatial"}
    assert method.input_changes(ANYRES) == {}


# --- through the model ----------------------------------------------------------------------------------


def encode(model, processor, size, **settings):
    """The model's sequence and accounting for one image, and the tower's signals for it."""
    image = noise_image(size, 5)
    model.set_compression(**settings)
    pixel_values = process_images([image], processor, model.input_config())
    with torch.no_grad():
        sequence, = model.encode_image_sequences(pixel_values, [image.size])
        _, signals = model.encode_images(pixel_values[0], {SCORE, KEYS, FEATURES})
    return sequence, signals, model.last_accounting[0]


def test_faithful_through_the_model_is_the_official_code_on_the_towers_signals(tiny, model):
    _, _, processor = tiny
    sequence, signals, record = encode(model, processor, (1000, 700), method="prumerge", retention_ratio=0.25)
    # 5 views x (int(576 x 0.25) + 1) = 725 tokens, no newline, against the model's own 2208 image tokens.
    assert sequence.shape[0] == record["tokens_after"] == 725 and record["newline_tokens"] == 0
    assert record["view_tokens"] == [145] * 5 and record["extra_tokens"] == 5
    assert record["vanilla_image_tokens"] == 2208 and record["realised_ratio"] == 725 / 2208
    _, tokens = official_sequence(signals, False, 0.25)
    with torch.no_grad():
        expected = model.get_model().mm_projector(tokens)
    assert torch.allclose(sequence, expected, atol=1e-5)


def test_anyres_through_the_model_has_newlines_and_the_extra_tokens_last(tiny, model):
    _, _, processor = tiny
    sequence, _, record = encode(model, processor, (1000, 700), method="prumerge", method_args=["mode=anyres"],
                                 retention_ratio=0.25)
    newline = model.get_model().image_newline
    is_newline = (sequence == newline).all(dim=1)
    # 34 image rows in the canvas; thumbnail int(576 / 4) = 144, crops int(408 / 4) = 102, + 5 extra.
    assert record["newline_tokens"] == int(is_newline.sum()) == 34 and bool(is_newline[-6])
    assert not is_newline[-5:].any() and record["image_tokens"] == 144 + 4 * 102 + 5 == sequence.shape[0] - 34


def test_the_tower_is_asked_for_the_declared_signals_only(model):
    model.set_compression(0.25, method="prumerge")
    assert model.compression_settings().signals == {SCORE, KEYS, FEATURES}
    model.set_compression(1.0, method="prumerge")  # everything kept: nothing to compute
    assert model.compression_settings().signals == frozenset()


def test_one_run_of_the_loader_runner(loader_answers):
    rows = loader_answers([(80, 50), (700, 300)], "--method", "prumerge", "--retention-ratio", "0.1",
                          text="What is it?")
    assert [row["question_id"] for row in rows] == [0, 1]
    for row in rows:
        meta = row["metadata"]
        image, = meta["images"]
        assert meta["method"] == "prumerge" and meta["method_args"]["mode"] == "faithful"
        views = len(image["view_tokens"])
        assert image["view_tokens"] == [int(576 * 0.1) + 1] * views and image["newline_tokens"] == 0
        assert meta["visual_tokens"] == image["tokens_after"] == 58 * views
