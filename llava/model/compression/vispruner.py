"""VisPruner: keep each view's most [CLS]-attended tokens, then a diverse set of the others.

For one image with `V = 1 + C` views (thumbnail first, then the crops row-major), each
`side x side` patches (`P = side**2`, 576 for CLIP-336), from the post-softmax attention of the
[CLS] query in CLIP layer -2 (signal `cls_attn_penultimate`, `[V, P]`, head mean in the tower
dtype) and the patch features of layer -2 before the projector (signal `tower_features`,
`[V, 1 + P, C]`, its [CLS] row dropped here):

1. `view_token_counts`: how many tokens each view keeps, `T_v` (see Budget), and
   `split_counts`: `T_imp = int(T_v rho)` important and `T_div = T_v - T_imp` diverse ones
   (`rho`: argument `important_ratio`; the truncation is the released one, quirk Q6).
2. `rank_by_attention`: each view's cells in descending attention (`argsort`, as released). The
   first `T_imp` are the important tokens; the rest, still in that order, are the residual.
3. `removal_plan` (host arithmetic) and `remove_duplicates` (tensors): the released duplicate
   removal on the residual, rounds until `T_div` remain. In a round with residual length `R`,
   `r = min(8, R - T_div)`; the residual splits by position parity in its current order
   (A = positions 0, 2, 4, ..., B = 1, 3, 5, ...: pairing by attention rank, not by space,
   quirk Q3); each A token scores its highest cosine to any B token (unit-normalised tower
   features, tower dtype); the `r` highest-scoring A tokens go; the new residual is the
   surviving A tokens by that score, descending, then all of B in its order.
   `surviving_tokens` says how many A tokens a round keeps and `released_gather_raises` where the
   released code raises instead (quirk Q1, argument `survivor_gather`); `view_rounds` plans one view.
4. The view keeps the important tokens and the residual; only the set counts. `common.arrange_tokens`
   sends them in raster order: the thumbnail's, then the crop canvas row by row, as the released
   glue does (quirk Q2: no unpadding and no newline in `faithful` mode).

Modes (argument `mode`):

- `faithful` (default): the official code's input, declared as input changes: every image on
  the 672x672 2x2 grid (`image_grid_pinpoints=[[672, 672]]`: the release's `select_best_resolution`
  always answers 672x672) and no unpadding or newline (`mm_patch_merge_type=spatial`: the release
  strips `_unpad`), quirk Q2. Every multi-view image then has 5 views of P cells each.
- `anyres`: the same selection on the views every other method gets (the model's grid and
  merge type, `spatial_unpad` for LLaVA-NeXT): crop c offers only its `N_c` image cells, and
  a newline follows every image row.

Budget. View v keeps `T_v = min(c_v, round(R' c_v))` of the `c_v` cells it offers (P in
`faithful` mode; P for the thumbnail and `N_c` for crop c in `anyres` mode), of which
`int(T_v rho)` by attention:

- `budget=paper` (default): `R' = R`. In `faithful` mode every view keeps `T = round(576 R)`:
  the release's `--visual_token_num T` is per view, and the paper's LLaVA-NeXT count is `5 T`
  (R = 0.1 gives T = 58, 290 tokens). The official input sends the letterbox padding too, so
  against the model's own vanilla sequence (which the glue's accounting uses) that is more
  than R wherever the image does not fill the 2x2 canvas. In `anyres` mode each view keeps R of
  its own image cells, R of the vanilla image tokens to within rounding.
- `budget=matched` (ours, not the paper's): R of the model's own vanilla image tokens
  (`Budget.model_vanilla_image_tokens`, `N_van`: on the model's grid, not the forced one),
  spread over the cells offered, `R' = R N_van / sum c_v`, at least one token per view:
  `T = max(1, round(R N_van / V))` in `faithful` mode.
- `--visual-tokens N`: `R' = N / sum c_v` under both budgets, so about N tokens are sent
  (`faithful`: `T = round(N / V)` per view, the release's `--visual_token_num` being `N / 5`).

The counts depend on the image size and the budget only, so they are known on the host. A full
budget (R = 1, or N at least the cells offered) keeps everything: in `anyres` mode vanilla
LLaVA-NeXT, in `faithful` mode the official code at T = 576 (every cell, padding included,
no newline: the paper's "2880 tokens" upper bound).

Arguments: `mode` (`faithful`), `budget` (`paper`), `important_ratio` (`rho`, 0.5: the
scripts' default; the README also uses 0.75), `survivor_gather` (`official`).

Quirks kept (`shared/spec/baselines/vispruner.md`, section f):

- Q1, the released gather of the surviving A tokens: its index grid has width `R // 2 - r`,
  one too few when `R` is odd. `survivor_gather=official` (default) is the released result
  wherever the released code runs, its silent loss included: where one A token survives an odd
  residual the grid has width 0 and the survivor is lost too, so the view keeps `T - 1` (on
  576 cells: no T at rho = 0.5, only T = 14 at rho = 0.75; more often on the short residuals
  of `anyres` crops). Where the released code raises (an odd residual with more than two survivors: every
  T with T mod 4 in {2, 3} at rho = 0.5, T = 58 among them; or `r` exceeding A by two or more
  at tiny T), the view gets the `fixed` result, the one the line means. `fixed`: every round
  keeps every survivor, so every view keeps exactly T.
- Q2 through the input changes of `faithful` mode (above).
- Q3: the parity split along the attention-ordered list, re-sorted by duplicate score after each
  round, reproduced as released (not a generic ToMe).
- Q4: both sorts are the released `argsort(descending=True)` calls on the released shapes and
  the tower dtype (fp16 in evaluation), so ties fall as they do on the same backend.
- Q5: the views of one image form one batch; nothing is shared across views or images, so a
  batch of images equals each image alone.
- Q6: `T_imp = int(T rho)` truncates; `rho = 1` disables the diverse part.

Follows `Theia-4869/VisPruner@aefa01a` (`llava/model/llava_arch.py:140-186` `encode_images`,
`:188-272` the glue, `llava/mm_utils.py:29` the forced grid), restated in
`shared/spec/baselines/vispruner.md`. Changed here: the tower computes the one attention row
that is needed with SDPA kept, instead of every layer's full attention maps; the cosines of the
residual cells are computed once per image (one `[V, R, R]` product of the same unit vectors in
the tower dtype) and looked up in each round, where the release multiplies the gathered A and B
features again every round. On CPU in fp16 and bf16 the products are bit-identical to the
per-round ones; in fp32 a BLAS may round a product's last bit differently (not checked on CUDA).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from llava.model.compression.common import (
    Budget, CropGeometry, Selection, keep_everything, proportional_view_counts, selection_from_mask, view_image_areas,
    view_image_tokens,
)
from llava.model.compression.registry import arg, register

IMPORTANCE = "cls_attn_penultimate"
FEATURES = "tower_features"
MAX_REMOVED_PER_ROUND = 8  # the release's bipartite rounds drop at most 8 tokens each


@dataclasses.dataclass(frozen=True)
class VisPrunerArgs:
    mode: Literal["faithful", "anyres"] = arg(
        "faithful", "faithful: the official input (every image on the 672x672 2x2 grid, merge type spatial: "
                    "padding cells eligible, no newlines); anyres: the model's own views, unpadding and newlines")
    budget: Literal["paper", "matched"] = arg(
        "paper", "paper: each view keeps round(R x its cells), round(576 R) in faithful mode; matched (ours): "
                 "R of the image's unpadded tokens spread over the views, at least one each")
    important_ratio: float = arg(0.5, "rho: int(T rho) tokens of each view by [CLS] attention, the rest by diversity")
    survivor_gather: Literal["official", "fixed"] = arg(
        "official", "official: the released result (Q1: an odd residual with one surviving A token loses it), and "
                    "fixed's where the released code raises; fixed: every survivor kept, exactly T per view")

    def __post_init__(self):
        if not 0.0 <= self.important_ratio <= 1.0:
            raise ValueError(f"important_ratio must be in [0, 1], got {self.important_ratio!r}")


def official_input(args: VisPrunerArgs) -> dict:
    """The input changes of `faithful` mode (Q2): the forced 2x2 grid, no unpadding or newlines."""
    if args.mode != "faithful":
        return {}
    return {"image_grid_pinpoints": [[672, 672]], "mm_patch_merge_type": "spatial"}


def view_token_counts(geometry: CropGeometry, budget: Budget, args: VisPrunerArgs) -> list[int]:
    """`T_v = min(c_v, round(R' c_v))` for each view `[V]`, thumbnail first (`R'`: the module's
    Budget). Host arithmetic in exact fractions, so a rule written per view (`round(576 R)`) or
    per image (`round(R N / V)`) gives the same count, halves included (half to even)."""
    matched = args.budget == "matched"
    return proportional_view_counts(geometry, budget, matched, at_least=int(matched))


def split_counts(counts: list[int], important_ratio: float) -> tuple[list[int], list[int]]:
    """`(T_imp, T_div)` per view: `int(T rho)` important (float product, truncated, as released:
    Q6) and the rest diverse."""
    important = [int(count * important_ratio) for count in counts]
    return important, [count - kept for count, kept in zip(counts, important)]


def released_gather_raises(length: int, removed: int) -> bool:
    """Whether the released gather of the surviving A tokens raises (Q1). It indexes the
    `max(ceil(R/2) - r, 0)` survivors with a row grid of `R // 2 - r` columns made by `expand`
    (-1 keeps the one column, anything lower raises); the two broadcast unless an odd `R` leaves
    two or more columns (one survivor too many for the grid)."""
    grid = length // 2 - removed
    return grid <= -2 or (grid >= 2 and length % 2 == 1)


def surviving_tokens(length: int, removed: int, gather: str) -> int:
    """How many A tokens (positions 0, 2, 4, ... of a residual of `length`) one round keeps when
    it drops the `removed` most duplicated ones: `max(ceil(R/2) - r, 0)`, except that the
    released gather (`official`, Q1) loses the one survivor of an odd `R` (its grid has width
    `R // 2 - r = 0`, to which the survivor broadcasts)."""
    if gather == "official" and length % 2 == 1 and length // 2 == removed:
        return 0
    return max((length + 1) // 2 - removed, 0)


def view_rounds(residual_length: int, diverse_count: int, gather: str) -> list[tuple[int, int, int]] | None:
    """One view's rounds, each `(R, r, survivors)`, from its residual length and `T_div`; None
    for `official` where a round of the released code would raise. `T_div = 0`: no round (the
    residual is not kept at all, as released)."""
    rounds, length = [], residual_length
    while diverse_count > 0 and length > diverse_count:
        removed = min(MAX_REMOVED_PER_ROUND, length - diverse_count)
        if gather == "official" and released_gather_raises(length, removed):
            return None
        survivors = surviving_tokens(length, removed, gather)
        rounds.append((length, removed, survivors))
        length = _length_after(rounds[-1])
    return rounds


def _length_after(step: tuple[int, int, int]) -> int:
    """The residual length after a round `(R, r, survivors)`: the survivors, then all of B."""
    length, _, survivors = step
    return survivors + length // 2


def removal_plan(residual_lengths: list[int], diverse_counts: list[int],
                 gather: str) -> tuple[list[tuple[list[int], list[int], list[int]]], list[int]]:
    """The duplicate-removal rounds of every view, from the counts alone (host arithmetic).

    A view runs the released rounds (`official`) unless one of them would raise (Q1); it then
    runs the `fixed` rounds, which keep every survivor. Returns the rounds, each
    `(lengths, removed, survivors)` per view `[V]` (the residual length before the round, the A
    tokens it drops, the A tokens it keeps; a view whose rounds are over has `removed = 0`), and
    each view's final residual length `[V]`: `T_div`, one less where Q1 loses a token, 0 where
    `T_div = 0` (`rho = 1`, or T = 0).
    """
    per_view = [view_rounds(length, diverse, gather) for length, diverse in zip(residual_lengths, diverse_counts)]
    per_view = [view_rounds(length, diverse, "fixed") if rounds is None else rounds
                for rounds, length, diverse in zip(per_view, residual_lengths, diverse_counts)]
    final = [_length_after(rounds[-1]) if rounds else residual if diverse > 0 else 0
             for rounds, residual, diverse in zip(per_view, residual_lengths, diverse_counts)]
    # A view whose rounds are over stays as it is: removed 0, every A token kept.
    done = [(length, 0, (length + 1) // 2) for length in final]
    steps = max(map(len, per_view))
    rounds = [tuple(map(list, zip(*[view[step] if step < len(view) else finished
                                    for view, finished in zip(per_view, done)])))
              for step in range(steps)]
    return rounds, final


def rank_by_attention(scores: torch.Tensor, image_areas: torch.Tensor) -> torch.Tensor:
    """Each view's cells `[V, P]` in descending attention `scores` `[V, P]`, its image cells
    (`image_areas` `[V, P]` bool) first: the released `argsort(descending=True)`, on the same
    values when every cell is offered (`faithful` mode), so ties fall the same way (Q4)."""
    return scores.masked_fill(~image_areas, -torch.inf).argsort(dim=-1, descending=True)


def unit_features(tower_features: torch.Tensor) -> torch.Tensor:
    """The patch features `[V, P, C]` of `tower_features` `[V, 1 + P, C]` ([CLS] row dropped),
    each divided by its norm in the tower dtype, as released."""
    patches = tower_features[:, 1:]
    return patches / patches.norm(dim=-1, keepdim=True)


def remove_duplicates(features: torch.Tensor, residual: torch.Tensor,
                      rounds: list[tuple[list[int], list[int], list[int]]], final_lengths: list[int]) -> torch.Tensor:
    """Run the planned rounds (`removal_plan`) on each view's residual list.

    `features`: unit features `[V, P, C]`; `residual`: `[V, W]` cell indices, each view's list
    first in its order (descending attention), then padding. Returns the remaining lists
    `[V, max(final_lengths)]`, each view's first `final_lengths[v]` entries being its residual.
    All views run together; where their lengths differ (`anyres` mode) the shorter lists are
    padded and the padding masked, so with equal lengths every call has the released shape.
    """
    num_views, width = residual.shape
    device = residual.device
    if not rounds:
        return residual[:, :max(final_lengths)]
    # Every cosine between residual cells, once: each round looks up its A x B block.
    residual_features = features.gather(1, residual[..., None].expand(-1, -1, features.shape[-1]))
    cosines = (residual_features @ residual_features.transpose(1, 2)).flatten(1)   # [V, W * W]
    plan = torch.tensor([list(step) for step in rounds], device=device)           # [rounds, 3, V], one copy
    widths_after = [max(lengths) for lengths, _, _ in rounds[1:]] + [max(final_lengths)]
    positions = torch.arange(width, device=device).expand(num_views, -1)          # into `residual`
    for (lengths, _, _), step, width_after in zip(rounds, plan, widths_after):
        length, removed, survivors = step[:, :, None]                              # each [V, 1]
        current = positions[:, :max(lengths)]
        first, second = current[:, 0::2], current[:, 1::2]                       # A [V, nA], B [V, nB]
        pairs = (first[:, :, None] * width + second[:, None, :]).flatten(1)        # into the flat W x W block
        similarity = cosines.gather(1, pairs).view(num_views, first.shape[1], second.shape[1])  # [V, nA, nB]
        if min(lengths) == max(lengths):  # no padding: the released shapes and values
            duplicate = similarity.max(dim=-1).values                               # [V, nA]
        else:
            offsets = torch.arange(first.shape[1], device=device)
            second_valid = 2 * offsets[:second.shape[1]] + 1 < length              # [V, nB]
            duplicate = similarity.masked_fill(~second_valid[:, None, :], -torch.inf).max(dim=-1).values
            duplicate = duplicate.masked_fill(~(2 * offsets < length), -torch.inf)  # [V, nA], padding last
        ranked = first.gather(1, duplicate.argsort(dim=-1, descending=True))       # most duplicated first
        # The new list: A ranks r .. r + survivors - 1 (by score, descending), then B in its order.
        slots = torch.arange(width_after, device=device)
        source = torch.where(slots < survivors, removed + slots, first.shape[1] + slots - survivors)
        candidates = torch.cat([ranked, second], dim=1)
        updated = candidates.gather(1, source.clamp(max=candidates.shape[1] - 1))
        positions = torch.where(removed > 0, updated, current[:, :width_after])     # a view that is done keeps its list
    return residual.gather(1, positions)


def keep_first(keep: torch.Tensor, cells: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """`keep` `[V, P]` bool with the first `counts[v]` entries of `cells[v]` (`[V, W]`) set."""
    valid = torch.arange(cells.shape[1], device=cells.device) < torch.tensor(counts, device=cells.device)[:, None]
    spare = keep.shape[1]  # unkept entries go to a spare column, so nothing needs a host sync
    marked = torch.zeros(keep.shape[0], spare + 1, dtype=torch.bool, device=keep.device)
    marked.scatter_(1, torch.where(valid, cells, spare), True)
    return keep | marked[:, :spare]


@register("vispruner", needs={IMPORTANCE, FEATURES}, args=VisPrunerArgs, input_changes=official_input)
def select(views: torch.Tensor, signals: dict, geometry: CropGeometry, budget: Budget,
           args: VisPrunerArgs = VisPrunerArgs()) -> Selection:
    """VisPruner for one image: `views` `[V, P, D]` (only its device is used), `signals`:
    `cls_attn_penultimate` `[V, P]` and `tower_features` `[V, 1 + P, C]`. `extra` records each
    view's kept tokens and their split, important and diverse."""
    if budget.keeps_all:
        return keep_everything(geometry, views.device)
    num_views, num_patches = views.shape[:2]
    scores, tower_features = signals[IMPORTANCE].to(views.device), signals[FEATURES].to(views.device)
    if tuple(scores.shape) != (num_views, num_patches):
        raise ValueError(f"{IMPORTANCE} must have shape [{num_views}, {num_patches}] ([V, P], as the views), "
                         f"got {list(scores.shape)}")
    if tower_features.ndim != 3 or tuple(tower_features.shape[:2]) != (num_views, 1 + num_patches):
        raise ValueError(f"{FEATURES} must have shape [{num_views}, {1 + num_patches}, C] ([V, 1 + P, C]), "
                         f"got {list(tower_features.shape)}")
    counts = view_token_counts(geometry, budget, args)
    important, diverse = split_counts(counts, args.important_ratio)
    offered = view_image_tokens(geometry)
    rounds, residual_kept = removal_plan([cells - kept for cells, kept in zip(offered, important)], diverse,
                                         args.survivor_gather)
    order = rank_by_attention(scores, view_image_areas(geometry, views.device))     # [V, P]
    keep = keep_first(torch.zeros_like(order, dtype=torch.bool), order, important)
    residual_width = max(cells - kept for cells, kept in zip(offered, important))
    starts = torch.tensor(important, device=views.device)[:, None]
    slots = torch.arange(residual_width, device=views.device)
    residual = order.gather(1, (starts + slots).clamp(max=num_patches - 1))       # [V, W], descending attention
    residual = remove_duplicates(unit_features(tower_features), residual, rounds, residual_kept)
    keep = keep_first(keep, residual, residual_kept)
    kept_counts = [first + rest for first, rest in zip(important, residual_kept)]
    return selection_from_mask(geometry, keep, kept_counts,
                               extra=dict(view_tokens=kept_counts, important_tokens=important,
                                          diverse_tokens=residual_kept))
