"""LLaVA-OneVision's AnyRes geometry (`anyres_max_9`, SigLIP-384: 27x27 tokens per view) and preprocessing.

The reference is LLaVA-VL's code (`mm_utils.py`, `llava_arch.py`'s `spatial_unpad` branch with `anyres_max`);
transformers' `llava_onevision` rounds the unpadding differently, pinned below.
"""

import math
import random
from functools import partial, reduce

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.image_transforms import convert_to_rgb, normalize, rescale, resize, to_channel_dimension_format
from transformers.image_utils import ChannelDimension, PILImageResampling, to_numpy_array
from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image as hf_unpad_image
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from llava.mm_utils import (
    ONEVISION_GRID_PINPOINTS,
    anyres_max_num_patches,
    anyres_visual_token_count,
    downsample_canvas,
    downsampled_canvas_shape,
    get_anyres_image_grid_shape,
    is_anyres,
    onevision_visual_token_count,
    parse_pinpoints,
    process_images,
    resize_and_pad_image,
    select_best_resolution,
    unpadded_bounds,
)
from llava.model.compression.common import crop_geometry

SIDE = 27  # SigLIP so400m-patch14-384: 384 // 14 patches per side
VIEW_TOKENS = SIDE * SIDE  # 729
# image_grid_pinpoints of lmms-lab/llava-onevision-qwen2-{0.5b,7b}-ov's config.json, copied by hand.
CONFIG_PINPOINTS = [
    [384, 384], [384, 768], [384, 1152], [384, 1536], [384, 1920], [384, 2304],
    [768, 384], [768, 768], [768, 1152], [768, 1536], [768, 1920], [768, 2304],
    [1152, 384], [1152, 768], [1152, 1152], [1152, 1536], [1152, 1920], [1152, 2304],
    [1536, 384], [1536, 768], [1536, 1152], [1536, 1536], [1536, 1920], [1536, 2304],
    [1920, 384], [1920, 768], [1920, 1152], [1920, 1536], [1920, 1920], [1920, 2304],
    [2304, 384], [2304, 768], [2304, 1152], [2304, 1536], [2304, 1920], [2304, 2304],
]


# ----------------------------------------------------------------------------------------------
# Pinpoints and the aspect-ratio mode
# ----------------------------------------------------------------------------------------------

def test_pinpoints_are_the_configs_in_its_order():
    assert ONEVISION_GRID_PINPOINTS == [tuple(pair) for pair in CONFIG_PINPOINTS]


def test_grid_range_string_expands_as_the_training_scripts_write_it():
    # LLaVA-VL reads only the first and last grid of the range
    assert parse_pinpoints("(1x1),...,(6x6)", 384) == ONEVISION_GRID_PINPOINTS
    assert parse_pinpoints("(1x1),(2x2),(3x3),(4x4),(5x5),(6x6)", 384) == ONEVISION_GRID_PINPOINTS
    assert parse_pinpoints("(1x2),...,(2x3)", 10) == [(10, 20), (10, 30), (20, 20), (20, 30)]
    assert get_anyres_image_grid_shape((500, 2000), "(1x1),...,(6x6)", 384) == (2, 6)
    with pytest.raises(ValueError, match="crop size"):
        parse_pinpoints("(1x1),...,(6x6)")


@pytest.mark.parametrize("mode, anyres, max_num_patches", [
    ("anyres", True, None), ("anyres_max_9", True, 9), ("anyres_max_12", True, 12),
    ("pad", False, None), (None, False, None), ("anyres_max_", False, None),
])
def test_aspect_ratio_modes(mode, anyres, max_num_patches):
    assert is_anyres(mode) is anyres
    assert anyres_max_num_patches(mode) == max_num_patches


# ----------------------------------------------------------------------------------------------
# Grid selection by hand
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, grid", [
    ((100, 100), (1, 1)),    # every candidate keeps all 10000 px; least waste: 384x384
    ((384, 384), (1, 1)),
    ((385, 384), (2, 1)),    # one pixel too wide for 384: 768x384 is the smallest that keeps every pixel
    ((1000, 1000), (3, 3)),  # 1152x1152 keeps every pixel with least waste
    ((500, 2000), (2, 6)),   # width >= 500 -> 768, height >= 2000 -> 2304
    ((3000, 1000), (6, 2)),  # scale <= 2304/3000 = 0.768 for all: 2304x768 reached by h >= 768, least waste 768
    ((1, 2000), (1, 6)),     # 384x2304: scale 1.152 -> 1x2304 px, capped at 2000; 384x1920 keeps int(0.96) = 0 px
    ((2000, 1), (6, 1)),
    ((769, 1153), (3, 4)),   # width >= 769 -> 1152, height >= 1153 -> 1536
])
def test_grid_by_hand(size, grid):
    assert get_anyres_image_grid_shape(size, ONEVISION_GRID_PINPOINTS, 384) == grid


