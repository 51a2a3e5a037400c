"""SigLIP vision tower of LLaVA-OneVision: patch features and the [CLS]-free signals.

As the LLaVA-OneVision (LLaVA-VL/LLaVA-NeXT) code builds `google/siglip-so400m-patch14-384`:
transformers' SigLIP vision model with its LAST encoder layer removed (26 of 27 kept) and no
pooling head; the features are the last kept layer's output (no `post_layernorm`, which stays in
the module because the checkpoints hold it), 27 x 27 = 729 tokens per 384-px view, no [CLS].
`mm_vision_select_layer` is ignored, as there. Weight names as the OneVision checkpoints hold
them: `model.vision_tower.vision_tower.vision_model.{embeddings,encoder.layers.0-25,post_layernorm}.*`.

Signals (`llava.model.compression.registry.SIGNALS`), computed only when named, SDPA kept:

- `neg_cos_mean`: `-cos(x_i, g)` of each feature against its view's mean feature.
- `neg_attn`: minus the mean attention each patch receives in the last kept layer, over all
  queries and heads, from that layer's input in query blocks (never the full maps).

Preprocessing (`SigLipImagePreprocessor`) as that code's own processor: bicubic resize of the whole
image to 384 x 384 (no aspect-preserving resize, no centre crop), rescale by 1/255, mean and std 0.5.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from llava.model.multimodal_encoder.clip_encoder import (NEG_COS_MEAN, VisionTowerBase, VisionTowerOutput,
                                                         _local_tower_dir, negative_cosine_to_mean,
                                                         negative_received_attention)
from llava.model.multimodal_encoder.image_processor import CLIPImagePreprocessor

SIGLIP_MODEL_TYPES = ("siglip", "siglip_vision_model")
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
NEG_ATTN = "neg_attn"
OFFERED_SIGNALS = frozenset({NEG_COS_MEAN, NEG_ATTN})

# Public architecture of google/siglip-so400m-patch14-384's vision side (27 layers before the
# last is removed). OneVision checkpoints carry their tower weights, so no hub access is needed.
KNOWN_SIGLIP_TOWERS = {
    "google/siglip-so400m-patch14-384": dict(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        num_channels=3,
    ),
}


class SigLipImagePreprocessor(CLIPImagePreprocessor):
    """LLaVA-OneVision's SigLIP preprocessing: the image squashed to `size x size` (bicubic), then
    CLIP's rescale and normalisation steps with SigLIP's mean and std. `size` stays
    `{"shortest_edge": size}` for AnyRes (the original takes `min(size)` there: the same number)."""

    def __init__(self, size: int = 384, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD, rescale_factor: float = 1 / 255,
                 resample: int = Image.Resampling.BICUBIC):
        super().__init__(size=size, crop_size=size, image_mean=image_mean, image_std=image_std,
                         rescale_factor=rescale_factor, resample=resample)

    def to_dict(self) -> dict:
        side = self.crop_size["height"]
        return {
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": self.image_mean,
            "image_processor_type": "SiglipImageProcessor",
            "image_std": self.image_std,
            "resample": int(self.resample),
            "rescale_factor": self.rescale_factor,
            "size": {"height": side, "width": side},
        }

    def _one(self, image: Image.Image) -> np.ndarray:
        """`[3, size, size]` float32: resized to the square without keeping the aspect ratio, so the
        parent's shortest-edge resize and centre crop have nothing left to do."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        square = (self.crop_size["width"], self.crop_size["height"])
        if image.size != square:
            image = image.resize(square, resample=self.resample)
        return super()._one(image)


def resolve_siglip_tower(name: str, model_path: str | None = None) -> tuple[SiglipVisionConfig, str]:
    """The full SigLIP vision config (all its layers, as published) and weight location of the tower
    `mm_vision_tower` names. Order: a local directory (a `SiglipModel` or `SiglipVisionModel`
    checkpoint); a known id (built from constants, no network); else the local Hugging Face cache.
    Raises `FileNotFoundError` saying what was tried."""
    local_dir = _local_tower_dir(name, model_path)
    if local_dir is not None:
        return SiglipVisionConfig.from_pretrained(local_dir), local_dir
    if name in KNOWN_SIGLIP_TOWERS:
        return SiglipVisionConfig(**KNOWN_SIGLIP_TOWERS[name]), name
    try:
        return SiglipVisionConfig.from_pretrained(name, local_files_only=True), name
    except OSError:
        raise FileNotFoundError(
            f"vision tower {name!r} (mm_vision_tower) is neither a local SigLIP directory, nor a known "
            f"SigLIP id ({', '.join(KNOWN_SIGLIP_TOWERS)}), nor in the local Hugging Face cache"
        ) from None


