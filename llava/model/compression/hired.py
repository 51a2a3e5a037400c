"""HiRED: an image's budget split between its views by the thumbnail's early [CLS] attention; per-view top-k.

For one AnyRes image with `V = 1 + C` views (thumbnail first, then the crops row-major), each
`side x side` patches (`P = side**2`, 576 for CLIP-336), and two [CLS] attention maps per view,
the post-softmax [CLS] rows of CLIP layer 0 (`A0`, "top" in the official code) and of layer -2
(`A22`, layer 22 of 24, "bottom"; quirk H7: the names are inverted, the layer numbers are what
counts):

1. `head_sum`: each signal `[V, H, P]` summed over its heads, in the tower dtype, as released.
2. `total_budget` and `split_budget`: the image's budget `total`, then `full` tokens for the
   thumbnail and `sub` for all crops together (see Budget).
3. `crop_budgets` (the official `HiRED_sub_img_budgets`): mark the thumbnail's
   `int(P (1 - alpha))` cells with the highest `A0` (a fixed count, quirk H5), count the marks
   in each crop's part of the thumbnail (`thumbnail_partition`), and give crop c
   `b_c = min(int(count_c / sum(count) * sub), P)` (float32, truncated, the remainder lost: H4).
4. `top_k_per_view`: the thumbnail keeps its `full` cells with the highest `A22`, crop c its
   `b_c` (one `torch.topk` per view, the official call).
5. `canvas_order`: the official sequence is the thumbnail's kept cells in raster order, then the
   crop canvas, unpadded, read in raster order without newlines, keeping only the kept cells.
   Kept cells in the letterbox padding are dropped there (H3), so fewer than `total` are sent.
   The canvas is laid out with the grid's width and height swapped (H2, below) unless
   `grid=correct`. That order is the selection's `sequence`.

A single-view image (grid `(0, 0)`) is sent whole, no selection at all, as the official pack
does (in `faithful` mode without a newline, in `anyres` mode as the model sends it).

Budget. The official `token_budget_rate` is a fraction of `V * P` (the thumbnail and the padded
crops, no newlines); `alpha` is the thumbnail's share. Our R in (0, 1] maps as:

- `budget=paper` (default): `rate = R`, `total = int(V * P * R)` (the paper's "HiRED-20%" is
  R = 0.2: 576 tokens for a 2x2 image, 288 for the thumbnail, 288 over the crops).
- `budget=matched` (ours, not the paper's): `total = round(R * N_van)`, `N_van` the image tokens
  vanilla LLaVA-NeXT sends (thumbnail plus unpadded crops, no newlines), and each crop's top-k
  only among the cells the layout sends (the image cells with `grid=correct` or in `anyres`
  mode; with the official swapped grid, the cells its unpadding keeps), `b_c` capped at their
  number, so the budget is spent on tokens that are sent (up to `C - 1` are still lost to H4).
- `--visual-tokens N`: `total = N` under both (with `budget=paper` fewer are sent where kept
  cells fall in the padding).

Then `full = min(int(total * alpha), P)` and `sub = min(total - full, C * P)`. A full budget
(R = 1, or N at least the image's vanilla tokens) keeps everything, as the official code does
for `rate >= 1`: in `faithful` mode that is still its own layout (no newlines, H2's canvas).
What is sent is `full + sum(b_c)` less the kept cells the unpadding drops; accounting reports it
against the model's own vanilla sequence (`N_van` image tokens).

Modes (argument `mode`):

- `faithful` (default): the official sequence above, as the selection's `sequence` (no input
  change: the official pack takes the features the model has and unpads them itself). On a
  non-square grid with `grid=official`, H2's canvas can send cells of the letterbox padding and
  drop image cells, which the model's unpadded geometry cannot hold: there the selection is on
  the crop canvas without unpadding (every cell at its real position), and its `spatial` layout
  (the sent cells in raster order) has no newlines; elsewhere that layout is the model's, with
  newlines.
- `anyres`: the same scores and budgets on the views every other method gets (the config's
  merge type, `spatial_unpad` for LLaVA-NeXT): kept cells outside the image area are dropped
  (H3), and the kept cells go in the model's raster arrangement on the real grid, a newline after
  every image row. It implies `grid=correct` (the `grid` argument is not used); `partition`,
  `budget` and `alpha` apply as given. At a full budget it is vanilla LLaVA-NeXT.

Quirks (ids of the spec) and corrections offered as arguments:

- H1, `partition=bands` (default): the marks are counted in `C` contiguous runs of `P / C`
  raster cells (horizontal bands of the thumbnail, cell `i` in run `i * C // P`), which are the
  crops' regions only for a grid one crop wide. `partition=crops` (ours): each thumbnail cell
  counts for the crop that shows it (a `grid_h x grid_w` block partition when the image fills the
  canvas; with letterbox padding, the crop holding the cell's centre in the unpadded canvas).
- H2, `grid=official` (default): the pack unpacks the `(rows, cols)` grid shape as
  `(width, height)`, so for 1x2, 2x1, 1x3, 3x1 grids the canvas is `cols` crops high and `rows`
  wide, crop c at `(c // rows, c % rows)`, and the unpadding runs on that canvas. `grid=correct` (ours): the real
  canvas. The budgets do not depend on it (the band order is the same).
- H3: budgets ignore padding; kept padding cells are dropped by the unpadding (`budget=matched`
  masks them out of the top-k instead).
- H4: `int()` truncation of the crop budgets, `min(., P)` without redistribution. `alpha = 1`
  with `sub > 0` divides 0 by 0 in the official code (NaN, then an invalid `topk`); here the
  crops then keep nothing.
- H5: the count of marks, `int(P (1 - alpha))`, does not follow the budget (kept).
- H6 (hooks leak), H7 (layer names), H8 (HF's LLaVA-NeXT processor instead of LLaVA's
  `process_anyres_image`): out of scope here; this project's preprocessing is used.

Official source: `hasanar1f/HiRED@502d6dd`,
`transformers/src/transformers/models/llava_next/modeling_llava_next.py`: `ViT_Attn_Hook`
(48-95), layers 0 and 22 (966-967), `HiRED_sub_img_budgets` (490-516), `HiRED_token_selection`
(518-559), `pack_HiRED_image_features` (782-860, `image_newline=None` at 1011); defaults
`token_budget_rate=0.2`, `alpha=0.5` (`accuracy_benchmarks/llava_1.6_vicuna_7b.sh`). Restated in
`shared/spec/baselines/hired.md`. What differs here: the tower computes the two [CLS] rows with
SDPA kept (signals `cls_attn_heads_first`, `cls_attn_heads_penultimate`) instead of hooking
`q_proj`/`k_proj` and forming full maps; it scales the query before the product (by
`head_dim**-0.5`, a power of two for CLIP-L's 64, so exact) and rounds an fp32 softmax to the
tower dtype. Chunk sizes `P / C` that are not whole (no v1.6 grid) use `i * C // P` where the
official reshape would fail.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from llava.model.compression.common import (
    Budget, CropGeometry, Selection, crop_canvas, crop_geometry, keep_everything, selection_from_mask,
    view_image_areas,
)
from llava.model.compression.registry import arg, register

FIRST_LAYER = "cls_attn_heads_first"              # A0: where the crops' budgets come from
PENULTIMATE_LAYER = "cls_attn_heads_penultimate"  # A22: what each view keeps


@dataclasses.dataclass(frozen=True)
class HiREDArgs:
    mode: Literal["faithful", "anyres"] = arg(
        "faithful", "faithful: the official sequence (no newlines, the official unpadding); anyres: the model's "
                    "own views, unpadding and newlines (implies grid=correct)")
    alpha: float = arg(0.5, "the thumbnail's share of the budget; the crops' marks are int(P (1 - alpha)) (H5)")
    partition: Literal["bands", "crops"] = arg(
        "bands", "bands: marks counted in contiguous raster runs of the thumbnail (H1); crops (ours): in each "
                 "crop's own region of the thumbnail")
    grid: Literal["official", "correct"] = arg(
        "official", "official: the crop canvas with the grid's width and height swapped (H2); correct (ours): "
                    "the real canvas")
    budget: Literal["paper", "matched"] = arg(
        "paper", "paper: total = int(V P R), padding selectable then dropped (H3); matched (ours): "
                 "total = round(R N_van), the top-k among the cells sent")

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (the thumbnail's share of the budget), got {self.alpha!r}")

    def keeps_everything(self) -> bool:
        """Whether a full budget is vanilla LLaVA-NeXT: in `anyres` mode only (the faithful
        sequence has no newlines and, on non-square grids, H2's canvas)."""
        return self.mode == "anyres"


def head_sum(attention: torch.Tensor) -> torch.Tensor:
    """`[V, H, P]` -> `[V, P]`: the heads summed, in the input's dtype (the official
    `attn.sum(dim=1)` on the model-dtype map)."""
    return attention.sum(dim=1)


def total_budget(geometry: CropGeometry, budget: Budget, args: HiREDArgs) -> int:
    """The image's token budget `total` (see Budget): N, `int(V * P * R)`, or `round(R * N_van)`."""
    if budget.tokens is not None:
        return budget.tokens
    if args.budget == "matched":
        return round(budget.ratio * budget.model_vanilla_image_tokens)
    num_views, num_patches = 1 + geometry.num_crops, geometry.side**2
    return int(num_views * num_patches * budget.ratio)  # the official product order, then truncation


def split_budget(total: int, num_crops: int, num_patches: int, alpha: float) -> tuple[int, int]:
    """`(full, sub)`: the thumbnail's `min(int(total * alpha), P)`, the crops' `min(total - full, C * P)`."""
    full = min(int(total * alpha), num_patches)
    return full, min(total - full, num_crops * num_patches)


def thumbnail_partition(geometry: CropGeometry, partition: str, device) -> torch.Tensor:
    """`[P]` int64: the crop (row-major) whose share of the marks each thumbnail cell counts for.

    `bands` (H1): cell `i` in run `i * C // P`, the official reshape into `C` runs of `P / C`.
    `crops`: the crop that shows the cell. The thumbnail is the whole image squashed to
    `side x side`; its cell `(r, x)` maps to the point `(r + 1/2) / side` of the way down the
    unpadded canvas (and likewise across), and counts for the crop that holds that point.
    """
    side, num_crops = geometry.side, geometry.num_crops
    cells = torch.arange(side * side, device=device)
    if partition == "bands":
        return cells * num_crops // (side * side)
    grid_w, grid_h = geometry.grid
    top, bottom, left, right = geometry.with_unpad(True).bounds
    steps = 2 * torch.arange(side, device=device) + 1                                   # 2 x (cell centre)
    crop_rows = ((top + steps * (bottom - top) // (2 * side)) // side).clamp(max=grid_h - 1)  # [side]
    crop_cols = ((left + steps * (right - left) // (2 * side)) // side).clamp(max=grid_w - 1)
    return (crop_rows[:, None] * grid_w + crop_cols[None, :]).flatten()


def crop_budgets(first_layer_thumbnail: torch.Tensor, cell_crop: torch.Tensor, num_crops: int, sub: int,
                 alpha: float, caps: list[int]) -> list[int]:
    """`b_c` for each crop `[C]` (the official `HiRED_sub_img_budgets`).

    first_layer_thumbnail: `[P]`, the thumbnail's head-summed layer-0 attention. cell_crop: `[P]`
    int64, the crop each cell counts for (`thumbnail_partition`). The `int(P (1 - alpha))`
    highest cells are marked; crop c gets `int(count_c / sum(count) * sub)` computed in float32
    as released, then at most `caps[c]` (P; in `budget=matched` the cells it can send). One
    host sync: the counts decide the `topk` sizes.
    """
    num_patches = first_layer_thumbnail.shape[0]
    marked = torch.zeros(num_patches, dtype=torch.bool, device=first_layer_thumbnail.device)
    marked[first_layer_thumbnail.topk(int(num_patches * (1 - alpha))).indices] = True
    counts = torch.zeros(num_crops, dtype=torch.long, device=marked.device).scatter_add_(0, cell_crop, marked.long())
    # int64 / int64 is float32 division, as released; with no mark (alpha = 1) every share is 0
    # where the official code divides 0 by 0 (H4).
    shares = counts / counts.sum().clamp(min=1)
    budgets = (shares * sub).int().tolist()
    return [min(budget, cap) for budget, cap in zip(budgets, caps)]


def top_k_per_view(scores: torch.Tensor, counts: list[int], eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Keep mask `[V, P]`: in view v the `counts[v]` cells with the highest `scores` `[V, P]`,
    among the `eligible` ones (`[V, P]` bool, at least `counts[v]` of them) if given.

    One `topk` per view with that view's own k, the official call on the same 1-D row, so ties
    fall as released on the same backend (a loop over the few views, not over tokens).
    """
    if eligible is not None:
        scores = scores.masked_fill(~eligible, -torch.inf)
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    for view, count in enumerate(counts):
        if count:
            keep[view, scores[view].topk(count).indices] = True
    return keep


def canvas_order(geometry: CropGeometry, grid: str, device=None) -> torch.Tensor:
    """`[M]` int64 cells (`view * P + patch`, crops only) of the unpadded crop canvas in the
    official pack's raster order, every cell, no newlines.

    `grid=official` (H2): crop c lies at `(c // grid_h, c % grid_h)` of a canvas `grid_w` crops
    high and `grid_h` wide (the two swapped; the same canvas for a square grid), and the image's
    unpadding is computed on that canvas. `correct`: the real canvas and its unpadding.
    """
    grid_w, grid_h = geometry.grid
    laid = crop_geometry(geometry.image_size, (grid_h, grid_w) if grid == "official" else (grid_w, grid_h),
                         geometry.side, unpad=True)
    num_patches = geometry.side**2
    cells = torch.arange(num_patches, (1 + geometry.num_crops) * num_patches, device=device)
    cells = cells.view(geometry.num_crops, num_patches)  # [C, P]: each crop's cells, numbered as in the views
    top, bottom, left, right = laid.bounds
    return crop_canvas(cells, laid.grid)[top:bottom, left:right].flatten()


def check_signals(signals: dict, num_views: int, num_patches: int) -> None:
    """Raise `ValueError` naming the expected shape `[V, H, P]` when a signal disagrees with the views."""
    for name in (FIRST_LAYER, PENULTIMATE_LAYER):
        shape = list(signals[name].shape)
        if len(shape) != 3 or shape[0] != num_views or shape[2] != num_patches:
            raise ValueError(f"{name} must have shape [{num_views}, H, {num_patches}] ([V, H, P], as the views), "
                             f"got {shape}")


@register("hired", needs={FIRST_LAYER, PENULTIMATE_LAYER}, args=HiREDArgs)
def select(views: torch.Tensor, signals: dict, geometry: CropGeometry, budget: Budget,
           args: HiREDArgs = HiREDArgs()) -> Selection:
    """HiRED for one image: `views` `[V, P, D]` (only the device is used: the scores decide),
    `signals[FIRST_LAYER]`, `signals[PENULTIMATE_LAYER]` `[V, H, P]`. `extra`: `total_budget`,
    `full_budget` (thumbnail), `sub_budget` (all crops) and `crop_budgets` (`b_c`, row-major)."""
    device = views.device
    num_views, num_patches = views.shape[:2]
    if args.mode == "anyres" and (budget.keeps_all or not geometry.crop_boxes):
        return keep_everything(geometry, device)
    if not geometry.crop_boxes:  # a single view: every cell, no selection and no newline, as released
        every_patch = torch.ones(1, num_patches, dtype=torch.bool, device=device)
        return selection_from_mask(geometry, every_patch, [num_patches],
                                   sequence=torch.arange(num_patches, device=device))
    if args.mode == "faithful":
        # Only the cells the official canvas keeps after its unpadding are ever sent. H2's canvas
        # (a non-square grid laid swapped) can keep letterbox padding: then every canvas cell must
        # be a possible kept cell, so the selection is on the canvas without unpadding.
        grid_w, grid_h = geometry.grid
        if args.grid == "official" and grid_w != grid_h:
            geometry = geometry.with_unpad(False)
        order = canvas_order(geometry, args.grid, device)
        sendable = torch.zeros(num_views * num_patches, dtype=torch.bool, device=device)
        sendable[:num_patches] = True
        sendable[order] = True
        sendable = sendable.view(num_views, num_patches)
    else:
        sendable = view_image_areas(geometry, device)
    if budget.keeps_all:  # faithful at a full budget: every cell, in the official sequence
        keep, extra = sendable, {}
    else:
        check_signals(signals, num_views, num_patches)
        first_layer = head_sum(signals[FIRST_LAYER].to(device))
        penultimate = head_sum(signals[PENULTIMATE_LAYER].to(device))
        total = total_budget(geometry, budget, args)
        full, sub = split_budget(total, geometry.num_crops, num_patches, args.alpha)
        matched = args.budget == "matched"
        sub_budgets = [0] * geometry.num_crops
        if sub > 0:
            caps = sendable[1:].sum(dim=1).tolist() if matched else [num_patches] * geometry.num_crops
            sub_budgets = crop_budgets(first_layer[0], thumbnail_partition(geometry, args.partition, device),
                                       geometry.num_crops, sub, args.alpha, caps)
        keep = top_k_per_view(penultimate, [full, *sub_budgets], sendable if matched else None) & sendable
        extra = dict(total_budget=total, full_budget=full, sub_budget=sub, crop_budgets=sub_budgets)
    counts = keep.sum(dim=1).tolist()
    selection = selection_from_mask(geometry, keep, counts, extra=extra)
    if args.mode == "faithful":
        # The official sequence: the thumbnail's kept cells in raster order, then the canvas's kept
        # cells in its order; a stable sort brings the `sum(counts[1:])` kept ones first, no host sync.
        not_kept = (~keep.flatten()[order]).to(torch.int8)
        crop_sequence = order[torch.argsort(not_kept, stable=True)[:sum(counts[1:])]]
        selection.sequence = torch.cat([selection.thumbnail_indices, crop_sequence])
    return selection
