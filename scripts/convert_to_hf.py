"""Convert an original-layout LLaVA-NeXT or LLaVA-OneVision checkpoint to transformers.

Reads a checkpoint in the `liuhaotian/llava-v1.6-*` layout (or the tiny one from
`python -m llava.tiny`) with `llava.model.builder.load_pretrained_model`, renames its weights
to transformers' LLaVA-NeXT names, and writes model, tokenizer and a `LlavaNextProcessor`
(its image processor with the CLIP mean/std, crop size and pinpoints) with `save_pretrained`.

A checkpoint in the `lmms-lab/llava-onevision-qwen2-*-ov` layout (`LlavaQwenForCausalLM`, or the
tiny one from `python -m llava.tiny --family onevision`) becomes a
`LlavaOnevisionForConditionalGeneration` instead: a Qwen2 text config; a SigLIP vision config with
the layers the original keeps (the published tower less its last layer) and no pooling head, whose
last hidden state, every token (`vision_feature_layer` -1, strategy `full`: SigLIP has no [CLS]),
is what the original feeds the projector; `vision_aspect_ratio` as the source's `anyres_max_N`;
and a `LlavaOnevisionProcessor` (SigLIP's mean/std 0.5, 729 tokens per view, the `qwen_1_5` prompt
as its chat template). `<image>` and `<video>` are both added, as transformers' OneVision
checkpoints have them (the real 0.5b/7b embeddings already have rows for both ids).

Two things differ between the layouts besides the weight names:

* Pinpoint order. Original configs list `image_grid_pinpoints` as (width, height) pairs;
  transformers reads them as (height, width) pairs (and takes `image_sizes` as (height, width),
  where PIL's `image.size` is (width, height)). Every pair is written swapped, in the same list
  order, so the same grid is chosen for every image and ties between candidates are broken the
  same way (earliest wins).
* An added image token. Original LLaVA marks the image with the placeholder id -200, which is
  not in the vocabulary; transformers expects a real token repeated once per visual token. The
  converter adds `<image>` to the tokenizer as a special token, sets `image_token_index` to its
  id and grows `embed_tokens` and `lm_head` by the rows that id needs (one for the Vicuna/
  Mistral checkpoints: 32000 -> 32001); the new rows are the mean of the existing rows. The
  image token's embedding is never used (its positions are overwritten by visual features), so
  logits over the original vocabulary are unchanged.

One known difference is not converted away: transformers unpads the crop canvas with
`int(round(x, 7))` where the original truncates `int(x)`, so for a few sizes (369x820 on OneVision,
88x55 on LLaVA-NeXT) transformers keeps one more row or column on each side than the original.

Usage:
    python scripts/convert_to_hf.py --model-path liuhaotian/llava-v1.6-vicuna-7b --out llava-v1.6-vicuna-7b-hf [--dtype float16]
    python scripts/convert_to_hf.py --model-path lmms-lab/llava-onevision-qwen2-0.5b-ov \
        --out llava-onevision-qwen2-0.5b-ov-hf
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from accelerate import init_empty_weights

if __name__ == "__main__":  # run as a file: make the repository's `llava` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import (  # noqa: E402
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    MistralConfig,
    Qwen2Config,
    SiglipVisionConfig,
)

from llava.conversation import conv_templates  # noqa: E402
from llava.mm_utils import anyres_max_num_patches, parse_pinpoints  # noqa: E402
from llava.model.builder import (DTYPES, llava_classes, load_pretrained_model, read_llava_config,  # noqa: E402
                                 resolve_local_checkpoint)
from llava.model.language_model.llava_qwen import LlavaQwenForCausalLM  # noqa: E402
from llava.utils import quiet_transformers, user_errors  # noqa: E402

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
# LLaVA-VL's `qwen_1_5` prompt (`llava.conversation`'s `conv_qwen`) as a chat template: its system turn unless
# the messages bring one, then per turn "<|im_start|>role\n", the images as "<image>\n" ahead of the text (where
# the original moves the image token), "<|im_end|>\n"; a generation prompt opens the assistant's turn.
QWEN_SYSTEM_TURN = conv_templates["qwen_1_5"].system + conv_templates["qwen_1_5"].sep + "\n"
QWEN_CHAT_TEMPLATE = (
    "{% if not messages or messages[0]['role'] != 'system' %}{{ '" + QWEN_SYSTEM_TURN.replace("\n", "\\n") + "' }}"
    "{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Our parameter names -> transformers 5.x LlavaNext names; the first matching prefix wins.
KEY_PREFIXES = (
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.image_newline", "model.image_newline"),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)
GROWN_KEYS = ("model.language_model.embed_tokens.weight", "lm_head.weight")
# Keys of the source config that are not language-model fields.
NOT_TEXT_FIELDS = {"model_type", "architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"}


def swap_pinpoints(grid_pinpoints, crop_size: int | None = None) -> list[list[int]]:
    """Original (width, height) pinpoints as transformers' (height, width) pairs, same order. `crop_size`: the
    view's side in pixels, needed for LLaVA-VL's range form `"(1x1),...,(6x6)"` only."""
    return [[height, width] for width, height in parse_pinpoints(grid_pinpoints, crop_size)]


def is_onevision(config: dict) -> bool:
    """Whether the source `config.json` is a LLaVA-OneVision checkpoint (Qwen2 language model)."""
    return llava_classes(config)[1] is LlavaQwenForCausalLM


def hf_key(key: str) -> str:
    """The transformers name of one of our state-dict keys; `ValueError` for an unknown key."""
    for old, new in KEY_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    raise ValueError(f"no transformers name for checkpoint weight {key!r}")


def check_convertible(config: dict) -> None:
    """transformers' LLaVA-NeXT and LLaVA-OneVision each implement one variant only; refuse anything else
    in one line (an unknown language-model family included).

    `config`: the source's `config.json` (checked before the weights are loaded).
    """
    onevision = is_onevision(config)
    target = "LlavaOnevisionForConditionalGeneration" if onevision else "LlavaNextForConditionalGeneration"
    expected = {  # name: (required value, upstream default when the key is absent)
        "image_aspect_ratio": ("anyres_max_N" if onevision else "anyres", None),
        "mm_patch_merge_type": ("spatial_unpad", "flat"),
        "mm_projector_type": ("mlp2x_gelu", "linear"),
        "mm_use_im_start_end": (False, False),
    }
    for name, (value, default) in expected.items():
        found = config.get(name, default)
        matches = anyres_max_num_patches(found) is not None if value == "anyres_max_N" else found == value
        if not matches:
            raise ValueError(f"cannot convert: {target} needs {name}={value!r}, the checkpoint has {found!r}")


def resolve_dtype(model_path: str, dtype: str | torch.dtype | None) -> torch.dtype:
    """`dtype` as a torch dtype; by default the checkpoint's own (`torch_dtype` in config.json), else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        saved = read_llava_config(model_path)
        dtype = saved.get("torch_dtype") or saved.get("dtype") or "float32"
        if dtype not in DTYPES:
            dtype = "float32"
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16")
    return DTYPES[dtype]


