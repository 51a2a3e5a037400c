"""`scripts/convert_gqa_for_eval.py` and `llava.eval.eval_gqa`: the trailing-period rule, exact
matching, Binary/Open/Accuracy, the distribution score and the breakdowns, checked against
hand-computed values on a hand-made questions file."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys
from collections import Counter

import pytest

from llava.eval import eval_gqa
from llava.eval.eval_gqa import GQAError, Tally

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "convert_gqa_for_eval.py"


def _load_converter():
    spec = importlib.util.spec_from_file_location("convert_gqa_for_eval", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert_gqa = _load_converter()


def _op(operation, argument=""):
    return {"operation": operation, "argument": argument, "dependencies": []}


def _question(text, answer, structural, semantic, steps, group, balanced=True):
    return {"imageId": "n1", "question": text, "answer": answer, "fullAnswer": answer, "isBalanced": balanced,
            "types": {"structural": structural, "semantic": semantic, "detailed": "x"},
            "semantic": steps, "groups": {"global": group, "local": "l"}, "annotations": {}, "entailed": [],
            "equivalent": []}


# Steps counted in comments; "exist" and "query: name" operations do not count.
QUESTIONS = {
    "q1": _question("Is the cup red?", "yes", "verify", "attr", [_op("select", "cup"), _op("verify color", "red")], None),
    "q2": _question("Are there both cups and plates?", "no", "logic", "obj",
                    [_op("select", "cup"), _op("exist", "?"), _op("select", "plate"), _op("exist", "?"), _op("and")], None),
    "q3": _question("What color is the cup?", "red", "query", "attr", [_op("select", "cup"), _op("query", "color")], "color"),
    "q4": _question("What color is the plate?", "blue", "query", "attr", [_op("select", "plate"), _op("query", "color")], "color"),
    "q5": _question("What is on the table?", "cup", "query", "cat",
                    [_op("select", "table"), _op("relate", "on"), _op("query", "name")], "object"),
    "q6": _question("Is the cup red or blue?", "red", "choose", "attr",
                    [_op("select", "cup"), _op("choose color", "red|blue")], "color"),
    "q7": _question("Is it unbalanced?", "yes", "verify", "attr", [], "color", balanced=False),  # needs no prediction
}
# Raw model answers (merge.jsonl "text") -> converted: q1 "yes" right, q2 "yes" wrong, q3 "red" right,
# q4 "red" wrong, q5 " cup" wrong (whitespace is kept), q6 "red" right; q9 is no question (ignored).
RAW_ANSWERS = {"q1": "Yes.", "q2": "Yes", "q3": "Red...", "q4": "Red", "q5": " Cup.", "q6": "RED.", "q9": "x"}

# Binary: q1, q2, q6 -> 2/3; Open: q3, q4, q5 -> 1/3; all 3/6. Distribution: group color (gold red 2,
# blue 1; predicted red 3): (3-2)^2/2 + (0-1)^2/1 = 1.5, weight 3; group object (gold cup, predicted
# " cup"): 1, weight 1; (1.5*3 + 1*1) / 4 = 1.375, / 100 = 0.01375.
EXPECTED_REPORT = """\
Binary: 66.67%
Open: 33.33%
Accuracy: 50.00%
Distribution: 0.01 (lower is better)

Accuracy / structural type:
  choose: 100.00% (1 questions)
  logic: 0.00% (1 questions)
  query: 33.33% (3 questions)
  verify: 100.00% (1 questions)

Accuracy / semantic type:
  attr: 75.00% (4 questions)
  cat: 0.00% (1 questions)
  obj: 0.00% (1 questions)

Accuracy / steps number:
  2: 60.00% (5 questions)
  3: 0.00% (1 questions)

Accuracy / words number:
  4: 100.00% (1 questions)
  5: 33.33% (3 questions)
  6: 50.00% (2 questions)
