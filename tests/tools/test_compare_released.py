"""`tools/compare_released.py`: its pure parts on hand-made tensors, and (slow) a real run against the released
GlobalCom2 code, in which our `released` tower numerics keep the released code's visual tokens bit for bit.

The slow test needs upstream LLaVA's interpreter (`sh scripts/install.sh upstream` makes `.venv-upstream`;
`LLAVA_UPSTREAM_PYTHON` names another) and the released repository (`LLAVA_RELEASED_REPO`, a directory
holding its `llava/`, else the mirror of `xuyang-liu16/GlobalCom2`); it is skipped without them.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[2]
_SPEC = importlib.util.spec_from_file_location("compare_released", REPO / "tools" / "compare_released.py")
compare_released = importlib.util.module_from_spec(_SPEC)
sys.modules["compare_released"] = compare_released
_SPEC.loader.exec_module(compare_released)

NEWLINE, UNMATCHED = compare_released.NEWLINE, compare_released.UNMATCHED


def test_cases_cover_every_size_and_ratio_once_and_any_prefix_cycles():
    cases = compare_released.comparison_cases(30)
    pairs = {((case.width, case.height), case.ratio) for case in cases}
    assert len(pairs) == 30 == len(compare_released.IMAGE_SIZES) * len(compare_released.RATIOS)
    first = compare_released.comparison_cases(6)
    assert [(case.width, case.height) for case in first] == compare_released.IMAGE_SIZES[:6]
    assert [case.ratio for case in first] == [0.5, 0.25, 0.1, 0.5, 0.25, 0.1]
    for count in (0, 31):
        with pytest.raises(ValueError, match="--cases"):
            compare_released.comparison_cases(count)


def test_ratio_line_set_and_refused_when_ambiguous():
    source = "import torch\n\nretention_ratio = 0.25 # defalt 0.25\n\ndef f(scale=retention_ratio):\n    pass\n"
    edited = compare_released.with_retention_ratio(source, 0.1)
    assert edited.splitlines()[2].startswith("retention_ratio = 0.1  #")
    assert edited.splitlines()[4] == "def f(scale=retention_ratio):"
    with pytest.raises(ValueError, match="one 'retention_ratio"):
        compare_released.with_retention_ratio(source + "retention_ratio = 0.5\n", 0.1)


def test_image_span_is_the_rows_replacing_the_image_token():
    input_ids = torch.tensor([1, 5, compare_released.IMAGE_TOKEN_INDEX, 7, 8])  # 2 text before, 2 after
    embeds = torch.arange(9.0)[:, None]  # 4 text rows + a 5-row image span
    assert compare_released.image_span(embeds, input_ids).flatten().tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]


def test_kept_positions_name_each_row_as_is_or_rounded_through_fp16():
    features = torch.tensor([[[1.0, 0.0], [0.1, 2.0]],
                             [[3.0, 1.0], [0.3, 4.0]]])  # views 0, 1 of 2 patches; 0.1 and 0.3 are not fp16 values
    newline = torch.tensor([9.0, 9.0])
    rounded = features[1, 1].half().float()
    assert not torch.equal(rounded, features[1, 1])
    span = torch.stack([features[1, 0], newline, features[0, 1], rounded, torch.tensor([5.0, 5.0]), newline])
    positions = compare_released.kept_positions(span, features, newline)
    assert positions.tolist() == [2, NEWLINE, 1, 3, UNMATCHED, NEWLINE]


def test_released_cast_rounds_only_after_the_thumbnail_and_bits_tell_zero_signs_apart():
    span = torch.tensor([[0.1], [0.1], [0.1]])
    cast = compare_released.as_released_casts(span, thumbnail_tokens=1)
    assert cast[0].item() == span[0].item() and cast[1].item() == cast[2].item() == torch.tensor(0.1).half().item()
    assert compare_released.bit_identical(span, span.clone())
    assert not compare_released.bit_identical(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert not compare_released.bit_identical(span, span[:2])


def test_compare_case_tells_order_set_and_length_differences():
    """The same tokens; two of them swapped (same set, not the same positions); another token kept; one
    token fewer."""
    case = compare_released.Case(index=0, width=4, height=2, ratio=0.5)
    features = torch.arange(8, dtype=torch.float16).view(2, 2, 2)  # [V=2, P=2, D=2]
    newline = torch.tensor([-1.0, -1.0], dtype=torch.float16)
    input_ids = torch.tensor([1, compare_released.IMAGE_TOKEN_INDEX, 2])
    text = torch.full((1, 2), 7.0, dtype=torch.float16)

    def side(rows, logits):
        return {"input_ids": input_ids, "embeds": torch.cat([text, rows, text]), "features": features,
                "last_logits": torch.tensor(logits)}

    theirs = side(torch.stack([features[0, 1], features[1, 0], features[1, 1], newline]), [0.0, 1.0])
    same = compare_released.compare_case(case, side(theirs["embeds"][1:-1], [0.0, 1.5]), theirs, newline, newline)
    assert same["same_positions"] and same["bit_identical"] and same["max_abs_diff"] == 0.0
    assert same["logits_max_abs_diff"] == 0.5 and same["tokens"] == [4, 4]
    swapped = side(torch.stack([features[0, 1], features[1, 1], features[1, 0], newline]), [0.0, 1.0])
    result = compare_released.compare_case(case, swapped, theirs, newline, newline)
    assert result["tokens"] == [4, 4] and result["only_kept"] == [0, 0]
    assert not result["same_positions"] and not result["bit_identical"] and result["max_abs_diff"] == 2.0
    other = side(torch.stack([features[0, 0], features[1, 0], features[1, 1], newline]), [0.0, 1.0])
    assert compare_released.compare_case(case, other, theirs, newline, newline)["only_kept"] == [1, 1]
    shorter = compare_released.compare_case(case, side(theirs["embeds"][2:-1], [0.0, 1.0]), theirs, newline, newline)
    assert shorter["tokens"] == [3, 4] and shorter["only_kept"] == [0, 1] and shorter["max_abs_diff"] is None


@pytest.fixture(scope="module")
def released_repo(tmp_path_factory) -> str:
    named = os.environ.get("LLAVA_RELEASED_REPO")
    if named:
        return named
    if not os.path.isdir(compare_released.RELEASED_MIRROR):
        pytest.skip(f"no released GlobalCom2 code: set LLAVA_RELEASED_REPO (no mirror at "
                    f"{compare_released.RELEASED_MIRROR})")
    return compare_released.export_released_repo(compare_released.RELEASED_MIRROR,
                                                 str(tmp_path_factory.mktemp("released")))


@pytest.fixture(scope="module")
def upstream_python(released_repo, tmp_path_factory) -> str:
    """The upstream interpreter, checked to import the released code with transformers 4.37."""
    python = os.environ.get("LLAVA_UPSTREAM_PYTHON") or compare_released.UPSTREAM_PYTHON
    if not os.path.isfile(python):
        pytest.skip(f"upstream LLaVA's interpreter is not installed ({python}; sh scripts/install.sh upstream)")
    found = subprocess.run([python, "-c", "import llava.model.builder, transformers; print(transformers.__version__)"],
                           cwd=tmp_path_factory.mktemp("upstream-check"),
                           env=compare_released.upstream_environment(released_repo), capture_output=True, text=True)
    if found.returncode != 0 or found.stdout.strip() != "4.37.2":
        pytest.skip(f"{python} cannot run the released code: {(found.stderr.strip().splitlines() or [''])[-1]}")
    return python


@pytest.mark.slow
def test_released_numerics_keep_the_released_tokens_bit_for_bit(released_repo, upstream_python, tiny_checkpoint,
                                                                tmp_path):
    """Six cases in fp16 (grids 2x1, 1x2, 2x2, 3x1, 1x3 and an odd letterboxed size; R 0.5, 0.25, 0.1)."""
    report = compare_released.compare(compare_released.comparison_cases(6), tiny_checkpoint, released_repo,
                                      upstream_python, "float16", ["sdpa", "released"], str(tmp_path))
    assert [row["grid"] for row in report["cases"]] == [[2, 1], [1, 2], [2, 2], [3, 1], [1, 3], [2, 2]]
    for row in report["cases"]:
        for mode in ("sdpa", "released"):
            assert row[mode]["same_ids"]
            assert row[mode]["unmatched"] == [0, 0]  # every span row is a view token or the newline, both sides
        assert row["released"]["bit_identical"], row
        assert row["released"]["same_positions"] and row["released"]["max_abs_diff"] == 0.0
        # SDPA rounds the tower differently, so ties and near-ties in the scores may go the other way and
        # the crop budgets int(N_c * scale_c) move with the scales (thumbnail and newline counts cannot):
        # by at most a token per crop here (over the 30 cases of the tool, one token at most in all).
        grid_w, grid_h = row["grid"]
        assert abs(row["sdpa"]["tokens"][0] - row["sdpa"]["tokens"][1]) <= grid_w * grid_h, row
