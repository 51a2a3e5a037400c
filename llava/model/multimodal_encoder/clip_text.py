"""The CLIP text tower: what a text-conditioned method needs beyond a LLaVA checkpoint.

A LLaVA checkpoint carries the CLIP vision tower (its `post_layernorm` included) but not CLIP's
text side. `CLIPTextTower` holds the three pieces of a CLIP checkpoint that CDPruner's released
code loads from the vision tower's name (`Theia-4869/CDPruner@9541616`,
`llava/model/multimodal_encoder/clip_encoder.py:38-98`), all in float32 as its loader leaves them
(spec quirk Q7): the tokenizer (`CLIPTokenizerFast`), the text model with its projection
(`CLIPTextModelWithProjection`) and the vision model's `visual_projection`. It computes the
signals of `registry.SIGNALS` whose source is not the vision tower:

- `patch_embeds` (`text_tower`): the vision tower's selected features (layer -2, patches)
  through the tower's own `post_layernorm`, then `.float()`, then `visual_projection`
  `[V, P, E]`, CLIP's image embedding taken at layer -2 instead of CLIP's last layer.
- `instruction_embeds` (`instruction`): the instruction text tokenised without truncation
  (BOS and EOS added), right-padded with id 0 and mask 0 to a multiple of 77 (the text model's
  positions), cut into `M` segments of 77 encoded apart, `text_embeds` `[M, E]` (quirk Q5:
  segments after the first have no BOS, only the last has the EOS, and CLIP's legacy pooling,
  the position of the largest id, picks the largest-id token in the others).

Where the checkpoint comes from (`resolve_text_tower`): `--text-tower PATH`, default the CLIP
the vision tower came from (`mm_vision_tower`), as a local directory (absolute, or relative to
the working directory or the LLaVA checkpoint) or in the local Hugging Face cache; never
downloaded at run time. It is loaded only when a method asks for one of these signals.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn
from transformers import CLIPTextModelWithProjection, CLIPTokenizerFast

from llava.model.multimodal_encoder.clip_encoder import RELEASED_ATTENTION, TOWER_NUMERICS

PROJECTION_KEY = "visual_projection.weight"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class TextTowerNotFound(FileNotFoundError):
    """No CLIP checkpoint with a text tower where one was looked for; the message says where."""


class CLIPTextTower:
    """Tokenizer, text model with projection and visual projection of one CLIP checkpoint, float32.

    Not a module of the LLaVA model (its weights are no part of the LLaVA checkpoint); it lives
    on the device it is moved to (`to`).
    """

    def __init__(self, tokenizer, text_model: CLIPTextModelWithProjection, visual_projection: nn.Linear,
                 location: str):
        self.tokenizer = tokenizer
        self.text_model = text_model
        self.visual_projection = visual_projection
        self.location = location

    @property
    def device(self) -> torch.device:
        return self.visual_projection.weight.device

    @property
    def segment_length(self) -> int:
        """Tokens per text segment: the text model's positions, 77 for CLIP."""
        return self.text_model.config.max_position_embeddings

    def to(self, device) -> CLIPTextTower:
        self.text_model.to(device)
        self.visual_projection.to(device)
        return self

    def set_numerics(self, numerics: str) -> None:
        """Run the text attention as `numerics` says (`clip_encoder.TOWER_NUMERICS`), as the vision tower:
        'released' rounds as transformers 4.37's CLIP (the official CDPruner's), 'sdpa' as transformers'."""
        if numerics not in TOWER_NUMERICS:
            raise ValueError(f"unknown tower numerics {numerics!r}; choose from {', '.join(TOWER_NUMERICS)}")
        self.text_model.set_attn_implementation(RELEASED_ATTENTION if numerics == "released" else "sdpa")

    def segments(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`input_ids` and `attention_mask` `[M, 77]` of `text`: tokenised whole, right-padded
        with id 0 and mask 0 to a multiple of 77, cut into rows (Q5)."""
        encoded = self.tokenizer(text=text, return_tensors="pt")
        length = self.segment_length
        count = (encoded.input_ids.shape[1] - 1) // length + 1
        padding = count * length - encoded.input_ids.shape[1]
        return tuple(torch.cat([values, values.new_zeros(1, padding)], dim=1).view(count, length).to(self.device)
                     for values in (encoded.input_ids, encoded.attention_mask))

    @torch.no_grad()
    def instruction_embeds(self, text: str) -> torch.Tensor:
        """CLIP text embeddings `[M, E]` float32 of `text`, one per 77-token segment."""
        input_ids, attention_mask = self.segments(text)
        return self.text_model(input_ids=input_ids, attention_mask=attention_mask).text_embeds.float()

    @torch.no_grad()
    def patch_embeds(self, features: torch.Tensor, vision_tower) -> torch.Tensor:
        """CLIP image embeddings `[V, P, E]` float32 of the vision tower's selected features
        `features` `[V, P, C]`: its `post_layernorm` (in the tower's dtype), then float32, then
        the visual projection."""
        normed = vision_tower.vision_tower.vision_model.post_layernorm(features)
        return self.visual_projection(normed.float().to(self.device))

    def image_signals(self, names, features: torch.Tensor, vision_tower) -> dict:
        """The signals among `names` computed from the views' features (`patch_embeds`)."""
        return {name: self.patch_embeds(features, vision_tower) for name in names if name == "patch_embeds"}

    def instruction_signals(self, names, text: str) -> dict:
        """The signals among `names` computed from one image's instruction (`instruction_embeds`)."""
        return {name: self.instruction_embeds(text) for name in names if name == "instruction_embeds"}


def is_clip_checkpoint(directory: str) -> bool:
    """Whether `directory` holds a whole CLIP checkpoint: a config with a text part, a tokenizer
    and weights (a vision-only tower directory does not)."""
    config_file = os.path.join(directory, "config.json")
    if not os.path.isfile(config_file):
        return False
    with open(config_file) as handle:
        config = json.load(handle)
    return ("text_config" in config and any(os.path.isfile(os.path.join(directory, name)) for name in TOKENIZER_FILES)
            and any(os.path.isfile(os.path.join(directory, name)) for name in WEIGHT_FILES))


def resolve_text_tower(name: str, model_path: str | None = None, needed_by: str = "this method") -> str:
    """The directory of the CLIP checkpoint `name`: a local directory (as given, or under the LLaVA
    checkpoint `model_path`), else its snapshot in the local Hugging Face cache. Raises
    `TextTowerNotFound` in one line saying what was looked for and how to give one."""
    candidates = [name] + ([os.path.join(model_path, name)] if model_path and not os.path.isabs(name) else [])
    for directory in candidates:
        if os.path.isdir(directory) and is_clip_checkpoint(directory):
            return directory
    cached = _cached_snapshot(name)
    if cached is not None and is_clip_checkpoint(cached):
        return cached
    looked = " and ".join(repr(directory) for directory in candidates)
    raise TextTowerNotFound(
        f"{needed_by} needs a CLIP text tower (text model, visual projection, tokenizer) but none was found: "
        f"looked for a CLIP checkpoint directory at {looked} and for {name!r} in the local Hugging Face cache; "
        "give one with --text-tower PATH (the CLIP the vision tower came from, e.g. a local copy of "
        "openai/clip-vit-large-patch14-336)")


def _cached_snapshot(name: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception:  # not a repository id, or not in the cache
        return None


def visual_projection_weight(directory: str) -> torch.Tensor:
    """`visual_projection.weight` `[E, C]` of a CLIP checkpoint, read alone (not the whole vision model)."""
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index) and not os.path.isfile(single):
        with open(index) as handle:
            single = os.path.join(directory, json.load(handle)["weight_map"].get(PROJECTION_KEY, "model.safetensors"))
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as weights:
            if PROJECTION_KEY in weights.keys():
                return weights.get_tensor(PROJECTION_KEY)
    else:
        weights = torch.load(os.path.join(directory, "pytorch_model.bin"), map_location="cpu", weights_only=True,
                             mmap=True)
        if PROJECTION_KEY in weights:
            return weights[PROJECTION_KEY]
    raise ValueError(f"{directory} has no {PROJECTION_KEY}: the text tower needs a CLIP checkpoint with both towers "
                     "(as openai/clip-vit-large-patch14-336)")


def load_text_tower(directory: str, device=None, vision_width: int | None = None) -> CLIPTextTower:
    """The text tower of the CLIP checkpoint in `directory`, float32 on `device` (Q7).
    `vision_width`: the LLaVA vision tower's width, checked against the visual projection."""
    weight = visual_projection_weight(directory).float()
    if vision_width is not None and weight.shape[1] != vision_width:
        raise ValueError(f"the CLIP checkpoint {directory} projects images of width {weight.shape[1]}, but the vision "
                         f"tower's width is {vision_width}: --text-tower must be the CLIP the vision tower came from")
    text_model = CLIPTextModelWithProjection.from_pretrained(directory, dtype=torch.float32)
    if text_model.config.projection_dim != weight.shape[0]:
        raise ValueError(f"{directory}: the text projection's width {text_model.config.projection_dim} differs from "
                         f"the visual projection's {weight.shape[0]}")
    projection = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.float32)
    with torch.no_grad():
        projection.weight.copy_(weight)
    text_model.eval().requires_grad_(False)
    projection.requires_grad_(False)
    tower = CLIPTextTower(CLIPTokenizerFast.from_pretrained(directory), text_model, projection, directory)
    return tower.to(device) if device is not None else tower
