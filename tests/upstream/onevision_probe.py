"""Run by the official LLaVA-NeXT (LLaVA-VL, `llava` 1.7.0.dev0) interpreter, never by pytest itself:

    cd <a directory without the tower> && PYTHONPATH=<parent of the exported official llava/> \
        <python> onevision_probe.py request.json

That interpreter has transformers 4.40.2 (see test_onevision_official.py for the exact environment).
It opens `request["checkpoint"]` with the official `load_pretrained_model(path, None, "llava_qwen")`,
unchanged, and writes to `request["out"]` (torch.save):
- `prompts`: for each user turn, the official `qwen_1_5` prompt and its ids through the official
  `tokenizer_image_token` with the tokenizer the loader returns;
- `images`: for each image file, the official `process_images` pixel values `[1 + crops, 3, 384, 384]`,
  the number of visual tokens `prepare_inputs_labels_for_multimodal` splices in for it, and the
  vanilla model's logits `[T, vocab]` for `request["question"]` asked about it.
The official loader loads in fp16 (its only CPU-usable dtype); the logits are computed in fp32 from those
fp16 weights, with Qwen2's rotary tables rebuilt in fp32 (4.40 builds them in the default dtype at load
time, fp16 here). `device_map="auto"` is what keeps the loader from moving the tower to CUDA
(`vision_tower.to(device="cuda")` for any other device map); with no GPU, "auto" places everything on CPU.
The working directory must not hold the tower's directory: the official `build_vision_tower` sends
any `mm_vision_tower` that exists as a path to the CLIP tower, so a SigLIP tower is found as a hub id.
"""

import json
import sys

import llava
import tokenizers
import torch
import transformers
from llava.conversation import conv_templates
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from PIL import Image


def qwen_prompt(user_turn: str) -> str:
    conv = conv_templates["qwen_1_5"].copy()
    conv.append_message(conv.roles[0], user_turn)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def main(request_file: str) -> None:
    with open(request_file) as handle:
        request = json.load(handle)
    tokenizer, model, image_processor, _ = load_pretrained_model(request["checkpoint"], None, "llava_qwen",
                                                                 device_map="auto", attn_implementation="eager")
    model = model.float()
    for layer in model.model.layers:
        rotary = layer.self_attn.rotary_emb
        rotary._set_cos_sin_cache(rotary.max_seq_len_cached, rotary.inv_freq.device, torch.float32)

    prompts = []
    for user_turn in request["prompts"]:
        prompt = qwen_prompt(user_turn)
        prompts.append({"prompt": prompt, "ids": tokenizer_image_token(prompt, tokenizer)})

    input_ids = torch.tensor([tokenizer_image_token(qwen_prompt(request["question"]), tokenizer)])
    images = []
    for image_file in request["images"]:
        image = Image.open(image_file).convert("RGB")
        pixel_values = process_images([image], image_processor, model.config)
        with torch.no_grad():
            embeds = model.prepare_inputs_labels_for_multimodal(input_ids, None, None, None, None, pixel_values,
                                                                 image_sizes=[image.size])[4]
            logits = model(input_ids, images=pixel_values, image_sizes=[image.size]).logits[0]
        images.append({
            "pixel_values": pixel_values[0],
            # the prompt's one image placeholder is replaced by the image's tokens
            "visual_tokens": embeds.shape[1] - (input_ids.shape[1] - 1),
            "logits": logits,
        })
    torch.save({
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "llava": llava.__file__, "tokenizer": type(tokenizer).__name__,
                     "tower": type(model.get_vision_tower()).__name__,
                     "tower_layers": len(model.get_vision_tower().vision_tower.vision_model.encoder.layers)},
        "prompts": prompts,
        "images": images,
    }, request["out"])


if __name__ == "__main__":
    main(sys.argv[1])
