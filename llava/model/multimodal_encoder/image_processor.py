"""CLIP image preprocessing in PIL + numpy (no torchvision, which has no CPU build here).

Same steps and defaults as transformers' `CLIPImageProcessor`: bicubic resize of the shortest
edge, centre crop, rescale by 1/255, normalise with the CLIP mean and std.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from PIL import Image

# Public preprocessing settings of openai/clip-vit-large-patch14-336, so no hub call is needed.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPImagePreprocessor:
    """Duck-types the parts of `CLIPImageProcessor` that LLaVA uses (`preprocess`, `crop_size`, ...)."""

    def __init__(
        self,
        size: int = 336,
        crop_size: int = 336,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        rescale_factor: float = 1 / 255,
        resample: int = Image.Resampling.BICUBIC,
    ):
        self.size = {"shortest_edge": int(size)}
        self.crop_size = {"height": int(crop_size), "width": int(crop_size)}
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.rescale_factor = rescale_factor
        self.resample = resample

    @classmethod
    def from_config_dict(cls, config: dict) -> "CLIPImagePreprocessor":
        """From a `preprocessor_config.json` dictionary."""
        size = config.get("size", 336)
        size = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
        crop = config.get("crop_size", size)
        crop = crop.get("height") if isinstance(crop, dict) else crop
        return cls(
            size=size,
            crop_size=crop,
            image_mean=config.get("image_mean", OPENAI_CLIP_MEAN),
            image_std=config.get("image_std", OPENAI_CLIP_STD),
            rescale_factor=config.get("rescale_factor", 1 / 255),
            resample=config.get("resample", Image.Resampling.BICUBIC),
        )

    @classmethod
    def from_pretrained(cls, directory: str) -> "CLIPImagePreprocessor":
        with open(os.path.join(directory, "preprocessor_config.json")) as handle:
            return cls.from_config_dict(json.load(handle))

    def to_dict(self) -> dict:
        return {
            "crop_size": dict(self.crop_size),
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": self.image_mean,
            "image_processor_type": "CLIPImageProcessor",
            "image_std": self.image_std,
            "resample": int(self.resample),
            "rescale_factor": self.rescale_factor,
            "size": dict(self.size),
        }

    def _one(self, image: Image.Image) -> np.ndarray:
        """`[3, crop, crop]` float32 for one PIL image."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size
        shortest = self.size["shortest_edge"]
        if width <= height:
            new_size = (shortest, int(shortest * height / width))
        else:
            new_size = (int(shortest * width / height), shortest)
        if new_size != image.size:
            image = image.resize(new_size, resample=self.resample)
        crop_h, crop_w = self.crop_size["height"], self.crop_size["width"]
        top, left = (new_size[1] - crop_h) // 2, (new_size[0] - crop_w) // 2
        if (top, left) != (0, 0) or new_size != (crop_w, crop_h):
            image = image.crop((left, top, left + crop_w, top + crop_h))
        # transformers' rounding: rescaled in float64 and cast, then normalised in float32
        pixels = (np.asarray(image) * self.rescale_factor).astype(np.float32)
        pixels = (pixels - np.asarray(self.image_mean, dtype=np.float32)) / np.asarray(self.image_std, dtype=np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def preprocess(self, images, return_tensors: str | None = "pt", **unused) -> dict:
        """`{"pixel_values": [N, 3, crop, crop]}` for one image or a list of images."""
        if isinstance(images, Image.Image):
            images = [images]
        pixel_values = np.stack([self._one(image) for image in images])
        if return_tensors == "pt":
            return {"pixel_values": torch.from_numpy(pixel_values)}
        return {"pixel_values": pixel_values}

    __call__ = preprocess
