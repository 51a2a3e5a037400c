"""PruMerge: per view, keep the patches the [CLS] query singles out, add to each the attention-weighted sum of
its 32 key-neighbours, and send the rest as one summed extra token, all in CLIP space before the projector.

For one image with `V = 1 + C` views (thumbnail first, then the crops row-major), each `side x side` patches
(`P = side**2`, 576 for CLIP-336), from three tower signals: the score `a = cls_attn_full_width_last` `[V, P]`
(the last layer's [CLS] row as one full-width head, quirk P1), the last layer's patch keys `keys_last`
`[V, P, C]`, and the pre-projector features `tower_features` `[V, 1 + P, C]` (their [CLS] row is dropped):

1. Counts, per view (`c_v`: the cells the view offers, see Modes): `top_counts` at a fixed reduction ratio
   (see Budget), or with `adaptive=true` `outlier_counts`: the scores above `Q3 + 1.5 (Q3 - Q1)` of the
   view's own scores (IQR; quantiles with linear interpolation in float32, as `np.percentile`), `r_v`
   their share and `k_v = int(c_v r_v)` (the released `outlier_dectection`).
2. `ranked_cells`: the `k_v` best-scored cells of each view, best first (`torch.topk`, as released).
3. `sending_order`: each view's kept cells in the order they are sent, then its other offered cells
   ascending (the released `complement_idx`), then the cells it does not offer.
4. `merge_key_neighbours`: kept token i becomes `x_i + sum_j a_j x_j` over the 32 patches whose
   L2-normalised keys are most similar to its own (cosine), among *all other* offered patches of the view,
   kept ones included: an unnormalised weighted sum (quirk P3) of the original features.
5. `extra_tokens`: each view's `sum_j a_j x_j` over its offered patches that are not kept (quirk P4).
6. `prune_merge`: the `Merge` (`feature_space="tower"`: the glue projects the merged and extra tokens).

Modes (argument `mode`):

- `faithful` (default): HiRED's LLaVA-NeXT port of the official code. Every view is compressed on its own
  and the views are concatenated, thumbnail first: each view's kept tokens best score first, then its extra
  token; no unpadding, no newline (declared as the input change `mm_patch_merge_type=spatial`, so every
  view offers all P cells, letterbox padding included), sent as the selection's `sequence` (quirk P7).
- `anyres`: the same per-view steps on the views every other method gets (the config's merge type,
  `spatial_unpad` for LLaVA-NeXT): crop c offers only its `N_c` image cells (scores, neighbours, IQR and the
  extra token see those only), the merged kept cells are sent in raster order with a newline after every
  image row, and the views' extra tokens follow at the end of the image's sequence, thumbnail's first. A
  view that offers no cell sends nothing.

Budget. `adaptive=false` (default): view v keeps `k_v = int(c_v r)` patches (the official
`int(N * reduction_ratio)`, in floating point) and sends its extra token, `k_v + 1` tokens:

- `budget=paper` (default): `r = R`. In `faithful` mode that is the GlobalCom2 paper's "PruMerge, 10%"
  row as the spec reads it (section 5): `int(576 R) + 1` tokens in every view, 58 at R = 0.1 (290 for 5
  views), 145 at R = 0.25, counted against the model's own vanilla sequence (2208 image tokens for a
  1000x700 image, where the official input's 2880 cells include the padding). In `anyres` mode each view
  keeps R of its own image cells.
- `budget=matched` (ours, the spec's section 5): `r = R N_van / sum_v c_v` (`N_van`: LLaVA-NeXT's image
  tokens, unpadded, newlines excluded): in `faithful` mode `R N_van / (V 576)` per view, so the kept patches
  total about R of the vanilla image tokens, the extra tokens on top as in the paper's count. In `anyres`
  mode `sum_v c_v = N_van`: the paper budget.
- `--visual-tokens N`: N counts every token sent, extra tokens included: with `E` views offering cells,
  view v keeps `floor((N - E) c_v / sum_v c_v)` patches (exact integers) plus its extra token, between
  `N - V` and N in all (at least the E extra tokens).
- `adaptive=true`: the released LLaVA-1.5 setting (`if_adaptive=True`): the counts are the data's (the
  IQR outliers of each view), so R and N are not used, except that a full budget keeps everything. The
  official code pools the IQR over all views of a tower call (quirk P2); HiRED's port, followed here, calls
  the tower once per view, so every view has its own ratio.

A full budget (R = 1, or N at least the cells offered) keeps everything without merging and without extra
tokens: in `anyres` mode vanilla LLaVA-NeXT, in `faithful` mode every cell of the official input
(`V x 576`, letterbox padding included, no newline), which is more than the model's vanilla image tokens
wherever there is padding.

Follows `42Shawn/LLaVA-PruMerge@097c041`, `llava/model/multimodal_encoder/clip_encoder.py:12-25`
(`complement_idx`), `:34-47` (`outlier_dectection`), `:85-171` (`token_prune_merge_advanced`), and its
LLaVA-NeXT port `hasanar1f/HiRED@502d6dd`, `prumerge_llava_next.py:879-967` (PruMerge), `:1063-1085` (one
tower call per view, views concatenated), restated in `shared/spec/baselines/prumerge.md`. PruMerge+ is
`prumerge_plus`, built on the steps here.

Quirks kept: P1 (the signal), P3 (sum, unnormalised weights, kept tokens in several clusters), P4 (the
extra token), P7 (score order, no layout; `mode=anyres` is the correction), and HiRED's per-view calls
(P2; the official pooling over a call is not offered: on LLaVA-NeXT it would tie the views' counts
together, and no released LLaVA-NeXT code does it). What differs here:

- no per-token loops or trip through numpy (P6): one `topk` per distinct count (a view's tie order under
  `torch.topk` depends on k, so views with the same k share a call, as the per-view official calls would
  give), one batched `matmul` for the cosines, one `topk` over every kept token's candidates (listed in the
  official order: the other kept tokens in sending order, then the rest ascending, so ties fall as released
  on the same backend), and the weighted sums as one `bmm`;
- the cosines and sums are taken in float32 (at least) and the results cast back to the tower's dtype; the
  official code runs in the tower's dtype (fp16 in evaluation), where near-ties of the cosines can fall
  differently;
- the IQR bound is taken in float32 (numpy 2's rule; numpy 1's took `Q3 + 1.5 IQR` in float64, which only
  matters for a score within one float32 step of the bound);
- fewer than 33 offered patches (small test grids, thin crops in `anyres` mode): all other patches are the
  neighbours (the official `topk(k=32)` raises);
- `Merge.source_map` records each kept cell as its own source only: the neighbour sums are many-to-many
  and every non-kept patch also enters its view's extra token.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Literal

import torch
import torch.nn.functional as F

from llava.model.compression.common import (
    Budget, CropGeometry, Merge, keep_everything, view_image_areas, view_image_tokens,
)
from llava.model.compression.registry import arg, register

SCORE, KEYS, FEATURES = "cls_attn_full_width_last", "keys_last", "tower_features"
NEIGHBOURS = 32  # the official topk(k=32) over the cosine similarities


@dataclasses.dataclass(frozen=True)
class PruMergeArgs:
    mode: Literal["faithful", "anyres"] = arg(
        "faithful", "faithful: HiRED's LLaVA-NeXT port (views concatenated, score order, extra tokens, merge type "
                    "spatial: no unpadding, no newlines); anyres: the model's views, raster order, newlines")
    adaptive: bool = arg(
        False, "false: fixed reduction ratio from the budget (the GlobalCom2 paper's row); true: each view's IQR "
               "outlier ratio (the released LLaVA-1.5 setting; the budget is not used)")
    budget: Literal["paper", "matched"] = arg(
        "paper", "paper: reduction ratio R in every view, int(576 R) + 1 tokens per view in faithful mode; "
                 "matched (ours): R of LLaVA-NeXT's image tokens spread over the views, extra tokens on top")


def official_input(args) -> dict:
    """The input change of `faithful` mode: HiRED's port sends no unpadding and no newline."""
    return {"mm_patch_merge_type": "spatial"} if args.mode == "faithful" else {}


