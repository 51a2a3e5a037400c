"""EvalAI answer normalisation and the TextVQA soft score, rule by rule, on cases checkable by hand."""

import subprocess
import sys

import pytest

from llava.eval.m4c_evaluator import CONTRACTIONS, EvalAIAnswerProcessor, TextVQAAccuracyEvaluator

normalise = EvalAIAnswerProcessor()


@pytest.mark.parametrize("raw, expected", [
    ("Two dogs.", "2 dogs"),
    ("RED", "red"),
    # commas and question marks are deleted, not spaced: "1,000" stays one number
    ("1,000", "1000"),
    ("yes?", "yes"),
    ("what,ever", "whatever"),
    # 's is split off as its own word; the article goes
    ("The cat's toy", "cat 's toy"),
    ("  padded  ", "padded"),
])
def test_step1_lower_commas_question_marks_possessive(raw, expected):
    assert normalise(raw) == expected


@pytest.mark.parametrize("raw, expected", [("red\nblue", "red blue"), ("red\tblue", "red blue"), ("\nred\t", "red")])
def test_step2_newlines_and_tabs_become_spaces(raw, expected):
    assert normalise(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    # not touching a space: the mark becomes a space
    ("red-blue", "red blue"),
    ("coca-cola", "coca cola"),
    ("left/right", "left right"),
    ("wow!", "wow"),
    ('say "hi"', "say hi"),
    # touching a space somewhere: the mark is deleted everywhere, even where it joins two words
    ("x - y-z", "x yz"),
    ("stop! go!now", "stop gonow"),
    ("(yes)", "yes"),
    ("f(x)", "f x"),
    ("e-mail @ home", "e mail home"),
])
def test_step3_punctuation_delete_or_space(raw, expected):
    assert normalise(raw) == expected


def test_step3_each_mark_is_tested_on_the_text_as_it_was_before_the_pass():
    # "/" becomes a space, which puts a space next to the first "-"; the test for "-" still looks at
    # the original "x/-y-z" (no space next to a "-"), so both "-" become spaces instead of vanishing.
    assert normalise("x/-y-z") == "x y z"


@pytest.mark.parametrize("raw, expected", [
    ("p.m.", "pm"),
    ("3.5", "3.5"),
    ("1..1", "1.1"),
    # the dot only needs a digit after it, not before it
    (".5 inch", ".5 inch"),
    ("U.S.A", "usa"),
])
def test_step4_periods_not_before_a_digit_are_deleted(raw, expected):
    assert normalise(raw) == expected


def test_step4_at_most_32_periods_are_deleted():
    assert normalise("wait" + "." * 40) == "wait" + "." * 8
    assert normalise("wait" + "." * 32) == "wait"


@pytest.mark.parametrize("raw, expected", [
    ("none", "0"), ("zero", "0"), ("one", "1"), ("five", "5"), ("ten", "10"), ("eleven", "eleven"),
    ("Three cats", "3 cats"),
    ("a dog", "dog"), ("an apple", "apple"), ("The End", "end"), ("the a an", ""),
    ("dont", "don't"), ("isnt", "isn't"), ("youre", "you're"), ("oclock", "o'clock"), ("aint", "ain't"),
    ("twas", "'twas"), ("yall", "y'all"),
    # the table has an entry that removes an apostrophe
    ("somebody'd", "somebodyd"),
    # no entries for "its" and "shes"
    ("its", "its"), ("shes", "shes"),
    ("  big   red    car ", "big red car"),
])
def test_step5_number_words_articles_contractions(raw, expected):
    assert normalise(raw) == expected


def test_contraction_table_is_the_full_evalai_table():
    assert len(CONTRACTIONS) == 120
    # mixed-case entries exist but cannot fire on lower-cased text
    assert CONTRACTIONS["Im"] == "I'm" and normalise("Im") == "im"


@pytest.mark.parametrize("copies, score", [(1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_soft_score_by_number_of_matching_annotators(copies, score):
    answers = ["cat"] * copies + ["dog"] * (10 - copies)
    assert TextVQAAccuracyEvaluator().answer_scores(answers)["cat"] == pytest.approx(score, abs=1e-12)


def test_prediction_scores_after_normalising_both_sides():
    evaluator = TextVQAAccuracyEvaluator()
    gt = ["2"] * 3 + ["3"] * 7
    assert evaluator.eval_pred_list([{"pred_answer": "Two.", "gt_answers": gt}]) == pytest.approx(0.9, abs=1e-12)
    assert evaluator.eval_pred_list([{"pred_answer": "four", "gt_answers": gt}]) == 0.0


def test_accuracy_is_the_mean_over_predictions():
    evaluator = TextVQAAccuracyEvaluator()
    pred_list = [
        {"pred_answer": "yes", "gt_answers": ["yes"] * 10},  # 1.0
        {"pred_answer": "no", "gt_answers": ["yes"] * 10},  # 0.0
        {"pred_answer": "Red", "gt_answers": ["red"] + ["blue"] * 9},  # 0.3
    ]
    assert evaluator.eval_pred_list(pred_list) == pytest.approx(1.3 / 3, abs=1e-12)


def test_exactly_ten_answers_and_at_least_one_prediction_are_required():
    evaluator = TextVQAAccuracyEvaluator()
    with pytest.raises(ValueError, match="expected 10 ground-truth answers, got 9"):
        evaluator.eval_pred_list([{"pred_answer": "yes", "gt_answers": ["yes"] * 9}])
    with pytest.raises(ValueError, match="no predictions"):
        evaluator.eval_pred_list([])


def test_scorers_import_only_the_standard_library():
    modules = ["m4c_evaluator", "eval_textvqa", "eval_pope", "eval_science_qa"]
    code = (f"import sys\nfor m in {modules}: __import__('llava.eval.' + m)\n"
            "print(sorted({'torch', 'numpy', 'transformers', 'PIL'} & set(sys.modules)))")
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "[]"
