"""ScienceQA accuracy of an answers file, as upstream LLaVA's `eval_science_qa.py` computes it.

    python -m llava.eval.eval_science_qa --base-dir playground/data/eval/scienceqa \
        --result-file playground/data/eval/scienceqa/answers/llava-next-7b.jsonl \
        --output-file playground/data/eval/scienceqa/answers/llava-next-7b_output.jsonl \
        --output-result playground/data/eval/scienceqa/answers/llava-next-7b_result.json

`--base-dir` holds ScienceQA's `problems.json` and `pid_splits.json`. Every problem of the split is
scored (no answer = wrong); IMG-Accuracy, the number LLaVA reports as "SQA", is over the answers whose
`prompt` contains `<image>`. Prints `Total: N, Correct: C, Accuracy: X.XX%, IMG-Accuracy: Y.YY%` and
writes upstream's two JSON files: `--output-file` (per-problem analysis, split into correct/incorrect)
and `--output-result` (acc, correct, count, parsed index and raw output per problem).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from llava.eval.answers import read_answers
from llava.files import write_text

FAILED = "FAILED"
DEFAULT_OPTIONS = "ABCDE"
# The final "." is unescaped upstream, so it matches any character but a newline: "The answer is A" at the
# very end of the text does not match, "The answer is A," does.
ANSWER_SENTENCE = re.compile(r"The answer is ([A-Z]).")
# What upstream assumes for a problem with no answer.
MISSING_ANSWER = {"text": FAILED, "prompt": "Unknown"}


def parse_science_answer(text: str, options: list[str]) -> str:
    """The option letter a model output names, or "FAILED". Accepted: the text is exactly a letter of
    `options`; it starts with such a letter followed by ". "; it contains "The answer is X" plus one more
    character exactly once (X may then be any capital letter)."""
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    letters = ANSWER_SENTENCE.findall(text)
    return letters[0] if len(letters) == 1 else FAILED


def answer_index(letter: str, num_choices: int, options: list[str]) -> int:
    """Position of `letter` among the problem's first `num_choices` options, -1 if it is not one of them."""
    return options.index(letter) if letter in options[:num_choices] else -1


def percent(part: int, whole: int, undefined_because: str) -> float:
    """part / whole * 100 (upstream's order of operations); ValueError(undefined_because) when whole is 0."""
    if whole == 0:
        raise ValueError(undefined_because)
    return part / whole * 100


def score(problems: dict, split_pids: list[str], predictions: dict[str, dict], options: list[str]) -> tuple[dict, dict]:
    """Score the split's problems, in `split_pids` order, against the predictions (question_id -> answers
    row). Returns (analysis, result): upstream's `--output-file` object {"correct": [...], "incorrect": [...]}
    and its `--output-result` object {"acc", "correct", "count", "results", "outputs"}."""
    analysis = {"correct": [], "incorrect": []}
    indices, outputs = {}, {}
    # A pid listed twice is scored once, as upstream's dict of split problems does.
    for pid in dict.fromkeys(split_pids):
        problem = problems[pid]
        prediction = predictions.get(pid, MISSING_ANSWER)
        letter = parse_science_answer(prediction["text"], options)
        index = answer_index(letter, len(problem["choices"]), options)
        analysis["correct" if index == problem["answer"] else "incorrect"].append({
            "question_id": pid,
            "parsed_ans": letter,
            "ground_truth": options[problem["answer"]],
            "question": prediction["prompt"],
            "pred": prediction["text"],
            "is_multimodal": "<image>" in prediction["prompt"],
        })
        indices[pid] = index
        outputs[pid] = prediction["text"]
    correct = len(analysis["correct"])
    count = correct + len(analysis["incorrect"])
    result = {"acc": percent(correct, count, "accuracy is undefined: the split has no problems"),
              "correct": correct, "count": count,
              "results": indices, "outputs": outputs}
    return analysis, result


def img_accuracy(analysis: dict) -> float:
    """Accuracy (percent) over the problems whose prompt had an image."""
    correct = sum(entry["is_multimodal"] for entry in analysis["correct"])
    wrong = sum(entry["is_multimodal"] for entry in analysis["incorrect"])
    return percent(correct, correct + wrong, "IMG-Accuracy is undefined: no answer's prompt contains <image>")


def load_json(path: str):
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def write_json(path: str, content) -> None:
    write_text(path, json.dumps(content, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="ScienceQA accuracy of a LLaVA answers file.")
    parser.add_argument("--base-dir", required=True, help="directory with problems.json and pid_splits.json")
    parser.add_argument("--result-file", required=True, help="answers .jsonl")
    parser.add_argument("--output-file", required=True, help="per-problem analysis (JSON)")
    parser.add_argument("--output-result", required=True, help="summary and per-problem results (JSON)")
    parser.add_argument("--split", default="test")
    # Upstream's `type=list`: "--options ABCD" means the letters A, B, C, D.
    parser.add_argument("--options", type=list, default=list(DEFAULT_OPTIONS))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        split_pids = load_json(os.path.join(args.base_dir, "pid_splits.json"))[args.split]
        problems = load_json(os.path.join(args.base_dir, "problems.json"))
        # A question_id asked with several prompts keeps its later answer, as upstream.
        predictions = {row["question_id"]: row for row in read_answers(args.result_file)}
        missing = len(set(split_pids) - predictions.keys())
        if missing:
            print(f"warning: {missing} of {len(set(split_pids))} {args.split} problems have no answer "
                  f"(scored as {FAILED})", file=sys.stderr)
        analysis, result = score(problems, split_pids, predictions, args.options)
        img = img_accuracy(analysis)
    except (ValueError, OSError) as error:  # a missing file too: one line, status 2 like every CLI here
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Total: {result['count']}, Correct: {result['correct']}, Accuracy: {result['acc']:.2f}%, "
          f"IMG-Accuracy: {img:.2f}%")
    write_json(args.output_file, analysis)
    write_json(args.output_result, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
