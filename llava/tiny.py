"""Build a tiny LLaVA-NeXT checkpoint in the original `liuhaotian/llava-v1.6-*` layout.

No weights can be downloaded here, so the project proves its whole path (loader, AnyRes,
tower, projector, splice, generation, conversion to transformers) on this checkpoint. It has
the real geometry -- CLIP at 336 px with 14 px patches (24x24 tokens per view), the v1.6
pinpoints, `spatial_unpad`, `mlp2x_gelu`, features from layer -2 -- with tiny widths and
depths, seeded random weights and a Llama-style byte-fallback BPE tokenizer trained here.
Same seed, same files.

    python -m llava.tiny --out checkpoints/llava-next-tiny
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPVisionConfig, LlamaTokenizer

from llava import conversation
from llava.model import LlavaConfig, LlavaLlamaForCausalLM, LlavaMistralConfig, LlavaMistralForCausalLM
from llava.model.multimodal_encoder.image_processor import CLIPImagePreprocessor

DEFAULT_OUT = os.path.join("checkpoints", "llava-next-tiny")
TOWER_DIR = "clip-vit-tiny-patch14-336"
V16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{value:02X}>" for value in range(256)]

_CORPUS_TEXT = """
The image shows a red square on a blue background next to a small green circle.
What is shown in this image? Describe the picture in detail. Answer the question using a single word or phrase.
Is there a cat in the image? Yes, there is a cat sitting on the table. No, there is no dog.
How many objects are there? There are two objects: one square and one circle.
What color is the sky? The sky is blue and the grass is green. The sun is yellow.
Answer with the option's letter from the given choices directly. A. red B. blue C. green D. yellow
When the provided information is insufficient, respond with 'Unanswerable'.
Reference OCR token: stop, sign, street, name, open, exit
The thumbnail guides which tokens of each crop are kept. Visual tokens are compressed.
A person is riding a bicycle along the street near a tall building with many windows.
The model reads the text in the picture and counts the people standing in the room.
Left, right, top, bottom, middle, center, corner, edge, inside, outside, above, below.
Please answer yes or no. Is the light on? Where is the book? Which animal is larger?
""".strip()


def _corpus() -> list[str]:
    """Training sentences: the chat templates' fixed text plus a small English sample.

    Newlines are left out on purpose, so that `\\n` is encoded by byte fallback (`<0x0A>`) as
    in the real Llama vocabulary.
    """
    lines = [line for line in _CORPUS_TEXT.splitlines() if line]
    for template in conversation.conv_templates.values():
        lines.append(template.system.replace("\n", " "))
        lines.extend(role.strip() + ":" for role in template.roles if role.strip())
    lines.extend(" ".join(str(number) for number in range(start, start + 10)) for start in range(0, 100, 10))
    return lines


def build_tokenizer(vocab_size: int = 1024) -> LlamaTokenizer:
    """A Llama-style tokenizer: `<unk> <s> </s>`, the 256 byte tokens, then BPE merges.

    Pieces start words with `▁` (Metaspace, prefix on the first piece only) and unknown
    characters fall back to bytes, as in Llama/Vicuna's vocabulary.
    """
    trainer_model = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    trainer_model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS) - len(BYTE_TOKENS), special_tokens=[], show_progress=False
    )
    trainer_model.train_from_iterator(_corpus(), trainer=trainer)
    trained = json.loads(trainer_model.to_str())["model"]
    learned = sorted(trained["vocab"].items(), key=lambda item: item[1])
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + BYTE_TOKENS)}
    for token, _ in learned:
        vocab.setdefault(token, len(vocab))
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in trained["merges"]]
    return LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        legacy=False,
        add_bos_token=True,
        add_eos_token=False,
        pad_token="<unk>",
        model_max_length=4096,
        padding_side="right",
    )


def tiny_configs(vocab_size: int, llm: str = "vicuna") -> tuple[dict, CLIPVisionConfig]:
    """`config.json` contents (original v1.6 keys) and the tiny CLIP tower's config."""
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=3,
        image_size=336,
        patch_size=14,
        projection_dim=32,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    language = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 4 if llm == "vicuna" else 2,
        "num_hidden_layers": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0 if llm == "vicuna" else 1000000.0,
        "vocab_size": vocab_size,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
    }
    multimodal = {
        "image_aspect_ratio": "anyres",
        "image_grid_pinpoints": V16_PINPOINTS,
        "mm_hidden_size": vision.hidden_size,
        "mm_patch_merge_type": "spatial_unpad",
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": TOWER_DIR,
        "tokenizer_model_max_length": 4096,
        "tokenizer_padding_side": "right",
        "unfreeze_mm_vision_tower": True,
        "use_mm_proj": True,
    }
    identity = (
        {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava"}
        if llm == "vicuna"
        else {"architectures": ["LlavaMistralForCausalLM"], "model_type": "llava_mistral", "sliding_window": None}
    )
    return {**identity, **language, **multimodal, "torch_dtype": "float32"}, vision


@torch.no_grad()
def _seeded_init(model: torch.nn.Module, seed: int) -> None:
    """Fill every tensor from one seeded generator, in name order, independent of torch's init.

    Matrices get N(0, 1/fan_in) so activations stay O(1) through the tiny stack (the [CLS]
    scores then vary between patches instead of being nearly tied); norms get 1, biases 0.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in sorted(model.state_dict().items()):
        if not tensor.is_floating_point():
            continue
        if "norm" in name and name.endswith("weight"):
            tensor.fill_(1.0)
        elif name.endswith("bias"):
            tensor.zero_()
        else:
            fan_in = math.prod(tensor.shape[1:]) if tensor.ndim > 1 else tensor.shape[0]
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * fan_in**-0.5)


def build_tiny_checkpoint(out: str = DEFAULT_OUT, seed: int = 0, llm: str = "vicuna", max_shard_size: str = "500KB") -> str:
    """Write the checkpoint to `out` (sharded safetensors, config, tokenizer, tower config); return `out`."""
    if llm not in ("vicuna", "mistral"):
        raise ValueError(f"llm must be 'vicuna' or 'mistral', got {llm!r}")
    os.makedirs(os.path.join(out, TOWER_DIR), exist_ok=True)
    tokenizer = build_tokenizer()
    config_dict, vision_config = tiny_configs(len(tokenizer), llm)
    vision_config.save_pretrained(os.path.join(out, TOWER_DIR))
    with open(os.path.join(out, TOWER_DIR, "preprocessor_config.json"), "w") as handle:
        json.dump(CLIPImagePreprocessor().to_dict(), handle, indent=2, sort_keys=True)

    config_class, model_class = (LlavaConfig, LlavaLlamaForCausalLM) if llm == "vicuna" else (LlavaMistralConfig, LlavaMistralForCausalLM)
    config = config_class(**{key: value for key, value in config_dict.items() if key not in ("architectures", "model_type")})
    config._name_or_path = out
    torch.manual_seed(seed)
    model = model_class(config)
    _seeded_init(model, seed)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    # The original checkpoints' config.json: model_type 'llava', LLaVA keys at top level.
    with open(os.path.join(out, "config.json"), "w") as handle:
        json.dump(config_dict, handle, indent=2, sort_keys=True)
    return out


def ensure_tiny_checkpoint(out: str = DEFAULT_OUT) -> str:
    """Build the default tiny checkpoint unless `out` already holds one."""
    if not os.path.isfile(os.path.join(out, "config.json")):
        build_tiny_checkpoint(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--llm", choices=["vicuna", "mistral"], default="vicuna", help="language model family")
    args = parser.parse_args(argv)
    build_tiny_checkpoint(args.out, seed=args.seed, llm=args.llm)
    print(f"wrote tiny LLaVA-NeXT checkpoint ({args.llm}, seed {args.seed}) to {args.out}")


if __name__ == "__main__":
    main()
