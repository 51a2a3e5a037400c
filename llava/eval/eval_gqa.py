"""GQA accuracy of a predictions file, computed as GQA's official `eval.py` computes it.

    python -m llava.eval.eval_gqa \
        --questions playground/data/eval/gqa/data/testdev_balanced_questions.json \
        --predictions playground/data/eval/gqa/data/testdev_balanced_predictions.json \
        [--tier testdev_balanced]

(`scripts/convert_gqa_for_eval.py` writes the predictions file; `--tier` only names the split in
messages.) The reported GQA number is "Accuracy".

Rules (the project's evaluation spec, §2.1):
* Questions: GQA's JSON dict question id -> question. Predictions: a JSON list of
  `{"questionId", "prediction"}`; an id listed twice keeps its last prediction.
* Every question with `isBalanced` true needs a prediction; otherwise this stops with an error
  naming the missing ids (eval.py raises at the first one). Only balanced questions are scored.
* Correct = the prediction equals `answer` exactly (no normalisation: the converter already
  stripped trailing periods and lower-cased).
* Binary = questions whose structural type is not "query", Open = those whose type is "query".
  A percentage is (correct / count) * 100, printed with 2 decimals; an empty group prints 0.00%.
* Distribution: eval.py's chi-square between the gold and the predicted answer histograms of
  each global group (questions with no global group left out), weighted by the group's size,
  divided by 100; lower is better. Summed in eval.py's order, so the float is the same.
* Breakdowns by structural type, semantic type, reasoning steps (semantic operations, not counting
  those whose "operation: argument" contains "exist", "query: name" or "choose name") and number of
  words, keys sorted. Keys are printed raw ("attr", not "Attribute"): eval.py means to rename them
  but tests a stale loop variable, so it never does.

Not computed: validity and plausibility (they need the choices file, which testdev lacks; eval.py
prints 0.00% for both there), consistency (needs predictions for all questions and `--consistency`)
and grounding (needs attention maps).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field

BREAKDOWNS = (("structural", "Accuracy / structural type"), ("semantic", "Accuracy / semantic type"),
              ("steps", "Accuracy / steps number"), ("words", "Accuracy / words number"))
# Operations that do not add a reasoning step (matched inside "operation: argument").
NON_STEPS = ("exist", "query: name", "choose name")
SHOWN = 5  # how many missing ids an error message lists


class GQAError(ValueError):
    """Inputs from which GQA's accuracy cannot be computed."""


@dataclass
class Tally:
    """Correct answers out of a number of questions."""

    correct: int = 0
    count: int = 0

    def add(self, is_correct: bool) -> None:
        self.correct += is_correct
        self.count += 1

    @property
    def percent(self) -> float:
        # eval.py's mean * 100, in that order (100 * correct / count can differ in the last bit)
        return self.correct / self.count * 100 if self.count else 0.0


@dataclass
class GQAScores:
    """The scores computed here (see the module docstring), as tallies."""

    binary: Tally = field(default_factory=Tally)
    open: Tally = field(default_factory=Tally)
    accuracy: Tally = field(default_factory=Tally)
    distribution: float | None = None  # None without any global group (eval.py divides by zero)
    # breakdown name (see BREAKDOWNS) -> key (type name or number) -> tally
    breakdowns: dict = field(default_factory=lambda: {name: {} for name, _ in BREAKDOWNS})


def load_questions(path: str) -> dict[str, dict]:
    with open(path, encoding="utf-8") as file:
        questions = json.load(file)
    if not isinstance(questions, dict):
        raise GQAError(f"{path}: expected a JSON object of question id -> question")
    return questions


def load_predictions(path: str) -> dict:
    """question id -> prediction; a later entry for the same id wins, as in eval.py."""
    with open(path, encoding="utf-8") as file:
        rows = json.load(file)
    if not isinstance(rows, list) or not all(isinstance(row, dict) and {"questionId", "prediction"} <= row.keys()
                                             for row in rows):
        raise GQAError(f'{path}: expected a JSON list of {{"questionId", "prediction"}} objects')
    return {row["questionId"]: row["prediction"] for row in rows}


