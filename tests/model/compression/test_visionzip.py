"""VisionZip: dominant tokens by [CLS] attention plus contextual tokens merged by key similarity,
worked by hand on side-4 views in both modes, restated from the official code and compared on
random inputs (ties included), the budget rule on random image sizes, the model's glue and one
run of the loader runner.

Tower features are named: value `100 * view + cell` (C = 1), a view's [CLS] `100 * view + 50`,
newline -1, and the projector is the identity, so a sequence reads as the cells the language
model receives; a contextual token reads as its target's name plus the mean of its members'.
"""

import json
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

from llava.eval import model_vqa_loader
from llava.eval.jsonl import read_jsonl
from llava.mm_utils import get_anyres_image_grid_shape, process_images
from llava.model.compression import get_method
from llava.model.compression.common import (
    Budget, Merge, arrange_tokens, crop_geometry, keep_mask, project_merge, selection_record,
)
from llava.model.compression.visionzip import (
    FEATURES, KEYS, SCORE, VisionZipArgs, official_input, select, split_view_tokens, view_token_counts,
)
from llava.tiny import V16_PINPOINTS
from support import noise_image

NEWLINE = -1.0
FAITHFUL, ANYRES = VisionZipArgs(), VisionZipArgs(mode="anyres")


def _sequence(selection, newline=None, layout="official"):
    """The arranged tokens `[M, C]` of a tower-space merge, with the identity projector (the
    views only give the arrangement its shapes and dtype: every token comes from the merge)."""
    geometry, features = selection.geometry, selection.features
    if features is None:  # nothing kept: only newlines
        features = torch.zeros(0, 1 if newline is None else newline.shape[0])
    views = torch.zeros(1 + geometry.num_crops, geometry.side**2, features.shape[-1], dtype=features.dtype)
    return arrange_tokens(views, project_merge(selection, lambda tokens: tokens), newline, layout)


# --- by hand: a 2x1 grid of side-4 views (V = 3, P = 16) --------------------------------------
#
# 800x200 on a 2x1 grid: the crop canvas is 4 rows x 8 columns. Unpadded (anyres) the image
# holds canvas rows 1-2 only (new height int(200 * 8 / 800) = 2), so each crop has the 8 image
# cells 4..11; without unpadding (faithful) all 16.
#
# Every view gets the same scores and keys. Ranking by the head sum, best first:
# 14, 10, 9, 6, 5, 2, 1, 11, then the rest. The two heads disagree on 11 and 0 (head 0 prefers 0),
# so only their sum ranks 11 eighth.
RANKING = [14, 10, 9, 6, 5, 2, 1, 11]
# Keys (d = 2): cell 0 points along x, cell 8 along y; 3 and 4 lean to x, 7, 11, 12, 15 to y, and
# 13 is exactly between them: a tie, which goes to the lower target (cell 0's).
KEYS_BY_CELL = {0: (1.0, 0.0), 8: (0.0, 1.0), 3: (1.0, 0.2), 4: (1.0, 0.1), 13: (1.0, 1.0),
                7: (0.2, 1.0), 11: (0.1, 1.0), 12: (0.3, 1.0), 15: (0.0, 1.0)}


def _hand_signals(views=3, side=4):
    cells = side * side
    total = torch.zeros(cells)
    for rank, cell in enumerate(RANKING):
        total[cell] = 20.0 - rank
    heads = torch.stack([total / 2, total / 2])
    heads[0, 0], heads[1, 0] = 12.6, 0.0      # 0 sums to 12.6 although head 0 alone ranks it above 11's 6.5
    heads[0, 11], heads[1, 11] = 0.0, 13.0   # 11 sums to 13.0
    keys = torch.tensor([KEYS_BY_CELL.get(cell, (1.0, 0.5)) for cell in range(cells)])
    keys = torch.cat([torch.tensor([[0.3, 0.3]]), keys])                # the [CLS] key, never used
    named = torch.stack([torch.cat([torch.tensor([100.0 * view + 50]), 100.0 * view + torch.arange(cells)])
                         for view in range(views)])[..., None]         # [V, 1 + P, 1]
    return {SCORE: heads.expand(views, -1, -1).contiguous(), KEYS: keys.expand(views, -1, -1).contiguous(),
            FEATURES: named}