"""


def _write_merge(path, answers=RAW_ANSWERS):
    path.write_text("".join(json.dumps({"question_id": qid, "prompt": "p", "text": text, "answer_id": "a",
                                        "model_id": "m", "metadata": {}}) + "\n" for qid, text in answers.items()))
    return str(path)


def _write_json(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def _predictions(**overrides):
    converted = {qid: convert_gqa.prediction_text(text) for qid, text in RAW_ANSWERS.items()}
    return {**converted, **overrides}


def _eval(capsys, *args):
    code = eval_gqa.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- the converter ---

@pytest.mark.parametrize("text, prediction", [
    ("Yes.", "yes"), ("No...", "no"), ("Red", "red"), ("U.S.A.", "u.s.a"), ("3.5", "3.5"), ("a.b.", "a.b"),
    (" yes. ", " yes. "), ("Yes. ", "yes. "), (" Cup.", " cup"), ("...", ""), ("", ""), ("Yes!", "yes!"),
])
def test_prediction_text(text, prediction):
    assert convert_gqa.prediction_text(text) == prediction


def test_convert_writes_upstream_json(tmp_path, capsys):
    src, dst = _write_merge(tmp_path / "merge.jsonl", {"201307251": "Yes.", "201640614": "Left"}), tmp_path / "p.json"
    assert convert_gqa.main(["--src", src, "--dst", str(dst)]) == 0
    assert dst.read_text() == ('[{"questionId": "201307251", "prediction": "yes"}, '
                               '{"questionId": "201640614", "prediction": "left"}]')


def test_convert_runs_as_a_script(tmp_path):
    src, dst = _write_merge(tmp_path / "merge.jsonl"), tmp_path / "p.json"
    subprocess.run([sys.executable, str(SCRIPT), "--src", src, "--dst", str(dst)], check=True, cwd=tmp_path)
    rows = json.loads(dst.read_text())
    assert rows[0] == {"questionId": "q1", "prediction": "yes"}
    assert [row["questionId"] for row in rows] == list(RAW_ANSWERS)


def test_convert_reports_malformed_lines_and_missing_fields(tmp_path, capsys):
    src = tmp_path / "merge.jsonl"
    src.write_text('{"question_id": "1", "text": "Yes."}\nnot json\n')
    assert convert_gqa.main(["--src", str(src), "--dst", str(tmp_path / "p.json")]) == 0
    assert "skipped 1 malformed line(s) (line 2)" in capsys.readouterr().err
    src.write_text('{"question_id": "1"}\n')
    assert convert_gqa.main(["--src", str(src), "--dst", str(tmp_path / "p.json")]) == 2
    assert "a line has no 'question_id' or no string 'text'" in capsys.readouterr().err


def test_convert_refuses_an_answer_written_twice_and_writes_nothing(tmp_path, capsys):
    src = tmp_path / "merge.jsonl"
    src.write_text('{"question_id": "q1", "prompt": "p", "text": "Yes."}\n' * 2)
    assert convert_gqa.main(["--src", str(src), "--dst", str(tmp_path / "p.json")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {src}: 1 question(s) are answered more than once "
                                              "(question_id 'q1' x2)")
    assert not (tmp_path / "p.json").exists()


# --- the scorer ---

def test_reasoning_steps_and_words():
    assert [eval_gqa.reasoning_steps(question) for question in QUESTIONS.values()] == [2, 3, 2, 2, 2, 2, 0]
    # The exclusions are substrings of "operation: argument", so an argument can hide a step too.
    assert eval_gqa.reasoning_steps({"semantic": [_op("choose name", "x"), _op("select", "existing"), _op("filter")]}) == 1
    assert eval_gqa.word_count({"question": "  Is  the cup\tred? "}) == 4


def test_percent_is_correct_over_count_times_100():
    assert repr(Tally(1, 3).percent) == "33.33333333333333"  # 100 / 3 would be 33.333333333333336
    assert Tally().percent == 0.0


def test_chi_square_by_hand():
    gold = {"color": {"red": 2, "blue": 1}, "object": {"cup": 1}}
    predicted = {"color": {"red": 3}, "object": {" cup": 1}}
    assert eval_gqa.chi_square({g: Counter(c) for g, c in gold.items()},
                               {g: Counter(c) for g, c in predicted.items()}) == 1.375


def test_scores_by_hand():
    scores = eval_gqa.score_gqa(QUESTIONS, _predictions())
    assert (scores.binary, scores.open, scores.accuracy) == (Tally(2, 3), Tally(1, 3), Tally(3, 6))
    assert scores.distribution == 0.01375
    assert scores.breakdowns["words"] == {4: Tally(1, 1), 6: Tally(1, 2), 5: Tally(1, 3)}


def test_exact_match_only():
    """No normalisation in the scorer: case and whitespace count."""
    for prediction, right in (("yes", True), ("Yes", False), ("yes ", False), ("yes.", False)):
        assert eval_gqa.score_gqa({"q1": QUESTIONS["q1"]}, {"q1": prediction}).accuracy == Tally(right, 1)


def test_last_duplicate_prediction_wins(tmp_path):
    path = _write_json(tmp_path / "p.json", [{"questionId": "q1", "prediction": "no"},
                                              {"questionId": "q1", "prediction": "yes"}])
    assert eval_gqa.load_predictions(path) == {"q1": "yes"}


def test_convert_then_score_printout(tmp_path, capsys):
    questions = _write_json(tmp_path / "testdev_balanced_questions.json", QUESTIONS)
    predictions = tmp_path / "testdev_balanced_predictions.json"
    assert convert_gqa.main(["--src", _write_merge(tmp_path / "merge.jsonl"), "--dst", str(predictions)]) == 0
    code, out, err = _eval(capsys, "--questions", questions, "--predictions", str(predictions), "--tier", "testdev_balanced")
    assert (code, err) == (0, "")
    assert out == EXPECTED_REPORT


def test_missing_predictions_are_named(tmp_path, capsys):
    questions = _write_json(tmp_path / "q.json", QUESTIONS)
    rows = [{"questionId": qid, "prediction": p} for qid, p in _predictions().items() if qid not in ("q3", "q5")]
    code, out, err = _eval(capsys, "--questions", questions, "--predictions", _write_json(tmp_path / "p.json", rows))
    assert (code, out) == (2, "")
    assert err == f"error: 2 balanced testdev_balanced question(s) have no prediction in {tmp_path / 'p.json'}: 'q3', 'q5'\n"


def test_many_missing_predictions_are_listed_briefly(tmp_path):
    questions = {f"q{i}": QUESTIONS["q1"] for i in range(8)}
    with pytest.raises(GQAError, match=r"^8 balanced val question\(s\) have no prediction in p.json: "
                                       r"'q0', 'q1', 'q2', 'q3', 'q4', \.\.\.$"):
        eval_gqa.check_predictions_complete(questions, {}, "val", "p.json")


def test_no_global_group_leaves_out_distribution(tmp_path, capsys):
    questions = _write_json(tmp_path / "q.json", {"q1": QUESTIONS["q1"]})
    predictions = _write_json(tmp_path / "p.json", [{"questionId": "q1", "prediction": "yes"}])
    code, out, _ = _eval(capsys, "--questions", questions, "--predictions", predictions)
    assert code == 0
    assert out.splitlines()[:4] == ["Binary: 100.00%", "Open: 0.00%", "Accuracy: 100.00%", ""]


@pytest.mark.parametrize("content, message", [
    ('{"questionId": "q1"}', "expected a JSON list"),
    ('[{"questionId": "q1"}]', "expected a JSON list"),
    ("[not json", "Expecting value"),
])
def test_bad_predictions_file(tmp_path, capsys, content, message):
    questions = _write_json(tmp_path / "q.json", QUESTIONS)
    (tmp_path / "p.json").write_text(content)
    code, _, err = _eval(capsys, "--questions", questions, "--predictions", str(tmp_path / "p.json"))
    assert code == 2 and err.startswith("error: ") and message in err
