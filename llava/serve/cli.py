"""Interactive chat about an image in the terminal (upstream LLaVA's `llava.serve.cli`).

    python -m llava.serve.cli --model-path checkpoints/llava-next-tiny --image-file images/shapes-800x500.png

Each turn prints the reply and a summary line; an empty line or end of input quits.
"""

from __future__ import annotations

import argparse
import sys

from llava.conversation import conv_templates, get_conv_template
from llava.eval.instructions import query_instruction
from llava.generation import (add_compression_arguments, add_input_arguments, answer, compression_arguments,
                              configure_model, image_prompt, infer_conv_mode)
from llava.mm_utils import load_image, set_max_image_pixels
from llava.model.builder import load_pretrained_model
from llava.utils import quiet_transformers, user_errors


def chat(args, read=input) -> None:
    compression_arguments(args)  # a bad method argument stops here, before any loading
    set_max_image_pixels(args.max_image_pixels)
    images = [load_image(path) for path in args.image_file]
    tokenizer, model, image_processor, _ = load_pretrained_model(args.model_path, device=args.device, torch_dtype=args.dtype)
    configure_model(model, args)
    conv = get_conv_template(args.conv_mode or infer_conv_mode(args.model_path, model.config))
    user, assistant = conv.roles
    first_turn = True
    while True:
        try:
            message = read(f"{user.strip()}: ")
        except EOFError:
            message = ""
        if not message.strip():
            print("exit...")
            return
        conv.append_message(user, image_prompt(message, len(images)) if first_turn else message)
        conv.append_message(assistant, None)
        result = answer(model, tokenizer, image_processor, conv.get_prompt(), images,
                        temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                        instructions=[query_instruction(message)] * len(images))
        conv.messages[-1][-1] = result.text
        print(f"{assistant.strip()}: {result.text}")
        for line in result.compression_lines():
            print(line)
        print(result.summary())
        first_turn = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Chat with a LLaVA checkpoint about an image.")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--image-file", required=True, nargs="+")
    parser.add_argument("--conv-mode", default=None, choices=sorted(conv_templates), metavar="TEMPLATE",
                        help="chat template (default: inferred from the checkpoint)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    add_compression_arguments(parser)
    add_input_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_transformers()
    with user_errors():
        chat(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
