"""Summarise LLaVA-Bench GPT reviews (the output of `eval_gpt_review_bench.py`).

For every review file it prints the file's name (without `gpt4_text_` and `.jsonl`), then one line
per category and for `all`, sorted by name:

    <category> <relative score> <reference score x10> <model score x10>

Each review holds a `tuple` [reference score, model score]; the means of each over the category
are rounded to 3 decimals, then relative = round(model / reference * 100, 1) and both means x10
are rounded to 1 decimal. Unparsed reviews ([-1, -1]) are averaged in as they are, as upstream
does. The reported LLaVA-Bench number is the `all` relative score.

    python llava/eval/summarize_gpt_review.py -f playground/data/eval/llava-bench-in-the-wild/reviews/llava-v1.6-vicuna-7b.jsonl
    python llava/eval/summarize_gpt_review.py -d playground/data/eval/llava-bench-in-the-wild/reviews -s vicuna-7b
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

from llava.eval.jsonl import iter_jsonl
from llava.utils import user_errors

SEPARATOR = "=" * 33


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Summarise GPT review files of LLaVA-Bench.")
    parser.add_argument("-d", "--dir", default=None, help="directory of review files (and base of --files)")
    parser.add_argument("-v", "--version", default=None, help="only files of this judge version (0314 or 0613)")
    parser.add_argument("-s", "--select", nargs="*", default=None, help="only files whose name contains all of these")
    parser.add_argument("-f", "--files", nargs="*", default=[], help="review files (default: found in --dir)")
    parser.add_argument("-i", "--ignore", nargs="*", type=int, default=[], help="question ids to leave out")
    return parser


def is_review_file(name: str, directory: str) -> bool:
    # Upstream takes every .jsonl when the directory's own path says it holds reviews.
    return name.endswith(".jsonl") and (name.startswith(("gpt4_text", "reviews_", "review_")) or "review" in directory)


def review_paths(directory: str | None, files: list[str]) -> list[str]:
    """The review files to read, sorted by the names given (or found), joined to `directory`."""
    names = files or [name for name in os.listdir(directory) if is_review_file(name, directory)]
    return [os.path.join(directory, name) if directory is not None else name for name in sorted(names)]


def config_name(path: str) -> str:
    return os.path.basename(path).replace("gpt4_text_", "").replace(".jsonl", "")


def judge_version(config: str) -> str:
    """Upstream's convention: a review file of the June GPT-4 says `0613` in its name."""
    return "0613" if "0613" in config else "0314"


def is_wanted(config: str, select: list[str] | None, version: str | None) -> bool:
    if select is not None and any(part not in config for part in select):
        return False
    return version is None or version == judge_version(config)


def scores_by_category(reviews, ignore=()) -> dict[str, list]:
    """category -> score pairs, every pair also under `all`. Reviews without a category count
    only under `all`; very old ones hold `score` instead of `tuple`."""
    scores = defaultdict(list)
    for review in reviews:
        if review["question_id"] in ignore:
            continue
        pair = review["tuple"] if "tuple" in review else review["score"]
        if "category" in review:
            scores[review["category"]].append(pair)
        scores["all"].append(pair)
    return scores


def summary_numbers(pairs: list) -> tuple[float, float, float]:
    """(relative score, reference mean x10, model mean x10) of a list of score pairs."""
    reference, model = (round(sum(column) / len(column), 3) for column in zip(*pairs))
    return round(model / reference * 100, 1), round(reference * 10, 1), round(model * 10, 1)


def summary_lines(config: str, scores: dict[str, list]) -> list[str]:
    lines = [config]
    for category, pairs in sorted(scores.items()):
        lines.append(" ".join(map(str, (category, *summary_numbers(pairs)))))
    lines.append(SEPARATOR)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dir is None and not args.files:
        parser.error("give the review files (-f) or their directory (-d)")
    with user_errors():
        for path in review_paths(args.dir, args.files):
            config = config_name(path)
            if is_wanted(config, args.select, args.version):
                print(*summary_lines(config, scores_by_category(iter_jsonl(path), args.ignore)), sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
