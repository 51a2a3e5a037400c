"""Image geometry, AnyRes preprocessing and prompt tokenisation shared by the model and the runners.

Sizes are PIL's `(width, height)` in pixels unless a name says otherwise; pinpoints are
`(width, height)` pairs, as in LLaVA-NeXT configs. The unpadding arithmetic lives here once
(`unpadded_bounds`) and serves both preprocessing-side accounting and the model's merge step.
"""

from __future__ import annotations

import ast
import math
import os
import re
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile
from transformers import StoppingCriteria

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX


class ImageLoadError(ValueError):
    """An image file is missing or cannot be decoded; the message names the file."""


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB.

    High-bit-depth greyscale (16-bit PNG, 32-bit int, float) is rescaled to 0..255 instead of
    being clipped, which would turn most of a 16-bit image white. Other modes use PIL's
    conversion, which drops alpha exactly as upstream LLaVA's `.convert('RGB')` does.
    """
    if image.mode == "RGB":
        return image
    if _high_bit_depth(image):
        values = np.asarray(image, dtype=np.float64)
        if values.size and values.max() > 255:
            values = values * (255.0 / 65535.0)
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")


def _high_bit_depth(image: Image.Image) -> bool:
    """Modes PIL cannot paste onto an 8-bit canvas faithfully (16/32-bit integer, float)."""
    return image.mode.startswith("I") or image.mode == "F"


def load_image(image_file: str | os.PathLike, question: str | None = None, rgb: bool = True) -> Image.Image:
    """Open an image file, as RGB unless `rgb=False` (upstream's ScienceQA runner keeps the file's
    mode); raise `ImageLoadError` naming the file (and question) on any failure to open or decode
    it, PIL's decompression-bomb guard included."""
    where = f" (question {question})" if question is not None else ""
    path = os.fspath(image_file)
    if path.startswith(("http://", "https://")):
        raise ImageLoadError(f"image {path}{where}: URLs are not fetched; download the file and pass its path")
    loads_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a damaged file is an error here, whatever another library set
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image) if rgb else image
    except FileNotFoundError:
        raise ImageLoadError(f"image file not found: {path}{where}") from None
    except IsADirectoryError:
        raise ImageLoadError(f"image path is a directory, not a file: {path}{where}") from None
    except Image.DecompressionBombError as err:
        raise ImageLoadError(f"image {path}{where} is too large: {err} (raise the limit with --max-image-pixels)") from None
    except Exception as err:  # a decoder can fail in any way on a damaged file
        raise ImageLoadError(f"cannot read image {path}{where}: {type(err).__name__}: {err}") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = loads_truncated


def set_max_image_pixels(limit: int | None) -> None:
    """PIL's decompression-bomb limit for every image opened afterwards (None: no limit)."""
    Image.MAX_IMAGE_PIXELS = limit


# ----------------------------------------------------------------------------------------------
# AnyRes geometry
# ----------------------------------------------------------------------------------------------

# The form LLaVA-VL's training scripts write pinpoints in: `"(1x1),...,(6x6)"`, a range of crop grids.
_GRID_RANGE = re.compile(r"\((\d+)x(\d+)\)")


def grid_range_pinpoints(first: tuple[int, int], last: tuple[int, int], crop_size: int) -> list[tuple[int, int]]:
    """Pinpoints `(width, height)` of every crop grid from `first` to `last` (`(grid_w, grid_h)`, inclusive),
    widths in the outer loop: the order LLaVA-VL expands `"(1x1),...,(6x6)"` in and OneVision's configs list."""
    return [(grid_w * crop_size, grid_h * crop_size)
            for grid_w in range(first[0], last[0] + 1) for grid_h in range(first[1], last[1] + 1)]


def parse_pinpoints(grid_pinpoints, crop_size: int | None = None) -> list[tuple[int, int]]:
    """Config pinpoints as `[(width, height), ...]`: a list, its string form, or LLaVA-VL's grid range
    `"(1x1),...,(6x6)"` (only its first and last grids count, as there), which needs `crop_size`."""
    if isinstance(grid_pinpoints, str) and "x" in grid_pinpoints:
        grids = [(int(w), int(h)) for w, h in _GRID_RANGE.findall(grid_pinpoints)]
        if not grids or crop_size is None:
            raise ValueError(f"grid pinpoints {grid_pinpoints!r}: a range of grids like '(1x1),...,(6x6)' "
                             "needs the crop size (and at least one '(WxH)')")
        return grid_range_pinpoints(grids[0], grids[-1], crop_size)
    if isinstance(grid_pinpoints, str):
        grid_pinpoints = ast.literal_eval(grid_pinpoints)
    return [(int(w), int(h)) for w, h in grid_pinpoints]


