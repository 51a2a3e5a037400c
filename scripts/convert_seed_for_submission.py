"""Score SEED-Bench answers locally and build the upload file.

Reads the official annotation (`SEED-Bench.json`) and the merged answers, and prints, as upstream:
the accuracy of every question type (in type-id order) and `Total accuracy` over all questions,
then `image accuracy` (the SEED-IMG number LLaVA-1.6 reports) and `video accuracy`. An answer is
correct only if its text equals the answer letter exactly (`"A."`, `" A"` and `"a"` are wrong); an
unanswered question counts as wrong. Then it writes the upload file, one
`{"question_id": <annotation id>, "prediction": <text>}` line per annotation question, which needs
every question answered: otherwise nothing is written and the missing ids are named.

    python scripts/convert_seed_for_submission.py \
        --annotation-file ./playground/data/eval/seed_bench/SEED-Bench.json \
        --result-file ./playground/data/eval/seed_bench/answers/llava-v1.6-vicuna-7b/merge.jsonl \
        --result-upload-file ./playground/data/eval/seed_bench/answers_upload/llava-v1.6-vicuna-7b.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __name__ == "__main__":  # run as a file: make the repository's `llava` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llava.eval.answers import (  # noqa: E402
    UserError,
    answer_texts,
    field,
    make_parent_dir,
    missing_answers_message,
)
from llava.eval.jsonl import write_jsonl  # noqa: E402
from llava.utils import user_errors  # noqa: E402

DATA_TYPES = ("image", "video")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Score SEED-Bench answers and convert them to the upload format.")
    parser.add_argument("--annotation-file", required=True, help="official SEED-Bench.json")
    parser.add_argument("--result-file", required=True, help="model answers (JSON lines, e.g. merge.jsonl)")
    parser.add_argument("--result-upload-file", required=True, help="upload file to write (JSON lines)")
    return parser


def scoring_key(question_id):
    """Annotation ids are strings and the runner's are ints: scoring looks an answer up by the
    annotation id cast to int whenever `int()` accepts it, and by the id as it is otherwise."""
    try:
        return int(question_id)
    except (TypeError, ValueError):
        return question_id


def type_tallies(questions: list[dict], texts: dict, data_type: str | None = None) -> dict:
    """question_type_id -> [correct, total] over the questions of `data_type` (all when None)."""
    tallies = {}
    for question in questions:
        if data_type is not None and question["data_type"] != data_type:
            continue
        tally = tallies.setdefault(question["question_type_id"], [0, 0])
        key = scoring_key(question["question_id"])
        tally[0] += int(key in texts and texts[key] == question["answer"])
        tally[1] += 1
    return tallies


def percent(correct: int, total: int) -> str:
    return f"{correct / total * 100:.2f}%"


def total_percent(tallies: dict) -> str:
    return percent(sum(correct for correct, _ in tallies.values()), sum(total for _, total in tallies.values()))


def accuracy_lines(questions: list[dict], texts: dict, type_names: dict) -> list[str]:
    """Upstream's printout: one line per question type and `Total accuracy` over all questions,
    then one total line per data type. `type_names` maps type id -> name."""
    tallies = type_tallies(questions, texts)
    lines = [f"{type_names.get(type_id, type_id)}: {percent(*tallies[type_id])}" for type_id in sorted(tallies)]
    lines.append(f"Total accuracy: {total_percent(tallies)}")
    for data_type in DATA_TYPES:
        # Upstream divides by zero here; an annotation without this data type just says so.
        tallies = type_tallies(questions, texts, data_type)
        lines.append(f"{data_type} accuracy: {total_percent(tallies) if tallies else 'no questions'}")
    return lines


def upload_key(texts: dict, question_id):
    """The key of the answer uploaded for an annotation id: the id as it is if answered so, else
    its scoring key (upstream's order); None when the question has no answer."""
    for key in (question_id, scoring_key(question_id)):
        if key in texts:
            return key
    return None


def upload_rows(questions: list[dict], texts: dict, answers_path: str) -> list[dict]:
    """One `{"question_id", "prediction"}` per annotation question, in order; a UserError naming
    the unanswered questions if there are any."""
    keys = [upload_key(texts, question["question_id"]) for question in questions]
    missing = [question["question_id"] for question, key in zip(questions, keys) if key is None]
    if missing:
        raise UserError(missing_answers_message(missing, answers_path) + "; the upload needs every question")
    return [{"question_id": question["question_id"], "prediction": texts[key]} for question, key in zip(questions, keys)]


def convert(annotation_file: str, result_file: str, upload_file: str) -> None:
    with open(annotation_file, encoding="utf-8") as file:
        annotation = json.load(file)
    questions = field(annotation, "questions", annotation_file)
    if not questions:
        raise UserError(f"{annotation_file} has no questions")
    type_names = {type_id: name for name, type_id in field(annotation, "question_type", annotation_file).items()}
    texts = answer_texts(result_file)

    print(*accuracy_lines(questions, texts, type_names), sep="\n")
    rows = upload_rows(questions, texts, result_file)
    make_parent_dir(upload_file)
    write_jsonl(upload_file, rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with user_errors():
        convert(args.annotation_file, args.result_file, args.result_upload_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