# ----------------------------------------------------------------------------------------------
# Counts (host-side arithmetic on a handful of numbers)
# ----------------------------------------------------------------------------------------------

def reduction_ratio(geometry: CropGeometry, budget: Budget, args, spread: int = 1) -> float | Fraction:
    """The official `reduction_ratio` r every view uses (see Budget): R (`paper`), `R N_van / sum c_v`
    (`matched`), or for `--visual-tokens N` the exact `(N - E) / sum c_v` (`E`: views offering cells,
    each of which sends an extra token). `spread`: how many tokens the method sends per unit of r and
    cell (PruMerge+'s training branch adds about as many spatial samples as it keeps: 2)."""
    cells = view_image_tokens(geometry)  # c_v: P each without unpadding
    offered = sum(cells)
    if budget.tokens is not None:
        extra_tokens = sum(1 for count in cells if count)
        return Fraction(max(budget.tokens - extra_tokens, 0), spread * offered)
    if args.budget == "paper":
        return budget.ratio
    return budget.ratio * budget.model_vanilla_image_tokens / offered / spread


def top_counts(geometry: CropGeometry, ratio: float | Fraction) -> list[int]:
    """`k_v = int(c_v r)` for each view `[V]`, thumbnail first: the official `int(N * reduction_ratio)` in
    floating point for a ratio, exact for a `Fraction` (`--visual-tokens`); at most `c_v`."""
    return [min(cells, math.floor(cells * ratio)) for cells in view_image_tokens(geometry)]


