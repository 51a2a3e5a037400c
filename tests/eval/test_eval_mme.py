"""`llava.eval.eval_mme`: MME's answer parsing, ground-truth keys, scores and printout, checked
against hand-computed values on a hand-made MME_Benchmark_release_version (all 14 categories, both
folder layouts)."""

from __future__ import annotations

import json

import pytest

from llava.eval import eval_mme
from llava.eval.eval_mme import MMEError, MMELine

SPLIT_LAYOUT = ("artwork", "celebrity", "landmark", "posters", "scene")  # images/ + questions_answers_YN/
SUFFIX = "\nAnswer the question using a single word or phrase."

# category -> the raw answers to its questions, two per image (ground truth: Yes, No per image).
ANSWERS = {
    "existence": ["Yes", "No"],  # 2/2, pair right: 200
    "count": ["yesterday", "none",  # yes, no: pair right
              "Yes", "the answer is no",  # other: pair wrong
              "y", "No"],  # other: pair wrong -> acc 4/6, acc+ 1/3: 66.666...67 + 33.333...33
    "position": ["Yes", "the answer is no"],  # 1/2, pair wrong: 50
    "color": ["  yes", "No"],  # leading spaces -> other: 50
    "posters": ["y", "yes"],  # other, wrong: 0
    "celebrity": ["No", "No"],  # 50
    "scene": ["yes", "no"],  # 200
    "landmark": ["YES", "NO."],  # "no."[:4] holds "no": 200
    "artwork": ["Yes", "No"],  # 200
    "OCR": ["Yes", "No"],  # ground truth with the double-space tail: 200
    "commonsense_reasoning": ["Yes", "Yes"],  # 50
    "numerical_calculation": ["No", "Yes"],  # 0
    "text_translation": ["Yes", "No"],  # 200
    "code_reasoning": ["eyes", "know"],  # yes, no: 200
}
# acc 4/6 * 100 + acc+ 1/3 * 100 in calculation.py's order; (acc + acc+) * 100 would be 100.0.
COUNT_SCORE = "99.99999999999999"
EXPECTED_REPORT = (
    "=========== Perception ===========\n"
    "total score: 1250.0 \n"
    "\n"
    "\t existence  score: 200.0\n"
    f"\t count  score: {COUNT_SCORE}\n"
    "\t position  score: 50.0\n"
    "\t color  score: 50.0\n"
    "\t posters  score: 0.0\n"
    "\t celebrity  score: 50.0\n"
    "\t scene  score: 200.0\n"
    "\t landmark  score: 200.0\n"
    "\t artwork  score: 200.0\n"
    "\t OCR  score: 200.0\n"
    "\n"
    "\n"
    "=========== Cognition ===========\n"
    "total score: 450.0 \n"
    "\n"
    "\t commonsense_reasoning  score: 50.0\n"
    "\t numerical_calculation  score: 0.0\n"
    "\t text_translation  score: 200.0\n"
    "\t code_reasoning  score: 200.0\n"
    "\n"
    "\n"
)


def _question(category: str, image: int, number: int) -> str:
    return f"Is this {category} picture {image} showing thing {number}?"


def _tail(category: str) -> str:
    return ("  " if category == "OCR" else " ") + "Please answer yes or no."


def _image_path(category: str, image: int) -> str:
    folder = f"{category}/images" if category in SPLIT_LAYOUT else category
    return f"{folder}/{image:04d}.jpg"


