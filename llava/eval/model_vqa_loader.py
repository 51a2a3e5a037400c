"""Runner for the short-answer benchmarks (GQA, VQAv2, VizWiz, TextVQA, POPE, MME, SEED).

    python -m llava.eval.model_vqa_loader --model-path ./liuhaotian/llava-next-7b \
        --question-file ./playground/data/eval/pope/llava_pope_test.jsonl \
        --image-folder ./playground/data/eval/pope/val2014 \
        --answers-file ./playground/data/eval/pope/answers/llava-next-7b.jsonl \
        --temperature 0 --conv-mode vicuna_v1 [--retention-ratio 0.25]

Question file: JSON lines with `question_id`, `image` (relative to `--image-folder`), `text`.
The user turn is `<image>\\n` + text; the answers' `prompt` is the text itself, as upstream.
`--drop-ocr-tokens` removes TextVQA's `Reference OCR token: ...` line from what the model sees
(the released GlobalCom2 loader does; upstream keeps it); the `prompt` field keeps it either way,
so scoring is unchanged, and each answer's metadata records the choice.
"""

from __future__ import annotations

import json
import os
import sys

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.eval.instructions import vqa_instruction
from llava.eval.jsonl import numbered_lines
from llava.eval.runner import Question, build_parser, build_questions, run
from llava.mm_utils import load_image

OCR_LINE_PREFIX = "Reference OCR token:"


def shown_text(text: str, drop_ocr_tokens: bool = False) -> str:
    """The question `text` as the model sees it (without the OCR line if `drop_ocr_tokens`)."""
    if drop_ocr_tokens:
        text = "\n".join(line for line in text.split("\n") if not line.startswith(OCR_LINE_PREFIX))
    return text


def image_query(text: str, drop_ocr_tokens: bool = False) -> str:
    """The user turn for a question `text`: the image first, then the text."""
    return DEFAULT_IMAGE_TOKEN + "\n" + shown_text(text, drop_ocr_tokens)


def questions_from_jsonl(question_file: str, image_folder: str, drop_ocr_tokens: bool = False,
                         skip_bad: bool = False) -> list[Question]:
    """One Question per line; a line that is not a JSON object with `question_id`, `image` and
    `text` stops the run before the model loads (or, with `skip_bad`, is left out with a warning)."""
    path = os.path.expanduser(question_file)

    def make(line: str) -> list[Question]:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"not valid JSON ({error.msg})") from None
        if not isinstance(entry, dict):
            raise ValueError("not a JSON object")
        question_id, text, image = entry["question_id"], entry["text"], entry["image"]
        if not isinstance(text, str) or not isinstance(image, str):
            raise TypeError("'text' and 'image' must be strings")
        image_path = os.path.join(image_folder, image)
        recorded = {"ocr_tokens_shown": not drop_ocr_tokens} if OCR_LINE_PREFIX in text else {}
        return [Question(
            question_id=question_id,
            prompt=text,
            query=image_query(text, drop_ocr_tokens),
            load_images=lambda: [load_image(image_path, question=question_id)],
            metadata=recorded,
            instruction=vqa_instruction(shown_text(text, drop_ocr_tokens)),
        )]

    return build_questions(numbered_lines(path), make, path, skip_bad)


def build_loader_parser(description: str, max_new_tokens: int):
    parser = build_parser(description, max_new_tokens=max_new_tokens)
    parser.add_argument("--drop-ocr-tokens", action="store_true",
                        help="TextVQA: hide the 'Reference OCR token:' line from the model (GlobalCom2's released loader)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_loader_parser(__doc__.split("\n")[0], max_new_tokens=128).parse_args(argv)
    return run(args, lambda: questions_from_jsonl(args.question_file, args.image_folder, args.drop_ocr_tokens,
                                                  args.skip_bad_questions),
               prompt_settings=dict(drop_ocr_tokens=args.drop_ocr_tokens))


if __name__ == "__main__":
    sys.exit(main())