def _hand_select(args, ratio):
    geometry = crop_geometry((800, 200), (2, 1), 4, unpad=args.mode == "anyres")
    return select(torch.zeros(3, 16, 1), _hand_signals(), geometry, Budget.resolve(geometry, ratio), args)


def test_faithful_sends_the_official_sequence_by_hand():
    # R = 0.625: N = round(16 R) = 10 per view, contextual max(1, round(100 / 64)) = 2, dominant 8:
    # [CLS] + the 7 best patches {1, 2, 5, 6, 9, 10, 14}. The filtered list is the other 9 cells
    # 0, 3, 4, 7, 8, 11, 12, 13, 15; step = 9 // 2 = 4, so the targets are its positions 0 and 4:
    # cells 0 and 8. Members: 3, 4, 13 (tie) -> 0; 7, 11, 12, 15 -> 8.
    selection = _hand_select(FAITHFUL, 0.625)
    assert isinstance(selection, Merge) and selection.feature_space == "tower"
    assert selection.extra == dict(view_tokens=[10] * 3, view_dominant=[8] * 3, view_contextual=[2] * 3)
    first, second = 0 + (3 + 4 + 13) / 3, 8 + (7 + 11 + 12 + 15) / 4      # target + mean of members
    expected = [50, 1, 2, 5, 6, 9, 10, 14, first, second,                 # thumbnail [CLS], dominant, contextual
                # the crops' dominant patches on the 4 x 8 canvas, row by row, padding not removed
                101, 102, 201, 202, 105, 106, 205, 206, 109, 110, 209, 210, 114, 214,
                150, 250,                                                 # the crops' [CLS] tokens
                # the crops' contextual tokens: target and members are all named 100 * view higher
                200 + first, 200 + second, 400 + first, 400 + second]
    tokens = _sequence(selection)[:, 0]
    assert torch.allclose(tokens, torch.tensor(expected)) and len(expected) == 3 * 10
    record = selection.accounting("official", selection.geometry.with_unpad(True))
    assert (record["image_tokens"], record["newline_tokens"], record["extra_tokens"]) == (30, 0, 3)
    assert record["vanilla_image_tokens"] == 16 + 8 + 8 and record["realised_ratio"] == 30 / 32
    # Provenance: each contextual token holds its target and its members.
    sources = selection_record(selection, "official")["sources"][0]
    assert sources[-2:] == [[0, 3, 4, 13], [7, 8, 11, 12, 15]] and sources[0] == [1]


def test_faithful_spatial_layout_is_the_raster_canvas_then_the_cls_tokens():
    selection = _hand_select(FAITHFUL, 0.625)
    first, second = 0 + 20 / 3, 8 + 45 / 4
    tokens = _sequence(selection, layout="spatial")[:, 0]
    thumbnail = [first, 1, 2, 5, 6, second, 9, 10, 14]
    canvas = [200 + first, 101, 102, 400 + first, 201, 202, 105, 106, 205, 206,
              200 + second, 109, 110, 400 + second, 209, 210, 114, 214]
    assert torch.allclose(tokens, torch.tensor(thumbnail + canvas + [50, 150, 250]))