# ----------------------------------------------------------------------------------------------
# Token counts
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, tokens", [
    ((1, 1), 729 + 27 * 28),       # 1x1 grid, square: the whole 27x27 canvas
    ((700, 500), 729 + 38 * 55),   # 2x2: new_h = int(500 * 54/700) = int(38.57) = 38, pad 8 -> 38 x 54
    ((1, 2000), 729 + 162 * 2),    # 1x6: new_w = int(1 * 162/2000) = 0, pad 13 -> 1 column of 162 rows
    ((2000, 1), 729 + 1 * 163),    # 6x1: one row of 162
    ((2304, 2304), 729 + 81 * 82),  # 6x6: 162x162, times = sqrt(26244/6561) = 2 -> 81x81
    ((5000, 5000), 729 + 81 * 82),
    ((1152, 1152), 729 + 81 * 82),  # 3x3: 81x81 = 9 x 729 exactly, times = 1: unchanged
    # 3x4: canvas 108 x 81; new_w = int(769 * 108/1153) = int(72.03) = 72, pad (81-72)//2 = 4 -> 73 columns;
    # 108*73 = 7884 > 6561 but times = sqrt(7884/6561) = 1.096 <= 1.1: not downsampled
    ((769, 1153), 729 + 108 * 74),
    # 3x5: canvas 135 x 81; new_w = int(769 * 135/1731) = int(59.97) = 59, pad 11 -> 59 columns;
    # 135*59 = 7965, times = sqrt(7965/6561) = 1.1018 > 1.1 -> int(135 // 1.1018) = 122, int(59 // 1.1018) = 53
    ((769, 1731), 729 + 122 * 54),
])
def test_token_count_by_hand(size, tokens):
    assert onevision_visual_token_count(size) == tokens
    assert anyres_visual_token_count(size, ONEVISION_GRID_PINPOINTS, 384, SIDE, 9) == tokens


@pytest.mark.parametrize("canvas, side, max_num_patches, shape", [
    ((162, 162), 27, 9, (81, 81)),
    ((81, 81), 27, 9, (81, 81)),
    ((108, 73), 27, 9, (108, 73)),   # 1.096 x the limit's side: kept
    ((135, 59), 27, 9, (122, 53)),
    ((162, 162), 27, None, (162, 162)),  # plain anyres: never downsampled
    ((8, 8), 2, 4, (4, 4)),          # times = sqrt(64/16) = 2
])
def test_downsampled_canvas_shape(canvas, side, max_num_patches, shape):
    assert downsampled_canvas_shape(*canvas, side, max_num_patches) == shape


def test_downsample_canvas_halving_averages_2x2_blocks():
    # bilinear without corner alignment samples output i at input 2i + 0.5: the mean of rows 2i and 2i+1
    canvas = torch.arange(2 * 8 * 8, dtype=torch.float32).view(2, 8, 8) ** 1.5
    downsampled = downsample_canvas(canvas, side=2, max_num_patches=4)
    assert downsampled.shape == (2, 4, 4)
    torch.testing.assert_close(downsampled, F.avg_pool2d(canvas[None], 2)[0])
    small = torch.ones(3, 4, 5)
    assert downsample_canvas(small, side=2, max_num_patches=9) is small


