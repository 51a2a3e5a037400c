"""Answer one query about one or more images (upstream LLaVA's `run_llava`, plus a summary line).

    python -m llava.eval.run_llava --model-path checkpoints/llava-next-tiny \
        --image-file images/shapes-800x500.png --query "What is shown?"
"""

from __future__ import annotations

import argparse
import os
import sys

from llava.conversation import conv_templates, first_turn_prompt
from llava.eval.instructions import query_instruction
from llava.generation import (add_compression_arguments, add_input_arguments, answer, compression_arguments,
                              configure_model, image_prompt, infer_conv_mode)
from llava.mm_utils import load_image, set_max_image_pixels
from llava.model.builder import load_pretrained_model
from llava.utils import quiet_transformers, user_errors
from llava.visualize import inspect_compression, open_selection_file, save_visualizations, selection_lines, write_lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Ask a LLaVA checkpoint about one or more images.")
    parser.add_argument("--model-path", required=True, help="checkpoint directory (original LLaVA layout)")
    parser.add_argument("--model-base", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--image-file", required=True, nargs="+", help="image path(s); also split on --sep")
    parser.add_argument("--sep", default=",", help="separator inside --image-file (default: %(default)r)")
    parser.add_argument("--query", required=True)
    parser.add_argument("--conv-mode", default=None, choices=sorted(conv_templates), metavar="TEMPLATE",
                        help="chat template (default: inferred from the checkpoint)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=None)
    parser.add_argument("--num_beams", "--num-beams", dest="num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=512)
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: float16 on GPU, float32 on CPU")
    add_compression_arguments(parser)
    add_input_arguments(parser)
    parser.add_argument("--visualize", metavar="OUT_DIR", default=None,
                        help="also draw what the method kept of each image into OUT_DIR (masks; for GlobalCom2 also "
                             "heatmaps, ratios and a summary)")
    parser.add_argument("--save-selection", metavar="FILE", default=None,
                        help="append one JSON line per image to FILE: the settings, the kept patches in the order "
                             "the language model receives them, and the token counts (see llava.visualize; "
                             "tools/mask_visualization.py --selection-file draws them)")
    return parser


def eval_model(args) -> str:
    """Load, ask, print the answer and the summary line; return the answer text."""
    image_files = [part for item in args.image_file for part in item.split(args.sep) if part]
    compression_arguments(args)  # a bad method argument stops here, before any loading
    set_max_image_pixels(args.max_image_pixels)
    images = [load_image(path) for path in image_files]
    tokenizer, model, image_processor, _ = load_pretrained_model(
        args.model_path, args.model_base, device=args.device, torch_dtype=args.dtype
    )
    configure_model(model, args)
    prompt = first_turn_prompt(args.conv_mode or infer_conv_mode(args.model_path, model.config),
                               image_prompt(args.query, len(images)))
    result = answer(model, tokenizer, image_processor, prompt, images, temperature=args.temperature,
                    top_p=args.top_p, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                    instructions=[query_instruction(args.query)] * len(images))
    print(result.text)
    for line in result.compression_lines():
        print(line)
    print(result.summary())
    if args.save_selection:
        with open_selection_file(args.save_selection) as out:
            lines = selection_lines(model, result.accounting)
            write_lines(out, [dict(image=path, **line) for path, line in zip(image_files, lines)])
    if args.visualize:
        for number, (path, image) in enumerate(zip(image_files, images), 1):
            view = inspect_compression(model, image_processor, image, instruction=query_instruction(args.query))
            stem = f"{number}_{os.path.splitext(os.path.basename(path))[0]}"
            print(*(f"[visualize] {written}" for written in save_visualizations(view, args.visualize, stem)), sep="\n")
    return result.text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_transformers()
    with user_errors():
        eval_model(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
