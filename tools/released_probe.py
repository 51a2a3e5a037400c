"""Run only by the upstream interpreter (transformers 4.37.2, `.venv-upstream`) with the released GlobalCom2
code first on PYTHONPATH, never by this repository's Python: `tools/compare_released.py` starts it.

    cd <checkpoint> && PYTHONPATH=<released copy> <upstream python> tools/released_probe.py request.json

From inside the checkpoint directory (its tower path is relative; the released loader resolves it against
the working directory) this opens the checkpoint with the released code's own `load_pretrained_model`
and runs, for each case of the request, the released `prepare_inputs_labels_for_multimodal` on the
released prompt, ids and pixels. The released code is run as shipped: its retention ratio is its
module constant (the copy on PYTHONPATH has line 101 set, as its README says to do), and nothing in it
is patched. Device placement needs no patch either: the released model code never calls `.cuda()`,
and `load_pretrained_model(device="cpu")` puts the model and the tower on the CPU. The only additions
are read-only: a forward hook on `mm_projector` keeps the projected views (to name the kept positions),
and the language model's last-position logits are computed from the returned embeddings.

request.json: `{"retention_ratio": r, "dtype": "float16"|"float32", "conv_mode": str, "user_turn": str,
"images": [path, ...], "out": path}`. Writes `out` (torch.save): `versions`, `image_newline` `[D]` and
per image `{input_ids [L], embeds [L', D], features [V, P, D], last_logits [vocab]}`.
"""

import json
import sys

import llava
import torch
import transformers
from llava.conversation import conv_templates
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model import llava_arch
from llava.model.builder import load_pretrained_model
from PIL import Image


def chat_prompt(conv_mode: str, user_turn: str) -> str:
    conv = conv_templates[conv_mode].copy()
    conv.append_message(conv.roles[0], user_turn)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def load_model(dtype: torch.dtype, device_map: str = "cpu", **budget):
    """The released loader always loads in fp16; an fp32 run upcasts those weights, and rebuilds Llama's
    rotary tables in fp32 (4.37 builds them in the load dtype), as loading in fp32 would have. `budget`: a
    fork's loader keywords, as its eval scripts pass them (the model keeps each under its own name)."""
    tokenizer, model, image_processor, _ = load_pretrained_model(".", None, "llava-next-tiny", device_map=device_map,
                                                                 device="cpu", **budget)
    assert {name: getattr(model, name) for name in budget} == budget
    if dtype != torch.float16:
        model = model.to(dtype)
        for layer in model.model.layers:
            rotary = layer.self_attn.rotary_emb
            rotary._set_cos_sin_cache(rotary.max_seq_len_cached, rotary.inv_freq.device, dtype)
    on_meta = [name for name, parameter in model.named_parameters() if parameter.device.type != "cpu"]
    assert not on_meta, f"parameters left off the CPU: {on_meta[:3]}"
    return tokenizer, model, image_processor


def main(request_file: str) -> None:
    with open(request_file) as handle:
        request = json.load(handle)
    # The ratio is bound at import as a default argument (behaviour spec Q5): check the copy says it.
    ratio = request["retention_ratio"]
    assert llava_arch.retention_ratio == ratio, (llava_arch.retention_ratio, ratio)
    assert llava_arch.generate_scale_for_crop_features.__defaults__[0] == ratio

    dtype = getattr(torch, request["dtype"])
    tokenizer, model, image_processor = load_model(dtype)
    projected = []
    model.get_model().mm_projector.register_forward_hook(lambda module, args, output: projected.append(output))
    input_ids = torch.tensor([tokenizer_image_token(chat_prompt(request["conv_mode"], request["user_turn"]),
                                                    tokenizer)])
    results = []
    for image_file in request["images"]:
        image = Image.open(image_file).convert("RGB")
        pixel_values = process_images([image], image_processor, model.config).to(dtype)
        projected.clear()
        with torch.no_grad():
            _, position_ids, attention_mask, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(
                input_ids, None, None, None, None, pixel_values, image_sizes=[image.size])
            logits = model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids).logits
        results.append({"input_ids": input_ids[0], "embeds": embeds[0], "features": projected[0],
                         "last_logits": logits[0, -1]})
    torch.save({
        "versions": {"transformers": transformers.__version__, "llava": llava.__file__,
                     "retention_ratio": llava_arch.retention_ratio},
        "image_newline": model.get_model().image_newline.detach(),
        "results": results,
    }, request["out"])


if __name__ == "__main__":
    main(sys.argv[1])