def test_anyres_keeps_image_cells_without_cls_and_places_contextual_tokens_at_their_targets():
    # R = 0.625. Thumbnail: N = 10, contextual 2, dominant 8 patches (no [CLS]): the ranking's
    # first 8, so 11 too. Filtered list 0, 3, 4, 7, 8, 12, 13, 15; step 4: targets 0 and 8;
    # members 3, 4, 13 -> 0 and 7, 12, 15 -> 8.
    # Each crop: N = round(8 R) = 5 of its image cells 4..11, contextual 1, dominant 4: the
    # ranking's best image cells 10, 9, 6, 5. Filtered list 4, 7, 8, 11; one target, cell 4.
    selection = _hand_select(ANYRES, 0.625)
    assert selection.extra == dict(view_tokens=[10, 5, 5], view_dominant=[8, 4, 4], view_contextual=[2, 1, 1])
    first, second = 0 + (3 + 4 + 13) / 3, 8 + (7 + 12 + 15) / 3
    crop = 4 + (7 + 8 + 11) / 3
    expected = [first, 1, 2, 5, 6, second, 9, 10, 11, 14,                 # thumbnail in raster order
                200 + crop, 105, 106, 400 + crop, 205, 206, NEWLINE,      # image row 1 of the canvas
                109, 110, 209, 210, NEWLINE]                              # image row 2
    tokens = _sequence(selection, torch.tensor([NEWLINE]))[:, 0]
    assert torch.allclose(tokens, torch.tensor(expected))
    assert selection.accounting("official")["image_tokens"] == 20 and selection.extra_tokens == 0


def test_a_single_view_sends_cls_dominant_and_contextual_tokens():
    geometry = crop_geometry((300, 300), (0, 0), 4, unpad=False)
    signals = {name: value[:1] for name, value in _hand_signals().items()}
    selection = select(torch.zeros(1, 16, 1), signals, geometry, Budget.resolve(geometry, 0.625))
    assert torch.allclose(_sequence(selection)[:, 0],
                          torch.tensor([50.0, 1, 2, 5, 6, 9, 10, 14, 20 / 3, 8 + 45 / 4]))


def test_smallest_budgets_send_cls_and_one_contextual_token_per_view():
    # N = 2 at least: dominant 1 (only [CLS], topk(0)) and contextual 1: the target is cell 0,
    # every other patch its member (mean of 1..15 = 8).
    selection = _hand_select(FAITHFUL, 0.001)
    assert selection.extra["view_tokens"] == [2] * 3
    assert torch.allclose(_sequence(selection)[:, 0], torch.tensor([50.0, 0 + 8, 150, 250, 100 + 108, 200 + 208]))
    # anyres at the same ratio: round(0.016) = 0 everywhere, nothing is sent but the newlines;
    # matched: one contextual token per view, the target its first image cell (a crop's: cell
    # 4, members 5..11 of mean 8), on canvas row 1.
    nothing = _hand_select(ANYRES, 0.001)
    assert nothing.image_tokens == 0 and _sequence(nothing, torch.tensor([NEWLINE]))[:, 0].tolist() == [NEWLINE] * 2
    matched = _hand_select(VisionZipArgs("anyres", "matched"), 0.001)
    assert torch.allclose(_sequence(matched, torch.tensor([NEWLINE]))[:, 0],
                          torch.tensor([0.0 + 8, 104 + 108, 204 + 208, NEWLINE, NEWLINE]))


def test_full_budget_runs_in_faithful_mode_and_keeps_everything_in_anyres():
    faithful = _hand_select(FAITHFUL, 1.0)  # N = 16 = 14 + 2: still [CLS] tokens and two merges
    assert not faithful.keeps_all and faithful.image_tokens == 3 * 16 and faithful.extra_tokens == 3
    assert not FAITHFUL.keeps_everything() and ANYRES.keeps_everything()
    anyres = _hand_select(ANYRES, 1.0)
    assert anyres.keeps_all and anyres.image_tokens == 16 + 8 + 8


# --- the budget ----------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens, split", [(64, (54, 10)), (192, (162, 30)), (128, (108, 20)), (32, (27, 5)),
                                           (58, (49, 9)), (2, (1, 1)), (1, (0, 1)), (0, (0, 0))])
def test_split_follows_the_readme_and_the_paper(tokens, split):
    """README 54 + 10; the paper's LLaVA-1.5 rows; spec §5's R = 0.1 example (58 = 49 + 9)."""
    assert split_view_tokens(tokens) == split


def _counts(size, ratio=None, args=FAITHFUL, visual_tokens=None, side=24):
    grid = get_anyres_image_grid_shape(size, V16_PINPOINTS, 336)
    geometry = crop_geometry(size, grid, side, unpad=args.mode == "anyres")
    return view_token_counts(geometry, Budget.resolve(geometry, ratio, visual_tokens), args)


