"""Runner for ScienceQA (a JSON list of conversations; some questions have no image).

    python -m llava.eval.model_vqa_science --model-path ./liuhaotian/llava-next-7b \
        --question-file ./playground/data/eval/scienceqa/llava_test_CQM-A.json \
        --image-folder ./playground/data/eval/scienceqa/images/test \
        --answers-file ./playground/data/eval/scienceqa/answers/llava-next-7b.jsonl \
        --single-pred-prompt --temperature 0 --conv-mode vicuna_v1

As upstream: `<image>` markers are removed from the question, which is stripped; an item with an
image gets `<image>\\n` in front of both the user turn and the answers' `prompt` (the IMG subset
is found by it); the image is passed in its own mode (palette, alpha), not converted to RGB.
"""

from __future__ import annotations

import json
import os
import sys

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.eval.runner import Question, build_parser, run
from llava.mm_utils import load_image

LETTER_PROMPT = "Answer with the option's letter from the given choices directly."


def science_question(item: dict, image_folder: str, single_pred_prompt: bool) -> Question:
    text = item["conversations"][0]["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
    load_images = list
    if "image" in item:
        text = DEFAULT_IMAGE_TOKEN + "\n" + text
        path = os.path.join(image_folder, item["image"])
        load_images = lambda: [load_image(path, question=item["id"], rgb=False)]  # noqa: E731
    if single_pred_prompt:
        text += "\n" + LETTER_PROMPT
    return Question(question_id=item["id"], prompt=text, query=text, load_images=load_images)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__.split("\n")[0], max_new_tokens=1024)
    parser.add_argument("--single-pred-prompt", action="store_true")
    parser.add_argument("--answer-prompter", action="store_true", help="accepted for upstream compatibility; unused")
    args = parser.parse_args(argv)
    with open(os.path.expanduser(args.question_file), encoding="utf-8") as file:
        items = json.load(file)
    return run(args, [science_question(item, args.image_folder, args.single_pred_prompt) for item in items])


if __name__ == "__main__":
    sys.exit(main())
