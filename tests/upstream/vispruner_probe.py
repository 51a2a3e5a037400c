"""Run only by the upstream LLaVA interpreter (`.venv-upstream`: transformers 4.37.2) with the official VisPruner
code (`Theia-4869/VisPruner`, its `llava/` exported) first on PYTHONPATH; never by pytest or this repository's
Python. `tests/upstream/test_vispruner_official.py` starts it.

    cd <checkpoint> && PYTHONPATH=<official copy> <upstream python> vispruner_probe.py request.json

From inside the checkpoint directory (its tower path is relative; the loader resolves it against the working
directory) each run opens the checkpoint with the official `load_pretrained_model`, its budget passed as the
official eval scripts pass it (`visual_token_num` T per view, `important_ratio`), and runs the official
`prepare_inputs_labels_for_multimodal` on the official prompt, ids and pixels (its `process_images`, whose
`select_best_resolution` always answers 672x672). Nothing of the official code is patched: the loader puts
model and tower on the CPU, and its model code never calls `.cuda()`. The additions are read-only: a forward
hook on `mm_projector` keeps the projected views (to name the kept positions), and the language model's
last-position logits are computed from the returned embeddings. `cdpruner_probe.py` and `fastervlm_probe.py`
run the CDPruner and FasterVLM forks through the same functions.

request.json: `{"conv_mode": str, "user_turn": str, "out": path, "runs": [{"budget": {loader keyword: value},
"dtype": "float16"|"float32", "images": [path, ...], "texts": [str, ...] (optional: each image's `texts`
argument)}, ...]}`, the budget here `{"visual_token_num": T, "important_ratio": rho}`. Writes `out`
(torch.save): `versions`, and per run `image_newline` `[D]` and per image either `{input_ids [L], embeds [L', D],
features [V, P, D], visual_tokens (the count the fork returns), last_logits [vocab]}` or `{error: str}` when the
official code raises an IndexError (VisPruner's duplicate-removal gather on an odd residual, spec quirk Q1).
"""

import json
import os
import sys

import llava
import torch
import transformers
from llava.mm_utils import process_images, tokenizer_image_token
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools"))
from released_probe import chat_prompt, load_model  # noqa: E402  (the same loading, with the fork's budget)


def run_images(run: dict, conv_mode: str, user_turn: str, device_map: str) -> dict:
    dtype = getattr(torch, run["dtype"])
    tokenizer, model, image_processor = load_model(dtype, device_map, **run["budget"])
    projected = []
    model.get_model().mm_projector.register_forward_hook(lambda module, args, output: projected.append(output))
    input_ids = torch.tensor([tokenizer_image_token(chat_prompt(conv_mode, user_turn), tokenizer)])
    results = []
    texts = run.get("texts") or [None] * len(run["images"])
    for image_file, text in zip(run["images"], texts):
        image = Image.open(image_file).convert("RGB")
        text_input = {} if text is None else {"texts": text}
        pixel_values = process_images([image], image_processor, model.config).to(dtype)
        projected.clear()
        with torch.no_grad():
            try:
                # the forks return extra values after upstream's six: the seventh is the first image's visual
                # token count (VisPruner's and CDPruner's last; FasterVLM adds its attentions, spec F5)
                prepared = model.prepare_inputs_labels_for_multimodal(input_ids, None, None, None, None, pixel_values,
                                                                      image_sizes=[image.size], **text_input)
                position_ids, attention_mask, embeds, visual_tokens = (prepared[1], prepared[2], prepared[4],
                                                                       prepared[6])
            except IndexError as error:  # VisPruner's Q1: the gather of the surviving A tokens on an odd residual
                results.append({"error": f"{type(error).__name__}: {error}"})
                continue
            logits = model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids).logits
        results.append({"input_ids": input_ids[0], "embeds": embeds[0], "features": projected[0],
                        "visual_tokens": visual_tokens, "last_logits": logits[0, -1]})
    return {"image_newline": model.get_model().image_newline.detach(), "results": results}


def main(request_file: str, device_map: str = "cpu") -> None:
    with open(request_file) as handle:
        request = json.load(handle)
    runs = [run_images(run, request["conv_mode"], request["user_turn"], device_map) for run in request["runs"]]
    # where `llava` came from: its directory (FasterVLM's fork has no `llava/__init__.py`)
    torch.save({"versions": {"transformers": transformers.__version__, "llava": list(llava.__path__)[0]},
                "runs": runs}, request["out"])


if __name__ == "__main__":
    main(sys.argv[1])
