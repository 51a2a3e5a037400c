"""Build a tiny LLaVA-NeXT checkpoint in the original `liuhaotian/llava-v1.6-*` layout.

No weights can be downloaded here, so the project proves its whole path (loader, AnyRes,
tower, projector, splice, generation, conversion to transformers) on this checkpoint. It has
the real geometry -- CLIP at 336 px with 14 px patches (24x24 tokens per view), the v1.6
pinpoints, `spatial_unpad`, `mlp2x_gelu`, features from layer -2 -- with tiny widths and
depths, seeded random weights and a Llama-style byte-fallback BPE tokenizer trained here,
written as the original checkpoints ship it -- a sentencepiece `tokenizer.model` -- and as a
`tokenizer.json` that the `tokenizers` release upstream LLaVA pins (0.15) reads too, so upstream
LLaVA's own `load_pretrained_model` opens the checkpoint unchanged (from inside it: the tower
path in `config.json` is relative).
The CLIP directory it names (`mm_vision_tower`) is a whole tiny CLIP checkpoint, as
`openai/clip-vit-large-patch14-336` is: both towers with their projections and a CLIP-style
byte-level BPE tokenizer trained here, so text-conditioned methods (CDPruner) run end to end.
Same seed, same files.

`--family onevision` writes a tiny checkpoint in the `lmms-lab/llava-onevision-qwen2-0.5b-ov`
layout instead: `LlavaQwenForCausalLM` (Qwen2 with its attention biases, tied embeddings), a
SigLIP tower at 384 px with 14 px patches (27x27 tokens per view) written as a whole tiny
`SiglipModel` (one encoder layer more than the LLaVA model keeps, and its pooling head),
`anyres_max_9` with the (1x1)..(6x6) pinpoints, `spatial_unpad`, `mlp2x_gelu`, and a Qwen-style
byte-level BPE tokenizer with the ChatML special tokens, trained here and written as Qwen2 checkpoints
ship it (`vocab.json`, `merges.txt`, a `tokenizer.json` that tokenizers 0.19 reads): the official
LLaVA-NeXT code's loader opens it.

    python -m llava.tiny --out checkpoints/llava-next-tiny
    python -m llava.tiny --family onevision --out checkpoints/llava-onevision-tiny
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os

import torch
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizerFast, CLIPVisionConfig, LlamaTokenizer,
                          Qwen2Tokenizer, SiglipConfig, SiglipModel, SiglipTextConfig, SiglipVisionConfig)

from llava import conversation
from llava.mm_utils import ONEVISION_GRID_PINPOINTS
from llava.model import (LlavaConfig, LlavaLlamaForCausalLM, LlavaMistralConfig, LlavaMistralForCausalLM,
                         LlavaQwenConfig, LlavaQwenForCausalLM)
from llava.model.multimodal_encoder.image_processor import CLIPImagePreprocessor
from llava.model.multimodal_encoder.siglip_encoder import SigLipImagePreprocessor

DEFAULT_OUT = os.path.join("checkpoints", "llava-next-tiny")
ONEVISION_OUT = os.path.join("checkpoints", "llava-onevision-tiny")
TOWER_DIR = "clip-vit-tiny-patch14-336"
SIGLIP_TOWER_DIR = "siglip-tiny-patch14-384"
V16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# Qwen2's special tokens after its BPE vocabulary, in its order (ids 151643-151645 in the real one).
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{value:02X}>" for value in range(256)]
CLIP_SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>"]  # the last ids, as in CLIP's vocabulary
END_OF_WORD = "</w>"

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


def sentencepiece_model(tokenizer: LlamaTokenizer) -> bytes:
    """The serialised sentencepiece `ModelProto` that encodes text as `build_tokenizer`'s merges do.

    Sentencepiece's BPE has no merge list: it repeatedly joins the adjacent pair whose join is a
    piece with the highest score. `build_tokenizer` numbers each merged piece in the order its merge
    was learned, so a score of minus the id replays the merges in their order (tests check it on
    random text). Settings as Llama's own model: identity normalisation, a dummy `▁` prefix, spaces
    kept, byte fallback, `<unk> <s> </s>` = 0, 1, 2. One difference, as with the real Llama files:
    sentencepiece adds the prefix even to text that starts with a space, the fast tokenizer does not.
    """
    proto = sentencepiece_model_pb2.ModelProto()
    piece_type = proto.SentencePiece.Type
    special = {tokenizer.unk_token: piece_type.UNKNOWN, tokenizer.bos_token: piece_type.CONTROL,
               tokenizer.eos_token: piece_type.CONTROL}
    vocab = tokenizer.get_vocab()
    for token in sorted(vocab, key=vocab.get):
        kind = special.get(token, piece_type.BYTE if token in BYTE_TOKENS else piece_type.NORMAL)
        proto.pieces.add(piece=token, type=kind, score=-float(vocab[token]) if kind == piece_type.NORMAL else 0.0)
    proto.trainer_spec.MergeFrom(sentencepiece_model_pb2.TrainerSpec(
        model_type=sentencepiece_model_pb2.TrainerSpec.BPE, vocab_size=len(vocab), byte_fallback=True,
        unk_id=tokenizer.unk_token_id, bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id, pad_id=-1))
    proto.normalizer_spec.MergeFrom(sentencepiece_model_pb2.NormalizerSpec(
        name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False, escape_whitespaces=True))
    return proto.SerializeToString()


def portable_tokenizer_json(saved: dict) -> dict:
    """`tokenizer.json` as written by `tokenizers` >= 0.20, rewritten in the form the releases the
    original codebases pin read as well (0.15 for LLaVA 1.2.2, 0.19 for LLaVA-NeXT's OneVision): merges
    as "left right" strings, no `ignore_merges` (false here), and a Metaspace pre-tokeniser with
    `add_prefix_space` instead of `split`. Newer releases read that back with `split` on, which changes
    nothing here: no piece holds a `▁` after its first character."""
    model = {key: value for key, value in saved["model"].items() if key != "ignore_merges"}
    model["merges"] = [" ".join(merge) for merge in model["merges"]]
    portable = {**saved, "model": model}
    pre_tokenizer = saved["pre_tokenizer"]
    if pre_tokenizer and pre_tokenizer["type"] == "Metaspace":
        portable["pre_tokenizer"] = {"type": "Metaspace", "replacement": pre_tokenizer["replacement"],
                                     "add_prefix_space": True, "prepend_scheme": pre_tokenizer["prepend_scheme"]}
    return portable


def write_llama_tokenizer(tokenizer: LlamaTokenizer, out: str) -> None:
    """Save `tokenizer` to `out` in the original layout: `tokenizer.model` (what upstream LLaVA's slow
    tokenizer reads), a portable `tokenizer.json`, and in `tokenizer_config.json` the keys the original
    has and transformers 5 leaves out: `add_bos_token` (a `tokenizer.model` alone has no post-processor
    to say it) and `legacy: false` (4.37 would otherwise fall back to its legacy mode and warn)."""
    tokenizer.save_pretrained(out)
    with open(os.path.join(out, "tokenizer.model"), "wb") as handle:
        handle.write(sentencepiece_model(tokenizer))
    _rewrite_json(os.path.join(out, "tokenizer.json"), portable_tokenizer_json)
    _rewrite_json(os.path.join(out, "tokenizer_config.json"), lambda config: {
        **config, "add_bos_token": True, "add_eos_token": False, "legacy": False})


def write_qwen_tokenizer(tokenizer: Qwen2Tokenizer, out: str) -> None:
    """Save `tokenizer` to `out` as Qwen2 checkpoints ship it: a portable `tokenizer.json`, and the slow
    tokenizer's `vocab.json` and `merges.txt` (transformers 5 writes neither)."""
    tokenizer.save_pretrained(out)
    saved = _rewrite_json(os.path.join(out, "tokenizer.json"), portable_tokenizer_json)["model"]
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as handle:
        json.dump(saved["vocab"], handle, ensure_ascii=False)
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n" + "".join(merge + "\n" for merge in saved["merges"]))


def _rewrite_json(path: str, change) -> dict:
    """The JSON file at `path` replaced by `change` of it; returns the new content."""
    with open(path, encoding="utf-8") as handle:
        content = change(json.load(handle))
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(content, handle, ensure_ascii=False, indent=2)
    return content


def build_clip_tokenizer(vocab_size: int = 768) -> CLIPTokenizerFast:
    """A CLIP-style tokenizer: lower-cased byte-level BPE with `</w>` word ends, its merges learned
    here from the same corpus. Vocabulary laid out as CLIP's: the 256 byte symbols, the same with
    `</w>`, the merges, then `<|startoftext|>` and `<|endoftext|>` last, so the EOS has the
    largest id (CLIP's legacy pooling takes the position of the largest id)."""
    pipeline = CLIPTokenizerFast().backend_tokenizer  # CLIP's normaliser and pre-tokeniser
    words = collections.Counter()
    for line in _corpus():
        for piece, _ in pipeline.pre_tokenizer.pre_tokenize_str(pipeline.normalizer.normalize_str(line)):
            words[(*piece[:-1], piece[-1] + END_OF_WORD)] += 1
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(alphabet + [symbol + END_OF_WORD for symbol in alphabet])}
    merges = _learn_merges(words, vocab_size - len(vocab) - len(CLIP_SPECIAL_TOKENS))
    for pair in merges:
        vocab.setdefault("".join(pair), len(vocab))
    for token in CLIP_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return CLIPTokenizerFast(vocab=vocab, merges=merges, model_max_length=77)


