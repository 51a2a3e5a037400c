"""CLIP preprocessing (`llava.model.multimodal_encoder.image_processor`) against transformers'."""

import numpy as np
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from llava.model.multimodal_encoder.image_processor import CLIPImagePreprocessor


def test_preprocessing_equals_transformers_clip_image_processor_bit_for_bit():
    """Rescaled in float64, cast, normalised in float32, as transformers' processor (and the released
    code's 4.37 one) rounds: the same bits, not merely close, on sizes that resize and crop either way;
    channels-first in memory too."""
    reference = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    generator = np.random.RandomState(0)
    for height, width in [(336, 336), (500, 800), (400, 300), (1000, 20)]:
        image = Image.fromarray(generator.randint(0, 256, (height, width, 3), dtype=np.uint8))
        ours = CLIPImagePreprocessor().preprocess(image)["pixel_values"]
        assert torch.equal(ours, reference.preprocess(image, return_tensors="pt")["pixel_values"])
        assert ours.is_contiguous()