def add_special_tokens(tokenizer, tokens: list[str], num_rows: int) -> tuple[list[int], int]:
    """Add `tokens` as special tokens; return (their ids, embedding rows needed: at least `num_rows`)."""
    tokenizer.add_tokens(tokens, special_tokens=True)
    ids = [tokenizer.convert_tokens_to_ids(token) for token in tokens]
    return ids, max(num_rows, max(ids) + 1, len(tokenizer))


def text_config_of(config, vocab_size: int):
    """The language model's plain `LlamaConfig` / `MistralConfig` / `Qwen2Config` from our LLaVA config."""
    base = next(kind for kind in (MistralConfig, Qwen2Config, LlamaConfig) if isinstance(config, kind))
    known = set(base().to_dict()) - NOT_TEXT_FIELDS
    fields = {key: value for key, value in config.to_dict().items() if key in known}
    fields["vocab_size"] = vocab_size
    return base.from_dict(fields)


def build_config(model, image_token_id: int, vocab_size: int) -> LlavaNextConfig:
    """`LlavaNextConfig` equivalent to our model's config (pinpoints swapped to (height, width))."""
    config = model.config
    vision_config = CLIPVisionConfig.from_dict(model.get_vision_tower().config.to_dict())
    text_config = text_config_of(config, vocab_size)
    select_feature = getattr(config, "mm_vision_select_feature", "patch")
    return LlavaNextConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=image_token_id,
        image_grid_pinpoints=swap_pinpoints(config.image_grid_pinpoints),
        vision_feature_layer=config.mm_vision_select_layer,
        vision_feature_select_strategy="full" if select_feature == "cls_patch" else "default",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )


