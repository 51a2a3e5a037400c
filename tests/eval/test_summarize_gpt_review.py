"""`summarize_gpt_review`: upstream's printout of LLaVA-Bench review files (spec §2.10), on hand-made
reviews whose numbers are worked out by hand."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from llava.eval import summarize_gpt_review as summary

# conv: reference 8, 9 -> 8.5; model 7, 9 -> 8.0; 8.0 / 8.5 = 94.12% -> 94.1, 85.0, 80.0.
# detail: an unparsed review [-1, -1] is averaged in: (10 - 1) / 2 = 4.5, (6 - 1) / 2 = 2.5 -> 55.6.
# complex: 7.5 and 8 -> 106.7, 75.0, 80.0.
# all: (8 + 9 + 10 - 1 + 7.5) / 5 = 6.7, (7 + 9 + 6 - 1 + 8) / 5 = 5.8; 5.8 / 6.7 = 86.57% -> 86.6.
REVIEWS = [
    {"question_id": 0, "category": "llava_bench_conv", "tuple": [8.0, 7.0]},
    {"question_id": 1, "category": "llava_bench_conv", "tuple": [9.0, 9.0]},
    {"question_id": 2, "category": "llava_bench_detail", "tuple": [10.0, 6.0]},
    {"question_id": 3, "category": "llava_bench_detail", "tuple": [-1, -1]},
    {"question_id": 4, "category": "llava_bench_complex", "tuple": [7.5, 8.0]},
]
SUMMARY = """\
llava-v1.6-vicuna-7b
all 86.6 67.0 58.0
llava_bench_complex 106.7 75.0 80.0
llava_bench_conv 94.1 85.0 80.0
llava_bench_detail 55.6 45.0 25.0
=================================
"""


def write_reviews(path: pathlib.Path, reviews: list[dict]) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(review) + "\n" for review in reviews))
    return path


def test_summary_of_one_file(tmp_path, capsys):
    path = write_reviews(tmp_path / "reviews" / "llava-v1.6-vicuna-7b.jsonl", REVIEWS)
    assert summary.main(["-f", str(path)]) == 0
    assert capsys.readouterr().out == SUMMARY


def test_summary_script_end_to_end(tmp_path):
    path = write_reviews(tmp_path / "reviews" / "llava-v1.6-vicuna-7b.jsonl", REVIEWS)
    script = pathlib.Path(summary.__file__)
    result = subprocess.run([sys.executable, str(script), "-f", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == SUMMARY


def test_means_are_rounded_to_three_decimals_before_the_ratio():
    # Reference 5, 5, 6 -> 5.333 (not 5.3333...), model 5, 6, 10 -> 7.0: 7 / 5.333 = 131.258% -> 131.3,
    # where the unrounded means give 131.25% -> 131.2.
    assert summary.summary_numbers([[5, 5], [5, 6], [6, 10]]) == (131.3, 53.3, 70.0)


def test_reviews_without_category_count_only_under_all_and_ignored_ids_not_at_all():
    reviews = [
        {"question_id": 0, "category": "llava_bench_conv", "tuple": [8, 6]},
        {"question_id": 1, "tuple": [4, 2]},
        {"question_id": 2, "score": [6, 6]},  # the oldest review files
        {"question_id": 3, "category": "llava_bench_conv", "tuple": [1, 1]},
    ]
    scores = summary.scores_by_category(reviews, ignore=[3])
    assert scores == {"llava_bench_conv": [[8, 6]], "all": [[8, 6], [4, 2], [6, 6]]}
    # all: 6.0 and 4.667 -> 77.8
    assert summary.summary_lines("x", scores) == ["x", "all 77.8 60.0 46.7", "llava_bench_conv 75.0 80.0 60.0", "=" * 33]


def test_directory_listing_select_and_version(tmp_path, capsys):
    directory = tmp_path / "evals"
    for name in ("gpt4_text_b-0613.jsonl", "review_a.jsonl", "reviews_c.jsonl"):
        write_reviews(directory / name, [{"question_id": 0, "category": "conv", "tuple": [8, 4]}])
    write_reviews(directory / "answers.jsonl", [{"question_id": 0, "tuple": [1, 1]}])
    (directory / "notes.txt").write_text("not a review")

    assert summary.review_paths(str(directory), []) == [
        str(directory / name) for name in ("gpt4_text_b-0613.jsonl", "review_a.jsonl", "reviews_c.jsonl")]
    # Under a directory whose path says "review", every .jsonl is a review file.
    assert summary.is_review_file("answers.jsonl", "llava-bench/reviews")
    assert not summary.is_review_file("review_a.json", "reviews")

    assert summary.main(["-d", str(directory), "-v", "0613"]) == 0
    assert capsys.readouterr().out == "b-0613\nall 50.0 80.0 40.0\nconv 50.0 80.0 40.0\n" + "=" * 33 + "\n"
    assert summary.main(["-d", str(directory), "-v", "0314", "-s", "review", "c"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "reviews_c"


def test_files_are_joined_to_the_directory(tmp_path, capsys):
    write_reviews(tmp_path / "model.jsonl", REVIEWS)
    assert summary.main(["-d", str(tmp_path), "-f", "model.jsonl"]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == ["model", "all 86.6 67.0 58.0"]


def test_no_files_and_no_directory_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        summary.main([])
    assert exit_info.value.code == 2
