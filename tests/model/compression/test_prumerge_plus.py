"""PruMerge+: PruMerge's outliers plus spatially uniform samples, worked by hand on small views (the crash
cases of the official code included), the official code restated (in `test_prumerge`) and compared on
random inputs with ties, the budget rules on random image sizes and the model's glue on the tiny checkpoint.

Tower features are named: value `100 * view + cell` (C = 1), newline -1, and the projector is the
identity, so a merged token reads as its cell's name plus the weighted names of its neighbours.
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from llava.mm_utils import get_anyres_image_grid_shape
from llava.model.compression import get_method
from llava.model.compression.common import Budget, crop_geometry, selection_record, view_image_tokens
from llava.model.compression.prumerge import FEATURES, KEYS, SCORE
from llava.model.compression.prumerge_plus import PruMergePlusArgs, official_input, sample_grid, select
from llava.tiny import V16_PINPOINTS
# The shared restatement of the official code and the hand-made signals.
from tests.model.compression.test_prumerge import (
    _hand_signals, _named_features, _run, _scores, _sequence, encode, official_sequence, random_signals,
)

ADAPTIVE, TRAINING = PruMergePlusArgs(), PruMergePlusArgs(adaptive=False)


# --- by hand: one side-6 view (P = 36), faithful ------------------------------------------------------
#
# Keys (d = 2): cells 0, 1, 2 point along -x, every other cell along +x, so a +x token's 32 nearest of
# its 35 candidates are the 32 other +x cells.

def _one_view_signals(scores):
    keys = torch.zeros(1, 36, 2, dtype=torch.float64)
    keys[..., 0] = 1.0
    keys[0, :3, 0] = -1.0
    return {SCORE: _scores([scores], 6), KEYS: keys, FEATURES: _named_features(1, 6)}


OUTLIERS = {7: 0.5, 20: 0.3, 33: 0.2, "rest": 0.01}


def test_adaptive_adds_every_int_s_over_3_th_cell_after_the_outliers():
    # IQR: Q1 = Q3 = 0.01, so the three larger scores are the outliers: r = 3 / 36, k = 3 (7, 20, 33,
    # best first). s = int(1 / r) = 12, stride int(12 / 3) = 4: cells 0, 4, ..., 32 (below 35), 20
    # already kept: samples 0, 4, 8, 12, 16, 24, 28, 32, ascending; then the extra token (cell id 36).
    selection, sequence = _run(select, (300, 300), (0, 0), 6, _one_view_signals(OUTLIERS), ADAPTIVE, ratio=0.5)
    record = selection_record(selection, "official")
    assert record["sequence"] == [7, 20, 33, 0, 4, 8, 12, 16, 24, 28, 32, 36]
    assert selection.extra["sample_stride"] == [4] and selection.extra["view_tokens"] == [12]
    # A sample is merged like a kept token: 4 + the weighted names of the +x cells other than itself.
    assert sequence[4] == pytest.approx(4 + 0.5 * 7 + 0.3 * 20 + 0.2 * 33 + 0.01 * (sum(range(3, 36)) - 4 - 60))
    # The extra token: the 25 cells neither kept nor sampled, 0.01 each.
    assert sequence[-1] == pytest.approx(0.01 * (sum(range(36)) - (7 + 20 + 33 + 0 + 4 + 8 + 12 + 16 + 24 + 28 + 32)))


def test_no_outlier_sends_cell_0_and_the_extra_token():
    # Flat scores: r = 0, where the official 1 / r divides by zero. Here the stride is unbounded, so
    # the grid is cell 0 alone: the view sends cell 0 (merged) and its extra token.
    selection, sequence = _run(select, (300, 300), (0, 0), 6, _one_view_signals({"rest": 0.25}), ADAPTIVE, ratio=0.5)
    assert selection_record(selection, "official")["sequence"] == [0, 36]
    assert sequence[1] == pytest.approx(0.25 * (sum(range(36)) - 0))
    # Cell 0's key is -x: its nearest are 1 and 2 (cosine 1), then 30 of the 33 +x cells (cosine -1);
    # whichever they are, each weighs 0.25.
    assert selection.extra["outlier_ratios"] == [0.0] and selection.extra["sample_stride"] == [36]


TRAINING_SCORES = {7: 0.5, 20: 0.45, 33: 0.4, 6: 0.35, 10: 0.3, 1: 0.25, 3: 0.2, 5: 0.15, 8: 0.12, "rest": 0.01}


def test_training_branch_samples_from_s_over_2_every_s_cells_without_duplicates():
    # R = 0.25: k = int(36 / 4) = 9 top cells (best first: 7, 20, 33, 6, 10, 1, 3, 5, 8); s = 4, the grid
    # starts at int(4 / 2) = 2: 2, 6, 10, ..., 34. The official code would send 6 and 10 twice; here
    # they are dropped: samples 2, 14, 18, 22, 26, 30, 34, then the extra token.
    selection, _ = _run(select, (300, 300), (0, 0), 6, _one_view_signals(TRAINING_SCORES), TRAINING, ratio=0.25)
    assert selection_record(selection, "official")["sequence"] == [7, 20, 33, 6, 10, 1, 3, 5, 8,
                                                                   2, 14, 18, 22, 26, 30, 34, 36]
    assert selection.extra["top_tokens"] == [9] and selection.extra["sample_stride"] == [4]


def test_anyres_samples_only_image_cells():
    # 800x200 on 2x1 side-4 views (crops: image cells 4..11, see test_prumerge). Training branch at
    # R = 0.25: thumbnail int(16 / 4) = 4 top (2, 13, 6, 9), crops int(8 / 4) = 2 (left 5, 10; right 7,
    # 4); s = 4, grid 2, 6, 10, 14: the thumbnail adds 10, 14; the left crop 6 (10 is kept; 2 and 14 are
    # padding); the right crop 6 and 10. Raster order per view in anyres mode.
    selection, _ = _run(select, (800, 200), (2, 1), 4, _hand_signals(), PruMergePlusArgs("anyres", False),
                        ratio=0.25)
    assert selection_record(selection, "official")["kept"] == [[2, 6, 9, 10, 13, 14], [5, 6, 10], [4, 6, 7, 10]]
    assert selection.extra["view_tokens"] == [7, 4, 5]


def test_sample_grid_for_the_official_crash_cases():
    assert sample_grid([3 / 36], True, 36) == ([0], [4])       # int(int(12) / 3)
    assert sample_grid([0.0], True, 36) == ([0], [36])         # r = 0: cell 0 only
    assert sample_grid([0.5], True, 36) == ([0], [1])          # int(2 / 3) = 0: clamped to 1
    assert sample_grid([0.25], False, 576) == ([2], [4])       # training: start int(4 / 2), stride 4
    assert sample_grid([0.0], False, 36) == ([36], [36])       # training at r = 0: nothing
    assert sample_grid([1.0], False, 576) == ([0], [1])        # s = 1: every cell but the last


def test_a_view_keeping_every_cell_sends_no_extra_token():
    # Training branch at R = 0.75 on 16 cells: k = 12 top cells, s = 1, grid 0..14: all 16 kept when 15
    # is among the top; the extra token would sum nothing, so none is sent.
    scores = {cell: 1.0 + cell for cell in range(16)}
    signals = {SCORE: _scores([scores], 4), KEYS: torch.ones(1, 16, 2, dtype=torch.float64),
               FEATURES: _named_features(1, 4)}
    selection, sequence = _run(select, (300, 300), (0, 0), 4, signals, TRAINING, ratio=0.75)
    assert selection.kept_cells == 16 and selection.extra_tokens == 0 and len(sequence) == 16


# --- the budget rules -----------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 5000), height=st.integers(1, 5000), ratio=st.sampled_from([0.5, 0.25, 0.1, 0.05, 0.01]),
       tokens=st.integers(1, 3000), rule=st.sampled_from(["adaptive", "paper", "matched", "tokens"]),
       mode=st.sampled_from(["faithful", "anyres"]), seed=st.integers(0, 99))
def test_budget_rules_on_random_sizes(width, height, ratio, tokens, rule, mode, seed):
    """Restated from the module: adaptive ignores the budget (the data's outliers); the training branch
    keeps `int(c_v r)` top cells with `r = R` (paper), `R N_van / (2 sum c_v)` (matched) or
    `(N - E) / (2 sum c_v)` (N, exact), plus its grid samples; never more than the cells offered."""
    size = (width, height)
    grid = get_anyres_image_grid_shape(size, V16_PINPOINTS, 336)
    views = 1 + grid[0] * grid[1]
    geometry = crop_geometry(size, grid, 24, unpad=mode == "anyres")
    offered = view_image_tokens(geometry)
    budget = Budget.resolve(geometry, None if rule == "tokens" else ratio, tokens if rule == "tokens" else None)
    args = PruMergePlusArgs(mode, rule == "adaptive", "matched" if rule == "matched" else "paper")
    signals = {name: signal.float() for name, signal in random_signals(views, 24, torch.Generator().manual_seed(seed),
                                                                         width=4).items()}
    selection = select(torch.zeros(views, 576, 1), signals, geometry, budget, args)
    assert selection.image_tokens <= geometry.vanilla_image_tokens
    if budget.keeps_all:
        assert selection.keeps_all and rule == "tokens"
        return
    kept = [len(cells) for cells in selection_record(selection, "official")["kept"]]
    assert selection.extra["view_tokens"] == [count + (count < cells) for count, cells in zip(kept, offered)]
    if rule == "adaptive":
        assert selection.extra["top_tokens"] == [int(cells * ratio) for cells, ratio in
                                                 zip(offered, selection.extra["outlier_ratios"])]
        return
    n_van = crop_geometry(size, grid, 24).vanilla_image_tokens
    extra_tokens = sum(1 for cells in offered if cells)
    r = {"paper": ratio, "matched": ratio * n_van / sum(offered) / 2}.get(rule)
    top = ([(max(tokens - extra_tokens, 0) * cells) // (2 * sum(offered)) for cells in offered] if rule == "tokens"
           else [int(cells * r) for cells in offered])
    assert selection.extra["top_tokens"] == top


# --- the official code (restated in test_prumerge), on random inputs with ties -----------------------

def _with_an_outlier_in_every_view(signals, generator):
    """The official adaptive code divides by zero without an outlier: spike one random cell per view."""
    scores = signals[SCORE]
    cells = torch.randint(0, scores.shape[1], (scores.shape[0],), generator=generator)
    scores[torch.arange(scores.shape[0]), cells] = 0.09
    return signals


@pytest.mark.parametrize("side, size, grid", [(24, (1000, 700), (2, 2)), (6, (800, 200), (2, 1)),
                                              (24, (336, 336), (0, 0))])
@pytest.mark.parametrize("seed", [0, 1])
def test_adaptive_faithful_equals_the_official_code_view_by_view(side, size, grid, seed):
    generator = torch.Generator().manual_seed(seed)
    signals = _with_an_outlier_in_every_view(random_signals(1 + grid[0] * grid[1], side, generator), generator)
    geometry = crop_geometry(size, grid, side, unpad=False)
    views = signals[FEATURES][:, 1:]
    selection = select(views, signals, geometry, Budget.resolve(geometry, 0.5), ADAPTIVE)
    cells, tokens = official_sequence(signals, True, None, plus=True)
    assert selection_record(selection, "official")["kept"] == cells
    assert torch.allclose(_sequence(selection, views), tokens, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ratio", [0.1, 0.25])  # where the official training branch runs: 57 and 144 samples
def test_training_branch_equals_the_official_code_where_it_runs(ratio):
    generator = torch.Generator().manual_seed(4)
    signals = random_signals(5, 24, generator)
    step = int(1 / ratio)
    signals[SCORE][:, step // 2:575:step] = 1e-4  # grid cells score lowest: no duplicate to drop
    geometry = crop_geometry((1000, 700), (2, 2), 24, unpad=False)
    views = signals[FEATURES][:, 1:]
    selection = select(views, signals, geometry, Budget.resolve(geometry, ratio), TRAINING)
    cells, tokens = official_sequence(signals, False, ratio, plus=True)
    assert all(len(view_cells) == 2 * int(576 * ratio) for view_cells in cells)
    assert selection_record(selection, "official")["kept"] == cells
    assert torch.allclose(_sequence(selection, views), tokens, rtol=1e-12, atol=1e-12)


def test_registration_declares_the_signals_and_the_input_change():
    method = get_method("prumerge_plus")
    assert method.needs == {SCORE, KEYS, FEATURES} and method.stage == "pre-llm"
    assert method.input_changes(ADAPTIVE) == official_input(ADAPTIVE) == {"mm_patch_merge_type": "spatial"}
    assert method.input_changes(PruMergePlusArgs(mode="anyres")) == {}


# --- through the model -------------------------------------------------------------------------------------

def test_adaptive_through_the_model_is_the_official_code_on_the_towers_signals(tiny, model):
    _, _, processor = tiny
    sequence, signals, record = encode(model, processor, (1000, 700), method="prumerge_plus", retention_ratio=0.25)
    assert all(ratio > 0 for ratio in record["outlier_ratios"])  # where the official code runs
    cells, tokens = official_sequence(signals, True, None, plus=True)
    assert record["view_tokens"] == [len(view_cells) + 1 for view_cells in cells] and record["newline_tokens"] == 0
    assert sequence.shape[0] == record["tokens_after"] == record["image_tokens"]
    assert record["vanilla_image_tokens"] == 2208
    with torch.no_grad():
        expected = model.get_model().mm_projector(tokens)
    assert torch.allclose(sequence, expected, atol=1e-5)