def _learn_merges(words: collections.Counter, count: int) -> list[tuple[str, str]]:
    """Up to `count` BPE merges of the symbol sequences `words` (with their frequencies): each time
    the most frequent adjacent pair, ties to the smallest pair, so the result never depends on
    hash order (the `tokenizers` trainer's ties do)."""
    merges = []
    while len(merges) < count:
        pairs = collections.Counter()
        for symbols, frequency in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += frequency
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged = collections.Counter()
        for symbols, frequency in words.items():
            out, index = [], 0
            while index < len(symbols):
                if symbols[index:index + 2] == best:
                    out.append(symbols[index] + symbols[index + 1])
                    index += 2
                else:
                    out.append(symbols[index])
                    index += 1
            merged[tuple(out)] += frequency
        words = merged
    return merges


def tiny_clip_config(vision: CLIPVisionConfig, vocab_size: int) -> CLIPConfig:
    """The tiny CLIP checkpoint's config: the tiny vision tower and a text tower in CLIP
    ViT-L/14-336's proportions (text width 3/4 of the vision width and the projection's width,
    head width equal to the vision tower's, 4x MLP, 77 positions), with the openai configs' token
    ids (`eos_token_id` 2: the legacy pooling the released CDPruner runs with)."""
    text = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=vision.hidden_size * 3 // 4,
        intermediate_size=4 * vision.hidden_size * 3 // 4,
        num_attention_heads=vision.num_attention_heads * 3 // 4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=vision.projection_dim,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=vision.projection_dim)


