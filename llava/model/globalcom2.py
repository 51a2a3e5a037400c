"""GlobalCom2: the thumbnail commands the compression of LLaVA-NeXT's AnyRes crops.

Pure tensor functions, no model state. For one image with a thumbnail and `C = grid_w * grid_h`
crops, each `side x side` patches (`P = side**2`, 576 for CLIP-336):

1. `compress_thumbnail`: keep the `int(P * R)` thumbnail patches with the highest [CLS] scores.
2. `generate_scale_for_crop_features`: give each crop a retention ratio, a softmax (temperature
   10) over the thumbnail's score mass in that crop's share of the thumbnail.
3. `interpolate_and_split_cls_attn_scores`: resize the thumbnail's scores to the unpadded crop
   canvas and cut out each crop's part (the "global" scores).
4. `select_crop_tokens`: per crop, keep the `int(N_c * ratio_c)` tokens with the highest
   L2-normalised own [CLS] scores plus L2-normalised global scores.
5. `arrange_tokens`: lay the kept tokens out for the language model, `official` (the released
   code's sequence) or `spatial` (true raster order).

Selection follows the released code exactly, quirks included (see
`shared/spec/globalcom2-official-behaviour.md`); only the layout may differ. `R = 1` keeps
everything and gives LLaVA-NeXT's own sequence. Steps 2-4 use the released names and arguments.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F

from llava.mm_utils import unpadded_bounds

LAYOUTS = ("official", "spatial")
TEMPERATURE = 10.0


def check_retention_ratio(retention_ratio) -> float:
    """Return `retention_ratio` as a float if it is a number in (0, 1]; else raise `ValueError`."""
    if isinstance(retention_ratio, bool) or not isinstance(retention_ratio, numbers.Real):
        raise ValueError(f"retention_ratio must be a number in (0, 1], got {retention_ratio!r}")
    ratio = float(retention_ratio)
    if math.isnan(ratio) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"retention_ratio must be in (0, 1] (1 keeps every token), got {retention_ratio!r}")
    return ratio


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"token layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return layout


@dataclasses.dataclass(frozen=True)
class CropGeometry:
    """Where the image lies in the crop canvas (`grid_h*side` rows by `grid_w*side` columns).

    `bounds`: rows `[top, bottom)` and columns `[left, right)` of the canvas that hold image.
    `crop_boxes[c]`: `(top, left, height, width)` of that area inside crop `c` (row-major),
    crop-local, in patches; `(0, 0, 0, 0)` for a crop that is all padding.
    """

    side: int
    grid: tuple[int, int]  # (grid_w, grid_h)
    bounds: tuple[int, int, int, int]
    crop_boxes: tuple[tuple[int, int, int, int], ...]
    unpad: bool

    @property
    def valid_counts(self) -> list[int]:
        return [height * width for _, _, height, width in self.crop_boxes]

    @property
    def crop_dimensions(self) -> list[tuple[int, int]]:
        """`(width, height)` of each crop's image area, the released code's `crop_dimensions`."""
        return [(width, height) for _, _, height, width in self.crop_boxes]

    def newline_rows(self, layout: str) -> range:
        """Canvas rows that end with an `image_newline`: every row (`official`), the image rows
        (`spatial`, as LLaVA-NeXT), or none without unpadding."""
        if not self.unpad:
            return range(0)
        if layout == "official":
            return range(self.grid[1] * self.side)
        top, bottom, _, _ = self.bounds
        return range(top, bottom)


def crop_geometry(image_size: tuple[int, int], grid: tuple[int, int], side: int, unpad: bool = True) -> CropGeometry:
    """Geometry of an image of PIL size `(width, height)` on a `(grid_w, grid_h)` crop grid.

    With `unpad` the letterbox padding is located as LLaVA-NeXT's `unpad_image` does; without
    it (merge type `spatial`) the whole canvas counts as image.
    """
    grid_w, grid_h = grid
    if unpad:
        top, bottom, left, right = unpadded_bounds(image_size, grid_h * side, grid_w * side)
    else:
        top, bottom, left, right = 0, grid_h * side, 0, grid_w * side
    boxes = []
    for row in range(grid_h):
        for col in range(grid_w):
            box_top, box_left = max(top - row * side, 0), max(left - col * side, 0)
            height = max(min(bottom - row * side, side) - box_top, 0)
            width = max(min(right - col * side, side) - box_left, 0)
            boxes.append((box_top, box_left, height, width) if height and width else (0, 0, 0, 0))
    return CropGeometry(side, (grid_w, grid_h), (top, bottom, left, right), tuple(boxes), unpad)


def compress_thumbnail(thumbnail_scores: torch.Tensor, retention_ratio: float) -> torch.Tensor:
    """Indices `[int(P * R)]` of the highest-scoring thumbnail patches, best first.

    `thumbnail_scores`: `[P]`. `argsort` on the 1-D scores, as the released code calls it, so
    ties fall the same way on the same backend.
    """
    keep = int(thumbnail_scores.shape[0] * retention_ratio)
    return torch.argsort(thumbnail_scores, descending=True)[:keep]


def generate_scale_for_crop_features(base_cls_attn_scores: torch.Tensor, num_patch_width: int, num_patch_height: int,
                                     base_scale: float, temperature: float = TEMPERATURE) -> list[float]:
    """Retention ratio of each crop (row-major), from the thumbnail's scores `[P]`.

    The thumbnail is split into an equal `num_patch_height x num_patch_width` partition (the
    last block takes the remainder; padding is ignored, as released). With `S_k` the score sum
    of block k (float64) and `s = softmax(S / temperature)` (plus 1e-8 in the denominator):
    `ratio_k = min(base_scale * (1 + s_k - mean(s)), 1)`. The ratios average `base_scale`
    before the clip. One host transfer of the C sums; the rest is numpy, as released.
    """
    side = math.isqrt(base_cls_attn_scores.shape[0])
    block_h, block_w = max(side // num_patch_height, 1), max(side // num_patch_width, 1)
    positions = torch.arange(side, device=base_cls_attn_scores.device)
    block_rows = (positions // block_h).clamp(max=num_patch_height - 1)
    block_cols = (positions // block_w).clamp(max=num_patch_width - 1)
    block_of_patch = (block_rows[:, None] * num_patch_width + block_cols[None, :]).flatten()  # [P]
    sums = torch.zeros(num_patch_width * num_patch_height, dtype=torch.float64, device=base_cls_attn_scores.device)
    sums = np.array(sums.index_add_(0, block_of_patch, base_cls_attn_scores.double()).tolist())
    if not np.isfinite(sums).all():
        raise ValueError("the thumbnail's [CLS] scores contain NaN or inf")
    exp_scores = np.exp((sums - np.max(sums)) / temperature)
    softmax_scores = exp_scores / (np.sum(exp_scores) + 1e-8)
    return np.clip(base_scale * (1 + softmax_scores - np.mean(softmax_scores)), None, 1.0).tolist()


def interpolate_and_split_cls_attn_scores(base_cls_attn_scores: torch.Tensor, cur_width: int, cur_height: int,
                                          num_patch_width: int, num_patch_height: int,
                                          crop_dimensions: list[tuple[int, int]]) -> list[torch.Tensor]:
    """The thumbnail's scores `[P]` resized (bilinear) to the unpadded canvas `cur_height x
    cur_width`, cut into one flat `[w_c * h_c]` piece per crop (row-major, raster inside).

    `crop_dimensions[c] = (w_c, h_c)`. Column offsets advance by each crop's width; the row
    offset advances by the height of each grid row's *first* crop, as released (quirk Q9).
    """
    side = math.isqrt(base_cls_attn_scores.shape[0])
    if cur_width == 0 or cur_height == 0:
        return [base_cls_attn_scores.new_empty(0) for _ in crop_dimensions]
    resized = F.interpolate(base_cls_attn_scores.view(1, 1, side, side), size=(cur_height, cur_width),
                            mode="bilinear", align_corners=False)[0, 0]
    pieces, row_offset = [], 0
    for row in range(num_patch_height):
        col_offset = 0
        for col in range(num_patch_width):
            width, height = crop_dimensions[row * num_patch_width + col]
            pieces.append(resized[row_offset:row_offset + height, col_offset:col_offset + width].flatten())
            col_offset += width
        row_offset += crop_dimensions[row * num_patch_width][1]
    return pieces


def select_crop_tokens(crop_scores: torch.Tensor, global_scores: list[torch.Tensor], geometry: CropGeometry,
                       crop_ratios: list[float]) -> tuple[torch.Tensor, list[int]]:
    """Keep mask `[C, P]` of crop tokens at their real positions, and the kept count per crop.

    `crop_scores`: `[C, P]` each crop's own [CLS] scores; `global_scores[c]`: `[N_c]` from
    `interpolate_and_split_cls_attn_scores`. Crop c keeps `int(N_c * ratio_c)` of its `N_c`
    image tokens, those with the largest `l/|l| + g/|g|` over its packed (raster, image-only)
    scores. Norms and `topk` run on 1-D tensors of exactly `N_c`, as released, so results
    (ties included) match it bit for bit on the same backend.
    """
    side = geometry.side
    keep = torch.zeros_like(crop_scores, dtype=torch.bool)
    kept_counts, kept_cells = [], []
    for crop, ((top, left, height, width), ratio) in enumerate(zip(geometry.crop_boxes, crop_ratios)):
        count = int(height * width * ratio)
        kept_counts.append(count)
        if count == 0:
            continue
        local = crop_scores[crop].view(side, side)[top:top + height, left:left + width].flatten()
        combined = F.normalize(local, dim=0) + F.normalize(global_scores[crop], dim=0)
        packed = torch.topk(combined, count).indices
        kept_cells.append(crop * side * side + (top + packed // width) * side + left + packed % width)
    if kept_cells:
        keep.view(-1)[torch.cat(kept_cells)] = True
    return keep, kept_counts


@dataclasses.dataclass
class Selection:
    """What GlobalCom2 keeps of one image; `arrange_tokens` turns it into the LLM's sequence."""

    geometry: CropGeometry
    thumbnail_indices: torch.Tensor  # [k_t] int64, best score first
    crop_keep_mask: torch.Tensor     # [C, P] bool, kept crop tokens at their real positions
    crop_ratios: list[float]         # retention ratio the thumbnail gave each crop
    crop_kept_counts: list[int]      # int(N_c * ratio_c)
    keeps_all: bool                  # R = 1: LLaVA-NeXT's own sequence

    @property
    def tokens_before(self) -> int:
        """LLaVA-NeXT's visual token count for this image (thumbnail, image area, newlines)."""
        return self.geometry.side**2 + sum(self.geometry.valid_counts) + len(self.geometry.newline_rows("spatial"))

    def layout(self, requested: str) -> str:
        """The layout actually used: keeping everything always gives LLaVA-NeXT's (`spatial`)."""
        return "spatial" if self.keeps_all else check_layout(requested)

    def tokens_after(self, layout: str) -> int:
        """Length of `arrange_tokens`'s output: kept tokens plus newlines."""
        newlines = len(self.geometry.newline_rows(self.layout(layout)))
        return self.thumbnail_indices.shape[0] + sum(self.crop_kept_counts) + newlines

    def accounting(self, layout: str) -> dict:
        return token_accounting(self.tokens_before, self.tokens_after(layout), int(self.thumbnail_indices.shape[0]),
                                self.geometry.grid, self.geometry.valid_counts, self.crop_kept_counts, self.crop_ratios)


def token_accounting(tokens_before: int, tokens_after: int, thumbnail_kept: int, grid: tuple[int, int] | None = None,
                     crop_valid=(), crop_kept=(), crop_ratios=()) -> dict:
    """One image's record: visual tokens before (vanilla LLaVA-NeXT) and after, and per crop
    (row-major) its image tokens, kept tokens and assigned ratio. JSON-ready."""
    return dict(tokens_before=tokens_before, tokens_after=tokens_after, retained=tokens_after / max(tokens_before, 1),
                grid=list(grid) if grid else None, thumbnail_kept=thumbnail_kept, crop_valid=list(crop_valid),
                crop_kept=list(crop_kept), crop_ratios=[round(ratio, 6) for ratio in crop_ratios])


def keep_everything(geometry: CropGeometry, device=None) -> Selection:
    """The selection at `R = 1`: every thumbnail patch and every crop token in the image area."""
    image_area, _ = crop_cells(geometry, device)
    every_patch = torch.arange(geometry.side**2, device=device)
    return Selection(geometry, every_patch, image_area, [1.0] * len(geometry.crop_boxes), geometry.valid_counts, True)


def select_tokens(cls_attn_scores: torch.Tensor, image_size: tuple[int, int], grid: tuple[int, int],
                  retention_ratio: float, temperature: float = TEMPERATURE, unpad: bool = True) -> Selection:
    """Steps 1-4 for one image. `cls_attn_scores`: `[1 + C, P]`, thumbnail first."""
    ratio = check_retention_ratio(retention_ratio)
    geometry = crop_geometry(image_size, grid, math.isqrt(cls_attn_scores.shape[1]), unpad)
    if ratio == 1.0:
        return keep_everything(geometry, cls_attn_scores.device)
    thumbnail_scores, crop_scores = cls_attn_scores[0], cls_attn_scores[1:]
    thumbnail_indices = compress_thumbnail(thumbnail_scores, ratio)
    crop_ratios = generate_scale_for_crop_features(thumbnail_scores, *grid, ratio, temperature)
    top, bottom, left, right = geometry.bounds
    global_scores = interpolate_and_split_cls_attn_scores(
        thumbnail_scores, right - left, bottom - top, *grid, geometry.crop_dimensions)
    keep, kept_counts = select_crop_tokens(crop_scores, global_scores, geometry, crop_ratios)
    return Selection(geometry, thumbnail_indices, keep, crop_ratios, kept_counts, False)


def arrange_tokens(image_feature: torch.Tensor, selection: Selection, image_newline: torch.Tensor | None,
                   layout: str = "official") -> torch.Tensor:
    """The kept tokens of `image_feature` `[1 + C, P, D]` as the sequence `[M, D]` the LLM reads.

    `official`: thumbnail tokens best score first, then the crop canvas row by row with one
    newline per canvas row, each kept crop token placed at the cell numbered by its *packed*
    index (the released code's sequence, quirks Q2, Q3, Q12). `spatial`: thumbnail tokens in
    raster order, kept crop tokens at their real canvas positions, one newline per image row
    (LLaVA-NeXT's layout). `R = 1` always gives LLaVA-NeXT's own sequence.
    `image_newline`: `[D]`, or None when the selection was made without unpadding.
    """
    geometry = selection.geometry
    layout = selection.layout(layout)
    if geometry.unpad and image_newline is None:
        raise ValueError("an unpadded selection needs image_newline")
    thumbnail_indices = selection.thumbnail_indices
    if layout == "spatial":
        thumbnail_indices = thumbnail_indices.sort().values
    num_crop_tokens = (image_feature.shape[0] - 1) * image_feature.shape[1]  # C * P
    keep = selection.crop_keep_mask
    token_ids = torch.arange(num_crop_tokens, device=keep.device).view(keep.shape)
    if layout == "official":
        # Move each kept token to the crop cell numbered by its packed index; unkept tokens
        # are scattered to a spare slot at the end, so no host sync is needed.
        _, packed = crop_cells(geometry, keep.device)
        target = torch.where(keep, packed + token_ids - token_ids % packed.shape[1], num_crop_tokens)
        placed = torch.full((num_crop_tokens + 1,), -1, dtype=torch.long, device=keep.device)
        cells = placed.scatter_(0, target.flatten(), torch.where(keep, token_ids, -1).flatten())[:-1]
    else:
        cells = torch.where(keep, token_ids, -1)
    newline_rows = geometry.newline_rows(layout)
    canvas = crop_canvas(cells, geometry.grid)
    if len(newline_rows):
        rows = canvas[newline_rows.start:newline_rows.stop]
        canvas = torch.cat([rows, rows.new_full((rows.shape[0], 1), num_crop_tokens)], dim=1)
    sequence = canvas.flatten()
    newline_count = len(newline_rows)
    crop_count = sum(selection.crop_kept_counts) + newline_count
    # Occupied cells in order via stable sorts rather than `nonzero`, whose output size would
    # need a host sync; the counts are already known on the host.
    sequence = sequence[_first_true(sequence >= 0, crop_count)]
    # One gather for the whole sequence (crop rows follow the thumbnail's P rows): separate
    # [M, D] temporaries joined by `cat` would cost more than the copies themselves.
    num_patches = image_feature.shape[1]
    rows = torch.cat([thumbnail_indices, num_patches + sequence.clamp(max=num_crop_tokens - 1)])
    tokens = image_feature.flatten(0, 1)[rows]
    if newline_count:
        newline_positions = thumbnail_indices.shape[0] + _first_true(sequence == num_crop_tokens, newline_count)
        tokens.index_put_((newline_positions,), image_newline.to(tokens.dtype))
    return tokens


def compress_image_features(image_feature: torch.Tensor, cls_attn_scores: torch.Tensor, image_size: tuple[int, int],
                            grid: tuple[int, int], image_newline: torch.Tensor | None, retention_ratio: float,
                            temperature: float = TEMPERATURE, layout: str = "official") -> torch.Tensor:
    """GlobalCom2 for one AnyRes image: its visual sequence `[M, D]`, in `image_feature`'s dtype.

    `image_feature`: `[1 + C, P, D]` projected views, thumbnail first, then the
    `C = grid_w * grid_h` crops row-major, patches in raster order (`P = side**2`).
    `cls_attn_scores`: `[1 + C, P]` each view's [CLS]->patch scores. `image_size`: PIL
    `(width, height)`. `grid`: `(grid_w, grid_h)`. `image_newline`: `[D]` (None: no unpadding
    and no newlines, merge type `spatial`). `layout`: `official` or `spatial`.
    """
    check_shapes(image_feature, cls_attn_scores, grid, image_newline)
    check_layout(layout)
    selection = select_tokens(cls_attn_scores, image_size, grid, retention_ratio, temperature, image_newline is not None)
    return arrange_tokens(image_feature, selection, image_newline, layout)


def check_shapes(image_feature: torch.Tensor, cls_attn_scores: torch.Tensor, grid: tuple[int, int],
                 image_newline: torch.Tensor | None) -> None:
    """Raise `ValueError` naming the expected shape when the inputs disagree with the grid."""
    grid_w, grid_h = grid
    if image_feature.ndim != 3:
        raise ValueError(f"image_feature must be [1 + C, P, D], got shape {tuple(image_feature.shape)}")
    views, num_patches, dim = image_feature.shape
    if views != 1 + grid_w * grid_h:
        raise ValueError(f"a {grid_w}x{grid_h} grid needs image_feature of shape [{1 + grid_w * grid_h}, P, D] "
                         f"(thumbnail + crops), got {tuple(image_feature.shape)}")
    if math.isqrt(num_patches) ** 2 != num_patches:
        raise ValueError(f"each view must have a square number of patches, got P = {num_patches}")
    if tuple(cls_attn_scores.shape) != (views, num_patches):
        raise ValueError(f"cls_attn_scores must have shape [{views}, {num_patches}] to match image_feature, "
                         f"got {tuple(cls_attn_scores.shape)}")
    if image_newline is not None and tuple(image_newline.shape) != (dim,):
        raise ValueError(f"image_newline must have shape [{dim}], got {tuple(image_newline.shape)}")


def crop_canvas(per_crop: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per-crop values `[C, P]` or `[C * P]` (crops row-major, patches raster) laid out as the crop
    canvas `[grid_h * side, grid_w * side]`: crop `(i, j)` cell `(y, x)` lands at `(i*side + y, j*side + x)`."""
    grid_w, grid_h = grid
    side = math.isqrt(per_crop.numel() // (grid_w * grid_h))
    return per_crop.view(grid_h, grid_w, side, side).permute(0, 2, 1, 3).reshape(grid_h * side, grid_w * side)


def crop_cells(geometry: CropGeometry, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For every crop cell `[C, P]`: whether it holds image, and its packed index (its rank in
    raster order among the crop's image cells; meaningless outside the image area)."""
    side = geometry.side
    top, left, height, width = torch.tensor(geometry.crop_boxes, device=device).T[..., None, None]  # each [C, 1, 1]
    rows = torch.arange(side, device=device)[:, None]
    cols = torch.arange(side, device=device)[None, :]
    image_area = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)
    packed = (rows - top) * width + (cols - left)
    return image_area.flatten(1), packed.flatten(1)


def _first_true(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the first `count` True entries of the 1-D `mask`, in order."""
    return torch.argsort(mask.logical_not().to(torch.int8), stable=True)[:count]
