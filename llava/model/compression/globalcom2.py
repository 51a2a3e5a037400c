"""GlobalCom2: the thumbnail commands the compression of LLaVA-NeXT's AnyRes crops.

Pure tensor functions, no model state. For one image with a thumbnail and `C = grid_w * grid_h`
crops, each `side x side` patches (`P = side**2`: 576 for CLIP-336, 729 for SigLIP-384; any grid,
up to OneVision's 6x6), from each view's importance scores `[1 + C, P]` (higher = more important;
the signal `score` picks, see below):

1. `compress_thumbnail`: keep the `int(P * R)` thumbnail patches with the highest scores.
2. `generate_scale_for_crop_features`: give each crop a retention ratio, a softmax (temperature
   10) over the thumbnail's score mass in that crop's share of the thumbnail (`crop_ratios`
   holds the other allocation strategies of the paper's Table 2). The shares are the released
   code's equal partition: `side // grid` patches per share, the last share taking the remainder
   (side 27 on a 6-wide grid: five shares of 4 columns and one of 7).
3. `interpolate_and_split_cls_attn_scores`: resize the thumbnail's `side x side` score map to the
   unpadded crop canvas and cut out each crop's part (the "global" scores).
4. `select_crop_tokens`: per crop, keep the `int(N_c * ratio_c)` tokens with the highest
   L2-normalised own scores plus L2-normalised global scores.
5. `common.arrange_tokens` lays the kept tokens out: `official` is the released code's sequence
   (arrangement `packed`), `spatial` true raster order.

Scores (`score`, `SCORE_SIGNALS`): `cls` is the released code's, the last CLIP layer's
pre-softmax [CLS]->patch logits (signal `cls_logits_last`); encoders without [CLS] (SigLIP, in
LLaVA-OneVision) use the paper's `neg_cos_mean`, `-cos(x_i, g)` of each patch's tower output
(before the projector) against its view's mean patch feature `g`, or `neg_attn`, minus the mean
attention a patch receives in the last encoder layer. The chosen signal is every view's: the
thumbnail's (steps 1-3) and each crop's own (step 4). The SigLIP tower refuses `cls`.

Budget. `R` (`--retention-ratio`) is the published method's ratio: `int(P R)` thumbnail tokens
and `int(N_c r_c)` per crop, the `r_c` averaging R, so about R of the image tokens are kept
(newlines excluded; slightly more where padding cuts crops). `--visual-tokens N` sets
`R = N / vanilla image tokens`. With `budget=exact` the kept image tokens are exactly
`round(R * vanilla)` (or N), shared between thumbnail and crops in proportion to the released
counts `P R` and `N_c r_c` (largest remainder, capped at each view's image tokens), so the
sequence length is known from the image size before the tower runs (`visual_token_count`).

On OneVision's downsampled canvas (`anyres_max_N`, `CropGeometry.downsampled_shape`: vanilla sends
the unpadded crop canvas resized to `rows x cols`, fewer tokens than the crops' cells) R stays
the fraction of the tokens *vanilla* sends (`Budget.vanilla_ratio`), and the rule keeps its form:
the thumbnail keeps `int(P R)` and the crops get the released ratios `r_c` (averaging R), each
scaled by the canvas's downsampling factor `f = rows * cols / sum N_c` (downsampled cells over
the crops' full-resolution image cells): crop c keeps `int(N_c r_c f)` of its full-resolution
cells. So about `R (P + rows * cols) = R N_van` image tokens are sent, what vanilla sends at R.
The kept cells go at their full-canvas places (not resized), so the newlines are those of the
full canvas. `budget=exact` sends exactly `round(R N_van)` (or N), apportioned in proportion to
`P R` and `N_c r_c f`. `crop_ratios` records the rule's `r_c`, `canvas_scale` records `f`.

Ablations (arguments, defaults reproduce the released code): `temperature`; `alpha`, the weight
of the global score (0.5 = the released plain sum; 0 = local only, 1 = global only, as the
paper's Table 3, also reachable as `scores=local|global`); `allocation` (Table 2); `views`
(the thumbnail-only / crops-only analysis); `drop_crop` (the most/least important crop analysis,
run at R = 1); `score` (the paper's [CLS]-free scores, its section on encoders without [CLS]).

Follows the released code exactly, quirks included (`shared/spec/globalcom2-official-behaviour.md`);
R = 1 with default arguments keeps everything: LLaVA-NeXT's own sequence. Steps 1-4 keep the
released names and arguments.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from llava.mm_utils import get_anyres_image_grid_shape
from llava.model.compression.common import (
    Budget, CropGeometry, Selection, apportion, arrange_tokens, check_layout, check_retention_ratio,
    check_shapes, crop_geometry, keep_everything,
)
from llava.model.compression.registry import arg, register

TEMPERATURE = 10.0

# The tower signal behind each `score` (`registry.SIGNALS`), every one `[V, P]`, higher = keep.
SCORE_SIGNALS = {"cls": "cls_logits_last", "neg_cos_mean": "neg_cos_mean", "neg_attn": "neg_attn"}


@dataclasses.dataclass(frozen=True)
class GlobalCom2Args:
    temperature: float = arg(TEMPERATURE, "softmax temperature of the crop-ratio allocation")
    alpha: float = arg(0.5, "weight of the global (thumbnail) score in a crop token's score; 0.5 = the released sum")
    allocation: Literal["softmax-sum", "softmax-max", "n-topk", "uniform"] = arg(
        "softmax-sum", "crop ratios from the thumbnail's score sum per crop share, its max, its share of the "
                       "thumbnail's top-k, or R for every crop")
    scores: Literal["both", "local", "global"] = arg(
        "both", "which scores rank crop tokens: both (weighted by alpha), the crop's own, or the thumbnail's")
    views: Literal["all", "thumbnail", "crops"] = arg(
        "all", "send every view, or only the thumbnail, or only the crops")
    drop_crop: Literal["none", "most", "least"] = arg(
        "none", "drop the crop with the largest or smallest thumbnail score sum")
    budget: Literal["released", "exact"] = arg(
        "released", "released: int(P R) + int(N_c r_c) tokens (P = side^2 patches per view); "
                    "exact: round(R x vanilla image tokens)")
    score: Literal["cls", "neg_cos_mean", "neg_attn"] = arg(
        "cls", "each view's patch importance, thumbnail and crops alike: cls, the last CLIP layer's [CLS] logits "
               "(released; CLIP only); neg_cos_mean, -cos(patch, view's mean patch) of the tower output before "
               "the projector (the paper's score without [CLS]); neg_attn, minus the mean attention a patch "
               "receives in the last encoder layer")

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.scores != "both" and self.alpha != 0.5:
            raise ValueError(f"alpha weighs the two scores, so it needs scores=both (got scores={self.scores})")

    @property
    def global_weight(self) -> float:
        return {"both": self.alpha, "local": 0.0, "global": 1.0}[self.scores]

    def keeps_everything(self) -> bool:
        """Whether a full budget keeps every token without looking at any score."""
        return self.views == "all" and self.drop_crop == "none"

    @property
    def signal(self) -> str:
        """The tower signal `score` names."""
        return SCORE_SIGNALS[self.score]

    def signals(self) -> frozenset:
        """The tower signals a run with these arguments reads (`registry.Method.signals_for`)."""
        return frozenset({self.signal})


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
    sums, _ = crop_block_scores(base_cls_attn_scores, num_patch_width, num_patch_height, "sum")
    return softmax_ratios(sums, base_scale, temperature)


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
                       counts: list[int], global_weight: float = 0.5) -> tuple[torch.Tensor, list[int]]:
    """Keep mask `[C, P]` of crop tokens at their real positions, and the kept count per crop.

    `crop_scores`: `[C, P]` each crop's own scores; `global_scores[c]`: `[N_c]` from
    `interpolate_and_split_cls_attn_scores`. Crop c keeps the `counts[c]` (at most `N_c`) of its
    `N_c` image tokens with the largest combined score over its packed (raster, image-only)
    scores: `l/|l| + g/|g|` at `global_weight` 0.5 (the released sum, computed as released),
    else `(1 - w) l/|l| + w g/|g|`. Norms and `topk` run on 1-D tensors of exactly `N_c`, as
    released, so results (ties included) match it bit for bit on the same backend.
    """
    side = geometry.side
    keep = torch.zeros_like(crop_scores, dtype=torch.bool)
    kept_counts, kept_cells = [], []
    for crop, ((top, left, height, width), count) in enumerate(zip(geometry.crop_boxes, counts)):
        count = min(count, height * width)
        kept_counts.append(count)
        if count == 0:
            continue
        local = F.normalize(crop_scores[crop].view(side, side)[top:top + height, left:left + width].flatten(), dim=0)
        global_ = F.normalize(global_scores[crop], dim=0)
        combined = local + global_ if global_weight == 0.5 else (1 - global_weight) * local + global_weight * global_
        packed = torch.topk(combined, count).indices
        kept_cells.append(crop * side * side + (top + packed // width) * side + left + packed % width)
    if kept_cells:
        keep.view(-1)[torch.cat(kept_cells)] = True
    return keep, kept_counts


def crop_block_scores(thumbnail_scores: torch.Tensor, num_patch_width: int, num_patch_height: int,
                      reduce: str = "sum") -> tuple[np.ndarray, np.ndarray]:
    """The thumbnail's scores `[P]` reduced (`sum` or `max`, in float64) over each block of its
    equal `num_patch_height x num_patch_width` partition (row-major; the last block takes the
    remainder; padding ignored, as released), and each block's patch count. One host transfer."""
    side = math.isqrt(thumbnail_scores.shape[0])
    block_h, block_w = max(side // num_patch_height, 1), max(side // num_patch_width, 1)
    positions = torch.arange(side, device=thumbnail_scores.device)
    block_rows = (positions // block_h).clamp(max=num_patch_height - 1)
    block_cols = (positions // block_w).clamp(max=num_patch_width - 1)
    block_of_patch = (block_rows[:, None] * num_patch_width + block_cols[None, :]).flatten()  # [P]
    blocks = torch.zeros(num_patch_width * num_patch_height, dtype=torch.float64, device=thumbnail_scores.device)
    if reduce == "sum":
        blocks = blocks.index_add_(0, block_of_patch, thumbnail_scores.double())
    else:
        blocks = blocks.fill_(-math.inf).scatter_reduce_(0, block_of_patch, thumbnail_scores.double(), "amax")
    sizes = torch.bincount(block_of_patch, minlength=blocks.shape[0])
    values = np.array(blocks.tolist())
    if not np.isfinite(values).all():
        raise ValueError("the thumbnail's scores contain NaN or inf")
    return values, np.array(sizes.tolist())


def softmax_ratios(block_scores: np.ndarray, base_scale: float, temperature: float) -> list[float]:
    """`min(base_scale * (1 + s_k - mean(s)), 1)` with `s = softmax(block_scores / temperature)`
    (plus 1e-8 in the denominator), in numpy as released."""
    exp_scores = np.exp((block_scores - np.max(block_scores)) / temperature)
    softmax_scores = exp_scores / (np.sum(exp_scores) + 1e-8)
    return np.clip(base_scale * (1 + softmax_scores - np.mean(softmax_scores)), None, 1.0).tolist()


def crop_ratios(thumbnail_scores: torch.Tensor, grid: tuple[int, int], ratio: float,
                args: GlobalCom2Args) -> list[float]:
    """Each crop's retention ratio under `args.allocation` (paper Table 2):

    - `softmax-sum`: the released rule, `generate_scale_for_crop_features`;
    - `softmax-max`: the same softmax over each share's *maximum* thumbnail score;
    - `n-topk`: in proportion to how many of the thumbnail's top-`int(P R)` patches fall in the
      crop's share, relative to the share's size: `R * (n_c / k) / (m_c / P)`, clipped at 1
      (all R when k = 0). The paper names it without defining it; this reading keeps the mean R
      for equal shares, like the others;
    - `uniform`: R for every crop.
    """
    grid_w, grid_h = grid
    if args.allocation == "uniform":
        return [ratio] * (grid_w * grid_h)
    if args.allocation == "softmax-sum":
        return generate_scale_for_crop_features(thumbnail_scores, grid_w, grid_h, ratio, args.temperature)
    if args.allocation == "softmax-max":
        maxima, _ = crop_block_scores(thumbnail_scores, grid_w, grid_h, "max")
        return softmax_ratios(maxima, ratio, args.temperature)
    top = torch.zeros_like(thumbnail_scores, dtype=torch.float64)
    top[compress_thumbnail(thumbnail_scores, ratio)] = 1.0
    in_top, sizes = crop_block_scores(top, grid_w, grid_h, "sum")
    if in_top.sum() == 0:
        return [ratio] * (grid_w * grid_h)
    shares = (in_top / in_top.sum()) / (sizes / sizes.sum())
    return np.clip(ratio * shares, None, 1.0).tolist()


def canvas_scale(geometry: CropGeometry) -> float:
    """`f`: the crop canvas's tokens vanilla sends per full-resolution image cell of the crops,
    `rows * cols / sum N_c` on a downsampled canvas (`CropGeometry.downsampled_shape`), else 1."""
    if geometry.downsampled_shape is None:
        return 1.0
    rows, cols = geometry.downsampled_shape
    return rows * cols / sum(geometry.valid_counts)


def kept_counts(geometry: CropGeometry, budget: Budget, ratios: list[float],
                args: GlobalCom2Args) -> tuple[int, list[int]]:
    """Tokens kept by the thumbnail and by each crop. `released`: `int(P R)` and `int(N_c r_c f)`
    (`f = canvas_scale`, 1 unless the canvas is downsampled). `exact`: `round(R x` the image
    tokens of the views sent`)` (or N) apportioned in proportion to the released shares `P R` and
    `N_c r_c f`, capped at each view's image tokens."""
    num_patches = geometry.side**2
    send_thumbnail = args.views != "crops"
    send_crops = args.views != "thumbnail" and bool(geometry.crop_boxes)
    thumbnail_target = num_patches * budget.vanilla_ratio if send_thumbnail else 0.0
    scale = canvas_scale(geometry)
    crop_targets = [valid * ratio * scale if send_crops else 0.0
                    for valid, ratio in zip(geometry.valid_counts, ratios)]
    if args.budget == "released":
        return int(thumbnail_target), [int(target) for target in crop_targets]
    caps = [num_patches if send_thumbnail else 0] + [valid if send_crops and ratio > 0 else 0
                                                   for valid, ratio in zip(geometry.valid_counts, ratios)]
    total = budget.tokens if budget.tokens is not None else round(budget.ratio * sum(caps))
    counts = apportion(total, [thumbnail_target, *crop_targets], caps)
    return counts[0], counts[1:]


def select_tokens(cls_attn_scores: torch.Tensor, geometry: CropGeometry, budget: Budget,
                  args: GlobalCom2Args = GlobalCom2Args()) -> Selection:
    """Steps 1-4 for one image. `cls_attn_scores`: `[1 + C, P]`, thumbnail first: each view's
    scores from the signal `args.score` names (the released [CLS] logits by default)."""
    if budget.keeps_all and args.keeps_everything():
        return everything_at_ratio_one(geometry, cls_attn_scores.device)
    thumbnail_scores, crop_scores = cls_attn_scores[0], cls_attn_scores[1:]
    # A full budget keeps every view it sends whole (the analyses of `views` and `drop_crop` at
    # R = 1), where the released allocation would still take tokens from below-average crops (Q11).
    if budget.keeps_all:
        ratios = [1.0] * geometry.num_crops
    else:
        ratio = budget.vanilla_ratio
        ratios = crop_ratios(thumbnail_scores, geometry.grid, ratio, args) if geometry.crop_boxes else []
    if args.drop_crop != "none" and geometry.crop_boxes:
        sums, _ = crop_block_scores(thumbnail_scores, *geometry.grid, "sum")
        dropped = int(np.argmax(sums) if args.drop_crop == "most" else np.argmin(sums))
        ratios[dropped] = 0.0
    thumbnail_count, crop_counts = kept_counts(geometry, budget, ratios, args)
    thumbnail_indices = compress_thumbnail(thumbnail_scores, 1.0)[:thumbnail_count]
    top, bottom, left, right = geometry.bounds
    global_scores = interpolate_and_split_cls_attn_scores(
        thumbnail_scores, right - left, bottom - top, *geometry.grid,
        geometry.crop_dimensions) if geometry.crop_boxes else []
    keep, crop_counts = select_crop_tokens(crop_scores, global_scores, geometry, crop_counts, args.global_weight)
    extra = dict(crop_ratios=[round(r, 6) for r in ratios])
    if geometry.downsampled_shape is not None:
        extra["canvas_scale"] = round(canvas_scale(geometry), 6)
    return Selection(geometry, thumbnail_indices, keep, crop_counts, arrangement="packed",
                     send_crops=args.views != "thumbnail", extra=extra)


def everything_at_ratio_one(geometry: CropGeometry, device) -> Selection:
    """Vanilla LLaVA-NeXT, with every crop's ratio (1) recorded like a compressed image's."""
    selection = keep_everything(geometry, device)
    selection.extra["crop_ratios"] = [1.0] * geometry.num_crops
    return selection


@register("globalcom2", needs=set(SCORE_SIGNALS.values()), args=GlobalCom2Args)
def select(views: torch.Tensor, signals: dict, geometry: CropGeometry, budget: Budget,
           args: GlobalCom2Args = GlobalCom2Args()) -> Selection:
    """GlobalCom2 for one image: `views` `[1 + C, P, D]` (unused: the scores decide),
    `signals[args.signal]` `[1 + C, P]` (only that one is read: `args.signals()`)."""
    if budget.keeps_all and args.keeps_everything():
        return everything_at_ratio_one(geometry, views.device)
    return select_tokens(signals[args.signal], geometry, budget, args)


def visual_token_count(image_size: tuple[int, int], grid_pinpoints, retention_ratio: float | None = None,
                       visual_tokens: int | None = None, layout: str = "official", side: int = 24,
                       crop_size: int = 336, unpad: bool = True, max_num_patches: int | None = None) -> int:
    """Visual tokens (image tokens plus newlines) GlobalCom2 with `budget=exact` sends for an
    image of PIL size `(width, height)`, from the size and the budget alone (no tower): what an
    engine that expands image placeholders before encoding needs. Default arguments otherwise.
    `side` and `crop_size`: the tower's patches per side and view size in pixels (24 and 336 for
    CLIP-336, 27 and 384 for SigLIP-384). `max_num_patches`: N of OneVision's `anyres_max_N`
    (a full budget then counts the downsampled canvas's rows of newlines, as vanilla sends)."""
    grid = get_anyres_image_grid_shape(image_size, grid_pinpoints, crop_size)
    geometry = crop_geometry(image_size, grid, side, unpad, max_num_patches)
    budget = Budget.resolve(geometry, retention_ratio, visual_tokens)
    if budget.keeps_all:
        return geometry.vanilla_image_tokens + geometry.newline_count(geometry.vanilla_arrangement)
    arrangement = "packed" if check_layout(layout) == "official" else "raster"
    return min(budget.image_tokens, geometry.offered_image_tokens) + geometry.newline_count(arrangement)


def compress_image_features(image_feature: torch.Tensor, cls_attn_scores: torch.Tensor, image_size: tuple[int, int],
                            grid: tuple[int, int], image_newline: torch.Tensor | None, retention_ratio: float,
                            temperature: float = TEMPERATURE, layout: str = "official") -> torch.Tensor:
    """GlobalCom2 for one AnyRes image: its visual sequence `[M, D]`, in `image_feature`'s dtype.

    `image_feature`: `[1 + C, P, D]` projected views, thumbnail first, then the
    `C = grid_w * grid_h` crops row-major, patches in raster order (`P = side**2`).
    `cls_attn_scores`: `[1 + C, P]` each view's scores (the [CLS]->patch logits as released, or a
    [CLS]-free signal: `SCORE_SIGNALS`). `image_size`: PIL
    `(width, height)`. `grid`: `(grid_w, grid_h)`. `image_newline`: `[D]` (None: no unpadding
    and no newlines, merge type `spatial`). `layout`: `official` or `spatial`.
    """
    check_shapes(image_feature, cls_attn_scores, grid, image_newline)
    check_layout(layout)
    geometry = crop_geometry(image_size, grid, math.isqrt(cls_attn_scores.shape[1]), image_newline is not None)
    budget = Budget.resolve(geometry, check_retention_ratio(retention_ratio))
    selection = select_tokens(cls_attn_scores, geometry, budget, GlobalCom2Args(temperature=temperature))
    return arrange_tokens(image_feature, selection, image_newline, layout)

