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

import os
import sys

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.eval.jsonl import read_jsonl
from llava.eval.runner import Question, build_parser, run
from llava.mm_utils import load_image

OCR_LINE_PREFIX = "Reference OCR token:"


def image_query(text: str, drop_ocr_tokens: bool = False) -> str:
    """The user turn for a question `text`: the image first, then the text."""
    if drop_ocr_tokens:
        text = "\n".join(line for line in text.split("\n") if not line.startswith(OCR_LINE_PREFIX))
    return DEFAULT_IMAGE_TOKEN + "\n" + text


def questions_from_jsonl(question_file: str, image_folder: str, drop_ocr_tokens: bool = False) -> list[Question]:
    questions = []
    for line in read_jsonl(os.path.expanduser(question_file)):
        path = os.path.join(image_folder, line["image"])
        recorded = {"ocr_tokens_shown": not drop_ocr_tokens} if OCR_LINE_PREFIX in line["text"] else {}
        questions.append(Question(
            question_id=line["question_id"],
            prompt=line["text"],
            query=image_query(line["text"], drop_ocr_tokens),
            load_images=lambda path=path, qid=line["question_id"]: [load_image(path, question=qid)],
            metadata=recorded,
        ))
    return questions


def build_loader_parser(description: str, max_new_tokens: int):
    parser = build_parser(description, max_new_tokens=max_new_tokens)
    parser.add_argument("--drop-ocr-tokens", action="store_true",
                        help="TextVQA: hide the 'Reference OCR token:' line from the model (GlobalCom2's released loader)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_loader_parser(__doc__.split("\n")[0], max_new_tokens=128).parse_args(argv)
    return run(args, questions_from_jsonl(args.question_file, args.image_folder, args.drop_ocr_tokens))


if __name__ == "__main__":
    sys.exit(main())