def test_paper_budget_is_the_papers_llava_next_rows():
    # 640 / 320 / 160 of "2880": 128 / 64 / 32 per view over 5 views.
    assert _counts((672, 672), 128 / 576) == [128] * 5 and _counts((1000, 700), 32 / 576) == [32] * 5
    assert _counts((1000, 700), 0.1) == [58] * 5                                          # round(57.6)
    assert _counts((1000, 700), 0.1, VisionZipArgs(budget="matched")) == [44] * 5         # round(2208 R / 5)
    assert _counts((1000, 700), 0.1, ANYRES) == [58, 41, 41, 41, 41]                       # round(408 R)
    assert _counts((1000, 700), visual_tokens=290) == [58] * 5                              # round(290 / 5)


@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 5000), height=st.integers(1, 5000),
       ratio=st.sampled_from([1.0, 0.5, 0.25, 0.1, 0.05, 0.01, 0.001]), tokens=st.integers(1, 4000))
def test_budget_rule_on_random_sizes(width, height, ratio, tokens):
    """Spec §5 restated: faithful paper N = round(576 R) per view, matched round(R N_van / V),
    --visual-tokens round(N / V), each within [2, 576]; anyres round(R c_v) of each view's image
    cells (matched: at least 1). Faithful sends V N tokens, [CLS] included."""
    size = (width, height)
    grid = get_anyres_image_grid_shape(size, V16_PINPOINTS, 336)
    views = 1 + grid[0] * grid[1]
    unpadded = crop_geometry(size, grid, 24)
    exact = Fraction(ratio)
    clamp = (lambda count: min(576, max(2, count)))
    assert _counts(size, ratio) == [clamp(round(576 * exact))] * views
    assert _counts(size, ratio, VisionZipArgs(budget="matched")) == [
        clamp(round(exact * unpadded.vanilla_image_tokens / views))] * views
    assert _counts(size, visual_tokens=tokens) == [clamp(round(Fraction(tokens, views)))] * views
    image_cells = [576, *unpadded.valid_counts]
    anyres = _counts(size, ratio, ANYRES)
    assert anyres == [round(cells * exact) for cells in image_cells]
    assert abs(sum(anyres) - ratio * unpadded.vanilla_image_tokens) <= views / 2           # R of the vanilla tokens
    assert _counts(size, ratio, VisionZipArgs("anyres", "matched")) == [
        min(cells, max(1, count)) for cells, count in zip(image_cells, anyres)]
    # The selection sends exactly these counts: V N in faithful mode, sum N_v in anyres mode.
    geometry = crop_geometry(size, grid, 4, unpad=False)
    signals = {SCORE: torch.rand(views, 2, 16), KEYS: torch.rand(views, 17, 2), FEATURES: torch.rand(views, 17, 1)}
    selection = select(torch.zeros(views, 16, 1), signals, geometry, Budget.resolve(geometry, ratio))
    per_view = min(16, max(2, round(16 * exact)))
    assert selection.image_tokens == _sequence(selection).shape[0] == views * per_view


# --- the official code, restated (visionzip/clip_encoder.py:31-85, llava_arch.py:42-121) -------

