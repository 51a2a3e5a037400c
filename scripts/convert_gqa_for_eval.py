"""Turn merged GQA answers into the predictions file GQA's evaluation reads.

Reads an answers file (JSON lines with `question_id` and `text`, e.g. gqa.sh's `merge.jsonl`) and
writes a JSON list of `{"questionId": question_id, "prediction": text}` in the same order, where the
text loses its trailing periods (all of them) and is lower-cased; nothing else is normalised
(whitespace stays, inner periods stay), as upstream's converter does. Malformed answer lines are
skipped and counted on stderr.

    python scripts/convert_gqa_for_eval.py \
        --src playground/data/eval/gqa/answers/llava_gqa_testdev_balanced/<ckpt>/merge.jsonl \
        --dst playground/data/eval/gqa/data/testdev_balanced_predictions.json

Then score with `python -m llava.eval.eval_gqa` (or GQA's own eval.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __name__ == "__main__":  # run as a file: make the repository's `llava` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llava.eval.answers import read_answers  # noqa: E402
from llava.files import write_text  # noqa: E402


def prediction_text(text: str) -> str:
    """"Yes." -> "yes", "No..." -> "no", "U.S.A." -> "u.s.a"; " yes. " stays " yes. "."""
    return text.rstrip(".").lower()


def gqa_predictions(answers: list[dict], src: str) -> list[dict]:
    """One `{"questionId", "prediction"}` per answer row, in order."""
    predictions = []
    for row in answers:
        if "question_id" not in row or not isinstance(row.get("text"), str):
            raise ValueError(f"{src}: a line has no 'question_id' or no string 'text': {str(row)[:200]}")
        predictions.append({"questionId": row["question_id"], "prediction": prediction_text(row["text"])})
    return predictions


def convert(src: str, dst: str) -> int:
    """Write the predictions of `src` to `dst`; returns how many."""
    predictions = gqa_predictions(read_answers(src), src)
    write_text(dst, json.dumps(predictions))
    return len(predictions)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Convert LLaVA GQA answers to a GQA predictions file.")
    parser.add_argument("--src", required=True, help="answers file (JSON lines), e.g. merge.jsonl")
    parser.add_argument("--dst", required=True, help="predictions file to write, e.g. testdev_balanced_predictions.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        convert(args.src, args.dst)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
