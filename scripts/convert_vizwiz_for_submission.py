"""Build the VizWiz EvalAI upload from model answers.

Reads the question file (`llava_test.jsonl`) and the answers file, and writes a JSON list with one
`{"image", "answer"}` per question, in question-file order, the answer being the EvalAI-normalised
model text. Every question must have an answer: otherwise nothing is written and the missing
question ids are named. Malformed answer lines are skipped and counted on stderr.

    python scripts/convert_vizwiz_for_submission.py \
        --annotation-file ./playground/data/eval/vizwiz/llava_test.jsonl \
        --result-file ./playground/data/eval/vizwiz/answers/llava-v1.6-vicuna-7b.jsonl \
        --result-upload-file ./playground/data/eval/vizwiz/answers_upload/llava-v1.6-vicuna-7b.json
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
from llava.eval.jsonl import read_jsonl  # noqa: E402
from llava.eval.m4c_evaluator import EvalAIAnswerProcessor  # noqa: E402
from llava.files import write_text  # noqa: E402
from llava.utils import user_errors  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Convert VizWiz answers to the EvalAI upload format.")
    parser.add_argument("--annotation-file", required=True, help="question file, e.g. vizwiz/llava_test.jsonl")
    parser.add_argument("--result-file", required=True, help="model answers (JSON lines)")
    parser.add_argument("--result-upload-file", required=True, help="upload file to write (JSON)")
    return parser


def upload_rows(questions: list[dict], texts: dict, normalise, answers_path: str) -> list[dict]:
    """One `{"image", "answer"}` per question, in order; a UserError if any question is unanswered."""
    missing = [question["question_id"] for question in questions if question["question_id"] not in texts]
    if missing:
        raise UserError(missing_answers_message(missing, answers_path))
    return [{"image": question["image"], "answer": normalise(texts[question["question_id"]])} for question in questions]


def convert(annotation_file: str, result_file: str, upload_file: str) -> None:
    texts = answer_texts(result_file)
    questions = [{"question_id": field(row, "question_id", annotation_file), "image": field(row, "image", annotation_file)}
                 for row in read_jsonl(annotation_file)]
    print(f"total results: {len(texts)}, total split: {len(questions)}")

    rows = upload_rows(questions, texts, EvalAIAnswerProcessor(), result_file)
    make_parent_dir(upload_file)
    write_text(upload_file, json.dumps(rows))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with user_errors():
        convert(args.annotation_file, args.result_file, args.result_upload_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
