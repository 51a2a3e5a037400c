"""Our CDPruner (`mode=faithful`) against the official code (`Theia-4869/CDPruner@9541616`), both run for real on
the tiny LLaVA-NeXT checkpoint: does `prepare_inputs_labels_for_multimodal` hand the language model the same image
span, token for token and bit for bit?

As `test_vispruner_official.py` (whose helpers this reuses), with CDPruner's budget (`--visual_token_num T` per
view; ours `T = round(576 R)` or `--visual-tokens 5 T`, spec `baselines/cdpruner.md` (d)) and its text: each case
passes a question as the official `texts` argument (as its eval loaders do) and as our instruction, one short
and one longer than CLIP's 77 positions (two segments, quirk Q5). The official side runs through
`cdpruner_probe.py` (CPU stand-ins for its CUDA streams, the eval scripts' `device_map="auto"`: text tower and
visual projection in float32), on the checkpoint as built (its CLIP `tokenizer.json` is in the form tokenizers
0.15, transformers 4.37's, reads).

Slow, and skipped unless both are found: the upstream interpreter (`LLAVA_UPSTREAM_PYTHON`, else
`.venv-upstream/bin/python`) and the official code (`CDPRUNER_REPO`, a git checkout or mirror of
Theia-4869/CDPruner, else the mirror at `/work/.mirror/Theia-4869+CDPruner/repo`).

    python -m pytest tests/upstream/test_cdpruner_official.py
"""

from pathlib import Path

import pytest
from test_vispruner_official import NUM_VIEWS, OfficialBudget, compare_spans, comparison_cases

PROBE = Path(__file__).with_name("cdpruner_probe.py")
DEFAULT_REPO = "/work/.mirror/Theia-4869+CDPruner/repo"
FORK_NAME, REPO_VARIABLE = "CDPruner", "CDPRUNER_REPO"
DTYPES = ("float16", "float32")
IMAGE_SIZES = [(672, 336), (672, 672), (336, 1008), (800, 500), (333, 777)]
BUDGETS = [
    OfficialBudget("cdpruner", 64, retention_ratio=1 / 9),  # the paper's "320 tokens": round(576 / 9) per view
    OfficialBudget("cdpruner", 32, visual_tokens=160),  # "160 tokens"
    OfficialBudget("cdpruner", 128, visual_tokens=640),  # "640 tokens"
]
TEXTS = ["What is shown in this image?",  # one segment
         "Which of the labelled regions holds the largest number of distinct shapes, counting only those that "
         "touch the border of the picture? Reference OCR token: alpha, beta, gamma, delta, epsilon, zeta, eta, "
         "theta, iota, kappa"]  # more than 77 tokens for the tiny CLIP tokenizer (checked below)
CASES = comparison_cases(IMAGE_SIZES, BUDGETS, TEXTS)

pytestmark = pytest.mark.slow


def test_it_is_the_official_code_that_ran(official, official_code):
    assert official["versions"]["transformers"] == "4.37.2"
    assert Path(official["versions"]["llava"]).is_relative_to(official_code)


def test_the_long_text_takes_two_clip_segments(tiny):
    """Q5 is exercised: the long text needs more than one 77-position segment (ours, with the text tower's own
    tokenizer, the file the official code reads too)."""
    model = tiny[1]
    short, long = (model.get_text_tower().instruction_signals({"instruction_embeds"}, text)["instruction_embeds"]
                   for text in TEXTS)
    assert short.shape[0] == 1 and long.shape[0] == 2


def _cases_at(per_view: int) -> list[int]:
    return [i for i, case in enumerate(CASES) if case.budget.per_view == per_view]


def _assert_official_span(ours: dict, official: dict, indices: list[int]) -> None:
    for i in indices:
        result = compare_spans(ours[i], official[i])
        expected = [CASES[i].budget.per_view] * NUM_VIEWS
        assert result["same_ids"] and result["unmatched"] == [0, 0], (CASES[i], result)
        assert result["view_counts"] == [expected, expected], (CASES[i], result)
        assert result["same_positions"] and result["bit_identical"], (CASES[i], result)
        assert result["max_abs_diff"] == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_view", [32, 64])
def test_released_numerics_send_the_official_tokens_bit_for_bit(official, ours, dtype, per_view):
    """Every view keeps T (5 T tokens, no newline): the same tokens in the same order, the same bits. At T = 64,
    the rank of the tiny model's 64-wide similarity, the last picks hang on gains of the size of rounding: the
    text tower must round as transformers 4.37's does too (`released` sets it; with transformers' SDPA text
    attention 1 to 9 tokens of an image differed)."""
    _assert_official_span(ours[dtype]["released"], official[dtype], _cases_at(per_view))


@pytest.mark.parametrize("dtype", DTYPES)
def test_past_the_kernel_rank_the_official_code_repeats_picks_where_ours_keeps_t(official, ours, dtype):
    """Q6: the tiny model's similarity has rank 64 (the LLM width), so at T = 128 the official greedy MAP takes the
    square root of gains that are no longer positive, and its NaN gains repeat picks: each view keeps fewer than
    T distinct tokens. Our guard (the cdpruner module docstring, Q6) keeps T distinct cells per view."""
    for i in _cases_at(128):
        official_counts = compare_spans(ours[dtype]["released"][i], official[dtype][i])["view_counts"][1]
        assert all(64 <= count < 128 for count in official_counts), (CASES[i], official_counts)
        for numerics in ("sdpa", "released"):
            assert compare_spans(ours[dtype][numerics][i], official[dtype][i])["view_counts"][0] == [128] * NUM_VIEWS


@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_numerics_send_as_many_tokens_of_each_view(official, ours, dtype):
    """SDPA rounds the tower differently, so the projected features and the picks differ (never bit-identical);
    each view still keeps T, on both sides, below the kernel's rank."""
    for i in _cases_at(32) + _cases_at(64):
        result = compare_spans(ours[dtype]["sdpa"][i], official[dtype][i])
        expected = [CASES[i].budget.per_view] * NUM_VIEWS
        assert result["unmatched"] == [0, 0] and result["view_counts"] == [expected, expected], (CASES[i], result)
