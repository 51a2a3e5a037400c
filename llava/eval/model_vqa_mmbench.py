"""Runner for MMBench and MMBench-CN (a TSV with base64 images and options A-D).

    python -m llava.eval.model_vqa_mmbench --model-path ./liuhaotian/llava-next-7b \
        --question-file ./playground/data/eval/mmbench/mmbench_dev_20230712.tsv \
        --answers-file ./playground/data/eval/mmbench/answers/mmbench_dev_20230712/llava-next-7b.jsonl \
        --single-pred-prompt --temperature 0 --conv-mode vicuna_v1 [--lang cn]

As upstream: the TSV is read with pandas (its missing-value rules decide which cells are empty);
options are taken from A, B, C, D in order up to the first empty one; the question is the hint
(if any), the question and one `X. option` line per option. `--all-rounds` asks once per
rotation of the options (letters stay A, B, ... in order), each answer with its `round_id`.
"""

from __future__ import annotations

import base64
import io
import math
import os
import sys

import pandas as pd
from PIL import Image

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.eval.instructions import mmbench_instruction
from llava.eval.runner import Question, build_parser, build_questions, run
from llava.mm_utils import ImageLoadError

OPTION_LETTERS = ["A", "B", "C", "D"]
LETTER_PROMPTS = {"en": "Answer with the option's letter from the given choices directly.", "cn": "请直接回答选项字母。"}


def is_none(value) -> bool:
    """Upstream's test for an empty cell: None, NaN, or the text 'nan'/'none' in any case."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.lower() in ("nan", "none")


def row_options(row) -> list[str]:
    options = []
    for letter in OPTION_LETTERS:
        if is_none(row[letter]):
            break
        options.append(row[letter])
    return options


def decode_image(encoded: str, question_id) -> Image.Image:
    """The row's base64 image, in its own mode (upstream does not convert it to RGB)."""
    try:
        image = Image.open(io.BytesIO(base64.b64decode(encoded)))
        image.load()
        return image
    except Image.DecompressionBombError as error:
        raise ImageLoadError(f"the image of question {question_id} is too large: {error} "
                             "(raise the limit with --max-image-pixels)") from None
    except Exception as error:  # a decoder can fail in any way on damaged data
        raise ImageLoadError(f"cannot decode the base64 image of question {question_id}: "
                             f"{type(error).__name__}: {error}") from None


def mmbench_questions(row, all_rounds: bool, single_pred_prompt: bool, lang: str) -> list[Question]:
    """One question per round: a single round, or one per rotation of the options."""
    options = row_options(row)
    question_id = row["index"].item() if hasattr(row["index"], "item") else row["index"]  # numpy -> JSON-ready
    questions = []
    for round_id in range(len(options) if all_rounds else 1):
        rotated = options[round_id:] + options[:round_id]
        letters = OPTION_LETTERS[:len(options)]
        text = row["question"] if is_none(row["hint"]) else row["hint"] + "\n" + row["question"]
        for letter, option in zip(letters, rotated):
            text += "\n" + letter + ". " + str(option)  # a numeric column would make upstream crash
        query = DEFAULT_IMAGE_TOKEN + "\n" + text
        if single_pred_prompt:
            query += "\n" + LETTER_PROMPTS[lang]
        questions.append(Question(
            question_id=question_id, prompt=text, query=query,
            load_images=lambda encoded=row["image"]: [decode_image(encoded, question_id)],
            extra=dict(round_id=round_id, options=rotated, option_char=letters[round_id:] + letters[:round_id]),
            instruction=mmbench_instruction(text),
        ))
    return questions


def mmbench_table_questions(question_file: str, all_rounds: bool, single_pred_prompt: bool, lang: str,
                            skip_bad: bool = False) -> list[Question]:
    path = os.path.expanduser(question_file)
    table = pd.read_table(path)
    # Row numbers as in the file: line 1 is the header.
    entries = ((f"line {number}", row) for number, (_, row) in enumerate(table.iterrows(), 2))
    return build_questions(entries, lambda row: mmbench_questions(row, all_rounds, single_pred_prompt, lang), path,
                           skip_bad)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__.split("\n")[0], max_new_tokens=1024, image_folder=False)
    parser.add_argument("--single-pred-prompt", action="store_true")
    parser.add_argument("--all-rounds", action="store_true")
    parser.add_argument("--lang", default="en", choices=sorted(LETTER_PROMPTS))
    args = parser.parse_args(argv)
    return run(args, lambda: mmbench_table_questions(args.question_file, args.all_rounds, args.single_pred_prompt,
                                                     args.lang, args.skip_bad_questions),
               prompt_settings=dict(single_pred_prompt=args.single_pred_prompt, lang=args.lang))


if __name__ == "__main__":
    sys.exit(main())
