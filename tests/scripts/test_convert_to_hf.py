"""`scripts/convert_to_hf.py`: the converted tiny checkpoint is the same model in transformers.

What is proven, on the tiny checkpoint (CPU, fp32): for images of several sizes and aspect
ratios, transformers' `LlavaNextForConditionalGeneration` loaded from the converted directory
builds as many visual tokens as our upstream-layout model (2046 for 800x500) and gives the
same logits at every position (max abs difference <= 1e-4) over the original vocabulary.
Both models get the same pixel values; only the prompt differs (one -200 placeholder for ours,
N copies of the added `<image>` token for transformers) and the image size's order (PIL
(width, height) for ours, (height, width) for transformers).

Known difference (not a conversion bug): transformers' `unpad_image` computes the unpadded side
as `int(round(x, 7))` where upstream LLaVA (and we) use `int(x)`. When `x` lands a hair below
an integer in floating point, e.g. 88x55 (x = 14.999999999999998) or 352x748
(x = 50.99999999999999), transformers keeps one more row/column (or one fewer padding line on
each side) than upstream, so the token counts differ. The equivalence test uses sizes where
both agree; `test_known_unpad_rounding_difference` records the disagreement.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaNextForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape as hf_grid_shape
from transformers.models.llava_next.modeling_llava_next import unpad_image as hf_unpad_image

from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import first_turn_prompt
from llava.mm_utils import anyres_visual_token_count, process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.tiny import V16_PINPOINTS, build_tiny_checkpoint

# These compare against vanilla LLaVA-NeXT (transformers' model, upstream token counts).
pytestmark = pytest.mark.usefixtures("vanilla")

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "convert_to_hf.py"
_spec = importlib.util.spec_from_file_location("convert_to_hf", SCRIPT)
convert_to_hf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_to_hf)

# PIL (width, height). 800x500: 2x2 grid, 30 unpadded rows of 48 columns + 30 newlines + 576.
# 20x2000: 1x3 grid whose unpadded area is empty (0 columns), leaving 72 newlines + 576.
# 336x336 and 1x1 tie between the 1x2 and 2x1 grids: the earliest pinpoint wins, so these two
# fail (logits differ) if the pinpoints are not swapped pair by pair in their original order.
SIZES = [(800, 500), (500, 900), (1000, 300), (336, 336), (20, 2000), (1, 1)]
# Sizes where transformers' unpad rounding keeps more tokens than upstream's truncation.
ROUNDING_DIFFERENCES = {(88, 55): (926, 976), (352, 748): (1826, 1876), (748, 352): (1800, 1848)}


def hf_visual_token_count(image_size: tuple[int, int], hf_pinpoints, crop: int = 336, side: int = 24) -> int:
    """transformers' visual token count for a PIL (width, height) image, from its own helpers."""
    width, height = image_size
    grid_h, grid_w = hf_grid_shape([height, width], hf_pinpoints, crop)
    canvas = hf_unpad_image(torch.empty(1, grid_h * side, grid_w * side), [height, width])
    return side * side + canvas.shape[1] * (canvas.shape[2] + 1)


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    """(tokenizer, our model, image processor, transformers model, output dir), fp32 on CPU."""
    out = str(tmp_path_factory.mktemp("hf") / "llava-next-tiny-hf")
    assert convert_to_hf.convert(tiny_checkpoint, out) == out
    tokenizer, ours, image_processor, _ = load_pretrained_model(tiny_checkpoint, device="cpu", torch_dtype=torch.float32)
    hf = LlavaNextForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    return tokenizer, ours, image_processor, hf, out


@pytest.fixture(scope="module")
def hf_processor(converted):
    return AutoProcessor.from_pretrained(converted[-1])