def reference_token_count(image_size: tuple[int, int], max_num_patches: int = 9) -> int:
    """LLaVA-VL's procedure restated on a feature canvas: transformers' `select_best_resolution` (its own
    implementation, `(height, width)` pairs) for the grid, LLaVA-VL's `unpad_image` slicing, the
    `anyres_max` bilinear resize, then a newline column; the sequence length it sends."""
    width, height = image_size
    best_height, best_width = hf_select_best_resolution((height, width), [[h, w] for w, h in CONFIG_PINPOINTS])
    rows, cols = best_height // 384 * SIDE, best_width // 384 * SIDE
    canvas = torch.zeros(1, rows, cols)
    if width / height > cols / rows:
        padding = (rows - int(height * (cols / width))) // 2
        canvas = canvas[:, padding:rows - padding]
    else:
        padding = (cols - int(width * (rows / height))) // 2
        canvas = canvas[:, :, padding:cols - padding]
    _, h, w = canvas.shape
    times = math.sqrt(h * w / (max_num_patches * SIDE**2))
    if times > 1.1:
        canvas = F.interpolate(canvas[None], [int(h // times), int(w // times)], mode="bilinear")[0]
    with_newlines = torch.cat([canvas, torch.ones(1, canvas.shape[1], 1)], dim=-1)
    return VIEW_TOKENS + with_newlines[0].numel()


def sample_sizes(count: int = 300) -> list[tuple[int, int]]:
    """Seeded sizes: extremes and tiny images, two around every pinpoint (each grid, both sides of the
    downsampling threshold), then uniform and log-uniform sides."""
    rng = random.Random(15)
    sizes = [(1, 2000), (2000, 1), (1, 1), (2, 1), (1, 2), (3, 3), (1, 5000), (5000, 1), (10000, 10000),
             (384, 384), (385, 384), (2304, 2304), (2305, 2304), (769, 1153), (1153, 769), (769, 1731),
             (1731, 769), (369, 820), (14, 3000), (3000, 14)]
    for width, height in CONFIG_PINPOINTS:
        sizes += [(max(1, round(width * rng.uniform(0.75, 1.0))), max(1, round(height * rng.uniform(0.75, 1.0))))
                  for _ in range(2)]
    while len(sizes) < count:
        if len(sizes) % 2:
            sizes.append((rng.randint(1, 3000), rng.randint(1, 3000)))
        else:
            sizes.append(tuple(round(math.exp(rng.uniform(0, math.log(5000)))) for _ in range(2)))
    return sizes


def test_token_count_equals_the_reference_rule_on_300_sizes():
    sizes = sample_sizes()
    assert len(sizes) == 300
    mismatches = [(size, onevision_visual_token_count(size), reference_token_count(size)) for size in sizes
                  if onevision_visual_token_count(size) != reference_token_count(size)]
    assert not mismatches
    # the sample covers every grid, downsampled canvases and canvases above 9 x 729 left as they are
    grids, downsampled, above_but_kept = set(), 0, 0
    for size in sizes:
        grid_w, grid_h = get_anyres_image_grid_shape(size, ONEVISION_GRID_PINPOINTS, 384)
        grids.add((grid_w, grid_h))
        top, bottom, left, right = unpadded_bounds(size, grid_h * SIDE, grid_w * SIDE)
        area = (bottom - top) * (right - left)
        downsampled += area > 1.21 * 9 * VIEW_TOKENS
        above_but_kept += 9 * VIEW_TOKENS < area <= 1.21 * 9 * VIEW_TOKENS
    assert len(grids) == 36 and downsampled >= 20 and above_but_kept >= 3


def test_crop_geometry_holds_the_onevision_canvas():
    # CropGeometry is side- and grid-generic: the 6x6 grid of 27x27 crops, before any downsampling
    geometry = crop_geometry((1, 2000), (1, 6), SIDE)
    assert geometry.bounds == (0, 162, 13, 14) and geometry.valid_counts == [27] * 6
    geometry = crop_geometry((769, 1153), (3, 4), SIDE)
    assert geometry.vanilla_image_tokens == VIEW_TOKENS + 108 * 73
    assert geometry.newline_count("raster") == 108


# ----------------------------------------------------------------------------------------------
# Where transformers' llava_onevision differs
# ----------------------------------------------------------------------------------------------

def hf_processor_token_count(image_size: tuple[int, int]) -> int:
    """transformers' `LlavaOnevisionProcessor._get_number_of_features` for PIL `(w, h)`, on a stand-in
    holding the attributes it reads."""
    width, height = image_size
    stand_in = type("StandIn", (), {})()
    stand_in.image_processor = type("ImageProcessor", (), {"image_grid_pinpoints": CONFIG_PINPOINTS})()
    stand_in.num_image_tokens, stand_in.vision_aspect_ratio = VIEW_TOKENS, "anyres_max_9"
    stand_in._get_unpadded_features = partial(LlavaOnevisionProcessor._get_unpadded_features, stand_in)
    return LlavaOnevisionProcessor._get_number_of_features(stand_in, height, width, 384, 384)


def test_transformers_rounds_the_unpadding_up_where_the_original_truncates():
    # 369x820 -> 1x3 grid, canvas 81 x 27. The image's height on the canvas is 820 * 27/369 = 60 exactly,
    # but in floats 820 * (27/369) = 59.99999999999999: LLaVA-VL truncates to 59 (pad 11, 59 rows);
    # transformers rounds to 7 decimals first: 60 (pad 10, 61 rows).
    assert 820 * (27 / 369) < 60
    assert unpadded_bounds((369, 820), 81, 27) == (11, 70, 0, 27)
    assert onevision_visual_token_count((369, 820)) == 729 + 59 * 28 == reference_token_count((369, 820))
    assert hf_processor_token_count((369, 820)) == 729 + 61 * 28
    assert hf_unpad_image(torch.zeros(1, 81, 27), (820, 369)).shape == (1, 61, 27)  # the model agrees with it
    # the same float in the transposed image (3x1 grid, 27 rows: 59 columns, or 61) and on a 3x3 grid (81 x 81)
    assert onevision_visual_token_count((820, 369)) == 729 + 27 * 60
    assert hf_processor_token_count((820, 369)) == 729 + 27 * 62
    assert onevision_visual_token_count((1107, 820)) == 729 + 59 * 82
    assert hf_processor_token_count((1107, 820)) == 729 + 61 * 82


@pytest.mark.parametrize("size", [(2304, 2304), (769, 1731), (769, 1153), (700, 500), (1, 2000), (2000, 1)])
def test_transformers_agrees_elsewhere_downsampling_included(size):
    assert hf_processor_token_count(size) == onevision_visual_token_count(size)


# ----------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------

class ReferenceSigLipProcessor:
    """LLaVA-VL's `SigLipImageProcessor` steps: `size` a tuple, bicubic resize to 384 x 384, rescale 1/255,
    normalise with mean and std 0.5, channels first (transformers' image transforms, as there)."""

    size = (384, 384)
    crop_size = {"height": 384, "width": 384}
    image_mean = (0.5, 0.5, 0.5)

    def preprocess(self, images, return_tensors):
        steps = [
            convert_to_rgb,
            to_numpy_array,
            partial(resize, size=self.size, resample=PILImageResampling.BICUBIC, data_format=ChannelDimension.FIRST),
            partial(rescale, scale=1 / 255, data_format=ChannelDimension.FIRST),
            partial(normalize, mean=self.image_mean, std=(0.5, 0.5, 0.5), data_format=ChannelDimension.FIRST),
            partial(to_channel_dimension_format, channel_dim=ChannelDimension.FIRST,
                    input_channel_dim=ChannelDimension.FIRST),
        ]
        views = reduce(lambda batch, step: [step(image) for image in batch], steps, list(images))
        return {"pixel_values": torch.from_numpy(np.stack(views))}


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_views_are_the_thumbnail_then_the_padded_crops():
    image = random_image(700, 500)
    config = type("Config", (), {"image_aspect_ratio": "anyres_max_9", "image_grid_pinpoints": CONFIG_PINPOINTS})()
    processor = ReferenceSigLipProcessor()
    views = process_images([image], processor, config)
    assert views.shape == (1, 5, 3, 384, 384)  # 700x500 -> 2x2 grid
    assert torch.equal(views[0, 0], processor.preprocess([image.resize((384, 384))], "pt")["pixel_values"][0])
    canvas = resize_and_pad_image(image, select_best_resolution(image.size, CONFIG_PINPOINTS))
    assert canvas.size == (768, 768)
    bottom_right = processor.preprocess([canvas.crop((384, 384, 768, 768))], "pt")["pixel_values"][0]
    assert torch.equal(views[0, 4], bottom_right)


@pytest.mark.parametrize("size", [(700, 500), (369, 820), (2000, 1)])
def test_views_equal_transformers_onevision_image_processor(size):
    try:
        from transformers import LlavaOnevisionImageProcessorPil as ImageProcessor  # no torchvision needed
    except ImportError:
        from transformers import LlavaOnevisionImageProcessor as ImageProcessor
    image = random_image(*size, seed=size[0])
    hf_processor = ImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3, image_grid_pinpoints=CONFIG_PINPOINTS)
    expected = hf_processor(image, return_tensors="pt")["pixel_values"][0]
    config = type("Config", (), {"image_aspect_ratio": "anyres_max_9", "image_grid_pinpoints": CONFIG_PINPOINTS})()
    views = process_images([image], ReferenceSigLipProcessor(), config)[0]
    assert views.shape == expected.shape
    torch.testing.assert_close(views, expected, rtol=0, atol=0)
