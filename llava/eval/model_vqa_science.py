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
from llava.eval.answers import UserError
from llava.eval.instructions import science_instruction
from llava.eval.runner import Question, build_parser, build_questions, run
from llava.mm_utils import load_image

LETTER_PROMPT = "Answer with the option's letter from the given choices directly."


def science_question(item: dict, image_folder: str, single_pred_prompt: bool) -> Question:
    if not isinstance(item, dict):
        raise TypeError("not a JSON object")
    question = item["conversations"][0]["value"]
    text = question.replace(DEFAULT_IMAGE_TOKEN, "").strip()
    question_id = item["id"]
    load_images = list
    if "image" in item:
        text = DEFAULT_IMAGE_TOKEN + "\n" + text
        path = os.path.join(image_folder, item["image"])
        load_images = lambda: [load_image(path, question=question_id, rgb=False)]  # noqa: E731
    if single_pred_prompt:
        text += "\n" + LETTER_PROMPT
    return Question(question_id=question_id, prompt=text, query=text, load_images=load_images,
                    instruction=science_instruction(question))


def science_questions(question_file: str, image_folder: str, single_pred_prompt: bool,
                      skip_bad: bool = False) -> list[Question]:
    """The questions of a JSON list of conversations; an item without `id` or a first turn stops
    the run before the model loads (or, with `skip_bad`, is left out with a warning)."""
    path = os.path.expanduser(question_file)
    with open(path, encoding="utf-8") as file:
        try:
            items = json.load(file)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(items, list):
        raise UserError(f"{path}: expected a JSON list of questions, got {type(items).__name__}")
    entries = ((f"item {index}", item) for index, item in enumerate(items))
    return build_questions(entries, lambda item: [science_question(item, image_folder, single_pred_prompt)], path,
                           skip_bad)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__.split("\n")[0], max_new_tokens=1024)
    parser.add_argument("--single-pred-prompt", action="store_true")
    parser.add_argument("--answer-prompter", action="store_true", help="accepted for upstream compatibility; unused")
    args = parser.parse_args(argv)
    return run(args, lambda: science_questions(args.question_file, args.image_folder, args.single_pred_prompt,
                                               args.skip_bad_questions),
               prompt_settings=dict(single_pred_prompt=args.single_pred_prompt))


if __name__ == "__main__":
    sys.exit(main())