def outlier_counts(scores: torch.Tensor, offered: torch.Tensor) -> torch.Tensor:
    """How many of each view's offered scores are IQR outliers `[V]` int64: above `Q3 + 1.5 (Q3 - Q1)`, the
    quartiles of the view's offered scores (`scores` `[V, P]`, `offered` `[V, P]` bool), linear
    interpolation in float32 as `np.percentile` on the released code's float32 copy. Only the upper bound is
    used, as released. A view offering nothing has none."""
    values = scores.float().masked_fill(~offered, math.nan)
    lower, upper = torch.nanquantile(values, torch.tensor([0.25, 0.75], device=scores.device), dim=1)  # [V] each
    bound = upper + 1.5 * (upper - lower)
    return (values > bound[:, None]).sum(dim=1)


def adaptive_counts(scores: torch.Tensor, offered: torch.Tensor, cells: list[int]) -> tuple[list[float], list[int]]:
    """Per view `[V]`: the outlier ratio `r_v = outliers / c_v` and `k_v = int(c_v r_v)`, as the released
    code computes them (Python floats; 0 for a view offering nothing). One host sync."""
    outliers = outlier_counts(scores, offered).tolist()
    ratios = [count / view_cells if view_cells else 0.0 for count, view_cells in zip(outliers, cells)]
    return ratios, [int(view_cells * ratio) for view_cells, ratio in zip(cells, ratios)]


# ----------------------------------------------------------------------------------------------
# Selection and merging (tensors)
# ----------------------------------------------------------------------------------------------

