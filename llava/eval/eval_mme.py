"""MME scores (Perception / Cognition) of a LLaVA answers file, in one step.

Upstream LLaVA scores MME in two steps: eval.zip's `convert_answer_to_mme.py` turns the answers file
into one `<category>.txt` per task, then MME's official `calculation.py` (eval_tool) scores those
files. This module does both, and prints what calculation.py prints:

    python -m llava.eval.eval_mme \
        --gt-dir playground/data/eval/MME/MME_Benchmark_release_version \
        --question-file playground/data/eval/MME/llava_mme.jsonl \
        --result-file playground/data/eval/MME/answers/<ckpt>.jsonl \
        [--out-dir playground/data/eval/MME/eval_tool/answers/<ckpt>]

With `--out-dir` the per-category files are written too, in the eval tool's format (one
`txtname<TAB>question<TAB>GT<TAB>raw answer` line per answer, answers-file order), so the official
calculation.py can be run on them as a cross-check.

Rules (the project's evaluation spec, §2.7):
* Ground truth: every `question<TAB>answer` line (stripped, then split) of the `*.txt` files in
  `<gt-dir>/<category>/questions_answers_YN/` when the category has an `images/` folder (artwork,
  celebrity, landmark, posters, scene), else in `<gt-dir>/<category>/`; keyed by
  (category, txt file name, question).
* An answer's key: category = question_id up to its first "/"; txt name = the base name of
  question_id up to its first "." + ".txt"; question = the answer's `prompt` without the LLaVA
  single-word suffix (then stripped), with " Please answer yes or no." appended unless already there,
  or "  Please answer yes or no." (two spaces) when only that variant is in the ground truth.
* A category's lines, in answers-file order, form consecutive pairs (one image, two questions).
  A line is correct when its answer's label (`parse_mme_answer`) equals the lower-cased ground truth.
  acc = correct lines / lines; acc+ = pairs with both lines correct / pairs; task score =
  acc*100 + acc+*100, added in that order as calculation.py does, so the float is the same to the
  last bit (e.g. acc 4/6 and acc+ 1/3 give 99.99999999999999, where (acc + acc+)*100 gives 100.0).
  Perception = the sum of its 10 task scores, Cognition of its 4, in MME's order.

The trailing newline: calculation.py reads each answer back from its txt line with the "\\n" still
on, so its exact "yes"/"no" test never fires there ("yes\\n" != "yes"). It makes no difference: the
first four characters of "yes\\n" contain "yes" and those of "no\\n" contain "no", and a newline
among the first four characters can neither form nor break "yes"/"no". So the raw answer is parsed
as it is, and gets the label the official tool gives it.

Where upstream would crash or print a silently wrong score, this stops with an error naming the
category instead: a question of the question file without an answer (or an answer to no question,
or a second answer), one of the 14 categories without answers, an odd number of lines in a category,
a pair whose two lines are about different images (answers out of order), an answer whose question
is not in the ground truth, an answer containing a tab or a line break (it would split its txt line).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import dataclass

from llava.eval.answers import UserError, read_answers
from llava.eval.jsonl import read_jsonl
from llava.files import write_text

PERCEPTION_TASKS = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                    "artwork", "OCR")
COGNITION_TASKS = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
TASKS_BY_TYPE = {"Perception": PERCEPTION_TASKS, "Cognition": COGNITION_TASKS}

LLAVA_SUFFIX = "Answer the question using a single word or phrase."
MME_TAIL = "Please answer yes or no."
# The eval tool splits a line on tabs and reads its files in universal-newline mode.
LINE_BREAKERS = ("\t", "\n", "\r")
SHOWN = 5  # how many offending ids an error message lists


class MMEError(ValueError):
    """An input from which the official MME scores cannot be computed faithfully."""


@dataclass(frozen=True)
class MMELine:
    """One line of an eval-tool `<category>.txt` file: one answered question."""

    txt_name: str  # ground-truth file of the image, e.g. "0020.txt"
    question: str  # as in the ground truth, with its "Please answer yes or no." tail
    gt_answer: str  # as in the ground truth: "Yes" or "No"
    answer: str  # the model's raw answer

    def to_text(self) -> str:
        answer = self.answer
        for breaker in LINE_BREAKERS:  # a tab or line break would split the eval tool's line
            answer = answer.replace(breaker, " ")
        return "\t".join((self.txt_name, self.question, self.gt_answer, answer)) + "\n"


def parse_mme_answer(text: str) -> str:
    """MME's label of a raw answer: "yes", "no" or "other". Lower-cased, an exact "yes"/"no" is
    itself; otherwise only the first 4 characters count: containing "yes" -> "yes", else
    containing "no" -> "no", else "other" ("yesterday" -> yes, "none" -> no, "  yes" -> other)."""
    answer = text.lower()
    if answer in ("yes", "no"):
        return answer
    head = answer[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def qa_folder(category_dir: str) -> str:
    """The folder holding a category's ground-truth `*.txt` files. Like upstream's converter, a
    category with an `images/` folder keeps them in `questions_answers_YN/`."""
    if not os.path.exists(os.path.join(category_dir, "images")):
        return category_dir
    folder = os.path.join(category_dir, "questions_answers_YN")
    if not os.path.isdir(folder):
        raise MMEError(f"{category_dir} has an images/ folder but no questions_answers_YN/ folder")
    return folder


def read_qa_file(path: str) -> dict[str, str]:
    """question -> answer ("Yes"/"No") of one ground-truth file of `question<TAB>answer` lines."""
    answers = {}
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():  # upstream would crash on a blank line; it carries nothing
                continue
            fields = line.strip().split("\t")
            if len(fields) != 2 or fields[1].lower() not in ("yes", "no"):
                raise MMEError(f"{path}:{number}: expected 'question<TAB>Yes|No', got {line!r}")
            question, answer = fields
            answers[question] = answer
    return answers


def load_ground_truth(gt_dir: str) -> dict[tuple[str, str, str], str]:
    """(category, txt file name, question) -> "Yes"/"No", for every category folder of `gt_dir`
    (an MME_Benchmark_release_version folder)."""
    ground_truth = {}
    for category in sorted(os.listdir(gt_dir)):
        category_dir = os.path.join(gt_dir, category)
        if not os.path.isdir(category_dir):
            continue
        folder = qa_folder(category_dir)
        for name in sorted(os.listdir(folder)):
            if name.endswith(".txt"):
                for question, answer in read_qa_file(os.path.join(folder, name)).items():
                    ground_truth[(category, name, question)] = answer
    return ground_truth


def category_of(question_id: str) -> str:
    """"artwork/images/14777.jpg" -> "artwork"."""
    return question_id.split("/")[0]


def txt_name_of(question_id: str) -> str:
    """"artwork/images/14777.jpg" -> "14777.txt" (base name up to its first ".")."""
    return question_id.split("/")[-1].split(".")[0] + ".txt"


def gt_question(category: str, txt_name: str, prompt: str, ground_truth: dict) -> str:
    """The ground-truth question an answer's `prompt` stands for (see the module docstring)."""
    question = prompt
    if LLAVA_SUFFIX in question:
        question = question.replace(LLAVA_SUFFIX, "").strip()
    if MME_TAIL in question:
        return question
    # A few MME questions have two spaces before the tail.
    single, double = f"{question} {MME_TAIL}", f"{question}  {MME_TAIL}"
    return single if (category, txt_name, single) in ground_truth else double


