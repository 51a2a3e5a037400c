"""POPE scoring: the yes/no rule, the confusion counts and ratios, positional pairing, the CLI's printed lines."""

import json

import pytest

from llava.eval import eval_pope
from llava.eval.eval_pope import label_files, parse_pope_answer, score_category


@pytest.mark.parametrize("text, parsed", [
    ("No, there is not.", "no"),
    ("no", "no"),
    ("not", "no"),
    ("There is no dog in the image.", "no"),
    ("The answer is no.", "no"),
    # only the first sentence counts
    ("Yes. There is no cat.", "yes"),
    ("Yes", "yes"),
    # case-sensitive, whole words split on single spaces only
    ("NO", "yes"),
    ("Not", "yes"),
    ("Nope", "yes"),
    ("None", "yes"),
    ("no!", "yes"),
    ("No\nthere is a dog", "yes"),
    ("I don't see one", "yes"),
    ("", "yes"),
    # commas are deleted before splitting
    ("no, never", "no"),
    ("no,never", "yes"),
])
def test_parse_pope_answer(text, parsed):
    assert parse_pope_answer(text) == parsed


def test_counts_and_ratios_by_hand():
    # pairs: (yes, yes) TP, (yes, no) FP, (no, no) TN, (no, yes) FN, (yes, yes) TP
    scores = score_category(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    assert (scores.tp, scores.fp, scores.tn, scores.fn) == (2, 1, 1, 1)
    assert (scores.precision, scores.recall, scores.f1) == (2 / 3, 2 / 3, pytest.approx(2 / 3, abs=1e-15))
    assert (scores.accuracy, scores.yes_ratio) == (0.6, 0.6)


def test_pairing_stops_at_the_shorter_list_but_yes_ratio_counts_every_answer():
    scores = score_category(["yes", "no", "yes", "yes"], ["yes", "no"])
    assert (scores.tp, scores.fp, scores.tn, scores.fn, scores.accuracy) == (1, 0, 1, 0, 1.0)
    assert scores.yes_ratio == 0.75


def test_any_label_but_no_is_a_yes():
    scores = score_category(["yes", "yes"], ["Yes", "no"])
    assert (scores.tp, scores.fp) == (1, 1)


@pytest.mark.parametrize("predictions, labels, message", [
    ([], ["yes"], "no answers"),
    (["yes"], [], "no labels"),
    (["no", "no"], ["yes", "no"], "precision is undefined"),
    (["yes", "no"], ["no", "no"], "recall is undefined"),
    (["yes", "no"], ["no", "yes"], "F1 is undefined"),
])
def test_division_by_zero_is_a_clear_error(predictions, labels, message):
    with pytest.raises(ValueError, match=message):
        score_category(predictions, labels)


def test_label_files_give_categories_in_name_order(tmp_path):
    for name in ["coco_pope_random.json", "coco_pope_adversarial.json"]:
        (tmp_path / name).write_text("")
    assert label_files(str(tmp_path)) == [("adversarial", str(tmp_path / "coco_pope_adversarial.json")),
                                          ("random", str(tmp_path / "coco_pope_random.json"))]
    (tmp_path / "readme.txt").write_text("")
    with pytest.raises(ValueError, match="'readme.txt' is not a coco_pope_<category>.json file"):
        label_files(str(tmp_path))


def _lines(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _benchmark(tmp_path, answers):
    """Six questions alternating adversarial / random; label files whose ids deliberately do not match the
    question ids (pairing is by position). Returns the CLI arguments."""
    (tmp_path / "coco").mkdir()
    label_lists = [("adversarial", 100, ["yes", "no", "no"]), ("random", 200, ["no", "yes", "yes"])]
    for category, first_id, labels in label_lists:
        _lines(tmp_path / "coco" / f"coco_pope_{category}.json",
               [{"question_id": first_id + i, "image": "x.jpg", "text": "q", "label": label}
                for i, label in enumerate(labels)])
    _lines(tmp_path / "questions.jsonl",
           [{"question_id": qid, "image": "x.jpg", "text": "q", "category": "adversarial" if qid % 2 else "random"}
            for qid in range(1, 7)])
    _lines(tmp_path / "answers.jsonl", [{"question_id": qid, "prompt": "q", "text": text} for qid, text in answers])
    return ["--annotation-dir", str(tmp_path / "coco"), "--question-file", str(tmp_path / "questions.jsonl"),
            "--result-file", str(tmp_path / "answers.jsonl")]


ANSWERS = [(1, "Yes, there is."), (2, "No."), (3, "No, there is not."), (4, "Yes"), (5, "Yes"), (6, "There is no cat.")]


def test_cli_prints_upstream_blocks_and_the_mean_f1(tmp_path, capsys):
    # adversarial: answers 1, 3, 5 = yes, no, yes vs labels yes, no, no -> TP 1, FP 1, TN 1, FN 0:
    #   precision 1/2, recall 1, F1 2/3, accuracy 2/3, yes ratio 2/3
    # random: answers 2, 4, 6 = no, yes, no vs labels no, yes, yes -> TP 1, FP 0, TN 1, FN 1:
    #   precision 1, recall 1/2, F1 2/3, accuracy 2/3, yes ratio 1/3
    code = eval_pope.main(_benchmark(tmp_path, ANSWERS))
    assert code == 0
    assert capsys.readouterr().out == (
        "Category: adversarial, # samples: 3\n"
        "TP\tFP\tTN\tFN\t\n"
        "1\t1\t1\t0\n"
        "Accuracy: 0.6666666666666666\n"
        "Precision: 0.5\n"
        "Recall: 1.0\n"
        "F1 score: 0.6666666666666666\n"
        "Yes ratio: 0.6666666666666666\n"
        "0.667, 0.667, 0.500, 1.000, 0.667\n"
        "====================================\n"
        "Category: random, # samples: 3\n"
        "TP\tFP\tTN\tFN\t\n"
        "1\t0\t1\t1\n"
        "Accuracy: 0.6666666666666666\n"
        "Precision: 1.0\n"
        "Recall: 0.5\n"
        "F1 score: 0.6666666666666666\n"
        "Yes ratio: 0.3333333333333333\n"
        "0.667, 0.667, 1.000, 0.500, 0.333\n"
        "====================================\n"
        "Average F1 over 2 categories: 66.67\n"
    )


def test_cli_pairs_by_answers_file_order_not_by_id(tmp_path, capsys):
    # adversarial answers in file order 5, 3, 1 = yes, no, no against labels yes, no, no: TP 1, TN 2.
    # (Matching by id would pair 1 with the first label instead: FN 1, TN 1, FP 1.)
    answers = [(5, "Yes"), (3, "No"), (1, "No"), (2, "No."), (4, "Yes"), (6, "There is no cat.")]
    assert eval_pope.main(_benchmark(tmp_path, answers)) == 0
    assert "Category: adversarial, # samples: 3\nTP\tFP\tTN\tFN\t\n1\t0\t2\t0\n" in capsys.readouterr().out


def test_cli_undefined_f1_is_reported_with_the_category(tmp_path, capsys):
    answers = [(1, "No"), (2, "No."), (3, "no"), (4, "Yes"), (5, "not"), (6, "There is no cat.")]
    assert eval_pope.main(_benchmark(tmp_path, answers)) == 2
    captured = capsys.readouterr()
    assert captured.out == "Category: adversarial, # samples: 3\n"
    assert captured.err == ("error: category 'adversarial': precision is undefined: no answer was a yes "
                            "(TP=0, FP=0, TN=2, FN=1)\n")


def test_cli_unknown_question_id_is_an_error(tmp_path, capsys):
    assert eval_pope.main(_benchmark(tmp_path, ANSWERS + [(99, "Yes")])) == 2
    assert capsys.readouterr().err == "error: 1 answer(s) have a question_id missing from the question file, e.g. 99\n"


def test_cli_refuses_an_answer_written_twice_and_names_it(tmp_path, capsys):
    # pairing by position would shift every later label of category adversarial by one
    assert eval_pope.main(_benchmark(tmp_path, ANSWERS[:1] + ANSWERS)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: {tmp_path / 'answers.jsonl'}: 1 question(s) are answered more than once "
                                   "(question_id 1 x2)")


def test_cli_warns_when_answers_and_labels_differ_in_number(tmp_path, capsys):
    # without answer 6, random pairs only answers 2, 4 (no, yes) with labels no, yes: TP 1, TN 1, F1 1
    assert eval_pope.main(_benchmark(tmp_path, ANSWERS[:5])) == 0
    captured = capsys.readouterr()
    assert "Category: random, # samples: 2\nTP\tFP\tTN\tFN\t\n1\t0\t1\t0\n" in captured.out
    assert "Yes ratio: 0.5\n" in captured.out
    assert captured.out.endswith("Average F1 over 2 categories: 83.33\n")
    assert captured.err == "warning: category 'random': 2 answers but 3 labels; only the first 2 are paired\n"


def test_missing_annotation_dir_is_one_line(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "q.jsonl").write_text("")
    assert eval_pope.main(["--annotation-dir", str(tmp_path / "nope"), "--question-file", str(tmp_path / "q.jsonl"),
                           "--result-file", str(tmp_path / "a.jsonl")]) == 2
    assert "nope" in capsys.readouterr().err
