"""PruMerge+: PruMerge's outlier tokens plus spatially uniform samples of each view, every kept token merged
with its key-neighbours, the rest summed into one extra token (the official code's default forward).

The steps are `prumerge`'s (its module docstring describes the signals, the merge, the extra token, the
modes and the layout), with one step added between choosing and merging:

1. Counts: `adaptive=true` (default, the released forward `token_prune_merge_advanced_plus(if_adaptive=True)`):
   each view's IQR outlier ratio `r_v` and `k_v = int(c_v r_v)` (`prumerge.adaptive_counts`);
   `adaptive=false`: the official "training" branch at a fixed reduction ratio r (see Budget).
2. `prumerge.ranked_cells`: the `k_v` best-scored cells, best first.
3. `spatial_samples`: cells on a regular raster grid of the view (`sample_grid`), `arange(start, P - 1, stride)` (the
   last cell, 575, is never a candidate: P5), those already kept dropped, appended ascending:
   - adaptive: `start = 0`, `stride = int(int(1 / r_v) / 3)`;
   - training branch: `start = int(s / 2)`, `stride = s = int(1 / r)`.
   In `anyres` mode the samples are the grid's cells that hold image.
4. `prumerge.prune_merge`: key-neighbour merging of every kept token (samples included), the extra token,
   the `Merge` in CLIP space. Each view sends its top tokens best first, then its samples ascending, then
   its extra token (`faithful` mode: views concatenated, no newline, HiRED's port, which calls PruMerge+).

Budget. `adaptive=true` (default): the counts are the data's (`k_v` outliers and about
`(P - 1) / int(int(1 / r_v) / 3)` samples per view), so R and `--visual-tokens N` are not used and the
budget cannot be controlled, except that a full budget (R = 1, or N at least the cells offered) keeps
everything (as `prumerge`). The spec's reading of the paper (about 25% of the tokens on LLaVA-1.5) is not
verified here; the realised ratio is in the accounting. `adaptive=false`, the training branch, keeps
`k_v = int(c_v r)` top cells and about as many samples, so about `2 r` of each view:

- `budget=paper` (default): `r = R`, the official knob (about 2R of each view is sent);
- `budget=matched` (ours): `r = R N_van / (2 sum_v c_v)`, so top cells and samples total about R of
  LLaVA-NeXT's image tokens, extra tokens on top (fewer where samples coincide with top cells, more where
  `int(1 / r)` rounds the stride down);
- `--visual-tokens N`: `r = (N - E) / (2 sum_v c_v)` (E extra tokens), about N tokens in all.

Crash cases of the official code, and what happens here instead (it refuses nothing at run time):

- `r_v = 0` (no outlier in a view: common, e.g. flat scores): the official `1 / r` divides by zero. Here
  `1 / r` is taken as infinite, so the stride is unbounded and the grid is the single cell 0 (adaptive:
  the view sends cell 0 merged with its neighbours, then its extra token); the training branch's start
  `int(s / 2)` is then past the view, so it adds nothing.
- `r_v > 1/3` (`int(s / 3) = 0`, so `arange` raises): the stride is clamped to 1, every cell but the
  last is a candidate (the official rule's value at `r = 1/3`). The IQR marks at most about a quarter of
  a view's scores as outliers, so this cannot happen in practice; the clamp keeps the rule total.
- the training branch appends all its samples without removing those already kept, and its
  `new_idx` of width `2 k` raises unless the grid has exactly `k` cells (it works at r = 0.1 and 0.25 on
  576 patches, not at r = 0.05): here any number of samples is taken, those already kept are dropped as in
  the adaptive branch, and the extra token sums exactly the patches not kept (the official duplicates
  corrupt `complement_idx`, which then drops real patches from the extra token).
- the official code works for one view per call only (the membership test flattens over the batch): every
  view is handled on its own here, as in HiRED's port, which calls it view by view.
- a view whose offered cells are all kept sends no extra token (it would sum nothing).

Follows `42Shawn/LLaVA-PruMerge@097c041`, `llava/model/multimodal_encoder/clip_encoder.py:174-281`
(`token_prune_merge_advanced_plus`) and `:286-302` (the forward calls it adaptively), and HiRED's port
`hasanar1f/HiRED@502d6dd`, `prumerge_llava_next.py:767-877`, `:1063-1085` (`use_prumerge_plus = True`,
one call per view), restated in `shared/spec/baselines/prumerge.md` (sections 3.2, 5, 7: P5). Quirks kept
and what differs here: as `prumerge` (P1, P3, P4, P7 kept; per-view ratios, P2; no loops, P6), plus P5's
never-sampled last cell.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from llava.model.compression.common import Budget, CropGeometry, keep_everything
from llava.model.compression.prumerge import (
    FEATURES, KEYS, SCORE, official_input, prune_merge, ranked_cells, view_top_counts,
)
from llava.model.compression.registry import arg, register


@dataclasses.dataclass(frozen=True)
class PruMergePlusArgs:
    mode: Literal["faithful", "anyres"] = arg(
        "faithful", "faithful: HiRED's LLaVA-NeXT port (views concatenated, score order then samples, extra "
                    "tokens, merge type spatial: no unpadding, no newlines); anyres: the model's views, raster, "
                    "newlines")
    adaptive: bool = arg(
        True, "true: each view's IQR outlier ratio and samples every int(int(1/r)/3) cells (released forward; "
              "the budget is not used); false: the training branch at a fixed ratio from the budget")
    budget: Literal["paper", "matched"] = arg(
        "paper", "adaptive=false only. paper: reduction ratio R (about 2R of each view sent); matched (ours): "
                 "about R of LLaVA-NeXT's image tokens")


def sample_grid(ratios: list[float], adaptive: bool, num_patches: int) -> tuple[list[int], list[int]]:
    """`(starts, strides)` `[V]` of each view's sampling grid from its reduction ratio (Python floats, as
    released): adaptive `(0, int(int(1/r)/3))`, training branch `(int(s/2), s)` with `s = int(1/r)`. A
    stride of `num_patches` stands for the infinite one of r = 0, and strides below 1 (r > 1/3) are 1."""
    starts, strides = [], []
    for ratio in ratios:
        if ratio > 0:
            step = int(1 / ratio)
            start, stride = (0, step // 3) if adaptive else (step // 2, step)
        else:  # 1 / r infinite: no cell past the start, and the training branch's start is past the view
            start, stride = (0 if adaptive else num_patches), num_patches
        starts.append(min(start, num_patches))
        strides.append(min(max(stride, 1), num_patches))
    return starts, strides


def spatial_samples(offered: torch.Tensor, ranked: torch.Tensor, starts: list[int], strides: list[int]) -> torch.Tensor:
    """The samples `[V, P]` bool: cells `start_v + m stride_v < P - 1` of each view that it offers
    (`offered` `[V, P]` bool) and that are not among its ranked cells (`ranked` `[V, K]`, -1 padded)."""
    num_views, num_patches = offered.shape
    device = offered.device
    cells = torch.arange(num_patches, device=device)
    start = torch.tensor(starts, device=device)[:, None]
    stride = torch.tensor(strides, device=device)[:, None]
    on_grid = (cells >= start) & ((cells - start) % stride == 0) & (cells < num_patches - 1)
    kept = torch.zeros(num_views, num_patches + 1, dtype=torch.bool, device=device)
    kept.scatter_(1, torch.where(ranked >= 0, ranked, num_patches), True)
    return on_grid & offered & ~kept[:, :num_patches]


@register("prumerge_plus", needs={SCORE, KEYS, FEATURES}, args=PruMergePlusArgs, input_changes=official_input)
def select(views: torch.Tensor, signals: dict, geometry: CropGeometry, budget: Budget,
           args: PruMergePlusArgs = PruMergePlusArgs()):
    """PruMerge+ for one image: `views` `[V, P, D]` (shape and device only), the three signals of
    `prumerge`. `extra` records per view the tokens sent (`view_tokens`), top tokens (`top_tokens`), the
    samples' grid (`sample_stride`) and the ratio (`outlier_ratios`, or `reduction_ratio`)."""
    if budget.keeps_all:
        return keep_everything(geometry, views.device)
    scores, offered, counts, ratios, extra = view_top_counts(views, signals, geometry, budget, args, spread=2)
    ranked = ranked_cells(scores, offered, counts)
    starts, strides = sample_grid(ratios, args.adaptive, offered.shape[1])
    added = spatial_samples(offered, ranked, starts, strides)
    return prune_merge(views, signals, geometry, ranked, added, args.mode == "faithful",
                       dict(extra, top_tokens=counts, sample_stride=strides))