def _string_field(row: dict, key: str, path: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise MMEError(f"{path}: a line has no string {key!r}: {str(row)[:200]}")
    return value


def _listed(items) -> str:
    items = list(items)
    return ", ".join(map(repr, items[:SHOWN])) + (", ..." if len(items) > SHOWN else "")


def _per_category(keys) -> str:
    counts = Counter(category_of(question_id) for question_id, _ in keys)
    return ", ".join(f"{category} {count}" for category, count in sorted(counts.items()))


def check_every_question_answered(questions: list[dict], answers: list[dict], question_file: str,
                                  result_file: str) -> None:
    """Each question (question_id + text) must be answered exactly once (question_id + prompt):
    a missing or doubled answer would shift the pairs that calculation.py forms by position."""
    expected = Counter((_string_field(row, "question_id", question_file), _string_field(row, "text", question_file))
                       for row in questions)
    given = Counter((_string_field(row, "question_id", result_file), _string_field(row, "prompt", result_file))
                    for row in answers)
    missing, unexpected = expected - given, given - expected
    problems = []
    if missing:
        problems.append(f"{sum(missing.values())} question(s) of {question_file} have no answer in {result_file} "
                        f"(per category: {_per_category(missing)}; question_id {_listed(qid for qid, _ in missing)})")
    if unexpected:
        problems.append(f"{sum(unexpected.values())} answer(s) in {result_file} match no question of {question_file} "
                        f"by question_id and prompt (per category: {_per_category(unexpected)}; "
                        f"question_id {_listed(qid for qid, _ in unexpected)})")
    if problems:
        raise MMEError("; ".join(problems))


def category_lines(answers: list[dict], ground_truth: dict, result_file: str) -> dict[str, list[MMELine]]:
    """category -> its eval-tool lines, in answers-file order (what the upstream converter writes)."""
    lines: dict[str, list[MMELine]] = {}
    broken = []
    for row in answers:
        question_id = _string_field(row, "question_id", result_file)
        answer = _string_field(row, "text", result_file)
        category, txt_name = category_of(question_id), txt_name_of(question_id)
        if any(breaker in answer for breaker in LINE_BREAKERS):
            broken.append(question_id)
        question = gt_question(category, txt_name, _string_field(row, "prompt", result_file), ground_truth)
        key = (category, txt_name, question)
        if key not in ground_truth:
            raise MMEError(f"MME category {category!r}: no ground truth for {question!r} in {txt_name} "
                           f"(answer to {question_id!r})")
        lines.setdefault(category, []).append(MMELine(txt_name, question, ground_truth[key], answer))
    if broken:
        print(f"warning: {len(broken)} answers contain a tab or line break ({_listed(broken)}); they are scored as they "
              "are, and written with spaces to --out-dir files (upstream's txt files would break there)", file=sys.stderr)
    return lines


def task_score(category: str, lines: list[MMELine]) -> float:
    """acc*100 + acc+*100 of one category's lines, paired by position."""
    if not lines:
        raise MMEError(f"MME category {category!r} has no answers; all 14 are needed for the totals")
    if len(lines) % 2:
        raise MMEError(f"MME category {category!r} has {len(lines)} lines, an odd number: "
                       f"its questions do not form pairs (one image, two questions)")
    correct = []
    for first, second in zip(lines[::2], lines[1::2]):
        if first.txt_name != second.txt_name:
            raise MMEError(f"MME category {category!r}: a pair mixes {first.txt_name} and {second.txt_name}; "
                           f"the answers must keep the question file's order")
        correct.append([parse_mme_answer(line.answer) == line.gt_answer.lower() for line in (first, second)])
    acc = sum(map(sum, correct)) / len(lines)
    acc_plus = sum(map(all, correct)) / len(correct)
    return acc * 100 + acc_plus * 100


def score_mme(lines_by_category: dict[str, list[MMELine]]) -> dict[str, dict[str, float]]:
    """"Perception"/"Cognition" -> task -> score, in MME's order. Categories outside the 14 are
    ignored, as calculation.py ignores their files."""
    return {eval_type: {task: task_score(task, lines_by_category.get(task, [])) for task in tasks}
            for eval_type, tasks in TASKS_BY_TYPE.items()}


def format_report(scores: dict[str, dict[str, float]]) -> str:
    """calculation.py's printout, character for character (its trailing space after the total and
    the two blank lines after each block included). A type's total is the sum of its task scores
    in order, as calculation.py adds them."""
    text = ""
    for eval_type, task_scores in scores.items():
        text += f"=========== {eval_type} ===========\n"
        text += f"total score: {sum(task_scores.values())} \n\n"
        for task, score in task_scores.items():
            text += f"\t {task}  score: {score}\n"
        text += "\n\n"
    return text


def write_category_files(lines_by_category: dict[str, list[MMELine]], out_dir: str) -> None:
    """One eval-tool `<category>.txt` per category, for the official calculation.py."""
    os.makedirs(out_dir, exist_ok=True)
    for category, lines in lines_by_category.items():
        write_text(os.path.join(out_dir, f"{category}.txt"), "".join(line.to_text() for line in lines), newline="\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Score LLaVA answers on MME (Perception / Cognition).")
    parser.add_argument("--gt-dir", required=True, help="the MME_Benchmark_release_version folder")
    parser.add_argument("--question-file", required=True, help="llava_mme.jsonl")
    parser.add_argument("--result-file", required=True, help="the answers file (JSON lines)")
    parser.add_argument("--out-dir", default=None, help="also write the eval tool's <category>.txt files here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ground_truth = load_ground_truth(args.gt_dir)
        answers = read_answers(args.result_file)
        questions = read_jsonl(args.question_file, report=sys.stderr)
        check_every_question_answered(questions, answers, args.question_file, args.result_file)
        lines_by_category = category_lines(answers, ground_truth, args.result_file)
        if args.out_dir:
            write_category_files(lines_by_category, args.out_dir)
        scores = score_mme(lines_by_category)
    except (MMEError, UserError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(format_report(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
