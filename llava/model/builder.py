"""`load_pretrained_model`: load an original-layout LLaVA checkpoint (v1.5 / v1.6 / OneVision / the tiny one).

The model class is chosen from `config.json` (`architectures`, else `model_type`), not from the
directory name; a family outside `FAMILIES` is refused before any weight is read. v1.6 checkpoints
carry their own fine-tuned CLIP weights; the tower's architecture comes from constants or a local
directory, so loading needs no network.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
import transformers
from transformers import AutoTokenizer

from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN
from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
from llava.model.language_model.llava_mistral import LlavaMistralConfig, LlavaMistralForCausalLM
from llava.model.language_model.llava_qwen import LlavaQwenConfig, LlavaQwenForCausalLM

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# The language-model families: the architecture name the original config.json writes -> (config class, model
# class). Vicuna and Yi-34B are Llama-shaped; OneVision is Qwen2 (attention biases Llama lacks).
FAMILIES = {
    "LlavaLlamaForCausalLM": (LlavaConfig, LlavaLlamaForCausalLM),
    "LlavaMistralForCausalLM": (LlavaMistralConfig, LlavaMistralForCausalLM),
    "LlavaQwenForCausalLM": (LlavaQwenConfig, LlavaQwenForCausalLM),
}
# For a config.json without `architectures`: its model_type. The bare `llava` of LLaVA-1.5's configs is Llama
# (OneVision's configs also write `llava`, but always name their architecture).
MODEL_TYPES = {"llava": "LlavaLlamaForCausalLM", "llava_llama": "LlavaLlamaForCausalLM",
               "llava_mistral": "LlavaMistralForCausalLM", "llava_qwen": "LlavaQwenForCausalLM"}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class CheckpointError(ValueError):
    """The path is not a loadable LLaVA checkpoint; the message says what is missing."""


def resolve_local_checkpoint(model_path: str) -> str:
    """A local checkpoint directory: `model_path` itself, or its snapshot in the Hugging Face cache."""
    if os.path.isdir(model_path):
        return model_path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model_path, local_files_only=True)
    except Exception:
        raise CheckpointError(
            f"{model_path!r} is not a directory, and no snapshot of it is in the local Hugging Face cache"
        ) from None


def read_llava_config(model_path: str) -> dict:
    """`config.json` of a LLaVA checkpoint, checked for the files a load needs."""
    config_file = os.path.join(model_path, "config.json")
    if not os.path.isfile(config_file):
        raise CheckpointError(f"{model_path} is not a LLaVA checkpoint: it has no config.json")
    try:
        with open(config_file) as handle:
            config = json.load(handle)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file} is not valid JSON: {err}") from None
    is_llava = "mm_vision_tower" in config or any("Llava" in name for name in config.get("architectures") or [])
    if not is_llava:
        raise CheckpointError(
            f"{model_path} is not a LLaVA checkpoint: config.json has no mm_vision_tower "
            f"(architectures: {config.get('architectures')}, model_type: {config.get('model_type')})"
        )
    if not any(os.path.isfile(os.path.join(model_path, name)) for name in WEIGHT_FILES):
        raise CheckpointError(f"{model_path} has no weights: expected one of {', '.join(WEIGHT_FILES)}")
    if not any(os.path.isfile(os.path.join(model_path, name)) for name in TOKENIZER_FILES):
        raise CheckpointError(f"{model_path} has no tokenizer: expected one of {', '.join(TOKENIZER_FILES)}")
    return config


def llava_classes(config: dict):
    """(config class, model class) for a LLaVA `config.json`: its first `architectures` entry, or
    without one its `model_type`, looked up in `FAMILIES`; anything else is a CheckpointError."""
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    name = architectures[0] if architectures else MODEL_TYPES.get(model_type)
    if name not in FAMILIES:
        what = f"architecture {name!r}" if architectures else f"model_type {model_type!r} (no architectures)"
        raise CheckpointError(f"unsupported LLaVA language-model family: {what}; supported architectures: "
                              f"{', '.join(FAMILIES)}")
    return FAMILIES[name]


def load_tokenizer(model_path: str):
    """The tokenizer class named by `tokenizer_config.json` (LlamaTokenizer for v1.6).

    `AutoTokenizer` would go by config.json's `model_type: llava`, which transformers maps to
    its own LLaVA processor; for a sentencepiece-only checkpoint that yields a tokenizer without
    Llama's word-start handling, and different ids.
    """
    config_file = os.path.join(model_path, "tokenizer_config.json")
    class_name = None
    if os.path.isfile(config_file):
        with open(config_file) as handle:
            class_name = json.load(handle).get("tokenizer_class")
    tokenizer_class = getattr(transformers, class_name, None) if class_name else None
    return (tokenizer_class or AutoTokenizer).from_pretrained(model_path)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None) -> str:
    """`device`, or the default, checked against this torch build and machine (a ValueError in one
    line instead of torch's AssertionError deep inside the first `.to`)."""
    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a device (examples: cpu, cuda, cuda:1)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "has no CUDA support" if torch.version.cuda is None else "finds no GPU"
            raise ValueError(f"--device {device}: this torch ({torch.__version__}) {build}; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def default_dtype(device: str | None) -> torch.dtype:
    """fp16 on a GPU, fp32 elsewhere (upstream's choice)."""
    return torch.float16 if str(device or default_device()).startswith("cuda") else torch.float32


def resolve_dtype(torch_dtype: torch.dtype | str | None, device: str | None) -> torch.dtype:
    if isinstance(torch_dtype, str):
        if torch_dtype not in DTYPES:
            raise ValueError(f"unknown dtype {torch_dtype!r}; use one of {', '.join(DTYPES)}")
        return DTYPES[torch_dtype]
    return torch_dtype or default_dtype(device)


def checkpoint_digest(model_path: str) -> str | None:
    """A short hash of what identifies a checkpoint's content without reading its weights:
    `config.json`, plus the weights index of a sharded checkpoint or the safetensors header (tensor
    names, shapes, dtypes, offsets) and size of a single-file one. None if there is no config.json."""
    config_file = os.path.join(model_path, "config.json")
    if not os.path.isfile(config_file):
        return None
    digest = hashlib.sha256()
    with open(config_file, "rb") as handle:
        digest.update(handle.read())
    for name in WEIGHT_FILES:
        path = os.path.join(model_path, name)
        if not os.path.isfile(path):
            continue
        digest.update(f"{name}:{os.path.getsize(path)}".encode())
        with open(path, "rb") as handle:
            if name.endswith(".json"):
                digest.update(handle.read())
            elif name.endswith(".safetensors"):
                header_length = int.from_bytes(handle.read(8), "little")
                digest.update(handle.read(min(header_length, 100 * 2**20)))
    return digest.hexdigest()[:16]


def load_pretrained_model(
    model_path: str,
    model_base: str | None = None,
    model_name: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    device_map: str | dict | None = None,
    device: str | None = None,
    use_flash_attn: bool = False,
    torch_dtype: torch.dtype | str | None = None,
    text_tower: str | None = None,
    **kwargs,
):
    """Load a LLaVA checkpoint; returns `(tokenizer, model, image_processor, context_len)`.

    Upstream's signature; `model_name` is accepted for compatibility but not needed. Defaults:
    the GPU in fp16 when there is one, else the CPU in fp32. `device_map` (e.g. "auto") is
    passed to transformers as is. `text_tower`: the CLIP checkpoint text-conditioned methods
    read (default: the CLIP the vision tower came from); loaded only when a method needs it.
    """
    if model_base is not None:
        raise NotImplementedError("LoRA / projector-only checkpoints (model_base) are not supported; pass a full checkpoint")
    if load_8bit or load_4bit:
        raise NotImplementedError("8-bit / 4-bit loading is not supported")
    model_path = resolve_local_checkpoint(model_path)
    raw_config = read_llava_config(model_path)
    config_class, model_class = llava_classes(raw_config)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(torch_dtype, device)
    if use_flash_attn:
        kwargs["attn_implementation"] = "flash_attention_2"

    # From the dict: original configs say model_type 'llava', which transformers maps to its own class.
    config = config_class.from_dict({key: value for key, value in raw_config.items() if key != "model_type"})
    config._name_or_path = model_path  # the vision tower resolves a relative mm_vision_tower against it
    model, loading_info = model_class.from_pretrained(
        model_path, config=config, dtype=torch_dtype, device_map=device_map, output_loading_info=True, **kwargs
    )
    if device_map is None:
        model.to(device)
    model.eval()

    vision_tower = model.get_vision_tower()
    if any(key.startswith("model.vision_tower.") for key in loading_info["missing_keys"]):
        vision_tower.load_model()  # LLaVA-1.5 style: the tower's weights come from the CLIP checkpoint
    vision_tower.to(device=model.device, dtype=torch_dtype)
    model.set_text_tower(text_tower)

    tokenizer = load_tokenizer(model_path)
    new_tokens = []
    if getattr(config, "mm_use_im_patch_token", True):
        new_tokens.append(DEFAULT_IMAGE_PATCH_TOKEN)
    if getattr(config, "mm_use_im_start_end", False):
        new_tokens += [DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN]
    if new_tokens:
        tokenizer.add_tokens(new_tokens, special_tokens=True)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))

    context_len = getattr(config, "max_sequence_length", 2048)
    return tokenizer, model, vision_tower.image_processor, context_len