def check_predictions_complete(questions: dict, predictions: dict, tier: str, predictions_path: str) -> None:
    missing = [qid for qid, question in questions.items() if question["isBalanced"] and qid not in predictions]
    if missing:
        shown = ", ".join(map(repr, missing[:SHOWN])) + (", ..." if len(missing) > SHOWN else "")
        raise GQAError(f"{len(missing)} balanced {tier} question(s) have no prediction in {predictions_path}: "
                       f"{shown}")


def answer_type(question: dict) -> str:
    """"open" for structural type "query", "binary" for every other type."""
    return "open" if question["types"]["structural"] == "query" else "binary"


def reasoning_steps(question: dict) -> int:
    return sum(not any(op in f"{step['operation']}: {step['argument']}" for op in NON_STEPS)
               for step in question["semantic"])


def word_count(question: dict) -> int:
    return len(question["question"].split())


def breakdown_keys(question: dict) -> dict:
    """The question's key in each breakdown."""
    return {"structural": question["types"]["structural"], "semantic": question["types"]["semantic"],
            "steps": reasoning_steps(question), "words": word_count(question)}


def chi_square(gold: dict[str, Counter], predicted: dict[str, Counter]) -> float:
    """eval.py's distribution score before its division by 100: per group, the sum over gold answers
    of (predicted - gold)^2 / gold, weighted by the group's size. Groups and answers are visited in
    first-seen order (the order eval.py adds the floats in)."""
    weighted, total = 0.0, 0
    for group, gold_counts in gold.items():
        score = 0.0
        for answer, expected in gold_counts.items():
            score += float(predicted[group][answer] - expected) ** 2 / expected
        size = sum(gold_counts.values())
        weighted += score * size
        total += size
    return weighted / total


def score_gqa(questions: dict, predictions: dict) -> GQAScores:
    """Scores over the balanced questions, in the questions file's order; each of them must have a
    prediction (`check_predictions_complete`)."""
    scores = GQAScores()
    gold: dict[str, Counter] = {}
    predicted: dict[str, Counter] = {}
    for qid, question in questions.items():
        if not question["isBalanced"]:
            continue
        prediction = predictions[qid]
        is_correct = prediction == question["answer"]
        scores.accuracy.add(is_correct)
        (scores.open if answer_type(question) == "open" else scores.binary).add(is_correct)
        for name, key in breakdown_keys(question).items():
            scores.breakdowns[name].setdefault(key, Tally()).add(is_correct)
        group = question["groups"]["global"]
        if group is not None:
            gold.setdefault(group, Counter())[question["answer"]] += 1
            predicted.setdefault(group, Counter())[prediction] += 1
    if gold:
        scores.distribution = chi_square(gold, predicted) / 100
    return scores


def format_report(scores: GQAScores) -> str:
    """eval.py's result lines: Binary, Open, Accuracy, Distribution, then the breakdowns."""
    lines = [f"Binary: {scores.binary.percent:.2f}%", f"Open: {scores.open.percent:.2f}%",
             f"Accuracy: {scores.accuracy.percent:.2f}%"]
    if scores.distribution is not None:
        lines.append(f"Distribution: {scores.distribution:.2f} (lower is better)")
    for name, title in BREAKDOWNS:
        lines += ["", f"{title}:"]
        tallies = scores.breakdowns[name]
        lines += [f"  {key}: {tallies[key].percent:.2f}% ({tallies[key].count} questions)" for key in sorted(tallies)]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="GQA accuracy (official eval.py rules) of a predictions file.")
    parser.add_argument("--questions", required=True, help="e.g. testdev_balanced_questions.json")
    parser.add_argument("--predictions", required=True, help="e.g. testdev_balanced_predictions.json")
    parser.add_argument("--tier", default="testdev_balanced", help="split name, used in messages only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        questions = load_questions(args.questions)
        predictions = load_predictions(args.predictions)
        check_predictions_complete(questions, predictions, args.tier, args.predictions)
        scores = score_gqa(questions, predictions)
    except (GQAError, OSError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(format_report(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
