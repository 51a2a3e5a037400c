"""TextVQA accuracy of an answers file, as upstream LLaVA's `eval_textvqa.py` computes it.

    python -m llava.eval.eval_textvqa --annotation-file playground/data/eval/textvqa/TextVQA_0.5.1_val.json \
        --result-file playground/data/eval/textvqa/answers/llava-next-7b.jsonl

Each answer is matched to its annotation by (image id = `question_id`, question recovered from the
answer's `prompt`), so answers produced with or without the "Reference OCR token:" line score alike.
Prints the result file's name, then `Samples: N` and `Accuracy: XX.XX%` (and a blank line), per file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from llava.eval.answers import read_answers
from llava.eval.m4c_evaluator import TextVQAAccuracyEvaluator

OCR_LINE_MARK = "Reference OCR token: "
# Upstream's start-of-prompt test omits the trailing space.
OCR_LINE_START = "Reference OCR token:"
# Prompts of the older "OCR tokens: ... Question: ... Short answer:" shape.
OLD_STYLE_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def question_from_prompt(prompt: str) -> str:
    """The lower-cased question inside an answers-file prompt. Recognised shapes:
    "OCR tokens: ... Question: <q> Short answer: ..."; three lines with a "Reference OCR token: " line
    (question first, or second when the prompt starts with the OCR line); two lines "<q>\\n<suffix>".
    Raises ValueError for anything else."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = OLD_STYLE_QUESTION.search(prompt)
        if match is None:
            raise ValueError(f"prompt starts with 'OCR tokens: ' but has no 'Question: ... Short answer:': {prompt!r}")
        question = match.group(1)
    elif OCR_LINE_MARK in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith(OCR_LINE_START) else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise ValueError(f"unrecognised prompt shape ({len(lines)} lines): {prompt!r}")
    return question.lower()


def index_annotations(annotations: list[dict]) -> dict[tuple[str, str], dict]:
    """(image_id, lower-cased question) -> annotation; a later duplicate replaces an earlier one."""
    return {(annotation["image_id"], annotation["question"].lower()): annotation for annotation in annotations}


def build_pred_list(annotations: dict[tuple[str, str], dict], results: list[dict]) -> list[dict]:
    """One {"pred_answer", "gt_answers"} per answers-file row, in file order. Raises ValueError naming
    the question_id when a prompt cannot be read or its question has no annotation."""
    pred_list = []
    for result in results:
        question_id = result["question_id"]
        try:
            question = question_from_prompt(result["prompt"])
        except ValueError as error:
            raise ValueError(f"question_id {question_id!r}: {error}") from None
        annotation = annotations.get((question_id, question))
        if annotation is None:
            raise ValueError(f"question_id {question_id!r}: no annotation for image {question_id!r} "
                             f"with question {question!r}")
        pred_list.append({"pred_answer": result["text"], "gt_answers": annotation["answers"]})
    return pred_list


def report(annotations: dict[tuple[str, str], dict], result_file: str) -> None:
    """Score one answers file and print upstream's lines for it."""
    print(os.path.splitext(os.path.basename(result_file))[0])
    pred_list = build_pred_list(annotations, read_answers(result_file))
    accuracy = TextVQAAccuracyEvaluator().eval_pred_list(pred_list)
    print(f"Samples: {len(pred_list)}\nAccuracy: {100 * accuracy:.2f}%\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="TextVQA accuracy of LLaVA answers files.")
    parser.add_argument("--annotation-file", required=True, help="TextVQA_0.5.1_val.json")
    parser.add_argument("--result-file", help="answers .jsonl")
    parser.add_argument("--result-dir", help="score every .jsonl in this directory (sorted by name)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.result_file is None and args.result_dir is None:
        parser.error("give --result-file or --result-dir")
    try:
        with open(args.annotation_file, encoding="utf-8") as file:
            annotations = index_annotations(json.load(file)["data"])
        if args.result_file is not None:
            report(annotations, args.result_file)
        if args.result_dir is not None:
            for name in sorted(os.listdir(args.result_dir)):
                if name.endswith(".jsonl"):
                    report(annotations, os.path.join(args.result_dir, name))
                else:
                    print(f"Skipping {name}")
    except (ValueError, OSError) as error:  # a missing file too: one line, status 2 like every CLI here
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
