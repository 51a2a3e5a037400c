"""Runner for the free-form benchmarks (LLaVA-Bench in the wild, MM-Vet).

    python -m llava.eval.model_vqa --model-path ./liuhaotian/llava-next-7b \
        --question-file ./playground/data/eval/mm-vet/llava-mm-vet.jsonl \
        --image-folder ./playground/data/eval/mm-vet/images \
        --answers-file ./playground/data/eval/mm-vet/answers/llava-next-7b.jsonl \
        --temperature 0 --conv-mode vicuna_v1

Same question format as `model_vqa_loader`; answers may be long (up to 1024 new tokens).
"""

from __future__ import annotations

import sys

from llava.eval.model_vqa_loader import questions_from_jsonl
from llava.eval.runner import build_parser, run


def main(argv: list[str] | None = None) -> int:
    args = build_parser(__doc__.split("\n")[0], max_new_tokens=1024).parse_args(argv)
    return run(args, lambda: questions_from_jsonl(args.question_file, args.image_folder, skip_bad=args.skip_bad_questions))


if __name__ == "__main__":
    sys.exit(main())
