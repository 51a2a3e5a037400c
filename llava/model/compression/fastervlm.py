"""FasterVLM: keep the tokens of each view that its [CLS] query attends to most.

For one image with `V = 1 + C` views (thumbnail first, then the crops row-major), each
`side x side` patches (`P = side**2`, 576 for CLIP-336), from the post-softmax attention of the
[CLS] query in CLIP layer -2 (signal `cls_attn_penultimate`, `[V, P]`, head mean):

1. `view_token_counts`: how many tokens each view keeps, `T_v` (see Budget).
2. `select_view_tokens`: in each view, the `T_v` cells with the highest [CLS] attention among
   the cells the view offers (`torch.topk` per view, as released). Only the set is kept; the
   score order is dropped.
3. `common.arrange_tokens` sends the kept tokens in raster order: the thumbnail's, then the crop
   canvas row by row (arrangement `raster`, so the `official` and `spatial` layouts agree).

Modes (argument `mode`):

- `faithful` (default): the official code's input. It forces the merge type to `spatial`
  (quirk F1), declared here as the input change `mm_patch_merge_type=spatial`: nothing is
  unpadded, so every view offers all P cells (letterbox padding included), and no newline is sent
  anywhere, single views included.
- `anyres`: the same scores and per-view top-T, on the views every other method gets (the
  config's merge type, `spatial_unpad` for LLaVA-NeXT): crop c offers only its `N_c` image cells,
  and a newline follows every image row.

Budget. View v keeps `T_v = min(c_v, round(R' c_v))` of the `c_v` cells it offers (P in
`faithful` mode; P for the thumbnail and `N_c` for crop c in `anyres` mode):

- `budget=paper` (default): `R' = R`. In `faithful` mode every view keeps `T = round(576 R)`,
  as in the paper's LLaVA-NeXT table (10% -> 58 per view, 290 for 5 views), the same T for every
  view, all-padding crops included (quirk F2). Where there is padding this is more than R of
  LLaVA-NeXT's tokens: a 1000x700 image (2x2 grid, 2208 vanilla image tokens) sends 290 = 13.1%
  at R = 0.1, and the run's accounting (against the model's own vanilla sequence) reports 13.1%.
  In `anyres` mode each view keeps R of its own image cells: the paper keeps R of every view it
  sees, and applied to the views LLaVA-NeXT sends this keeps R of the vanilla image tokens to
  within rounding, the budget other methods are held to (a uniform `round(576 R)` would be
  capped on padding-cut crops and miss it).
- `budget=matched` (ours, not the paper's): the vanilla budget `R N_van` (`N_van`: LLaVA-NeXT's
  image tokens, unpadded, newlines excluded) spread over the cells offered, `R' = R N_van / sum c_v`,
  and at least one token per view: `T = max(1, round(R N_van / V))` in `faithful` mode. In
  `anyres` mode `sum c_v = N_van`, so it is the paper budget with at least one token per view.
- `--visual-tokens N`: `R' = N / sum c_v` under both budgets, so about N tokens are sent
  (`faithful`: `T = round(N / V)` per view, the paper's token count being `V T`).

The counts depend on the image size and the budget only, not on the scores. A full budget
(R = 1, or N at least the cells offered) keeps everything: in `anyres` mode vanilla LLaVA-NeXT,
in `faithful` mode the official code at T = 576, its "2880 tokens" row (every cell, no newline),
which is more than LLaVA-NeXT's image tokens wherever there is padding (F1).

Follows `Theia-4869/FasterVLM@f5d5f12` (`llava/model/llava_arch.py:140-240`), restated in
`shared/spec/baselines/fastervlm.md`. Changed here: the tower computes the one attention row
that is needed with SDPA kept, instead of every layer's full attention maps (F6); the released
code's extra return values (F5) do not exist.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from llava.model.compression.common import (
    Budget, CropGeometry, Selection, keep_everything, proportional_view_counts, selection_from_mask, view_image_areas,
)
from llava.model.compression.registry import arg, register

SIGNAL = "cls_attn_penultimate"


@dataclasses.dataclass(frozen=True)
class FasterVLMArgs:
    mode: Literal["faithful", "anyres"] = arg(
        "faithful", "faithful: the official input (merge type spatial: padding cells eligible, no newlines); "
                    "anyres: the model's own views, unpadding and newlines")
    budget: Literal["paper", "matched"] = arg(
        "paper", "paper: each view keeps round(R x its cells), round(576 R) in faithful mode; matched (ours): "
                 "R of LLaVA-NeXT's image tokens spread over the views, at least one each")


def official_input(args: FasterVLMArgs) -> dict:
    """The input change of `faithful` mode: the official code forces merge type `spatial` (F1)."""
    return {"mm_patch_merge_type": "spatial"} if args.mode == "faithful" else {}


def view_token_counts(geometry: CropGeometry, budget: Budget, args: FasterVLMArgs) -> list[int]:
    """`T_v = min(c_v, round(R' c_v))` for each view `[V]`, thumbnail first (`R'`: the module's
    Budget). Host-side arithmetic on a handful of numbers, done in exact fractions so that a rule
    written per view (`round(576 R)`) or per image (`round(R N_van / V)`) gives the same count,
    halves included (Python's `round`: half to even)."""
    matched = args.budget == "matched"
    return proportional_view_counts(geometry, budget, matched, at_least=int(matched))


def select_view_tokens(scores: torch.Tensor, image_areas: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Keep mask `[V, P]`: in view v, the `counts[v]` cells with the highest `scores` `[V, P]`
    among its image cells `image_areas` `[V, P]` bool (`counts[v]` at most their number).

    One `topk` over all views with `k = max(counts)`; each view keeps the first `counts[v]` of
    its ranked cells. With equal counts and every cell offered (`faithful` mode) this is the
    released call, `topk(scores, k=T, dim=1)`, so ties fall the same way on the same backend.
    """
    largest = max(counts)
    eligible = scores.masked_fill(~image_areas, -torch.inf)
    ranked = torch.topk(eligible, k=largest, dim=1).indices                                  # [V, max T], best first
    within_count = torch.arange(largest, device=scores.device) < torch.tensor(counts, device=scores.device)[:, None]
    return torch.zeros_like(image_areas).scatter_(1, ranked, within_count)


@register("fastervlm", needs={SIGNAL}, args=FasterVLMArgs, input_changes=official_input)
def select(views: torch.Tensor, signals: dict, geometry: CropGeometry, budget: Budget,
           args: FasterVLMArgs = FasterVLMArgs()) -> Selection:
    """FasterVLM for one image: `views` `[V, P, D]` (only its device is used: the scores decide),
    `signals["cls_attn_penultimate"]` `[V, P]`. `extra` records each view's `T_v`."""
    if budget.keeps_all:
        return keep_everything(geometry, views.device)
    scores = signals[SIGNAL]
    if tuple(scores.shape) != tuple(views.shape[:2]):
        raise ValueError(f"{SIGNAL} must have shape {list(views.shape[:2])} ([V, P], as the views), "
                         f"got {list(scores.shape)}")
    counts = view_token_counts(geometry, budget, args)
    keep = select_view_tokens(scores.to(views.device), view_image_areas(geometry, views.device), counts)
    return selection_from_mask(geometry, keep, counts, extra=dict(view_tokens=counts))
