"""CDPruner: keep, in each view, a diverse set of tokens that the instruction makes relevant (conditional DPP).

For one image with `V = 1 + C` views (thumbnail first, then the crops row-major), each
`side x side` patches (`P = side**2`, 576 for CLIP-336), from the projected features `views`
`[V, P, D]`, the CLIP image embeddings of the patches (signal `patch_embeds` `[V, P, E]`: the
selected layer -2 through the tower's `post_layernorm`, then in float32 through CLIP's visual
projection) and the CLIP text embeddings of the instruction (signal `instruction_embeds`
`[M, E]`, one per 77-token segment of the text):

1. `token_similarity`: `S = cos` of the projected features of each view `[V, P, P]`, normalised
   in the features' dtype, then a float32 product (as released).
2. `instruction_relevance`: `r = mean over the M segments of -cos(e_img, e_txt)` `[V, P]`,
   negated on purpose (quirk Q4), then min-max normalised, `(r - min + 1e-6) / (max - min)`,
   over every cell offered by every view of the image (Q3, see below).
3. `conditional_kernel`: `L = diag(r) S diag(r)` `[V, P, P]` float32.
4. `view_token_counts`: how many tokens each view keeps, `T_v` (see Budget).
5. `greedy_map`: the greedy MAP of the DPP with kernel L, the fast incremental-Cholesky form,
   every view at once: `T` steps, each picking the cell with the largest residual gain `d`
   (first `argmax d = r^2`: the most relevant cell), then `e = (L[j] - sum_t c_t[j] c_t) / sqrt(d_j)`,
   `d -= e^2`. Only cells a view offers are eligible; the picks are kept as a set, so the
   sequence is raster order (the pick order is discarded, as released).
6. `common.arrange_tokens` sends the thumbnail's kept tokens, then the crop canvas row by row.

Modes (argument `mode`):

- `faithful` (default): the official code's input, declared as input changes: every image on
  the 672x672 grid (`image_grid_pinpoints=[[672, 672]]`: a 2x2 grid of crops whatever the aspect
  ratio, letterboxed, quirk Q1; preprocessing follows) and merge type `spatial` (no unpadding, no
  newlines anywhere, single views included, Q2). Every view offers all P cells, padding included.
- `anyres`: the model's own grid, unpadding and newlines. Each crop's DPP runs on its image cells
  only (the spec's "restrict each crop's DPP to its image area"; padding cells are never
  eligible), and the relevance is min-max normalised over the image cells.

Budget. `R` in (0, 1] or `--visual-tokens N`; `V` views; `c_v` the cells view v offers (P in
`faithful` mode; the thumbnail's P and crop c's `N_c` image cells in `anyres` mode):

- `budget=paper` (default), `faithful`: `T = round(576 R)` on every view (the official
  `--visual_token_num`, per view: R = 1/9 gives T = 64, the paper's "320 tokens" = 5 x 64 of its
  2880-token forced-grid model), the same T on every view, all-padding crops included. With
  `--visual-tokens N`: `T = round(N / V)`, so about N tokens are sent (the paper's count is V T).
- `budget=paper`, `anyres`: the spec's "faithful to our R": `T = int(R N_van / V)` per view,
  `N_van` the model's vanilla image tokens (576 + the unpadded crop cells, newlines excluded),
  at most `c_v` in each view, so at most R N_van tokens are sent (less where a crop has fewer
  than T image cells; the accounting reports what is realised). With `--visual-tokens N`:
  `T = int(N / V)`.
- `budget=matched` (ours, not the paper's): exactly `round(R N_van)` tokens (N with
  `--visual-tokens`), shared over the views in proportion to the cells they offer
  (`common.apportion`: equal shares in `faithful` mode). `N_van` is the model's own vanilla
  count (`Budget.model_vanilla_image_tokens`, on the model's grid, not the forced 2x2 one).

The counts depend on the image size and the budget only. A full budget (R = 1, or N at least the
input's image tokens) keeps everything unlooked: in `anyres` mode vanilla LLaVA-NeXT, in
`faithful` mode the official code at T = 576, its "2880 tokens" row (every cell of the forced 2x2
canvas, no newline), which is more than the model's own vanilla sequence wherever the model's
grid differs or there is padding.

Follows `Theia-4869/CDPruner@9541616` (`llava/model/llava_arch.py:140-187` for steps 1-5,
`:189-272` for the sequence, `llava/mm_utils.py:30` for the forced grid,
`llava/model/multimodal_encoder/clip_encoder.py:38-98` for the embeddings, restated in
`shared/spec/baselines/cdpruner.md`). Kept: Q1, Q2 (faithful mode), Q4, Q5 (the text tower's
segmentation, `multimodal_encoder/clip_text.py`), Q7 (text tower and projection in float32),
Q8 (`argmax` takes the first of tied gains, as released). Different here:

- Q3: the official min-max spans every view of every image in the call, so with several images
  one image's relevance depends on the others; here it spans the views of one image, which is
  the official result at the batch size 1 its loaders assert (batched equals per-sample).
- Q6 (a guard, not an argument): where the official code would take `sqrt` of a gain that is
  not positive (the kernel's numerical rank used up: NaN, then repeated picks), such a step
  picks the cell with the largest residual gain without updating the others, so every view
  still keeps T distinct cells; wherever the official picks are defined they are unchanged.
  Likewise a zero feature vector is normalised to zero instead of NaN, and a relevance without
  spread (max = min, where the official divides by zero) is taken as uniform, which picks what
  the official's limit would (the greedy MAP is invariant to a uniform scale of r).
- The released similarity, relevance and DPP run once over every view of the call; here over
  the views of one image (the same per view).
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Literal

import torch

from llava.model.compression.common import (
    Budget, CropGeometry, Selection, apportion, keep_everything, selection_from_mask, view_image_areas,
    view_image_tokens,
)
from llava.model.compression.registry import arg, register

PATCH_EMBEDS = "patch_embeds"
INSTRUCTION_EMBEDS = "instruction_embeds"
OFFICIAL_PINPOINTS = [[672, 672]]  # mm_utils.py:30, "to get 2880 visual tokens" (Q1)
RELEVANCE_OFFSET = 1e-6            # the released min-max's numerator offset


@dataclasses.dataclass(frozen=True)
class CDPrunerArgs:
    mode: Literal["faithful", "anyres"] = arg(
        "faithful", "faithful: the official input (every image on the 672x672 2x2 grid, merge type spatial: padding "
                    "cells eligible, no newlines); anyres: the model's own grid, unpadding and newlines, each crop's "
                    "DPP on its image cells")
    budget: Literal["paper", "matched"] = arg(
        "paper", "paper: T = round(576 R) per view (faithful), T = int(R N_van / V) per view (anyres); matched "
                 "(ours): exactly round(R N_van) tokens shared over the views by their cells")


def official_input(args: CDPrunerArgs) -> dict:
    """The input changes of `faithful` mode: the forced 2x2 grid (Q1) and merge type `spatial` (Q2)."""
    if args.mode != "faithful":
        return {}
    return {"image_grid_pinpoints": OFFICIAL_PINPOINTS, "mm_patch_merge_type": "spatial"}


def view_token_counts(geometry: CropGeometry, budget: Budget, args: CDPrunerArgs) -> list[int]:
    """`T_v` for each view `[V]`, thumbnail first (the module's Budget). Host-side arithmetic on a
    handful of numbers, in exact fractions (Python's `round`: half to even)."""
    cells = view_image_tokens(geometry)  # c_v: P each without unpadding
    num_views = len(cells)
    if args.budget == "matched":
        total = (budget.tokens if budget.tokens is not None
                 else round(Fraction(budget.ratio) * budget.model_vanilla_image_tokens))
        return apportion(total, [float(count) for count in cells], cells)
    if args.mode == "faithful":
        per_view = (round(Fraction(budget.tokens, num_views)) if budget.tokens is not None
                    else round(Fraction(budget.ratio) * geometry.side**2))
    else:
        kept = (Fraction(budget.tokens) if budget.tokens is not None
                else Fraction(budget.ratio) * budget.vanilla_image_tokens)
        per_view = int(kept / num_views)
    return [min(count, per_view) for count in cells]


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    """`vectors / ||vectors||` over the last dimension, in their dtype; a zero vector stays zero
    (the released division would give NaN). Equal to the released division for every norm of at
    least the dtype's smallest normal number."""
    norms = vectors.norm(dim=-1, keepdim=True)
    return vectors / norms.clamp_min(torch.finfo(norms.dtype).tiny)


def token_similarity(views: torch.Tensor) -> torch.Tensor:
    """Cosine similarity `[V, P, P]` float32 of the projected features `views` `[V, P, D]` within
    each view: normalised in the features' dtype, then cast and multiplied in float32 (as released)."""
    unit = _unit(views).float()
    return torch.bmm(unit, unit.transpose(1, 2))


def instruction_relevance(patch_embeds: torch.Tensor, instruction_embeds: torch.Tensor,
                          offered: torch.Tensor) -> torch.Tensor:
    """Relevance `r` `[V, P]` float32 of each cell to the instruction.

    `patch_embeds` `[V, P, E]` and `instruction_embeds` `[M, E]` (CLIP space, float32), `offered`
    `[V, P]` bool: the cells taking part. `r = mean_m(-cos(e_img, e_txt_m))` (negated, Q4), then
    `(r - min + 1e-6) / (max - min)` with min and max over the offered cells of all the views
    (Q3, per image). Cells not offered get a value too, which the DPP never reads.
    """
    image = _unit(patch_embeds.float())
    text = _unit(instruction_embeds.float())
    relevance = (-(image @ text.T)).mean(dim=-1)                                         # [V, P]
    lowest = relevance.masked_fill(~offered, torch.inf).amin()
    spread = relevance.masked_fill(~offered, -torch.inf).amax() - lowest
    normalised = (relevance - lowest + RELEVANCE_OFFSET) / spread
    # No spread: the released division by zero; every offered cell is equally relevant (Q6 guard).
    return torch.where(spread > 0, normalised, torch.ones_like(relevance))


def conditional_kernel(similarity: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """`L = diag(r) S diag(r)` `[V, P, P]` from `similarity` `[V, P, P]` and `relevance` `[V, P]`."""
    return relevance[:, :, None] * similarity * relevance[:, None, :]


def greedy_map(kernel: torch.Tensor, eligible: torch.Tensor, steps: int) -> torch.Tensor:
    """The cells `[V, steps]` int64 picked, in pick order, by the greedy MAP of the DPP with kernel
    `kernel` `[V, P, P]` in each view, among its `eligible` `[V, P]` bool cells.

    The fast incremental Cholesky (released `encode_images`): residual gains `d = diag(L)`; each
    step picks `j = argmax d` among the cells not yet picked, sets
    `e = (L[j] - sum_t c_t[j] c_t) / sqrt(d_j)`, stores `c = e` and subtracts `e^2` from `d`.
    All views advance together: a loop over the steps (each pick depends on the last), each step
    a handful of batched tensor operations, no host sync. A step whose best gain is not positive
    (Q6: the released code's `sqrt` would give NaN) updates nothing. A view with fewer eligible
    cells than `steps` repeats picks after its last eligible one: read only its first `T_v`.
    """
    num_views, num_patches, _ = kernel.shape
    rows = torch.arange(num_views, device=kernel.device)
    largest = torch.finfo(kernel.dtype).max
    gains = kernel.diagonal(dim1=1, dim2=2).clone()                                 # d [V, P]
    available = eligible.clone()
    factors = kernel.new_zeros(num_views, steps, num_patches)                       # c_t as rows [V, T, P]
    picks = torch.empty(num_views, steps, dtype=torch.long, device=kernel.device)
    for step in range(steps):
        # A picked or ineligible cell is never the best; a NaN gain (only after the guard's steps,
        # from overflow) ranks below every finite one, where `argmax` would prefer it.
        candidates = torch.where(available, gains.nan_to_num(nan=-largest, posinf=largest, neginf=-largest),
                                 -torch.inf)
        best = candidates.argmax(dim=1)                                             # [V]
        picks[:, step] = best
        gain = gains[rows, best]                                                    # [V]
        proceed = (gain > 0) & available[rows, best]
        earlier = factors[rows, :step, best]                                        # c_t[j] [V, step]
        residual = kernel[rows, best] - torch.bmm(earlier[:, None, :], factors[:, :step]).squeeze(1)  # [V, P]
        update = torch.where(proceed[:, None], residual / torch.where(proceed, gain, 1.0).sqrt()[:, None], 0.0)
        factors[:, step] = update
        gains -= update.square()
        available[rows, best] = False
    return picks


def keep_from_picks(picks: torch.Tensor, counts: list[int], num_patches: int) -> torch.Tensor:
    """Keep mask `[V, P]` of the first `counts[v]` picks of each view (`picks` `[V, T]`)."""
    num_views, steps = picks.shape
    wanted = torch.arange(steps, device=picks.device) < torch.tensor(counts, device=picks.device)[:, None]
    # Unwanted picks go to a spare column, so repeated cells never overwrite a wanted one.
    target = torch.where(wanted, picks, num_patches)
    keep = torch.zeros(num_views, num_patches + 1, dtype=torch.bool, device=picks.device)
    return keep.scatter_(1, target, True)[:, :num_patches]


def _check_signals(views: torch.Tensor, signals: dict) -> tuple[torch.Tensor, torch.Tensor]:
    patch_embeds, instruction_embeds = signals[PATCH_EMBEDS], signals[INSTRUCTION_EMBEDS]
    if patch_embeds.ndim != 3 or tuple(patch_embeds.shape[:2]) != tuple(views.shape[:2]):
        raise ValueError(f"{PATCH_EMBEDS} must have shape [{views.shape[0]}, {views.shape[1]}, E] ([V, P, E], as the "
                         f"views), got {list(patch_embeds.shape)}")
    width = patch_embeds.shape[2]
    if instruction_embeds.ndim != 2 or instruction_embeds.shape[0] < 1 or instruction_embeds.shape[1] != width:
        raise ValueError(f"{INSTRUCTION_EMBEDS} must have shape [M, {width}] (M >= 1 text segments, "
                         f"the width of {PATCH_EMBEDS}), got {list(instruction_embeds.shape)}")
    return patch_embeds.to(views.device), instruction_embeds.to(views.device)


@register("cdpruner", needs={PATCH_EMBEDS, INSTRUCTION_EMBEDS}, args=CDPrunerArgs, input_changes=official_input)
def select(views: torch.Tensor, signals: dict, geometry: CropGeometry, budget: Budget,
           args: CDPrunerArgs = CDPrunerArgs()) -> Selection:
    """CDPruner for one image: `views` `[V, P, D]` projected features, `signals["patch_embeds"]`
    `[V, P, E]`, `signals["instruction_embeds"]` `[M, E]`. `extra` records each view's `T_v`."""
    if budget.keeps_all:
        return keep_everything(geometry, views.device)
    patch_embeds, instruction_embeds = _check_signals(views, signals)
    counts = view_token_counts(geometry, budget, args)
    offered = view_image_areas(geometry, views.device)
    relevance = instruction_relevance(patch_embeds, instruction_embeds, offered)
    kernel = conditional_kernel(token_similarity(views), relevance)
    keep = keep_from_picks(greedy_map(kernel, offered, max(counts)), counts, views.shape[1])
    return selection_from_mask(geometry, keep, counts, extra=dict(view_tokens=counts))