# OneVision's pinpoints as `lmms-lab/llava-onevision-qwen2-{0.5b,7b}-ov`'s config.json lists them (each pair is
# `(width, height)` for LLaVA-VL, `(height, width)` for transformers; the list is the same either way).
ONEVISION_GRID_PINPOINTS = grid_range_pinpoints((1, 1), (6, 6), 384)
_ANYRES_MAX = re.compile(r"anyres_max_(\d+)")


def is_anyres(image_aspect_ratio) -> bool:
    """Whether images are split into AnyRes views: `anyres` (LLaVA-NeXT) or `anyres_max_N` (OneVision)."""
    return image_aspect_ratio == "anyres" or anyres_max_num_patches(image_aspect_ratio) is not None


def anyres_max_num_patches(image_aspect_ratio) -> int | None:
    """N of `anyres_max_N` (the crop canvas is downsampled to about N views' tokens), else None."""
    matched = _ANYRES_MAX.fullmatch(image_aspect_ratio) if isinstance(image_aspect_ratio, str) else None
    return int(matched.group(1)) if matched else None


def select_best_resolution(original_size: tuple[int, int], possible_resolutions) -> tuple[int, int]:
    """The pinpoint `(w, h)` that keeps most of the image's pixels, then wastes least canvas.

    Effective pixels = the downscaled image area, capped at the original area (upscaling adds
    none). Exact ties go to the earliest candidate, as upstream.
    """
    original_width, original_height = original_size
    best, best_key = None, None
    for width, height in parse_pinpoints(possible_resolutions):
        scale = min(width / original_width, height / original_height)
        downscaled = int(original_width * scale) * int(original_height * scale)
        effective = min(downscaled, original_width * original_height)
        key = (effective, -(width * height - effective))
        if best_key is None or key > best_key:
            best, best_key = (width, height), key
    return best


def get_anyres_image_grid_shape(image_size: tuple[int, int], grid_pinpoints, patch_size: int) -> tuple[int, int]:
    """Crop grid `(num_patch_width, num_patch_height)` for an image of PIL size `(w, h)`; `patch_size` is
    the crop's side in pixels (the tower's image size)."""
    width, height = select_best_resolution(image_size, parse_pinpoints(grid_pinpoints, patch_size))
    return width // patch_size, height // patch_size


def unpadded_bounds(image_size: tuple[int, int], canvas_height: int, canvas_width: int) -> tuple[int, int, int, int]:
    """Rows `[top, bottom)` and columns `[left, right)` of a canvas that hold image, not padding.

    The canvas is the crop grid's feature map (in patches); the image was letterboxed into it by
    `resize_and_pad_image`. Upstream's arithmetic: truncate the scaled side, floor-halve the
    padding, and remove the same amount from both ends (an odd total leaves one extra line).
    """
    original_width, original_height = image_size
    if original_width / original_height > canvas_width / canvas_height:
        new_height = int(original_height * (canvas_width / original_width))
        padding = (canvas_height - new_height) // 2
        return padding, canvas_height - padding, 0, canvas_width
    new_width = int(original_width * (canvas_height / original_height))
    padding = (canvas_width - new_width) // 2
    return 0, canvas_height, padding, canvas_width - padding


