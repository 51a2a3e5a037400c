"""Build the VQAv2 EvalAI upload from merged model answers.

Reads `<dir>/answers/<split>/<ckpt>/merge.jsonl` and the full test list
`<dir>/llava_vqav2_mscoco_test2015.jsonl`, and writes `<dir>/answers_upload/<split>/<ckpt>.json`:
a JSON list with one `{"question_id", "answer"}` per test2015 question, in that file's order. The
answer is the EvalAI-normalised model text, or "" for a question the model did not answer (every
question outside test-dev). Malformed answer lines are skipped and counted on stderr.

    python scripts/convert_vqav2_for_submission.py --dir ./playground/data/eval/vqav2 \
        --ckpt llava-v1.6-vicuna-7b --split llava_vqav2_mscoco_test-dev2015
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __name__ == "__main__":  # run as a file: make the repository's `llava` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llava.eval.answers import answer_texts, field, make_parent_dir  # noqa: E402
from llava.eval.jsonl import read_jsonl  # noqa: E402
from llava.eval.m4c_evaluator import EvalAIAnswerProcessor  # noqa: E402
from llava.files import write_text  # noqa: E402
from llava.utils import user_errors  # noqa: E402

TEST_LIST = "llava_vqav2_mscoco_test2015.jsonl"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Convert VQAv2 answers to the EvalAI upload format.")
    parser.add_argument("--dir", default="./playground/data/eval/vqav2", help="VQAv2 eval directory")
    parser.add_argument("--ckpt", required=True, help="checkpoint name (answers/<split>/<ckpt>/merge.jsonl)")
    parser.add_argument("--split", required=True, help="split name, e.g. llava_vqav2_mscoco_test-dev2015")
    return parser


def upload_rows(test_question_ids: list, texts: dict, normalise) -> list[dict]:
    """One upload row per test question, in order; unanswered questions get an empty answer."""
    return [{"question_id": qid, "answer": normalise(texts[qid]) if qid in texts else ""}
            for qid in test_question_ids]


def convert(directory: str, ckpt: str, split: str) -> None:
    answers_path = os.path.join(directory, "answers", split, ckpt, "merge.jsonl")
    test_path = os.path.join(directory, TEST_LIST)
    upload_path = os.path.join(directory, "answers_upload", split, f"{ckpt}.json")

    texts = answer_texts(answers_path)
    test_question_ids = [field(row, "question_id", test_path) for row in read_jsonl(test_path)]
    print(f"total results: {len(texts)}, total split: {len(test_question_ids)}")
    # Upstream drops answers to questions outside the test list without a word; a test list that
    # does not match the answers would lose them all.
    unmatched = len(texts.keys() - set(test_question_ids))
    if unmatched:
        print(f"warning: {unmatched} answer(s) in {answers_path} match no question in {test_path}", file=sys.stderr)

    rows = upload_rows(test_question_ids, texts, EvalAIAnswerProcessor())
    make_parent_dir(upload_path)
    write_text(upload_path, json.dumps(rows))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with user_errors():
        convert(args.dir, args.ckpt, args.split)
    return 0


if __name__ == "__main__":
    sys.exit(main())
