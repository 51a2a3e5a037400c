"""`scripts/convert_to_hf.py` on LLaVA-OneVision: the converted tiny OneVision checkpoint
(`python -m llava.tiny --family onevision`) is the same model in transformers'
`LlavaOnevisionForConditionalGeneration`.

What is proven (CPU, fp32): for images that pick every crop grid 1x1..6x6 (an image of exactly a
grid's pinpoint picks it and fills it, so the 6x6, 4x3, ... canvases are downsampled and the 5x2 one,
7290 tokens, is above 9 x 729 but within 1.21 x 9 x 729 and kept), images that unpad, and extreme
aspect ratios, transformers' model builds as many visual tokens as ours (`onevision_visual_token_count`)
and gives the same logits at every position (max abs difference <= 1e-4) over the original vocabulary.
Both get the same pixel values; only the prompt (one -200 placeholder for ours, N copies of `<image>`
for transformers) and the image size's order ((width, height) for ours, (height, width) there) differ.

Known difference (pinned, not converted away): transformers unpads with `int(round(x, 7))` where
LLaVA-VL truncates; for 369x820, `820 * (27 / 369)` is 59.99999999999999, so the original keeps 59
canvas rows (729 + 59 * 28 = 2381 visual tokens) and transformers 61 (2437).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import first_turn_prompt
from llava.mm_utils import ONEVISION_GRID_PINPOINTS, onevision_visual_token_count, process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model

pytestmark = pytest.mark.usefixtures("vanilla")

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "convert_to_hf.py"
_spec = importlib.util.spec_from_file_location("convert_to_hf", SCRIPT)
convert_to_hf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_to_hf)

QUESTION = "What is in the picture?"
# PIL (width, height). Every grid by its own pinpoint; then 800x500 (3x2 grid, unpadded to 50 rows of 81),
# 1500x1100 (4x3, unpadded to 79 x 108 = 8532 > 1.21 x 6561: downsampled), thin and tiny images.
GRID_SIZES = [(384 * grid_w, 384 * grid_h) for grid_w in range(1, 7) for grid_h in range(1, 7)]
SIZES = GRID_SIZES + [(800, 500), (1500, 1100), (1, 2000), (2000, 1), (2000, 3), (10, 10)]
# Where transformers' rounding keeps more: PIL size -> (ours, transformers') visual tokens.
ROUNDING_DIFFERENCES = {(369, 820): (729 + 59 * 28, 729 + 61 * 28), (820, 369): (729 + 27 * 60, 729 + 27 * 62)}


@pytest.fixture(scope="module")
def converted(tiny_onevision_checkpoint, tmp_path_factory):
    """(tokenizer, our model, image processor, transformers model, output dir), fp32 on CPU."""
    source = tiny_onevision_checkpoint
    out = convert_to_hf.convert(source, str(tmp_path_factory.mktemp("ov-hf") / "hf"))
    tokenizer, ours, image_processor, _ = load_pretrained_model(source, device="cpu", torch_dtype=torch.float32)
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    return tokenizer, ours, image_processor, hf, out


def random_image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    width, height = size
    pixels = np.random.RandomState(seed).randint(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def qwen_prompt() -> str:
    return first_turn_prompt("qwen_1_5", f"<image>\n{QUESTION}")


def saved_image_processor(out: str):
    try:
        from transformers import LlavaOnevisionImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import LlavaOnevisionImageProcessor as ImageProcessor
    return ImageProcessor.from_pretrained(out)


def hf_token_count(out: str, size: tuple[int, int]) -> int:
    """transformers' `LlavaOnevisionProcessor` token rule for PIL `size` with the settings saved in `out`, on a
    stand-in (the processor itself cannot be built without torchvision)."""
    with open(os.path.join(out, "processor_config.json")) as handle:
        settings = json.load(handle)
    stand_in = type("Processor", (), {"image_processor": saved_image_processor(out), **settings})()
    stand_in._get_unpadded_features = LlavaOnevisionProcessor._get_unpadded_features.__get__(stand_in)
    width, height = size
    return LlavaOnevisionProcessor._get_number_of_features(stand_in, height, width, 384, 384)


def run_both(converted, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """One prompt + image through both models: (our logits, transformers' logits over the original
    vocabulary, our visual tokens, transformers' visual tokens). transformers' model is given as many
    `<image>` tokens as its processor's rule says and refuses to run if its own features differ in number."""
    tokenizer, ours, image_processor, hf, out = converted
    image = random_image(size, seed=size[0] + size[1])
    pixel_values = process_images([image], image_processor, ours.config)  # [1, V, 3, 384, 384]
    ids = tokenizer_image_token(qwen_prompt(), tokenizer, return_tensors="pt")
    position = int((ids == IMAGE_TOKEN_INDEX).nonzero())
    image_sizes = torch.tensor([[image.height, image.width]])
    with torch.no_grad():
        our_logits = ours(ids[None], images=pixel_values, image_sizes=[image.size]).logits  # PIL (w, h)
        num_hf_tokens = hf_token_count(out, size)
        hf_ids = torch.cat([ids[:position], torch.full((num_hf_tokens,), hf.config.image_token_id), ids[position + 1:]])
        hf_logits = hf(input_ids=hf_ids[None], pixel_values=pixel_values, image_sizes=image_sizes).logits
    num_ours = our_logits.shape[1] - (len(ids) - 1)
    assert hf_logits.shape[2] == our_logits.shape[2] + 2  # + the `<image>` and `<video>` rows
    return our_logits, hf_logits[..., : our_logits.shape[2]], num_ours, num_hf_tokens


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_same_logits_as_ours(converted, size):
    our_logits, hf_logits, num_ours, num_hf = run_both(converted, size)
    assert num_ours == num_hf == onevision_visual_token_count(size)
    max_diff = (our_logits - hf_logits).abs().max().item()
    print(f"{size[0]}x{size[1]}: {num_ours} visual tokens, max |ours - hf| = {max_diff:.3g}")
    assert max_diff <= 1e-4


def test_sizes_cover_the_downsampling_rule():
    """The size list holds canvases downsampled, kept above 9 x 729 tokens, and kept below (hand counts)."""
    assert onevision_visual_token_count((2304, 2304)) == 729 + 81 * 82  # 6x6: 162x162 halved
    assert onevision_visual_token_count((1536, 1152)) == 729 + 70 * 94  # 4x3: 81x108, times 1.155 -> 70x93
    assert onevision_visual_token_count((1920, 768)) == 729 + 54 * 136  # 5x2: 54x135 = 7290 kept
    assert onevision_visual_token_count((800, 500)) == 729 + 50 * 82  # 3x2 unpadded to 50x81, kept


@pytest.mark.parametrize("size", sorted(ROUNDING_DIFFERENCES), ids=lambda s: f"{s[0]}x{s[1]}")
def test_known_unpad_rounding_difference(converted, size):
    """transformers' `int(round(x, 7))` vs LLaVA-VL's `int(x)`: each model's own sequence length, pinned."""
    ours_count, hf_count = ROUNDING_DIFFERENCES[size]
    our_logits, hf_logits, num_ours, num_hf = run_both(converted, size)
    assert (num_ours, num_hf) == (ours_count, hf_count) and onevision_visual_token_count(size) == ours_count
    prompt_length = our_logits.shape[1] - num_ours
    assert (our_logits.shape[1], hf_logits.shape[1]) == (prompt_length + ours_count, prompt_length + hf_count)
    print(f"{size[0]}x{size[1]}: ours {our_logits.shape[1]} positions, transformers {hf_logits.shape[1]}")


def test_config_tokenizer_and_processor_files(converted):
    tokenizer, ours, image_processor, hf, out = converted
    vocab = ours.get_input_embeddings().weight.shape[0]
    config = hf.config
    ids = (config.image_token_id, config.video_token_id, config.text_config.vocab_size)
    assert ids == (vocab, vocab + 1, vocab + 2)
    assert config.text_config.model_type == "qwen2" and config.text_config.tie_word_embeddings
    assert hf.lm_head.weight is hf.get_input_embeddings().weight
    assert hf.model.language_model.layers[0].self_attn.q_proj.bias is not None
    vision = config.vision_config
    assert vision.model_type == "siglip_vision_model" and not vision.vision_use_head
    assert vision.num_hidden_layers == 2  # the tiny SigLIP checkpoint has 3; the original drops the last
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-1, "full")
    assert config.vision_aspect_ratio == "anyres_max_9"
    assert config.image_grid_pinpoints == [[h, w] for w, h in ONEVISION_GRID_PINPOINTS]
    assert config.image_grid_pinpoints[:2] == [[384, 384], [768, 384]]  # heights first, as ours lists widths

    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer.convert_tokens_to_ids(["<image>", "<video>"]) == [vocab, vocab + 1]
    assert hf_tokenizer(QUESTION).input_ids == tokenizer(QUESTION).input_ids
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    assert hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == qwen_prompt()
    with open(os.path.join(out, "chat_template.jinja")) as handle:
        assert handle.read() == hf_tokenizer.chat_template

    with open(os.path.join(out, "processor_config.json")) as handle:
        processor_config = json.load(handle)
    assert processor_config == {"processor_class": "LlavaOnevisionProcessor", "num_image_tokens": 729,
                                "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9",
                                "image_token": "<image>", "video_token": "<video>"}


