"""Plain helpers the tests share (importable as `support`: pyproject puts tests/ on the path)."""

import torch
from PIL import Image


def noise_image(size: tuple[int, int], seed: int) -> Image.Image:
    """A seeded RGB image of uniform noise, `size` = PIL (width, height): every AnyRes grid from its size
    alone, and scores with no ties, so kept tokens differ between methods and settings."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())
