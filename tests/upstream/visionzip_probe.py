"""Run only by the upstream interpreter (`.venv-upstream`: llava-torch 1.2.2, transformers 4.37.2) with the
official VisionZip package (`dvlab-research/VisionZip`, its `visionzip/` folder) on PYTHONPATH, never by this
repository's Python: `tests/upstream/test_visionzip_official.py` starts it.

    cd <checkpoint> && PYTHONPATH=<folder holding visionzip/> <upstream python> visionzip_probe.py request.json

From inside the checkpoint directory (its tower path is relative) this opens the checkpoint with stock
LLaVA's `load_pretrained_model` (fp16; an fp32 run upcasts those weights, `tools/released_probe.py`'s
`load_model`), applies VisionZip as its README does, `visionzip(model, dominant=..., contextual=...)`, once
per case with the case's setting, and runs the patched `prepare_inputs_labels_for_multimodal` on stock
LLaVA's prompt, ids and pixels.

One setting is adapted, no code: `apply_info` writes CLIP-L's layer schedule (`r = [0] * 22 + [1] + [0]` for
24 layers: the merge metric kept by layer 22, `layers[-2]`, which the patched tower reads with
`attentions[-2]` and `hidden_states[-2]`). The tiny tower has fewer layers, on which that list never marks
`layers[-2]` and the tower fails for want of a metric; the probe sets the same rule for the tower's depth,
`[0] * (L - 2) + [1] + [0]`, after checking that the official list is that rule for L = 24.

Read-only additions: forward hooks keep every projector call's input and output and the output of the
tower's `layers[-2]` (`hidden_states[-2]`, [CLS] row included), so that each row of the image span can be
named by the tower row it came from.

request.json: `{"dtype": "float16"|"float32", "conv_mode": str, "user_turn": str, "cases": [[image path,
dominant, contextual], ...], "out": path}`. Writes `out` (torch.save): `versions`, `image_newline` `[D]` and
per case `{input_ids [L], embeds [L', D], projector_inputs [n, C], projector_outputs [n, D], tower_rows
[V, 1 + P, C]}`.
"""

import json
import os
import sys

import llava
import torch
import transformers
import visionzip as visionzip_package
from llava.mm_utils import process_images, tokenizer_image_token
from PIL import Image
from visionzip import visionzip

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools"))
from released_probe import chat_prompt, load_model  # noqa: E402

OFFICIAL_LAYERS = 24  # CLIP-L, the only depth the official schedule is written for


def metric_schedule(num_layers: int) -> list[int]:
    """The official `r` rule, a 1 at `layers[-2]` only, for a tower of `num_layers` layers."""
    return [0] * (num_layers - 2) + [1, 0]


def apply_visionzip(model, dominant: int, contextual: int) -> None:
    """`visionzip(model, dominant, contextual)` as the README calls it, then the schedule for the tower's depth."""
    visionzip(model, dominant=dominant, contextual=contextual)
    tower = model.get_model().vision_tower.vision_tower
    assert tower.r == metric_schedule(OFFICIAL_LAYERS), f"the official schedule changed: {tower.r}"
    tower.r = metric_schedule(len(tower.vision_model.encoder.layers))


def main(request_file: str) -> None:
    with open(request_file) as handle:
        request = json.load(handle)
    dtype = getattr(torch, request["dtype"])
    tokenizer, model, image_processor = load_model(dtype)
    projector_calls, tower_rows = [], []
    model.get_model().mm_projector.register_forward_hook(
        lambda module, args, output: projector_calls.append((args[0], output)))
    tower_layers = model.get_model().vision_tower.vision_tower.vision_model.encoder.layers
    tower_layers[-2].register_forward_hook(lambda module, args, output: tower_rows.append(output[0]))
    input_ids = torch.tensor([tokenizer_image_token(chat_prompt(request["conv_mode"], request["user_turn"]),
                                                    tokenizer)])
    results = []
    for image_file, dominant, contextual in request["cases"]:
        apply_visionzip(model, dominant, contextual)
        image = Image.open(image_file).convert("RGB")
        pixel_values = process_images([image], image_processor, model.config).to(dtype)
        projector_calls.clear()
        tower_rows.clear()
        with torch.no_grad():
            _, _, _, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(
                input_ids, None, None, None, None, pixel_values, image_sizes=[image.size])
        assert len(tower_rows) == 1, f"the tower ran {len(tower_rows)} times"
        results.append({"input_ids": input_ids[0], "embeds": embeds[0],
                        "projector_inputs": torch.cat([inputs.flatten(0, -2) for inputs, _ in projector_calls]),
                        "projector_outputs": torch.cat([outputs.flatten(0, -2) for _, outputs in projector_calls]),
                        "tower_rows": tower_rows[0]})
    torch.save({
        "versions": {"transformers": transformers.__version__, "llava": llava.__file__,
                     "visionzip": visionzip_package.__file__},
        "image_newline": model.get_model().image_newline.detach(),
        "results": results,
    }, request["out"])


if __name__ == "__main__":
    main(sys.argv[1])