def build_onevision_config(model, image_token_id: int, video_token_id: int,
                           vocab_size: int) -> LlavaOnevisionConfig:
    """`LlavaOnevisionConfig` equivalent to our OneVision model's config.

    The vision config is our tower's (already the published one less its last layer, without the head), so
    its last hidden state, all 729 tokens, is the feature the original projects; pinpoints swapped to
    (height, width); `vision_aspect_ratio` is the source's `anyres_max_N`.
    """
    config = model.config
    vision_config = SiglipVisionConfig.from_dict(model.get_vision_tower().config.to_dict())
    text_config = text_config_of(config, vocab_size)
    return LlavaOnevisionConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=image_token_id,
        video_token_index=video_token_id,
        image_grid_pinpoints=swap_pinpoints(config.image_grid_pinpoints, vision_config.image_size),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=config.image_aspect_ratio,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )


def grow_rows(weight: torch.Tensor, num_rows: int) -> torch.Tensor:
    """`weight` `[V, D]` with rows appended up to `num_rows`, each the mean of the existing rows."""
    extra = num_rows - weight.shape[0]
    if extra <= 0:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(extra, -1)])


def convert_state_dict(state_dict: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names, embedding and LM head grown to `vocab_size` rows.

    A tied LM head (Qwen2-0.5B) stays one tensor with the embedding after growing.
    """
    converted = {hf_key(key): value for key, value in state_dict.items()}
    grown = {}  # source tensor's storage -> its grown copy
    for key in GROWN_KEYS:
        source = converted[key]
        storage = (source.untyped_storage().data_ptr(), source.shape)
        if storage not in grown:
            grown[storage] = grow_rows(source, vocab_size)
        converted[key] = grown[storage]
    return converted


def build_hf_model(config, state_dict: dict[str, torch.Tensor]):
    """The transformers model (`LlavaNextForConditionalGeneration` or `LlavaOnevisionForConditionalGeneration`,
    after `config`'s class) holding `state_dict`, with strict checks on names and shapes.

    Parameters are created on the meta device and filled with `assign=True`, so no random
    initialisation runs and no second copy of the weights is made; buffers are built normally.
    """
    model_class = (LlavaOnevisionForConditionalGeneration if isinstance(config, LlavaOnevisionConfig)
                   else LlavaNextForConditionalGeneration)
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers real
        model = model_class(config)
    expected = model.state_dict()  # persistent tensors only (no rotary / position-id buffers)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"weight names do not match {model_class.__name__}: missing {missing}, "
                         f"unexpected {unexpected}")
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"{key}: shape {tuple(tensor.shape)} in the checkpoint, {tuple(expected[key].shape)} expected")
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def build_processor(tokenizer, image_processor, config: LlavaNextConfig) -> LlavaNextProcessor:
    """A `LlavaNextProcessor`: CLIP preprocessing settings of the source and the swapped pinpoints."""
    try:
        from transformers import LlavaNextImageProcessorPil as ImageProcessor  # no torchvision needed
    except ImportError:
        from transformers import LlavaNextImageProcessor as ImageProcessor
    hf_image_processor = ImageProcessor(
        size=dict(image_processor.size),
        crop_size=dict(image_processor.crop_size),
        image_mean=list(image_processor.image_mean),
        image_std=list(image_processor.image_std),
        rescale_factor=image_processor.rescale_factor,
        resample=int(image_processor.resample),
        image_grid_pinpoints=config.image_grid_pinpoints,
    )
    return LlavaNextProcessor(
        image_processor=hf_image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # the CLS token
    )


def save_onevision_processor(out: str, tokenizer, image_processor, config: LlavaOnevisionConfig) -> None:
    """Write a `LlavaOnevisionProcessor`'s files to `out`: the source's SigLIP preprocessing settings (views
    squashed to the tower's size, mean/std 0.5) with the swapped pinpoints, the tokenizer with the `qwen_1_5`
    chat template, and `processor_config.json` (729 tokens per view, strategy, `anyres_max_N`).

    Written file by file, in the layout of transformers' published OneVision checkpoints, because the processor
    object cannot be built without torchvision (its video processor is a required part); `AutoProcessor`
    loads the directory where torchvision is installed.
    """
    try:
        from transformers import LlavaOnevisionImageProcessorPil as ImageProcessor  # no torchvision needed
    except ImportError:
        from transformers import LlavaOnevisionImageProcessor as ImageProcessor
    side = config.vision_config.image_size
    ImageProcessor(
        size={"height": side, "width": side},
        image_mean=list(image_processor.image_mean),
        image_std=list(image_processor.image_std),
        rescale_factor=image_processor.rescale_factor,
        resample=int(image_processor.resample),
        image_grid_pinpoints=config.image_grid_pinpoints,
    ).save_pretrained(out)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    with open(os.path.join(out, "chat_template.jinja"), "w") as handle:
        handle.write(QWEN_CHAT_TEMPLATE)
    processor_config = {
        "processor_class": "LlavaOnevisionProcessor",
        "num_image_tokens": (side // config.vision_config.patch_size) ** 2,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "vision_aspect_ratio": config.vision_aspect_ratio,
        "image_token": IMAGE_TOKEN,
        "video_token": VIDEO_TOKEN,
    }
    with open(os.path.join(out, "processor_config.json"), "w") as handle:
        json.dump(processor_config, handle, indent=2, sort_keys=True)


def convert(model_path: str, out: str, dtype: str | torch.dtype | None = None) -> str:
    """Convert the checkpoint at `model_path` (directory or cached hub id) into `out`; return `out`.

    `dtype`: float32, float16 or bfloat16 (default: the checkpoint's saved dtype).
    The written tokenizer has `<image>` added (and `<video>` for OneVision); the embeddings grow where
    their ids need rows (see the module doc).
    """
    source = resolve_local_checkpoint(model_path)
    if os.path.abspath(out) == os.path.abspath(source):
        raise ValueError(f"--out {out} is the source checkpoint itself; choose another directory")
    source_config = read_llava_config(source)
    check_convertible(source_config)
    onevision = is_onevision(source_config)
    torch_dtype = resolve_dtype(source, dtype)
    tokenizer, model, image_processor, _ = load_pretrained_model(source, device="cpu", torch_dtype=torch_dtype)

    num_rows = model.get_input_embeddings().weight.shape[0]
    if onevision:
        (image_token_id, video_token_id), vocab_size = add_special_tokens(tokenizer, [IMAGE_TOKEN, VIDEO_TOKEN],
                                                                          num_rows)
        config = build_onevision_config(model, image_token_id, video_token_id, vocab_size)
    else:
        (image_token_id,), vocab_size = add_special_tokens(tokenizer, [IMAGE_TOKEN], num_rows)
        config = build_config(model, image_token_id, vocab_size)
    state_dict = convert_state_dict(model.state_dict(), vocab_size)
    generation_config = model.generation_config
    del model

    hf_model = build_hf_model(config, state_dict)
    if generation_config is not None:
        hf_model.generation_config = generation_config
    os.makedirs(out, exist_ok=True)
    hf_model.save_pretrained(out)
    if onevision:
        save_onevision_processor(out, tokenizer, image_processor, config)
    else:
        build_processor(tokenizer, image_processor, config).save_pretrained(out)  # tokenizer + image processor
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True,
                        help="original-layout LLaVA-NeXT or LLaVA-OneVision checkpoint (directory or cached hub id)")
    parser.add_argument("--out", required=True, help="output directory for the transformers checkpoint")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="weight dtype to write (default: the checkpoint's own)")
    args = parser.parse_args(argv)
    quiet_transformers()
    with user_errors():
        out = convert(args.model_path, args.out, args.dtype)
    with open(os.path.join(out, "config.json")) as handle:
        architecture = json.load(handle)["architectures"][0]
    print(f"wrote {architecture} checkpoint to {out}")


if __name__ == "__main__":
    main()
