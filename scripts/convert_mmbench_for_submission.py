"""Build the MMBench / MMBench-CN submission spreadsheet from model answers.

Reads the benchmark TSV and `<result-dir>/<experiment>.jsonl`, and writes
`<upload-dir>/<experiment>.xlsx`: the TSV without its hint, category, source, image, comment and
l2-category columns, with a `prediction` column inserted as the seventh column (so: index,
question, A, B, C, D, prediction, answer, split for the dev files). Each answer's raw text goes
into the row whose `index` equals its `question_id`; rows without an answer stay empty. The
OpenCompass server scores the file.

    python scripts/convert_mmbench_for_submission.py \
        --annotation-file ./playground/data/eval/mmbench/mmbench_dev_20230712.tsv \
        --result-dir ./playground/data/eval/mmbench/answers/mmbench_dev_20230712 \
        --upload-dir ./playground/data/eval/mmbench/answers_upload/mmbench_dev_20230712 \
        --experiment llava-v1.6-vicuna-7b
"""

from __future__ import annotations

import argparse
import os
import sys

import pandas as pd
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

if __name__ == "__main__":  # run as a file: make the repository's `llava` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llava.eval.answers import UserError, answer_texts  # noqa: E402
from llava.files import atomic_write  # noqa: E402
from llava.utils import user_errors  # noqa: E402

# Columns the server does not want back (the image column alone is most of the TSV's size).
DROPPED_COLUMNS = ["hint", "category", "source", "image", "comment", "l2-category"]
PREDICTION_POSITION = 6


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Convert MMBench answers to the submission spreadsheet.")
    parser.add_argument("--annotation-file", required=True, help="benchmark TSV, e.g. mmbench_dev_20230712.tsv")
    parser.add_argument("--result-dir", required=True, help="directory holding <experiment>.jsonl")
    parser.add_argument("--upload-dir", required=True, help="directory the .xlsx is written to (created)")
    parser.add_argument("--experiment", required=True, help="answers file name without .jsonl")
    return parser


def submission_table(benchmark: pd.DataFrame, texts: dict) -> pd.DataFrame:
    """The benchmark table with the dropped columns removed and the predictions inserted."""
    absent = [column for column in ["index", *DROPPED_COLUMNS] if column not in benchmark.columns]
    if absent:
        raise UserError(f"the benchmark TSV lacks the column(s) {', '.join(absent)}: is it an MMBench TSV?")
    table = benchmark.drop(columns=DROPPED_COLUMNS)
    table.insert(PREDICTION_POSITION, "prediction", None)
    for question_id, text in texts.items():
        table.loc[table["index"] == question_id, "prediction"] = text
    return table


def spreadsheet_safe(texts: dict) -> tuple[dict, int]:
    """The answer texts without the control characters an .xlsx cell cannot hold (a model may emit
    them; openpyxl refuses the whole file), and how many texts held any."""
    cleaned = {key: ILLEGAL_CHARACTERS_RE.sub("", text) for key, text in texts.items()}
    return cleaned, sum(cleaned[key] != text for key, text in texts.items())


def convert(annotation_file: str, result_dir: str, upload_dir: str, experiment: str) -> None:
    answers_path = os.path.join(result_dir, f"{experiment}.jsonl")
    upload_path = os.path.join(upload_dir, f"{experiment}.xlsx")
    benchmark = pd.read_table(annotation_file)
    texts = answer_texts(answers_path)
    texts, cleaned = spreadsheet_safe(texts)
    table = submission_table(benchmark, texts)
    if cleaned:
        print(f"warning: {cleaned} prediction(s) held control characters a spreadsheet cannot store; they were "
              "removed", file=sys.stderr)

    # Upstream drops these silently; they usually mean the wrong TSV or a partial run.
    unmatched = len(texts.keys() - set(benchmark["index"].tolist()))
    unanswered = int(table["prediction"].isna().sum())
    if unmatched:
        print(f"warning: {unmatched} answer(s) in {answers_path} match no index in {annotation_file}", file=sys.stderr)
    if unanswered:
        print(f"warning: {unanswered} question(s) have no answer; their prediction cell is empty", file=sys.stderr)

    os.makedirs(upload_dir, exist_ok=True)
    with atomic_write(upload_path, "wb") as out:
        table.to_excel(out, index=False, engine="openpyxl")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with user_errors():
        convert(args.annotation_file, args.result_dir, args.upload_dir, args.experiment)
    return 0


if __name__ == "__main__":
    sys.exit(main())