def tiny_configs(vocab_size: int, llm: str = "vicuna") -> tuple[dict, CLIPVisionConfig]:
    """`config.json` contents (original v1.6 keys) and the tiny CLIP tower's config."""
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=3,
        image_size=336,
        patch_size=14,
        projection_dim=24,  # CLIP-L: 768 = 3/4 of the width, the text tower's width
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
    scores then vary between patches instead of being nearly tied); norms get 1, biases 0;
    scalars (CLIP's logit scale) keep their configured value.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in sorted(model.state_dict().items()):
        if not tensor.is_floating_point() or tensor.ndim == 0:
            continue
        if "norm" in name and name.endswith("weight"):
            tensor.fill_(1.0)
        elif name.endswith("bias"):
            tensor.zero_()
        else:
            fan_in = math.prod(tensor.shape[1:]) if tensor.ndim > 1 else tensor.shape[0]
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * fan_in**-0.5)


def build_tiny_checkpoint(out: str = DEFAULT_OUT, seed: int = 0, llm: str = "vicuna", max_shard_size: str = "500KB") -> str:
    """Write the checkpoint to `out` (sharded safetensors, config, tokenizer, and the CLIP
    checkpoint its tower names); return `out`."""
    if llm not in ("vicuna", "mistral"):
        raise ValueError(f"llm must be 'vicuna' or 'mistral', got {llm!r}")
    tokenizer = build_tokenizer()
    config_dict, vision_config = tiny_configs(len(tokenizer), llm)
    build_tiny_clip(os.path.join(out, TOWER_DIR), vision_config, seed)

    config_class, model_class = ((LlavaConfig, LlavaLlamaForCausalLM) if llm == "vicuna"
                                 else (LlavaMistralConfig, LlavaMistralForCausalLM))
    _save_checkpoint(out, config_class, model_class, config_dict, seed, max_shard_size)
    write_llama_tokenizer(tokenizer, out)
    return out