def unpad_image(tensor: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """Remove letterbox padding from a `[C, H, W]` feature map; `original_size` is PIL `(w, h)`."""
    top, bottom, left, right = unpadded_bounds(original_size, tensor.shape[1], tensor.shape[2])
    return tensor[:, top:bottom, left:right]


def downsampled_canvas_shape(rows: int, cols: int, side: int, max_num_patches: int | None) -> tuple[int, int]:
    """`(rows, cols)` of the unpadded crop canvas after `anyres_max_N`'s bilinear downsampling.

    LLaVA-VL's rule (`llava_arch`, `spatial_unpad` with `anyres_max_N`): `times = sqrt(rows * cols /
    (N * side**2))`; only when `times > 1.1` is the canvas resized to `(int(rows // times), int(cols //
    times))` (float floor division, as there). So a canvas of up to 1.21 N views' tokens goes unchanged.
    `max_num_patches` None (plain `anyres`): never downsampled.
    """
    if max_num_patches is None:
        return rows, cols
    times = math.sqrt(rows * cols / (max_num_patches * side**2))
    if times > 1.1:
        return int(rows // times), int(cols // times)
    return rows, cols


def downsample_canvas(canvas: torch.Tensor, side: int, max_num_patches: int | None) -> torch.Tensor:
    """The unpadded crop canvas `[D, H, W]` as `anyres_max_N` sends it: bilinearly resized (no corner
    alignment, as `F.interpolate`'s default) to `downsampled_canvas_shape`, or itself when small enough."""
    shape = downsampled_canvas_shape(canvas.shape[1], canvas.shape[2], side, max_num_patches)
    if shape == tuple(canvas.shape[1:]):
        return canvas
    return torch.nn.functional.interpolate(canvas[None], size=shape, mode="bilinear")[0]


def anyres_canvas_shape(image_size: tuple[int, int], grid_pinpoints, crop_size: int, side: int,
                        max_num_patches: int | None = None) -> tuple[int, int]:
    """`(rows, cols)` of the crop canvas the LLM receives (newlines excluded) for an image of PIL size
    `(w, h)`: the grid's canvas, unpadded, then downsampled under `anyres_max_N` (`max_num_patches`)."""
    grid_width, grid_height = get_anyres_image_grid_shape(image_size, grid_pinpoints, crop_size)
    top, bottom, left, right = unpadded_bounds(image_size, grid_height * side, grid_width * side)
    return downsampled_canvas_shape(bottom - top, right - left, side, max_num_patches)


def anyres_visual_token_count(image_size: tuple[int, int], grid_pinpoints, crop_size: int = 336, side: int = 24,
                              max_num_patches: int | None = None) -> int:
    """Upstream's visual token count for one image (`spatial_unpad`, no compression).

    `side*side` thumbnail tokens plus the unpadded (under `anyres_max_N`, possibly downsampled) crop
    canvas with one newline per row.
    Example (LLaVA-NeXT): 800x500 -> 2x2 grid -> 30 rows x 48 columns -> 576 + 30*49 = 2046.
    """
    rows, cols = anyres_canvas_shape(image_size, grid_pinpoints, crop_size, side, max_num_patches)
    return side * side + rows * (cols + 1)


def onevision_visual_token_count(image_size: tuple[int, int], grid_pinpoints=ONEVISION_GRID_PINPOINTS,
                                 max_num_patches: int = 9) -> int:
    """LLaVA-OneVision's visual token count (SigLIP-384: 27x27 per view, `anyres_max_9`) for PIL `(w, h)`.
    Example: 2304x2304 -> 6x6 grid -> 162x162 canvas, times 2 -> 81x81 -> 729 + 81*82 = 7371."""
    return anyres_visual_token_count(image_size, grid_pinpoints, 384, 27, max_num_patches)


# ----------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------

def resize_and_pad_image(image: Image.Image, target_resolution: tuple[int, int]) -> Image.Image:
    """Fit `image` inside `target_resolution` `(w, h)` keeping its aspect, centred on black."""
    original_width, original_height = image.size
    target_width, target_height = target_resolution
    scale_w = target_width / original_width
    scale_h = target_height / original_height
    if scale_w < scale_h:
        new_width, new_height = target_width, min(math.ceil(original_height * scale_w), target_height)
    else:
        new_width, new_height = min(math.ceil(original_width * scale_h), target_width), target_height
    canvas = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    canvas.paste(image.resize((new_width, new_height)), ((target_width - new_width) // 2, (target_height - new_height) // 2))
    return canvas


def divide_to_patches(image: Image.Image, patch_size: int) -> list[Image.Image]:
    """Square crops of `patch_size` px, row-major (top row left to right, then the next row)."""
    width, height = image.size
    return [
        image.crop((left, top, left + patch_size, top + patch_size))
        for top in range(0, height, patch_size)
        for left in range(0, width, patch_size)
    ]


def expand2square(image: Image.Image, background_color: tuple[int, ...]) -> Image.Image:
    """Pad to a square with `background_color`, image centred (LLaVA-1.5's `pad` aspect mode)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background_color)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def process_anyres_image(image: Image.Image, processor, grid_pinpoints) -> torch.Tensor:
    """AnyRes views `[1 + n_crops, 3, S, S]`: the squashed thumbnail first, then the crops row-major.

    The thumbnail's side is the processor's `size`: its `shortest_edge` (CLIP), else its smaller side
    (LLaVA-VL's SigLIP processor has `size=(384, 384)`; transformers' `{"height", "width"}`).
    """
    crop_size = processor.crop_size["height"]
    best_resolution = select_best_resolution(image.size, parse_pinpoints(grid_pinpoints, crop_size))
    crops = divide_to_patches(resize_and_pad_image(image, best_resolution), crop_size)
    size = processor.size
    if isinstance(size, dict):
        shortest_edge = size["shortest_edge"] if "shortest_edge" in size else min(size["height"], size["width"])
    else:
        shortest_edge = min(size)
    thumbnail = image.resize((shortest_edge, shortest_edge))
    return processor.preprocess([thumbnail, *crops], return_tensors="pt")["pixel_values"]


def process_images(images: Sequence[Image.Image], image_processor, model_cfg):
    """Pixel values for a list of PIL images, following `model_cfg.image_aspect_ratio`.

    `anyres` and `anyres_max_N` give one `[1 + n_crops, 3, S, S]` tensor per image (stacked into a
    5-D tensor when all images have the same number of views, else returned as a list, as upstream);
    `pad` and anything else give `[N, 3, S, S]`.
    """
    image_aspect_ratio = getattr(model_cfg, "image_aspect_ratio", None)
    # Other modes go through as upstream passes them: PIL resizes palette images with nearest
    # neighbour and RGBA premultiplied, and the processor converts to RGB afterwards.
    images = [to_rgb(image) if _high_bit_depth(image) else image for image in images]
    if is_anyres(image_aspect_ratio):
        new_images = [process_anyres_image(image, image_processor, model_cfg.image_grid_pinpoints) for image in images]
    elif image_aspect_ratio == "pad":
        background = tuple(int(x * 255) for x in image_processor.image_mean)
        new_images = [
            image_processor.preprocess(expand2square(to_rgb(image), background), return_tensors="pt")["pixel_values"][0]
            for image in images
        ]
    else:
        return image_processor.preprocess(images, return_tensors="pt")["pixel_values"]
    if len(new_images) == 1:  # no copy (stacking one preprocessed image costs milliseconds)
        return new_images[0].unsqueeze(0)
    if all(x.shape == new_images[0].shape for x in new_images):
        return torch.stack(new_images, dim=0)
    return new_images


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------

def tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = IMAGE_TOKEN_INDEX, return_tensors=None):
    """Token ids of a rendered prompt with one `image_token_index` per `<image>`.

    Each text piece between `<image>` markers is tokenised on its own, as upstream does: the
    tokenizer adds BOS to every piece, and only the first piece's BOS is kept. Tokenising the
    pieces separately also reproduces the word-start marker the tokenizer puts at the start of
    each later piece (for Llama, a lone `▁` before a leading newline).
    """
    pieces = [tokenizer(piece).input_ids for piece in prompt.split(DEFAULT_IMAGE_TOKEN)]
    bos = tokenizer.bos_token_id
    starts_with_bos = bos is not None and len(pieces[0]) > 0 and pieces[0][0] == bos
    input_ids = list(pieces[0])
    for piece in pieces[1:]:
        input_ids.append(image_token_index)
        input_ids.extend(piece[1:] if starts_with_bos else piece)
    if return_tensors == "pt":
        return torch.tensor(input_ids, dtype=torch.long)
    if return_tensors is not None:
        raise ValueError(f"unsupported tensor type: {return_tensors}")
    return input_ids


def get_model_name_from_path(model_path: str) -> str:
    """Last path component; `parent_checkpoint-N` for trainer checkpoint folders (upstream rule)."""
    parts = model_path.strip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return parts[-2] + "_" + parts[-1]
    return parts[-1]


class KeywordsStoppingCriteria(StoppingCriteria):
    """Stop a sequence once its generated text ends with (or its tail contains) one of `keywords`.

    Checks the keyword's token ids against the tail first, then the decoded tail text, which
    catches keywords the tokenizer splits differently in context. Only the tail is looked at, so
    it works whether the ids passed in hold the prompt or (with `generate(inputs_embeds=...)`)
    only the new tokens. `input_ids` is accepted for upstream compatibility. One flag per row.
    """

    def __init__(self, keywords: Iterable[str], tokenizer, input_ids: torch.Tensor | None = None):
        self.keywords = list(keywords)
        self.tokenizer = tokenizer
        self.keyword_ids = []
        for keyword in self.keywords:
            ids = tokenizer(keyword).input_ids
            if len(ids) > 1 and ids[0] == tokenizer.bos_token_id:
                ids = ids[1:]
            self.keyword_ids.append(torch.tensor(ids, dtype=torch.long))
        self.tail_length = max((len(ids) for ids in self.keyword_ids), default=1) + 3

    def _row_stops(self, row: torch.Tensor) -> bool:
        row = row.cpu()
        if any(len(row) >= len(ids) and torch.equal(row[-len(ids):], ids) for ids in self.keyword_ids):
            return True
        tail = self.tokenizer.decode(row[-self.tail_length:], skip_special_tokens=True)
        return any(keyword in tail for keyword in self.keywords)

    def __call__(self, output_ids: torch.Tensor, scores: torch.Tensor | None = None, **kwargs) -> torch.BoolTensor:
        flags = [self._row_stops(row) for row in output_ids]
        return torch.tensor(flags, dtype=torch.bool, device=output_ids.device)