def official_view_outputs(head_scores, keys, features, dominant, contextual):
    """Each view's `[dominant + contextual, C]` tower output and its dominant rows (sequence
    indices, [CLS] = 0), as the released tower computes them, one view at a time after the
    batched score and `topk` (`dominant - 1` patches are stored, main.py:7)."""
    num_views, rows, _ = features.shape
    top = head_scores.sum(dim=1).topk(dominant - 1, dim=1).indices + 1     # batched over views, as released
    outputs, dominant_rows = [], []
    for view in range(num_views):
        kept = sorted({0, *top[view].tolist()})                           # masked_select keeps sequence order
        rest = [row for row in range(rows) if row not in kept]
        metric = keys[view, rest]
        metric = metric / metric.norm(dim=-1, keepdim=True)
        step = max(1, len(rest) // contextual)
        targets = list(range(0, len(rest), step))[:contextual]
        others = [index for index in range(len(rest)) if index not in targets]
        nearest = torch.bmm(metric[others][None], metric[targets].T[None])[0].argmax(dim=1).tolist()
        tokens = []
        for slot, target in enumerate(targets):
            members = [rest[others[index]] for index in range(len(others)) if nearest[index] == slot]
            total = features[view, members].float().sum(dim=0).to(features.dtype)
            tokens.append(features[view, rest[target]] + total / max(1, len(members)))
        outputs.append(torch.cat([features[view, kept], torch.stack(tokens)]))
        dominant_rows.append(kept)
    return outputs, dominant_rows


def official_llava_next_sequence(outputs, dominant_rows, grid, side):
    """`prepare_inputs_labels_for_multimodal_visionzip` under `spatial_unpad`: the thumbnail's
    output, then `restore_image_features_sorted` on the crops (dominant patches on the padded
    canvas, read row by row, no newline; the crops' [CLS]; their contextual tokens)."""
    thumbnail, *crops = outputs
    if not crops:
        return thumbnail
    grid_w, grid_h = grid
    dominant = len(dominant_rows[0])
    canvas = []
    for row in range(grid_h * side):
        for col in range(grid_w * side):
            crop = (row // side) * grid_w + col // side
            patch = (row % side) * side + col % side
            rows = dominant_rows[1 + crop]
            if 1 + patch in rows:
                canvas.append(crops[crop][rows.index(1 + patch)])
    cls_tokens = [output[0] for output in crops]
    contextual = [token for output in crops for token in output[dominant:]]
    return torch.stack([*thumbnail, *canvas, *cls_tokens, *contextual])


def _random_signals(views, side, generator, ties, width=8, heads=4, head_dim=4, dtype=torch.float32):
    """Random signals; with `ties`, scores are quarters (so head sums tie often) and keys are
    one-hot or all-ones (normalised exactly, so similarities tie exactly)."""
    patches = side * side
    if ties:
        head_scores = torch.randint(0, 4, (views, heads, patches), generator=generator) / 4
        palette = torch.cat([torch.eye(head_dim), torch.ones(1, head_dim)])
        keys = palette[torch.randint(0, head_dim + 1, (views, 1 + patches), generator=generator)]
    else:
        head_scores = torch.rand(views, heads, patches, generator=generator).softmax(dim=-1)
        keys = torch.randn(views, 1 + patches, head_dim, generator=generator)
    features = torch.randn(views, 1 + patches, width, generator=generator)
    return {SCORE: head_scores.to(dtype), KEYS: keys.to(dtype), FEATURES: features.to(dtype)}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_faithful_equals_the_official_code_on_random_inputs(seed, ties):
    generator = torch.Generator().manual_seed(seed)
    size = tuple(torch.randint(1, 3000, (2,), generator=generator).tolist())
    grid = get_anyres_image_grid_shape(size, V16_PINPOINTS, 336)
    views, side = 1 + grid[0] * grid[1], 24
    geometry = crop_geometry(size, grid, side, unpad=False)
    signals = _random_signals(views, side, generator, ties)
    for ratio in (0.5, 0.1, 0.02):
        budget = Budget.resolve(geometry, ratio)
        selection = select(torch.zeros(views, side * side, 1), signals, geometry, budget)
        dominant, contextual = split_view_tokens(round(576 * ratio))
        outputs, dominant_rows = official_view_outputs(signals[SCORE], signals[KEYS], signals[FEATURES],
                                                       dominant, contextual)
        expected = official_llava_next_sequence(outputs, dominant_rows, grid, side)
        got = _sequence(selection)
        assert got.shape == expected.shape
        # Kept and merged the same tokens: dominant ones and [CLS] equal exactly, the
        # contextual ones up to the summation order of the members' mean.
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
        kept = keep_mask(selection)  # the dominant patches and the targets
        assert torch.equal(kept.sum(dim=1), torch.full((views,), dominant - 1 + contextual))
        for view, rows in enumerate(dominant_rows):
            assert kept[view, torch.tensor(rows[1:], dtype=torch.long) - 1].all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_faithful_in_half_precision_matches_the_official_code(dtype):
    generator = torch.Generator().manual_seed(7)
    geometry = crop_geometry((1000, 700), (2, 2), 24, unpad=False)
    signals = _random_signals(5, 24, generator, ties=False, dtype=dtype)
    selection = select(torch.zeros(5, 576, 1, dtype=dtype), signals, geometry, Budget.resolve(geometry, 0.1))
    outputs, dominant_rows = official_view_outputs(signals[SCORE], signals[KEYS], signals[FEATURES], 49, 9)
    expected = official_llava_next_sequence(outputs, dominant_rows, (2, 2), 24)
    got = _sequence(selection)
    assert got.dtype == dtype and torch.allclose(got.float(), expected.float(), rtol=1e-2, atol=1e-2)


@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 5000), height=st.integers(1, 5000), ratio=st.floats(0.001, 0.999),
       budget=st.sampled_from(["paper", "matched"]), seed=st.integers(0, 99))
