"""Convert MM-Vet answers to the results file the official MM-Vet GPT-4 grader reads.

Writes one JSON object, `{"v1_<question_id>": <answer text>, ...}`, indented by 2, keys in answers
file order (a question answered twice keeps its later text).

    python scripts/convert_mmvet_for_eval.py \
        --src ./playground/data/eval/mm-vet/answers/llava-v1.6-vicuna-7b.jsonl \
        --dst ./playground/data/eval/mm-vet/results/llava-v1.6-vicuna-7b.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __name__ == "__main__":  # run as a file: make the repository's `llava` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llava.eval.answers import answer_texts, make_parent_dir  # noqa: E402
from llava.files import write_text  # noqa: E402
from llava.utils import user_errors  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Convert MM-Vet answers for the official grader.")
    parser.add_argument("--src", required=True, help="model answers (JSON lines)")
    parser.add_argument("--dst", required=True, help="results file to write (JSON)")
    return parser


def grader_results(texts: dict) -> dict:
    """The grader names MM-Vet questions `v1_<n>`; the runner's question_id is that n."""
    return {f"v1_{question_id}": text for question_id, text in texts.items()}


def convert(src: str, dst: str) -> None:
    results = grader_results(answer_texts(src))
    make_parent_dir(dst)
    write_text(dst, json.dumps(results, indent=2))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with user_errors():
        convert(args.src, args.dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