def build_mme(root, answers=ANSWERS):
    """A fake benchmark folder, question file and answers file; returns their paths."""
    gt_dir, questions, rows = root / "MME_Benchmark_release_version", [], []
    for category, texts in answers.items():
        qa_dir = gt_dir / category / ("questions_answers_YN" if category in SPLIT_LAYOUT else "")
        qa_dir.mkdir(parents=True, exist_ok=True)
        for image in range(1, len(texts) // 2 + 1):
            image_path = _image_path(category, image)
            (gt_dir / image_path).parent.mkdir(exist_ok=True)
            (gt_dir / image_path).write_bytes(b"")
            gt_lines = [f"{_question(category, image, 1)}{_tail(category)}\tYes\n",
                        f"{_question(category, image, 2)}{_tail(category)}\tNo\n"]
            (qa_dir / f"{image:04d}.txt").write_text("".join(gt_lines))
            for number in (1, 2):
                text = _question(category, image, number) + SUFFIX
                questions.append({"question_id": image_path, "image": image_path, "text": text, "category": category})
                rows.append({"question_id": image_path, "prompt": text, "text": texts[2 * (image - 1) + number - 1],
                             "answer_id": "x", "model_id": "m", "metadata": {}})
    question_file, result_file = root / "llava_mme.jsonl", root / "answers.jsonl"
    _write_jsonl(question_file, questions)
    _write_jsonl(result_file, rows)
    return str(gt_dir), str(question_file), str(result_file)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _run(capsys, gt_dir, question_file, result_file, *extra):
    code = eval_mme.main(["--gt-dir", gt_dir, "--question-file", question_file, "--result-file", result_file, *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("text, label", [
    ("Yes", "yes"), ("yes", "yes"), ("NO", "no"), ("no", "no"),
    ("yesterday", "yes"), ("eyes", "yes"), ("Yes, it is.", "yes"), ("noyes", "no"), ("nyes", "yes"),
    ("none", "no"), ("not sure", "no"), ("know", "no"), ("snow", "no"), ("No.", "no"),
    ("the answer is no", "other"), ("  yes", "other"), (" no", "no"), ("y", "other"), ("", "other"),
    ("maybe yes", "other"), ("a no", "no"),
])
def test_parse_mme_answer(text, label):
    assert eval_mme.parse_mme_answer(text) == label


@pytest.mark.parametrize("text", ["Yes", "no", "y", "", "n", "ye", "  yes", "eyes", "yesterday", "abc"])
def test_trailing_newline_changes_no_label(text):
    """calculation.py parses the answer with its line's "\\n" still on: same label either way."""
    assert eval_mme.parse_mme_answer(text + "\n") == eval_mme.parse_mme_answer(text)


def test_ground_truth_both_layouts(tmp_path):
    gt_dir, _, _ = build_mme(tmp_path)
    (tmp_path / "MME_Benchmark_release_version" / "existence" / "notes.md").write_text("not a txt file")
    ground_truth = eval_mme.load_ground_truth(gt_dir)
    assert len(ground_truth) == 2 * 16  # 13 categories of one image, count has three
    assert ground_truth[("artwork", "0001.txt", _question("artwork", 1, 1) + " Please answer yes or no.")] == "Yes"
    assert ground_truth[("count", "0003.txt", _question("count", 3, 2) + " Please answer yes or no.")] == "No"
    assert ground_truth[("OCR", "0001.txt", _question("OCR", 1, 1) + "  Please answer yes or no.")] == "Yes"


def test_ground_truth_lines_are_stripped_and_blank_lines_skipped(tmp_path):
    category = tmp_path / "gt" / "color"
    category.mkdir(parents=True)
    (category / "0001.txt").write_text(" Is it red? Please answer yes or no.\tYes \r\n\nIs it blue? Please answer yes or no.\tNo")
    assert eval_mme.load_ground_truth(str(tmp_path / "gt")) == {
        ("color", "0001.txt", "Is it red? Please answer yes or no."): "Yes",
        ("color", "0001.txt", "Is it blue? Please answer yes or no."): "No"}


def test_ground_truth_errors(tmp_path):
    category = tmp_path / "gt" / "color"
    category.mkdir(parents=True)
    (category / "0001.txt").write_text("Is it red? Please answer yes or no.\tMaybe\n")
    with pytest.raises(MMEError, match=r"0001\.txt:1: expected"):
        eval_mme.load_ground_truth(str(tmp_path / "gt"))
    (tmp_path / "gt2" / "scene" / "images").mkdir(parents=True)
    with pytest.raises(MMEError, match="no questions_answers_YN"):
        eval_mme.load_ground_truth(str(tmp_path / "gt2"))


def test_names_from_question_id():
    assert eval_mme.category_of("artwork/images/14777.jpg") == "artwork"
    assert eval_mme.txt_name_of("artwork/images/14777.jpg") == "14777.txt"
    assert eval_mme.txt_name_of("code_reasoning/0020.png") == "0020.txt"
    assert eval_mme.txt_name_of("OCR/a.b.jpg") == "a.txt"  # up to the first "."


def test_gt_question():
    single = {("color", "1.txt", "Is it red? Please answer yes or no."): "Yes"}
    double = {("color", "1.txt", "Is it red?  Please answer yes or no."): "Yes"}
    prompt = "Is it red?\nAnswer the question using a single word or phrase."
    assert eval_mme.gt_question("color", "1.txt", prompt, single) == "Is it red? Please answer yes or no."
    assert eval_mme.gt_question("color", "1.txt", prompt, double) == "Is it red?  Please answer yes or no."
    # A prompt that already has the tail is used as it is.
    assert eval_mme.gt_question("color", "1.txt", "Is it red? Please answer yes or no.", {}) == \
        "Is it red? Please answer yes or no."
    # Without the LLaVA suffix nothing is stripped.
    assert eval_mme.gt_question("color", "1.txt", "Is it red? ", single) == "Is it red?   Please answer yes or no."


def _lines(*answers_and_truths, txt_names=None):
    names = txt_names or [f"{i // 2}.txt" for i in range(len(answers_and_truths))]
    return [MMELine(name, "q", truth, answer) for name, (answer, truth) in zip(names, answers_and_truths)]


def test_task_score_acc_and_acc_plus():
    both_right = _lines(("Yes", "Yes"), ("no", "No"))
    assert eval_mme.task_score("color", both_right) == 200.0
    one_each = _lines(("Yes", "Yes"), ("Yes", "No"), ("No", "Yes"), ("No", "No"))  # acc 1/2, acc+ 0
    assert eval_mme.task_score("color", one_each) == 50.0
    others_never_match = _lines(("maybe", "Yes"), ("maybe", "No"))
    assert eval_mme.task_score("color", others_never_match) == 0.0
    # acc 7/10, acc+ 3/5: 70.0 + 60.0 = 130.0 in this order; (0.7 + 0.6) * 100 is 129.99999999999997.
    seven_of_ten = _lines(*[("Yes", "Yes"), ("No", "No")] * 3, ("Yes", "Yes"), ("Yes", "No"), ("No", "Yes"), ("No", "Yes"))
    assert repr(eval_mme.task_score("color", seven_of_ten)) == "130.0"


def test_task_score_errors():
    with pytest.raises(MMEError, match="'color' has no answers"):
        eval_mme.task_score("color", [])
    with pytest.raises(MMEError, match="'color' has 3 lines, an odd number"):
        eval_mme.task_score("color", _lines(("Yes", "Yes"), ("No", "No"), ("Yes", "Yes")))
    with pytest.raises(MMEError, match="'color': a pair mixes 1.txt and 2.txt"):
        eval_mme.task_score("color", _lines(("Yes", "Yes"), ("Yes", "Yes"), txt_names=["1.txt", "2.txt"]))


def test_scores_and_printout(tmp_path, capsys):
    code, out, err = _run(capsys, *build_mme(tmp_path))
    assert (code, err) == (0, "")
    assert out == EXPECTED_REPORT


def test_score_mme_values(tmp_path):
    gt_dir, _, result_file = build_mme(tmp_path)
    lines = eval_mme.category_lines(eval_mme.read_jsonl(result_file), eval_mme.load_ground_truth(gt_dir), result_file)
    scores = eval_mme.score_mme(lines)
    assert list(scores) == ["Perception", "Cognition"]
    assert list(scores["Perception"]) == list(eval_mme.PERCEPTION_TASKS)
    assert repr(scores["Perception"]["count"]) == COUNT_SCORE
    assert sum(scores["Cognition"].values()) == 450.0


def test_out_dir_files_in_eval_tool_format(tmp_path, capsys):
    out_dir = tmp_path / "eval_tool" / "answers" / "ckpt"
    code, out, _ = _run(capsys, *build_mme(tmp_path), "--out-dir", str(out_dir))
    assert code == 0 and out == EXPECTED_REPORT
    assert sorted(path.name for path in out_dir.iterdir()) == sorted(f"{category}.txt" for category in ANSWERS)
    assert (out_dir / "OCR.txt").read_text() == (
        f"0001.txt\t{_question('OCR', 1, 1)}  Please answer yes or no.\tYes\tYes\n"
        f"0001.txt\t{_question('OCR', 1, 2)}  Please answer yes or no.\tNo\tNo\n")
    count_lines = (out_dir / "count.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in count_lines] == ["0001.txt", "0001.txt", "0002.txt", "0002.txt",
                                                             "0003.txt", "0003.txt"]
    assert [line.split("\t")[3] for line in count_lines] == ANSWERS["count"]


def test_missing_category_is_an_error(tmp_path, capsys):
    answers = {category: texts for category, texts in ANSWERS.items() if category != "code_reasoning"}
    code, out, err = _run(capsys, *build_mme(tmp_path, answers))
    assert (code, out) == (2, "")
    assert err == "error: MME category 'code_reasoning' has no answers; all 14 are needed for the totals\n"


def _drop_answer_line(result_file, index):
    with open(result_file) as lines:
        rows = lines.readlines()
    del rows[index]
    with open(result_file, "w") as out:
        out.writelines(rows)


def test_missing_answer_is_an_error(tmp_path, capsys):
    gt_dir, question_file, result_file = build_mme(tmp_path)
    _drop_answer_line(result_file, 3)  # count, image 1, question 2
    code, out, err = _run(capsys, gt_dir, question_file, result_file)
    assert (code, out) == (2, "")
    assert "1 question(s) of" in err and "(per category: count 1; question_id 'count/0001.jpg')" in err


def test_doubled_answer_is_an_error(tmp_path, capsys):
    gt_dir, question_file, result_file = build_mme(tmp_path)
    with open(result_file) as lines:
        first = lines.readline()
    with open(result_file, "a") as out:
        out.write(first)
    code, out, err = _run(capsys, gt_dir, question_file, result_file)
    assert (code, out) == (2, "")
    assert err.startswith(f"error: {result_file}: 1 question(s) are answered more than once "
                          f"(question_id {json.loads(first)['question_id']!r} x2)")


def test_malformed_answer_line_is_reported_and_an_error(tmp_path, capsys):
    gt_dir, question_file, result_file = build_mme(tmp_path)
    with open(result_file) as lines:
        rows = lines.readlines()
    rows[0] = rows[0][:20] + "\n"
    with open(result_file, "w") as out:
        out.writelines(rows)
    code, _, err = _run(capsys, gt_dir, question_file, result_file)
    assert code == 2
    assert "skipped 1 malformed line(s) (line 1)" in err and "per category: existence 1" in err


def test_answers_out_of_order_is_an_error(tmp_path, capsys):
    gt_dir, question_file, result_file = build_mme(tmp_path)
    with open(result_file) as lines:
        rows = lines.readlines()
    rows[3], rows[4] = rows[4], rows[3]  # count: image 1 question 2 <-> image 2 question 1
    with open(result_file, "w") as out:
        out.writelines(rows)
    code, _, err = _run(capsys, gt_dir, question_file, result_file)
    assert code == 2 and "'count': a pair mixes 0001.txt and 0002.txt" in err


@pytest.mark.parametrize("answer", ["Yes\tNo", "Yes\nNo", "Yes\rNo"])
def test_answer_with_a_line_break_is_scored_as_it_is_with_a_warning(tmp_path, capsys, answer):
    """Upstream's txt line would break; the answer's label ("Yes..." -> yes) is what counts here,
    and the eval-tool file gets spaces instead."""
    plain = _run(capsys, *build_mme(tmp_path / "plain", {**ANSWERS, "scene": ["Yes No", "No"]}))[1]
    out_dir = tmp_path / "out"
    code, out, err = _run(capsys, *build_mme(tmp_path / "broken", {**ANSWERS, "scene": [answer, "No"]}),
                          "--out-dir", str(out_dir))
    assert code == 0 and out == plain and "1 answers contain a tab or line break ('scene/images/0001.jpg')" in err
    assert (out_dir / "scene.txt").read_text().splitlines()[0].endswith("\tYes No")


def test_question_without_ground_truth_is_an_error(tmp_path, capsys):
    gt_dir, question_file, result_file = build_mme(tmp_path)
    (tmp_path / "MME_Benchmark_release_version" / "color" / "0001.txt").write_text("Other? Please answer yes or no.\tYes\n")
    code, _, err = _run(capsys, gt_dir, question_file, result_file)
    assert code == 2
    assert f"MME category 'color': no ground truth for '{_question('color', 1, 1)}  Please answer yes or no.' in 0001.txt" in err


def test_missing_file_is_an_error(tmp_path, capsys):
    gt_dir, question_file, _ = build_mme(tmp_path)
    code, _, err = _run(capsys, gt_dir, question_file, str(tmp_path / "nowhere.jsonl"))
    assert code == 2 and err.startswith("error: ") and "nowhere.jsonl" in err