@pytest.mark.parametrize("size", [(800, 500), (1, 2000), (384, 384)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_saved_processor_matches_ours(converted, size):
    """The saved image processor gives our pixel values, and transformers' processor token rule with the saved
    settings gives our count."""
    _, ours, image_processor, _, out = converted
    image = random_image(size)
    pixel_values = process_images([image], image_processor, ours.config)
    hf_image_processor = saved_image_processor(out)
    inputs = hf_image_processor(image, return_tensors="pt")
    assert inputs["image_sizes"].tolist() == [[image.height, image.width]]
    assert inputs["pixel_values"].shape == pixel_values.shape
    assert (inputs["pixel_values"] - pixel_values).abs().max().item() <= 1e-5
    assert hf_token_count(out, size) == onevision_visual_token_count(image.size)


def test_unsupported_onevision_variant_is_refused_in_one_line():
    config = {"architectures": ["LlavaQwenForCausalLM"], "image_aspect_ratio": "anyres",
              "mm_patch_merge_type": "spatial_unpad", "mm_projector_type": "mlp2x_gelu"}
    with pytest.raises(ValueError, match="LlavaOnevisionForConditionalGeneration needs image_aspect_ratio"):
        convert_to_hf.check_convertible(config)
    convert_to_hf.check_convertible({**config, "image_aspect_ratio": "anyres_max_4"})  # any N converts
