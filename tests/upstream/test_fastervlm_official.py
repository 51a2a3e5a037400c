"""Our FasterVLM (`mode=faithful`) against the official code (`Theia-4869/FasterVLM@f5d5f12`), both run for real on
the tiny LLaVA-NeXT checkpoint: does `prepare_inputs_labels_for_multimodal` hand the language model the same image
span, token for token and bit for bit?

As `test_vispruner_official.py` (whose helpers this reuses), with FasterVLM's budget (`visual_token_num` T per
view, as its LLaVA-NeXT eval scripts pass it; ours `T = round(576 R)`, the paper's mapping, spec
`baselines/fastervlm.md` section 5). Unlike VisPruner's fork, FasterVLM's keeps the config's grid pinpoints, so
the sizes below land on the v1.6 grids 2x1, 2x2, 1x3 and 3x1 (3, 5, 4 and 4 views); its forced `spatial` merge
(F1) sends every view's T kept cells, padding included, with no newline: `V T` tokens. The official side runs
through `fastervlm_probe.py`.

Slow, and skipped unless both are found: the upstream interpreter (`LLAVA_UPSTREAM_PYTHON`, else
`.venv-upstream/bin/python`) and the official code (`FASTERVLM_REPO`, a git checkout or mirror of
Theia-4869/FasterVLM, else the mirror at `/work/.mirror/Theia-4869+FasterVLM/repo`).

    python -m pytest tests/upstream/test_fastervlm_official.py
"""

from pathlib import Path

import pytest
from test_vispruner_official import OfficialBudget, compare_spans, comparison_cases

PROBE = Path(__file__).with_name("fastervlm_probe.py")
DEFAULT_REPO = "/work/.mirror/Theia-4869+FasterVLM/repo"
FORK_NAME, REPO_VARIABLE = "FasterVLM", "FASTERVLM_REPO"
DTYPES = ("float16", "float32")
# PIL (width, height) -> views (1 + crops) in LLaVA-NeXT's grid choice (ours; upstream `select_best_resolution`:
# most effective resolution, then least waste), worked by hand on the v1.6 pinpoints: the 2x1, 2x2, 1x3 and 3x1
# grids filled exactly, then odd sizes: 800x500 on 2x2 (672x420 keeps the most resolution) and 333x777 on 1x3
# (unscaled).
VIEWS = {(672, 336): 3, (672, 672): 5, (336, 1008): 4, (1008, 336): 4, (800, 500): 5, (333, 777): 4}
IMAGE_SIZES = list(VIEWS)
# The fork's own `select_best_resolution` (`llava/mm_utils.py:12-36` at f5d5f12) keeps the canvas the scaled image
# fills best instead: 800x500 fills 80% of 672x336 (537x336) against 62.5% of 672x672, 333x777 fills 86% of
# 336x672 against 78% of 336x1008, so both go on a 3-view grid there. Our faithful mode keeps LLaVA-NeXT's grid
# (`llava/mm_utils.py:132-147`), and the spec does not name this difference: pinned as strict xfails.
OFFICIAL_VIEWS = {**VIEWS, (800, 500): 3, (333, 777): 3}
GRID_DIFFERS = ("the official fork picks its AnyRes grid by canvas fill (llava/mm_utils.py:12-36 at f5d5f12), "
                "LLaVA-NeXT's by effective resolution; spec baselines/fastervlm.md does not name it")
GRID_XFAIL = pytest.mark.xfail(strict=True, reason=GRID_DIFFERS)
SIZES = [pytest.param(size, id="{}x{}".format(*size), marks=[GRID_XFAIL] * (OFFICIAL_VIEWS[size] != VIEWS[size]))
         for size in IMAGE_SIZES]
BUDGETS = [
    OfficialBudget("fastervlm", 144, retention_ratio=0.25),  # the paper's 25%: round(576 * 0.25) per view
    OfficialBudget("fastervlm", 58, retention_ratio=0.1),  # 10%: round(57.6)
    OfficialBudget("fastervlm", 29, retention_ratio=0.05),  # 5%: round(28.8), the README's "29 * 5 = 145"
]
CASES = comparison_cases(IMAGE_SIZES, BUDGETS)

pytestmark = pytest.mark.slow


def test_it_is_the_official_code_that_ran(official, official_code):
    assert official["versions"]["transformers"] == "4.37.2"
    assert Path(official["versions"]["llava"]).is_relative_to(official_code)


def _cases_of(size: tuple[int, int]) -> list[int]:
    return [i for i, case in enumerate(CASES) if (case.width, case.height) == size]


def test_the_official_grid_is_the_canvas_it_fills_best(official):
    """The grid difference pinned by the xfails below, on the official side alone: V T tokens, V = 3 on the
    odd sizes (worked by hand above) where LLaVA-NeXT's choice would give 5 and 4."""
    for i, case in enumerate(CASES):
        views = OFFICIAL_VIEWS[(case.width, case.height)]
        assert official["float16"][i]["visual_tokens"] == views * case.budget.per_view, case


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_released_numerics_send_the_official_tokens_bit_for_bit(official, ours, dtype, size):
    """With transformers 4.37's eager CLIP rounding (the official tower runs eager to return its attentions) our
    span is the official one: T of every view (F2), no newline, the same tokens in the same order, the same bits."""
    for i in _cases_of(size):
        result = compare_spans(ours[dtype]["released"][i], official[dtype][i])
        expected = [CASES[i].budget.per_view] * VIEWS[size]
        assert result["same_ids"] and result["unmatched"] == [0, 0], (CASES[i], result)
        assert result["view_counts"] == [expected, expected], (CASES[i], result)
        assert result["same_positions"] and result["bit_identical"], (CASES[i], result)
        assert result["max_abs_diff"] == 0.0


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_numerics_send_as_many_tokens_of_each_view(official, ours, dtype, size):
    """SDPA rounds the tower differently (features and [CLS] row), so near-ties among the tiny tower's nearly flat
    attentions may fall the other way (in fp16); each view's count depends on the grid and budget only."""
    for i in _cases_of(size):
        result = compare_spans(ours[dtype]["sdpa"][i], official[dtype][i])
        expected = [CASES[i].budget.per_view] * VIEWS[size]
        assert result["same_ids"] and result["unmatched"] == [0, 0], (CASES[i], result)
        assert result["view_counts"] == [expected, expected], (CASES[i], result)