def without_last_layer(config: SiglipVisionConfig) -> SiglipVisionConfig:
    """The tower's config: one encoder layer fewer than published and no pooling head."""
    trimmed = copy.deepcopy(config)
    trimmed.num_hidden_layers = config.num_hidden_layers - 1
    trimmed.vision_use_head = False
    return trimmed


class SigLipVisionHolder(nn.Module):
    """Keeps the SigLIP model under `vision_model`, the name in the original checkpoints (the
    LLaVA-VL code's own `SigLipVisionModel` has that level; transformers 5's has not)."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.vision_model = SiglipVisionModel(config)


class SigLipVisionTower(VisionTowerBase):
    """LLaVA-OneVision's tower module, with `CLIPVisionTower`'s interface (`forward` returns a
    `VisionTowerOutput`), so the LLaVA model calls either.

    Built from the config, not loaded: the OneVision checkpoint's own tower weights
    (`model.vision_tower.vision_tower.*`) fill it inside `from_pretrained`; `load_model()` takes
    them from the SigLIP checkpoint instead (its last layer and head left out).
    """

    def __init__(self, vision_tower: str, args=None, model_path: str | None = None):
        super().__init__()
        self.vision_tower_name = vision_tower
        published_config, self.weights_location = resolve_siglip_tower(vision_tower, model_path)
        self.image_processor = SigLipImagePreprocessor(size=published_config.image_size)
        self.vision_tower = SigLipVisionHolder(without_last_layer(published_config))
        self.vision_tower.requires_grad_(False)

    kind = "SigLIP (no [CLS])"
    offered_signals = OFFERED_SIGNALS

    def set_numerics(self, numerics: str) -> None:
        """Only 'sdpa': the released numerics reproduce the released GlobalCom2 code's CLIP attention."""
        if numerics != "sdpa":
            raise ValueError(f"tower numerics {numerics!r} is for CLIP towers; this model's is SigLIP")

    @property
    def numerics(self) -> str:
        return "sdpa"

    def load_model(self) -> None:
        """Replace the tower's weights with the SigLIP checkpoint's (for checkpoints without them);
        the checkpoint's last layer, pooling head (and text side) are not loaded."""
        loaded = SiglipVisionModel.from_pretrained(self.weights_location, config=self.config, dtype=self.dtype)
        self.vision_tower.vision_model.load_state_dict(loaded.state_dict())
        self.vision_tower.requires_grad_(False)

    def forward(self, images: torch.Tensor, signals=frozenset()) -> VisionTowerOutput:
        """`images` `[V, 3, S, S]` -> features `[V, P, C]` (P = (S // 14)^2, 729 at 384 px), the last
        kept layer's output, and the named `signals` (`OFFERED_SIGNALS`), each `[V, P]` float32."""
        unknown = set(signals) - OFFERED_SIGNALS
        if unknown:
            raise ValueError(f"the SigLIP tower (no [CLS]) cannot compute {sorted(unknown)}; "
                             f"it offers {sorted(OFFERED_SIGNALS)}")
        vision_model = self.vision_tower.vision_model
        *earlier_layers, last_layer = vision_model.encoder.layers
        hidden = vision_model.embeddings(images.to(device=self.device, dtype=self.dtype))
        for layer in earlier_layers:
            hidden = layer(hidden, None)
        last_input = hidden
        features = last_layer(last_input, None)
        computed = {}
        if NEG_COS_MEAN in signals:
            computed[NEG_COS_MEAN] = negative_cosine_to_mean(features)
        if NEG_ATTN in signals:
            computed[NEG_ATTN] = negative_received_attention(last_layer, last_input, first_patch=0)
        return VisionTowerOutput(features, computed)
