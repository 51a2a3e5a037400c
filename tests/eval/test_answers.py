"""`refuse_duplicate_answers` and `read_answers`: one answer per (question_id, prompt)."""

from __future__ import annotations

import json

import pytest

from llava.eval.answers import UserError, read_answers, refuse_duplicate_answers


def test_distinct_pairs_are_accepted():
    # TextVQA: one image id, two questions; MMBench --all-rounds: one id, options rotated
    refuse_duplicate_answers([
        {"question_id": "img1", "prompt": "What colour?"},
        {"question_id": "img1", "prompt": "What brand?"},
        {"question_id": 5, "prompt": "A. x B. y"},
        {"question_id": 5, "prompt": "A. y B. x"},
        {"question_id": 6},
        {"question_id": "6"},  # a string id is another question than the int
        {"text": "no question_id: left to the caller"},
        {"text": "no question_id: left to the caller"},
    ], "a.jsonl")


def test_repeated_pairs_are_named_with_their_counts():
    rows = [{"question_id": 5, "prompt": "p"}, {"question_id": "a"}, {"question_id": 5, "prompt": "p"},
            {"question_id": "a"}, {"question_id": "a", "prompt": None}, {"question_id": 7, "prompt": "p"}]
    with pytest.raises(UserError) as error:
        refuse_duplicate_answers(rows, "a.jsonl")
    assert str(error.value) == (
        "a.jsonl: 2 question(s) are answered more than once (question_id 5 x2, question_id 'a' x3): the file was "
        "written by two runs at once or merged twice; rerun the runner (it keeps one answer per question) or "
        "remove the duplicates")


def test_at_most_ten_repeated_questions_are_listed():
    rows = [{"question_id": number, "prompt": "p"} for number in range(12)] * 2
    with pytest.raises(UserError, match=r"12 question\(s\) .*\(question_id 0 x2, .*question_id 9 x2, \.\.\.\)"):
        refuse_duplicate_answers(rows, "a.jsonl")


def test_read_answers_reads_then_refuses(tmp_path, capsys):
    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps({"question_id": 1, "prompt": "p", "text": "x"}) + "\n{broken\n")
    assert read_answers(path) == [{"question_id": 1, "prompt": "p", "text": "x"}]
    assert "skipped 1 malformed line(s) (line 2)" in capsys.readouterr().err
    path.write_text(json.dumps({"question_id": 1, "prompt": "p", "text": "x"}) + "\n" +
                    json.dumps({"question_id": 1, "prompt": "p", "text": "y"}) + "\n")
    with pytest.raises(UserError, match=r"question_id 1 x2"):
        read_answers(path)