def random_image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    width, height = size
    pixels = np.random.RandomState(seed).randint(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def prompt_ids(tokenizer) -> torch.Tensor:
    return tokenizer_image_token(first_turn_prompt("vicuna_v1", "<image>\nWhat is in the picture?"), tokenizer,
                                 return_tensors="pt")


def test_config_tokenizer_and_processor(converted):
    tokenizer, ours, _, hf, out = converted
    vocab = ours.get_input_embeddings().weight.shape[0]
    config = hf.config
    assert config.image_token_id == vocab == 1024  # `<image>` appended after the 1024 source tokens
    assert config.text_config.vocab_size == vocab + 1
    assert hf.get_input_embeddings().weight.shape[0] == hf.lm_head.weight.shape[0] == vocab + 1
    assert config.image_grid_pinpoints == [[h, w] for w, h in V16_PINPOINTS]
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert config.text_config.model_type == "llama"
    with open(os.path.join(out, "config.json")) as handle:
        assert json.load(handle)["image_token_index"] == 1024

    processor = AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == 1024
    assert processor.image_processor.image_grid_pinpoints == config.image_grid_pinpoints
    assert processor.image_processor.crop_size["height"] == 336
    # Text without the image marker tokenises as before.
    assert processor.tokenizer("What is in the picture?").input_ids == tokenizer("What is in the picture?").input_ids


def compare_logits(tokenizer, ours, image_processor, hf, size: tuple[int, int]) -> tuple[int, float]:
    """Run one prompt + image through both models; return (visual tokens, max abs logit difference)."""
    image = random_image(size)
    pixel_values = process_images([image], image_processor, ours.config)  # [1, V, 3, 336, 336]
    ids = prompt_ids(tokenizer)
    assert int((ids == IMAGE_TOKEN_INDEX).sum()) == 1

    with torch.no_grad():
        our_logits = ours(ids[None], images=pixel_values, image_sizes=[image.size]).logits  # PIL (w, h)
        num_image_tokens = our_logits.shape[1] - (len(ids) - 1)
        position = int((ids == IMAGE_TOKEN_INDEX).nonzero())
        hf_ids = torch.cat([ids[:position], torch.full((num_image_tokens,), hf.config.image_token_id), ids[position + 1:]])
        hf_logits = hf(
            input_ids=hf_ids[None], pixel_values=pixel_values, image_sizes=torch.tensor([[image.height, image.width]])
        ).logits

    assert num_image_tokens == anyres_visual_token_count(image.size, V16_PINPOINTS)
    assert num_image_tokens == hf_visual_token_count(image.size, hf.config.image_grid_pinpoints)
    assert hf_logits.shape == (1, our_logits.shape[1], our_logits.shape[2] + 1)  # + the `<image>` row
    max_diff = (our_logits - hf_logits[..., : our_logits.shape[2]]).abs().max().item()
    print(f"{size[0]}x{size[1]}: {num_image_tokens} visual tokens, max |ours - hf| = {max_diff:.3g}")
    return num_image_tokens, max_diff


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_same_logits_as_ours(converted, size):
    tokenizer, ours, image_processor, hf, _ = converted
    num_image_tokens, max_diff = compare_logits(tokenizer, ours, image_processor, hf, size)
    if size == (800, 500):
        assert num_image_tokens == 576 + 30 * (48 + 1) == 2046
    if size == (20, 2000):
        assert num_image_tokens == 576 + 72 * (0 + 1)
    assert max_diff <= 1e-4


def test_mistral_same_logits_as_ours(tmp_path_factory):
    """The Mistral flavour (grouped KV heads, rope theta 1e6) converts to a `mistral` text config."""
    root = tmp_path_factory.mktemp("mistral")
    source = build_tiny_checkpoint(str(root / "llava-mistral-tiny"), llm="mistral")
    out = convert_to_hf.convert(source, str(root / "hf"))
    tokenizer, ours, image_processor, _ = load_pretrained_model(source, device="cpu", torch_dtype=torch.float32)
    hf = LlavaNextForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.text_config.model_type == "mistral" and hf.config.text_config.num_key_value_heads == 2
    num_image_tokens, max_diff = compare_logits(tokenizer, ours, image_processor, hf, (800, 500))
    assert num_image_tokens == 2046 and max_diff <= 1e-4


@pytest.mark.parametrize("size", sorted(ROUNDING_DIFFERENCES), ids=lambda s: f"{s[0]}x{s[1]}")
def test_known_unpad_rounding_difference(size):
    """transformers' `int(round(x, 7))` vs upstream's `int(x)` in unpadding: documented, not converted away."""
    ours_count, hf_count = ROUNDING_DIFFERENCES[size]
    hf_pinpoints = convert_to_hf.swap_pinpoints(V16_PINPOINTS)
    assert anyres_visual_token_count(size, V16_PINPOINTS) == ours_count
    assert hf_visual_token_count(size, hf_pinpoints) == hf_count


def test_swap_pinpoints_keeps_order():
    assert convert_to_hf.swap_pinpoints("[(336, 672), (672, 336)]") == [[672, 336], [336, 672]]


def test_cli_errors_are_one_line(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert_to_hf.main(["--model-path", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0

    # A LLaVA-1.5-style ('pad') checkpoint has no LLaVA-NeXT equivalent.
    source = tmp_path / "pad"
    shutil.copytree(tiny_checkpoint, source)
    config = json.loads((source / "config.json").read_text())
    config["image_aspect_ratio"] = "pad"
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit):
        convert_to_hf.main(["--model-path", str(source), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert err.startswith("error: cannot convert") and "image_aspect_ratio='anyres'" in err and err.count("\n") == 1


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_saved_processor_matches_ours(converted, hf_processor, size):
    """The saved `LlavaNextProcessor` gives our pixel values and the same number of image tokens."""
    _, ours, image_processor, _, _ = converted
    image = random_image(size)
    pixel_values = process_images([image], image_processor, ours.config)
    inputs = hf_processor(images=image, text="USER: <image>\nWhat is in the picture? ASSISTANT:", return_tensors="pt")
    assert inputs["image_sizes"].tolist() == [[image.height, image.width]]
    assert inputs["pixel_values"].shape == pixel_values.shape
    assert (inputs["pixel_values"] - pixel_values).abs().max().item() <= 1e-5
    num_image_tokens = int((inputs["input_ids"] == hf_processor.image_token_id).sum())
    assert num_image_tokens == anyres_visual_token_count(image.size, V16_PINPOINTS)