def test_anyres_keeps_dominant_and_targets_among_image_cells(width, height, ratio, budget, seed):
    """Anyres restated per view on side-6 views: the dominant cells are the best-scored image
    cells, the targets are taken by filtered index, every image cell is kept or merged, and
    the sequence length matches the accounting."""
    size, side = (width, height), 6
    grid = get_anyres_image_grid_shape(size, V16_PINPOINTS, 336)
    views = 1 + grid[0] * grid[1]
    geometry = crop_geometry(size, grid, side)
    signals = _random_signals(views, side, torch.Generator().manual_seed(seed), ties=False)
    args = VisionZipArgs("anyres", budget)
    selection = select(torch.zeros(views, side * side, 1), signals, geometry, Budget.resolve(geometry, ratio), args)
    if selection.keeps_all:
        return
    sequence = _sequence(selection, torch.tensor([NEWLINE] * 8))
    assert sequence.shape[0] == selection.tokens_after("official")
    counts = view_token_counts(geometry, Budget.resolve(geometry, ratio), args)
    kept = keep_mask(selection)
    scores = signals[SCORE].sum(dim=1)
    record = selection_record(selection, "official")
    for view in range(views):
        area = torch.zeros(side * side, dtype=torch.bool)
        top, left, height, width = ((0, 0, side, side), *geometry.crop_boxes)[view]
        for row in range(top, top + height):
            area[row * side + left:row * side + left + width] = True
        dominant, contextual = split_view_tokens(counts[view])
        ranked = sorted(area.nonzero().flatten().tolist(), key=lambda cell: -scores[view, cell].item())
        best = set(ranked[:dominant])
        rest = [cell for cell in range(side * side) if area[cell] and cell not in best]
        if contextual:
            step = max(1, len(rest) // contextual)
            targets = set(rest[::step][:contextual])
        else:
            targets = set()
        assert set(kept[view].nonzero().flatten().tolist()) == best | targets
        merged = sorted(cell - view * side * side for sources in record["sources"][view] for cell in sources)
        assert merged == (sorted(area.nonzero().flatten().tolist()) if counts[view] else [])  # all image cells


def test_bad_signal_shape_is_a_clear_error():
    geometry = crop_geometry((800, 200), (2, 1), 4, unpad=False)
    signals = dict(_hand_signals(), **{KEYS: torch.zeros(3, 16, 2)})
    with pytest.raises(ValueError, match=r"keys_head_mean_penultimate must have shape \[3, 17, _\]"):
        select(torch.zeros(3, 16, 1), signals, geometry, Budget.resolve(geometry, 0.5))
    with pytest.raises(ValueError, match="mode=anyres"):
        select(torch.zeros(3, 16, 1), _hand_signals(), crop_geometry((800, 200), (2, 1), 4),
               Budget.resolve(geometry, 0.5))


def test_registration_declares_the_signals_and_the_input_change():
    method = get_method("visionzip")
    assert method.needs == {SCORE, KEYS, FEATURES} and method.stage == "pre-llm"
    assert method.input_changes(FAITHFUL) == official_input(FAITHFUL) == {"mm_patch_merge_type": "spatial"}
    assert method.input_changes(ANYRES) == {}


# --- through the model ---------------------------------------------------------------------------


def test_faithful_through_the_model_is_the_official_sequence(tiny, model):
    """The tower's own signals, the official input (no unpadding, no newline), the projector after
    the merge, and the accounting against the model's own vanilla sequence."""
    _, _, processor = tiny
    image = noise_image((1000, 700), 5)
    pixel_values = process_images([image], processor, model.input_config())
    model.set_compression(0.1, method="visionzip")
    with torch.no_grad():
        sequence, = model.encode_image_sequences(pixel_values, [image.size])
        _, signals = model.encode_images(pixel_values[0], {SCORE, KEYS, FEATURES})
        outputs, dominant_rows = official_view_outputs(signals[SCORE], signals[KEYS], signals[FEATURES], 49, 9)
        projected = [model.get_model().mm_projector(output) for output in outputs]
    expected = official_llava_next_sequence(projected, dominant_rows, (2, 2), 24)
    assert torch.allclose(sequence, expected, rtol=1e-4, atol=1e-5)
    record = model.last_accounting[0]
    assert record["tokens_after"] == record["image_tokens"] == 5 * 58 and record["newline_tokens"] == 0
    assert record["extra_tokens"] == 5 and record["view_dominant"] == [49] * 5 and record["view_contextual"] == [9] * 5
    assert record["vanilla_image_tokens"] == 576 + 4 * 408 and record["realised_ratio"] == 290 / 2208
    assert model.compression_settings().signals == {SCORE, KEYS, FEATURES}
    model.set_compression(1.0, method="visionzip")  # faithful is never vanilla: the tower is still asked
    assert model.compression_settings().signals == {SCORE, KEYS, FEATURES}


def test_anyres_through_the_model_has_newlines_and_r_of_the_vanilla_tokens(tiny, model):
    _, _, processor = tiny
    image = noise_image((1000, 700), 5)
    pixel_values = process_images([image], processor, model.config)
    model.set_compression(0.25, method="visionzip", method_args=["mode=anyres"])
    with torch.no_grad():
        sequence, = model.encode_image_sequences(pixel_values, [image.size])
    record = model.last_accounting[0]
    newline = model.get_model().image_newline
    assert record["newline_tokens"] == int((sequence == newline).all(dim=1).sum()) == 34  # one per image row
    assert record["image_tokens"] == 144 + 4 * 102 and record["extra_tokens"] == 0
    assert math.isclose(record["realised_ratio"], (144 + 4 * 102) / 2208)
    model.set_compression(1.0, method="visionzip", method_args=["mode=anyres"])
    assert model.compression_settings().signals == frozenset()  # a full budget needs no signal


def test_the_loader_runs_visionzip_end_to_end(tiny_checkpoint, tmp_path):
    Image.new("RGB", (800, 500), (30, 120, 60)).save(tmp_path / "a.jpg")
    with open(tmp_path / "questions.jsonl", "w") as file:
        file.write(json.dumps({"question_id": 0, "image": "a.jpg", "text": "What is it?"}) + "\n")
    answers = tmp_path / "answers.jsonl"
    assert model_vqa_loader.main(["--model-path", tiny_checkpoint, "--question-file", str(tmp_path / "questions.jsonl"),
                                  "--image-folder", str(tmp_path), "--answers-file", str(answers),
                                  "--temperature", "0", "--max_new_tokens", "2", "--method", "visionzip",
                                  "--retention-ratio", "0.1"]) == 0
    row, = read_jsonl(answers)
    meta = row["metadata"]
    assert meta["method"] == "visionzip" and meta["method_args"] == {"mode": "faithful", "budget": "paper"}
    image = meta["images"][0]
    views = 1 + image["grid"][0] * image["grid"][1]
    assert meta["visual_tokens"] == image["tokens_after"] == views * 58 and image["newline_tokens"] == 0
    assert image["view_tokens"] == [58] * views