def _save_checkpoint(out: str, config_class, model_class, config_dict: dict, seed: int, max_shard_size: str) -> None:
    """A seeded random `model_class` of `config_dict` saved to `out`, then the original checkpoints'
    config.json over transformers' (model_type 'llava', LLaVA keys at top level)."""
    config = config_class(**{key: value for key, value in config_dict.items()
                             if key not in ("architectures", "model_type")})
    config._name_or_path = out
    torch.manual_seed(seed)
    model = model_class(config)
    _seeded_init(model, seed)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    with open(os.path.join(out, "config.json"), "w") as handle:
        json.dump(config_dict, handle, indent=2, sort_keys=True)


def build_tiny_clip(out: str, vision_config: CLIPVisionConfig, seed: int = 0) -> str:
    """Write a whole tiny CLIP checkpoint to `out` (the layout of `openai/clip-vit-large-patch14-336`:
    config with both towers, `model.safetensors` of a `CLIPModel`, tokenizer, preprocessor
    config); return `out`. The vision weights here play the role of OpenAI's, which the LLaVA
    checkpoint's own (fine-tuned) tower weights replace; the text side and `visual_projection`
    are what a text-conditioned method loads from it."""
    os.makedirs(out, exist_ok=True)
    tokenizer = build_clip_tokenizer()
    model = CLIPModel(tiny_clip_config(vision_config, len(tokenizer)))
    _seeded_init(model, seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _rewrite_json(os.path.join(out, "tokenizer.json"), portable_tokenizer_json)  # official forks read it (0.15)
    with open(os.path.join(out, "preprocessor_config.json"), "w") as handle:
        json.dump(CLIPImagePreprocessor().to_dict(), handle, indent=2, sort_keys=True)
    return out


def build_qwen_tokenizer(vocab_size: int = 1024) -> Qwen2Tokenizer:
    """A Qwen2-style tokenizer: byte-level BPE over Qwen2's pre-tokeniser (its split pattern, NFC), its
    merges learned here from the corpus (`_learn_merges`, so ties never depend on hash order); the
    vocabulary is the 256 byte symbols, the merges, then `<|endoftext|> <|im_start|> <|im_end|>`.
    As OneVision's tokenizer: no BOS, `<|im_end|>` ends a turn (EOS), `<|endoftext|>` pads."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pipeline = Qwen2Tokenizer(vocab={symbol: index for index, symbol in enumerate(alphabet)}, merges=[])
    pipeline = pipeline.backend_tokenizer
    words = collections.Counter()
    for line in _corpus() + [conversation.conv_templates["qwen_1_5"].system]:
        for piece, _ in pipeline.pre_tokenizer.pre_tokenize_str(pipeline.normalizer.normalize_str(line)):
            words[tuple(piece)] += 1
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    merges = _learn_merges(words, vocab_size - len(vocab) - len(QWEN_SPECIAL_TOKENS))
    for token in ["".join(pair) for pair in merges] + QWEN_SPECIAL_TOKENS:
        vocab.setdefault(token, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", model_max_length=32768, padding_side="right")
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})
    return tokenizer


def onevision_configs(vocab_size: int) -> tuple[dict, SiglipVisionConfig]:
    """`config.json` contents (the keys of `lmms-lab/llava-onevision-qwen2-0.5b-ov`'s, Qwen2's at top
    level) and the tiny SigLIP vision config as published (3 layers: the LLaVA model keeps 2)."""
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
                                image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    language = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "max_window_layers": 2,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "attention_dropout": 0.0,
        "vocab_size": vocab_size,
        "bos_token_id": vocab_size - 3,  # <|endoftext|>, as the original's 151643
        "eos_token_id": vocab_size - 1,  # <|im_end|>
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    multimodal = {
        "image_aspect_ratio": "anyres_max_9",
        "image_crop_resolution": None,
        "image_grid_pinpoints": [list(pinpoint) for pinpoint in ONEVISION_GRID_PINPOINTS],
        "image_split_resolution": None,
        "mm_hidden_size": vision.hidden_size,
        "mm_newline_position": "grid",
        "mm_patch_merge_type": "spatial_unpad",
        "mm_projector_type": "mlp2x_gelu",
        "mm_spatial_pool_mode": "bilinear",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": SIGLIP_TOWER_DIR,
        "tokenizer_model_max_length": 32768,
        "tokenizer_padding_side": "right",
        "use_mm_proj": True,
    }
    identity = {"architectures": ["LlavaQwenForCausalLM"], "model_type": "llava"}
    return {**identity, **language, **multimodal, "torch_dtype": "float32"}, vision


def build_tiny_siglip(out: str, vision_config: SiglipVisionConfig, seed: int = 0) -> str:
    """Write a whole tiny SigLIP checkpoint to `out` (the layout of `google/siglip-so400m-patch14-384`:
    a `SiglipModel` with both towers, the vision side with all its layers and its pooling head,
    and the SigLIP preprocessor config); return `out`. The LLaVA model drops the last layer and the
    head (`siglip_encoder.without_last_layer`); its own tower weights replace these."""
    os.makedirs(out, exist_ok=True)
    text = SiglipTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                            num_hidden_layers=1, max_position_embeddings=16, pad_token_id=1, bos_token_id=62,
                            eos_token_id=63)
    vision = SiglipVisionConfig(**{**vision_config.to_dict(), "vision_use_head": True})
    model = SiglipModel(SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict()))
    _seeded_init(model, seed)
    model.save_pretrained(out)
    with open(os.path.join(out, "preprocessor_config.json"), "w") as handle:
        json.dump(SigLipImagePreprocessor(size=vision.image_size).to_dict(), handle, indent=2, sort_keys=True)
    return out


def build_tiny_onevision_checkpoint(out: str = ONEVISION_OUT, seed: int = 0, max_shard_size: str = "500KB") -> str:
    """Write the tiny OneVision checkpoint to `out` (sharded safetensors, config, Qwen-style
    tokenizer, and the SigLIP checkpoint its tower names); return `out`."""
    tokenizer = build_qwen_tokenizer()
    config_dict, vision_config = onevision_configs(len(tokenizer))
    build_tiny_siglip(os.path.join(out, SIGLIP_TOWER_DIR), vision_config, seed)
    _save_checkpoint(out, LlavaQwenConfig, LlavaQwenForCausalLM, config_dict, seed, max_shard_size)
    write_qwen_tokenizer(tokenizer, out)
    return out


def ensure_tiny_checkpoint(out: str = DEFAULT_OUT) -> str:
    """Build the default tiny checkpoint unless `out` already holds a whole one (one built before its
    CLIP directory held the text tower, or before it had a `tokenizer.model`, is rebuilt)."""
    whole = all(os.path.isfile(os.path.join(out, *parts))
                for parts in [("config.json",), ("tokenizer.model",), (TOWER_DIR, "tokenizer.json")])
    if not whole:
        build_tiny_checkpoint(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help=f"output directory (default: {DEFAULT_OUT}, or {ONEVISION_OUT} for OneVision)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--llm", choices=["vicuna", "mistral"], default="vicuna",
                        help="language model of the LLaVA-NeXT family (default: %(default)s)")
    parser.add_argument("--family", choices=["next", "onevision"], default="next",
                        help="LLaVA-NeXT (CLIP-336, anyres) or LLaVA-OneVision (Qwen2, SigLIP-384, anyres_max_9)")
    args = parser.parse_args(argv)
    if args.family == "onevision":
        out = build_tiny_onevision_checkpoint(args.out or ONEVISION_OUT, seed=args.seed)
        print(f"wrote tiny LLaVA-OneVision checkpoint (qwen2, seed {args.seed}) to {out}")
        return
    out = build_tiny_checkpoint(args.out or DEFAULT_OUT, seed=args.seed, llm=args.llm)
    print(f"wrote tiny LLaVA-NeXT checkpoint ({args.llm}, seed {args.seed}) to {out}")


if __name__ == "__main__":
    main()