def ranked_cells(scores: torch.Tensor, offered: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The `counts[v]` best-scored offered cells of each view, best first, `[V, max counts]` int64, -1 past
    a view's count. `torch.topk` breaks ties in an order that depends on k, so the views sharing a count
    share one call: each gets the released `topk(cls_attn, k)` (one call per distinct count, at most V)."""
    eligible = scores.masked_fill(~offered, -math.inf)
    ranked = torch.full((scores.shape[0], max(counts, default=0)), -1, dtype=torch.long, device=scores.device)
    for count in sorted(set(counts) - {0}):
        views = torch.tensor([view for view, view_count in enumerate(counts) if view_count == count],
                             device=scores.device)
        ranked[views, :count] = torch.topk(eligible[views], count, dim=1).indices
    return ranked


def sending_order(ranked: torch.Tensor, added: torch.Tensor, offered: torch.Tensor) -> torch.Tensor:
    """Every cell of each view `[V, P]` int64 in the order: the ranked cells (`ranked` `[V, K]`, -1 padded)
    as ranked, then the `added` ones (`[V, P]` bool, PruMerge+'s samples) ascending, then the other offered
    cells ascending (the released `complement_idx`), then the cells the view does not offer. The first
    `n_v` are what view v sends; the official neighbour candidates of kept token i are this order
    without i."""
    num_views, num_patches = offered.shape
    cells = torch.arange(num_patches, device=offered.device).expand(num_views, -1)
    rank_of_cell = torch.full((num_views, num_patches + 1), -1, dtype=torch.long, device=offered.device)
    positions = torch.arange(ranked.shape[1], device=offered.device).expand(num_views, -1)
    rank_of_cell.scatter_(1, torch.where(ranked >= 0, ranked, num_patches), positions)
    rank_of_cell = rank_of_cell[:, :num_patches]
    tail = ranked.shape[1]  # sort keys: ranked by rank, then each later group by cell number
    key = torch.where(rank_of_cell >= 0, rank_of_cell,
                      tail + cells + num_patches * torch.where(added, 0, torch.where(offered, 1, 2)))
    return torch.argsort(key, dim=1)


def merge_key_neighbours(order: torch.Tensor, kept_counts: list[int], offered_counts: list[int],
                         scores: torch.Tensor, keys: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Merged kept tokens `[V, K, C]` (K = max kept count; rows past a view's count are meaningless):
    `x_i + sum_j a_j x_j` over the `min(32, c_v - 1)` offered cells j != i whose normalised keys have the
    highest cosine with i's (P3).

    `order` `[V, P]`: `sending_order`; `scores` `[V, P]` (a), `keys` `[V, P, C_k]`, `features` `[V, P, C]`,
    all in the compute dtype. Candidates of the token at position p are `order` without position p, so
    `torch.topk` sees them in the released order; those past the view's offered cells are never chosen.
    """
    num_views, num_patches = scores.shape
    device = scores.device
    most_kept = max(kept_counts)
    kept = order[:, :most_kept]                                                        # [V, K]
    normed = F.normalize(keys, p=2, dim=-1)                                            # [V, P, C_k]
    cosines = normed.gather(1, kept[..., None].expand(-1, -1, normed.shape[-1])) @ normed.transpose(1, 2)
    # Candidate positions in `order` for row p: 0..P-2, skipping p itself.
    slots = torch.arange(num_patches - 1, device=device)
    positions = slots + (slots >= torch.arange(most_kept, device=device)[:, None])     # [K, P-1]
    candidates = order.gather(1, positions.flatten().expand(num_views, -1)).view(num_views, most_kept, -1)
    offered = positions < torch.tensor(offered_counts, device=device)[:, None, None]  # [V, K, P-1]
    candidate_cosines = cosines.gather(2, candidates).masked_fill(~offered, -math.inf)
    nearest = torch.topk(candidate_cosines, min(NEIGHBOURS, num_patches - 1), dim=2).indices
    neighbour_cells = candidates.gather(2, nearest)                                     # [V, K, 32]
    neighbour_weights = scores.gather(1, neighbour_cells.flatten(1)).view_as(neighbour_cells)
    neighbour_weights = neighbour_weights * offered.gather(2, nearest)
    # The weighted sums as one product: each row of `weights` holds a_j at its neighbours' cells.
    weights = scores.new_zeros(num_views, most_kept, num_patches).scatter_(2, neighbour_cells, neighbour_weights)
    own = features.gather(1, kept[..., None].expand(-1, -1, features.shape[-1]))
    return own + weights @ features


def extra_tokens(scores: torch.Tensor, not_kept: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Each view's extra token `[V, C]`: `sum_j a_j x_j` over its offered, not kept cells (`not_kept`
    `[V, P]` bool), P4; `scores` `[V, P]`, `features` `[V, P, C]`."""
    return torch.einsum("vp,vpc->vc", scores * not_kept, features)


def prune_merge(views: torch.Tensor, signals: dict, geometry: CropGeometry, ranked: torch.Tensor,
                added: torch.Tensor | None, official_sequence: bool, extra: dict) -> Merge:
    """The `Merge` of one image from its ranked cells (`[V, K]`, -1 padded, best first) and PruMerge+'s
    `added` samples (`[V, P]` bool or None). `official_sequence`: faithful mode's order (each view's
    kept tokens as sent, then its extra token, views one after another); else the shared raster
    arrangement, the extra tokens at the end. A view whose offered cells are all kept sends no extra
    token (it would sum nothing). Merged and extra features are in the tower's space and dtype."""
    device = views.device
    scores = signals[SCORE].to(device)
    tower = signals[FEATURES].to(device)[:, 1:]                                       # [V, P, C], [CLS] dropped
    compute = torch.promote_types(tower.dtype, torch.float32)
    offered = view_image_areas(geometry, device)
    offered_counts = view_image_tokens(geometry)
    num_views, num_patches = offered.shape
    added = torch.zeros_like(offered) if added is None else added
    order = sending_order(ranked, added, offered)
    kept_counts = ((ranked >= 0).sum(dim=1) + added.sum(dim=1)).tolist()              # one host sync
    keep = torch.arange(num_patches, device=device) < torch.tensor(kept_counts, device=device)[:, None]
    keep = torch.zeros_like(offered).scatter_(1, order, keep)                          # [V, P] by cell
    attention, features = scores.to(compute), tower.to(compute)
    with_extra = [kept < cells for kept, cells in zip(kept_counts, offered_counts)]
    extra_features = extra_tokens(attention, offered & ~keep, features)[torch.tensor(with_extra, device=device)]
    canonical = (keep.flatten().cumsum(0) - 1).view(num_views, num_patches)           # rank among kept cells
    merged_features = None  # no kept cell: nothing to merge (the shared arrangement reads no row)
    if max(kept_counts):
        keys = signals[KEYS].to(device, compute)
        merged = merge_key_neighbours(order, kept_counts, offered_counts, attention, keys, features)
        # Each merged row to its canonical rank; rows past a view's count go to a spare last row.
        total = sum(kept_counts)
        rows = torch.arange(merged.shape[1], device=device) < torch.tensor(kept_counts, device=device)[:, None]
        target = torch.where(rows, canonical.gather(1, order[:, :merged.shape[1]]), total)
        merged_features = features.new_empty(total + 1, features.shape[-1])
        merged_features = merged_features.index_copy_(0, target.flatten(), merged.flatten(0, 1))[:total]
    sequence = _official_sequence(order, kept_counts, with_extra) if official_sequence else None
    extra = dict(extra, view_tokens=[kept + has_extra for kept, has_extra in zip(kept_counts, with_extra)])
    return Merge(geometry, order[0, :kept_counts[0]], keep[1:], kept_counts[1:], extra=extra, sequence=sequence,
                 features=None if merged_features is None else merged_features.to(tower.dtype),
                 source_map=torch.where(keep, canonical, -1), extra_features=extra_features.to(tower.dtype),
                 feature_space="tower")


def _official_sequence(order: torch.Tensor, kept_counts: list[int], with_extra: list[bool]) -> torch.Tensor:
    """Faithful mode's sequence `[M]`: view by view, its kept cells `view * P + cell` in sending order,
    then its extra token `V * P + e` (the e-th extra token) where it has one."""
    num_views, num_patches = order.shape
    device = order.device
    slots = torch.arange(num_patches + 1, device=device)
    counts = torch.tensor(kept_counts, device=device)[:, None]
    cells = torch.cat([order, order[:, :1]], dim=1) + num_patches * torch.arange(num_views, device=device)[:, None]
    extra_ids = num_views * num_patches + torch.tensor(with_extra, device=device).cumsum(0)[:, None] - 1
    has_extra = torch.tensor(with_extra, device=device)[:, None]
    sent = (slots < counts) | ((slots == counts) & has_extra)
    return torch.where(slots < counts, cells, extra_ids)[sent]


def check_signals(views: torch.Tensor, signals: dict) -> None:
    """Raise `ValueError` naming the expected shape when a signal disagrees with `views` `[V, P, D]`."""
    num_views, num_patches = views.shape[:2]
    expected = {SCORE: (num_views, num_patches), KEYS: (num_views, num_patches),
                FEATURES: (num_views, 1 + num_patches)}
    for name, leading in expected.items():
        shape = tuple(signals[name].shape)
        if shape[:2] != leading or len(shape) != len(leading) + (name != SCORE):
            wanted = ", ".join(map(str, leading)) + (", C" if name != SCORE else "")
            raise ValueError(f"{name} must have shape [{wanted}] (views {list(views.shape[:2])}), got {list(shape)}")


@register("prumerge", needs={SCORE, KEYS, FEATURES}, args=PruMergeArgs, input_changes=official_input)
def select(views: torch.Tensor, signals: dict, geometry: CropGeometry, budget: Budget,
           args: PruMergeArgs = PruMergeArgs()):
    """PruMerge for one image: `views` `[V, P, D]` (only their shape and device are used: merging is in
    the tower's space), the three signals (module docstring). `extra` records each view's tokens sent
    (`view_tokens`), kept patches (`top_tokens`) and its ratio (`reduction_ratio`, or `outlier_ratios`)."""
    if budget.keeps_all:
        return keep_everything(geometry, views.device)
    scores, offered, counts, _, extra = view_top_counts(views, signals, geometry, budget, args)
    ranked = ranked_cells(scores, offered, counts)
    return prune_merge(views, signals, geometry, ranked, None, args.mode == "faithful", dict(extra, top_tokens=counts))


def view_top_counts(views: torch.Tensor, signals: dict, geometry: CropGeometry, budget: Budget, args, spread: int = 1):
    """The signals checked, then per view `[V]` what PruMerge and PruMerge+ keep of the top cells:
    `(scores [V, P], offered [V, P] bool, counts k_v, ratios r_v, extra)`, the ratios and `extra` from
    the outliers (`adaptive`) or the budget's one `reduction_ratio` (`spread`: see `reduction_ratio`)."""
    check_signals(views, signals)
    scores = signals[SCORE].to(views.device)
    offered = view_image_areas(geometry, views.device)
    if args.adaptive:
        ratios, counts = adaptive_counts(scores, offered, view_image_tokens(geometry))
        return scores, offered, counts, ratios, dict(outlier_ratios=ratios)
    ratio = reduction_ratio(geometry, budget, args, spread)
    counts = top_counts(geometry, ratio)
    return scores, offered, counts, [float(ratio)] * len(counts), dict(reduction_ratio=float(ratio))
