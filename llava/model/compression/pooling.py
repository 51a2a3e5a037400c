"""Pooling: average-pool each view's image area to a smaller grid (the simplest spatial baseline).

1. `pooling_windows`: each view's image area (`h x w` cells: the thumbnail's 24 x 24, a crop's
   unpadded box) is cut into `round(h sqrt(R)) x round(w sqrt(R))` windows (at least 1 x 1),
   rows and columns split as evenly as integers allow (window sizes differ by at most one cell),
   every cell in exactly one window.
2. `select`: one token per window, the mean of its cells' features, placed at the window's
   top-left cell. The merged tokens then go through the shared arrangement like any kept token
   (raster order, one newline per image row), so only the features differ from a selection.

Budget: about R of the image tokens (`round(h sqrt(R)) round(w sqrt(R))` per view: exactly R
when `24 sqrt(R)` is whole, e.g. 144 of 576 at R = 0.25); `--visual-tokens N` uses
`R = N / vanilla image tokens`. No official code; `official` = `spatial`.
"""

from __future__ import annotations

import math

import torch

from llava.model.compression.common import (
    Budget, CropGeometry, Merge, keep_everything, selection_from_mask,
)
from llava.model.compression.registry import NoArgs, register


def pooling_windows(geometry: CropGeometry, ratio: float, device) -> tuple[torch.Tensor, list[int]]:
    """Window index of every cell `[V, P]` int64 (numbered view by view, raster inside a view; -1
    outside the image area) and the windows per view `[V]`."""
    side = geometry.side
    boxes = [(0, 0, side, side), *geometry.crop_boxes]
    scale = math.sqrt(ratio)
    rows, cols = torch.arange(side, device=device)[:, None], torch.arange(side, device=device)[None, :]
    window_ids, counts, first = [], [], 0
    for top, left, height, width in boxes:
        if height == 0:
            window_ids.append(torch.full((side * side,), -1, dtype=torch.long, device=device))
            counts.append(0)
            continue
        out_h, out_w = max(1, round(height * scale)), max(1, round(width * scale))
        inside = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)
        window = ((rows - top) * out_h // height) * out_w + (cols - left) * out_w // width
        window_ids.append(torch.where(inside, first + window, -1).flatten())
        counts.append(out_h * out_w)
        first += out_h * out_w
    return torch.stack(window_ids), counts


@register("pooling", args=NoArgs)
def select(views: torch.Tensor, signals: dict, geometry: CropGeometry, budget: Budget, args: NoArgs = NoArgs()):
    """`views` `[V, P, D]`; no signals. Returns a `Merge` whose features are the window means."""
    if budget.keeps_all:
        return keep_everything(geometry, views.device)
    windows, counts = pooling_windows(geometry, budget.ratio, views.device)
    total, cells = sum(counts), windows.numel()
    target = torch.where(windows >= 0, windows, total).flatten()  # cells outside the image go to a spare slot
    flat = views.flatten(0, 1)
    sizes = torch.bincount(target, minlength=total + 1).clamp(min=1)
    means = flat.new_zeros(total + 1, flat.shape[1]).index_add_(0, target, flat).div_(sizes[:, None].to(flat.dtype))
    features = means[:total]
    corner = torch.full((total + 1,), cells, device=views.device).scatter_reduce_(
        0, target, torch.arange(cells, device=views.device), "amin")[:total]       # each window's top-left cell
    keep = torch.zeros(cells, dtype=torch.bool, device=views.device).scatter_(0, corner, True).view_as(windows)
    return selection_from_mask(geometry, keep, counts, kind=Merge, features=features, source_map=windows)
