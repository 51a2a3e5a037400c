"""POPE scores of an answers file, as upstream LLaVA's `eval_pope.py` computes them, plus LLaVA's single
POPE number (the mean F1 of the categories).

    python -m llava.eval.eval_pope --annotation-dir playground/data/eval/pope/coco \
        --question-file playground/data/eval/pope/llava_pope_test.jsonl \
        --result-file playground/data/eval/pope/answers/llava-next-7b.jsonl

The annotation directory holds `coco_pope_<category>.json` label files. For each category the answers
whose question has that category are taken in answers-file order and paired with the label file's lines
by position (no id matching), so the answers file must keep the question file's order. Prints, per
category, upstream's block (counts, accuracy, precision, recall, F1, yes ratio), then
`Average F1 over <n> categories: XX.XX`.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from llava.eval.answers import read_answers
from llava.eval.jsonl import read_jsonl

LABEL_FILE_PREFIX = "coco_pope_"
LABEL_FILE_SUFFIX = ".json"
LABEL_FILE_PATTERN = f"{LABEL_FILE_PREFIX}<category>{LABEL_FILE_SUFFIX}"
# Case-sensitive on purpose: "NO", "Not" and "no!" do not count as a no (upstream's rule).
NEGATIVE_WORDS = {"No", "not", "no"}
CATEGORY_SEPARATOR = "=" * 36


def parse_pope_answer(text: str) -> str:
    """"no" iff the first sentence (text before the first ".") has, after deleting commas and splitting on
    single spaces, a word that is exactly "No", "not" or "no"; "yes" for everything else, even ""."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if NEGATIVE_WORDS.intersection(words) else "yes"


@dataclass(frozen=True)
class PopeScores:
    """One category's confusion counts (positive class = yes) and upstream's ratios."""

    tp: int
    fp: int
    tn: int
    fn: int
    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float


def score_category(predictions: list[str], labels: list[str]) -> PopeScores:
    """Scores of "yes"/"no" predictions against labels paired by position (the shorter list decides how
    many pairs; every label other than "no" counts as yes). The yes ratio is over all predictions, paired or
    not. Raises ValueError where a ratio would divide by zero."""
    if not predictions:
        raise ValueError("no answers in this category")
    pairs = list(zip(predictions, labels))
    if not pairs:
        raise ValueError("the label file has no labels")
    tp = sum(predicted == "yes" and label != "no" for predicted, label in pairs)
    fp = sum(predicted == "yes" and label == "no" for predicted, label in pairs)
    tn = sum(predicted == "no" and label == "no" for predicted, label in pairs)
    fn = sum(predicted == "no" and label != "no" for predicted, label in pairs)
    if tp + fp == 0:
        raise ValueError(f"precision is undefined: no answer was a yes (TP={tp}, FP={fp}, TN={tn}, FN={fn})")
    if tp + fn == 0:
        raise ValueError(f"recall is undefined: no label is yes (TP={tp}, FP={fp}, TN={tn}, FN={fn})")
    if tp == 0:
        raise ValueError(f"F1 is undefined: precision and recall are both 0 (TP={tp}, FP={fp}, TN={tn}, FN={fn})")
    precision = tp / (tp + fp)
    recall = tp / (tp + fn)
    return PopeScores(tp=tp, fp=fp, tn=tn, fn=fn, accuracy=(tp + tn) / (tp + tn + fp + fn), precision=precision,
                      recall=recall, f1=2 * precision * recall / (precision + recall),
                      yes_ratio=predictions.count("yes") / len(predictions))


def print_scores(scores: PopeScores) -> None:
    """Upstream's per-category lines (full-precision floats, then the 3-decimal summary line)."""
    print("TP\tFP\tTN\tFN\t")
    print(f"{scores.tp}\t{scores.fp}\t{scores.tn}\t{scores.fn}")
    print(f"Accuracy: {scores.accuracy}")
    print(f"Precision: {scores.precision}")
    print(f"Recall: {scores.recall}")
    print(f"F1 score: {scores.f1}")
    print(f"Yes ratio: {scores.yes_ratio}")
    print(f"{scores.f1:.3f}, {scores.accuracy:.3f}, {scores.precision:.3f}, {scores.recall:.3f}, "
          f"{scores.yes_ratio:.3f}")


def label_files(annotation_dir: str) -> list[tuple[str, str]]:
    """(category, path) of every label file, sorted by file name (upstream takes the directory listing's
    arbitrary order; the scores are the same, the printout becomes reproducible). Raises ValueError for any
    other file (upstream asserts the same) and for an empty directory."""
    found = []
    for name in sorted(os.listdir(annotation_dir)):
        if not (name.startswith(LABEL_FILE_PREFIX) and name.endswith(LABEL_FILE_SUFFIX)):
            raise ValueError(f"{annotation_dir}: {name!r} is not a {LABEL_FILE_PATTERN} file")
        found.append((name[len(LABEL_FILE_PREFIX):-len(LABEL_FILE_SUFFIX)], os.path.join(annotation_dir, name)))
    if not found:
        raise ValueError(f"{annotation_dir}: no {LABEL_FILE_PATTERN} files")
    return found


def answer_categories(answers: list[dict], questions: list[dict]) -> list[str]:
    """The category of each answer's question, in answers-file order. Raises ValueError for an answer
    whose question_id is not in the question file."""
    category_of = {question["question_id"]: question["category"] for question in questions}
    unknown = [answer["question_id"] for answer in answers if answer["question_id"] not in category_of]
    if unknown:
        raise ValueError(f"{len(unknown)} answer(s) have a question_id missing from the question file, "
                         f"e.g. {unknown[0]!r}")
    return [category_of[answer["question_id"]] for answer in answers]


def report_category(category: str, texts: list[str], labels: list[str]) -> float:
    """Print upstream's block for one category (answer texts and labels in pairing order); return its F1."""
    print(f"Category: {category}, # samples: {len(texts)}")
    if len(texts) != len(labels):
        print(f"warning: category {category!r}: {len(texts)} answers but {len(labels)} labels; "
              f"only the first {min(len(texts), len(labels))} are paired", file=sys.stderr)
    try:
        scores = score_category([parse_pope_answer(text) for text in texts], labels)
    except ValueError as error:
        raise ValueError(f"category {category!r}: {error}") from None
    print_scores(scores)
    print(CATEGORY_SEPARATOR)
    return scores.f1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="POPE scores of a LLaVA answers file.")
    parser.add_argument("--annotation-dir", required=True, help="directory of coco_pope_<category>.json label files")
    parser.add_argument("--question-file", required=True, help="llava_pope_test.jsonl (gives each question's category)")
    parser.add_argument("--result-file", required=True, help="answers .jsonl, in question-file order")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        answers = read_answers(args.result_file)
        categories = answer_categories(answers, read_jsonl(args.question_file, report=sys.stderr))
        f1_scores = []
        for category, label_file in label_files(args.annotation_dir):
            texts = [answer["text"] for answer, answer_category in zip(answers, categories)
                     if answer_category == category]
            labels = [row["label"] for row in read_jsonl(label_file, report=sys.stderr)]
            f1_scores.append(report_category(category, texts, labels))
    except (ValueError, OSError) as error:  # a missing file too: one line, status 2 like every CLI here
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Average F1 over {len(f1_scores)} categories: {100 * sum(f1_scores) / len(f1_scores):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
