"""Run by upstream LLaVA's interpreter (llava-torch 1.2.2, transformers 4.37.2), never by pytest itself.

    cd <checkpoint> && <upstream python> upstream_probe.py request.json

From inside the checkpoint directory (its tower path is relative, and upstream resolves it against
the working directory) this opens the checkpoint with upstream's own `load_pretrained_model`,
unchanged, and writes to `request["out"]` (torch.save):
- `prompts`: for each `[conv_mode, user_turn]`, upstream's prompt and its ids through upstream's
  `tokenizer_image_token` with the slow tokenizer it loads (`tokenizer.model`) and with 4.37's fast
  one (`tokenizer.json`), and each chunk's ids from `tokenizers` reading `tokenizer.json` directly;
- `logits`: for each `[image_file, conv_mode, user_turn]`, the vanilla model's logits `[T, vocab]`.
Upstream loads in fp16; the logits are computed in fp32 from those fp16 weights, with the rotary
tables rebuilt in fp32 (4.37 builds them in the default dtype at load time, fp16 here).
"""

import json
import os
import sys

import llava
import tokenizers
import torch
import transformers
from llava.mm_utils import process_images, tokenizer_image_token
from PIL import Image
from transformers import AutoTokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools"))
from released_probe import chat_prompt, load_model  # noqa: E402  (upstream's loader, fp32 from its fp16 weights)


def main(request_file: str) -> None:
    with open(request_file) as handle:
        request = json.load(handle)
    tokenizer, model, image_processor = load_model(torch.float32)
    fast = AutoTokenizer.from_pretrained(".", use_fast=True)
    raw = tokenizers.Tokenizer.from_file("tokenizer.json")

    prompts = []
    for conv_mode, user_turn in request["prompts"]:
        prompt = chat_prompt(conv_mode, user_turn)
        prompts.append({
            "prompt": prompt,
            "slow": tokenizer_image_token(prompt, tokenizer),
            "fast": tokenizer_image_token(prompt, fast),
            "chunks": [raw.encode(chunk, add_special_tokens=False).ids for chunk in prompt.split("<image>")],
        })
    logits = []
    for image_file, conv_mode, user_turn in request["logits"]:
        image = Image.open(image_file).convert("RGB")
        input_ids = torch.tensor([tokenizer_image_token(chat_prompt(conv_mode, user_turn), tokenizer)])
        pixel_values = process_images([image], image_processor, model.config)
        with torch.no_grad():
            logits.append(model(input_ids, images=pixel_values, image_sizes=[image.size]).logits[0])
    torch.save({
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "llava": llava.__file__, "slow_tokenizer": type(tokenizer).__name__},
        "prompts": prompts,
        "logits": logits,
    }, request["out"])


if __name__ == "__main__":
    main(sys.argv[1])
