"""VisionZip: keep each view's dominant tokens by [CLS] attention, merge the rest into a few contextual tokens.

For one image with `V = 1 + C` views (thumbnail first, then the crops row-major), each `side x side`
patches (`P = side**2`, 576 for CLIP-336), from CLIP layer -2 (layer 22 of 24), per view:

1. `view_token_counts`, `split_view_tokens`: the view's `N_v` tokens split into `dominant`
   and `contextual` (see Budget).
2. `dominant_tokens`: the patches with the highest [CLS] attention (signal
   `cls_attn_heads_penultimate`, `[V, H, P]` post-softmax, summed over the heads in the tower
   dtype, as released), by one `topk` over all views.
3. `filtered_tokens`: the view's other patches in raster order (the "filtered list").
4. `target_positions`: `contextual` targets taken uniformly by index in the filtered list:
   positions `0, step, 2 step, ...` with `step = max(1, M // contextual)` (quirk V3).
5. `assign_to_targets`: each other token of the filtered list joins the target whose layer -2
   key, averaged over the heads and L2-normalised (signal `keys_head_mean_penultimate`), is the
   most similar (argmax over a `[V, M, K]` cosine similarity, ties to the lower target; V4).
6. `contextual_features`: contextual token j = the target's feature + the mean of its members'
   (V2), in CLIP space (signal `tower_features`, layer -2's output), by one `index_add_`.
7. `select` returns a `Merge` in the tower's space (`feature_space="tower"`): its kept cells are
   the dominant patches (their own features) and the targets (the contextual tokens); the glue
   projects them (`common.project_merge`), as the official code projects after merging.

Modes (argument `mode`):

- `faithful` (default): the official code on LLaVA-NeXT. Its input has no unpadding and no
  newline (quirk V5; declared as the input change `mm_patch_merge_type=spatial`), so every view
  offers all P cells, padding included. Each view also sends its [CLS] token (V1), as one of its
  `dominant` tokens, here an extra token (`Merge.extra_features`). The sequence is the official one
  (`Merge.sequence`): thumbnail [CLS], thumbnail dominant patches (raster), thumbnail contextual
  tokens (by target position), the crops' dominant patches on the padded crop canvas (canvas
  raster), the crops' [CLS] tokens, every crop's contextual tokens (crop-major).
- `anyres`: the same selection on the views every other method gets (the config's merge type,
  `spatial_unpad`): each view offers only its image cells (dominant patches and the filtered list
  are among them), no [CLS] token is sent, and each contextual token takes its target's cell, so
  the shared raster arrangement (LLaVA-NeXT's, newline after each image row) sends dominant
  and contextual tokens at canvas positions.

Budget. Each view v gets `N_v` tokens; `contextual_v = max(1, round(10 N_v / 64))` (the README's
54 + 10 of 64, the paper's 162 + 30, 108 + 20, 54 + 10) and `dominant_v = N_v - contextual_v`,
halves rounded to even (Python's `round`, exact fractions). `N_v = min(c_v, max(m, round(R' c_v)))`
of the `c_v` cells view v offers (P each in `faithful` mode; P for the thumbnail, a crop's image
cells in `anyres` mode):

- `budget=paper` (default): `R' = R`. In `faithful` mode every view sends `N = round(576 R)`
  tokens, its [CLS] token counted among the `dominant` ones, `V N` in all: the paper's LLaVA-NeXT
  rows (640 / 320 / 160 of "2880" are 128 / 64 / 32 per view over 5 views; R = 0.1 gives
  58 = 49 + 9 per view). Padding is kept, so this is more than R of LLaVA-NeXT's image tokens
  where there is padding; the glue's accounting (against the model's own vanilla sequence) shows
  it. At R = 1 the method still runs (576 = 486 + 90 per view, [CLS] tokens sent), not vanilla.
  In `anyres` mode each view keeps R of its image cells, so R of the vanilla image tokens to
  within rounding.
- `budget=matched` (ours, not the paper's): `R' = R N_van / sum c_v` (`N_van`: LLaVA-NeXT's
  image tokens, unpadded, newlines excluded): `N = round(R N_van / V)` per view in `faithful`
  mode; in `anyres` mode (`sum c_v = N_van`) the paper budget with at least one token per view
  that has image cells.
- `--visual-tokens N`: `R' = N / sum c_v` under both budgets (`faithful`: `round(N / V)` tokens
  per view, so about N sent, the paper's way of counting).
- `m`, the least a view sends: 2 in `faithful` mode (the official code needs `dominant >= 1`,
  the [CLS] token, and `contextual >= 1`); 1 with `budget=matched` in `anyres` mode, else 0.
  A view of `anyres` mode that keeps a single token sends one contextual token.

A full budget (R = 1, or N at least the cells offered) keeps everything in `anyres` mode
(vanilla LLaVA-NeXT); `faithful` mode is never vanilla (`VisionZipArgs.keeps_everything`).

Follows `dvlab-research/VisionZip@3151f6d` (also `JIA-Lab-research/VisionZip`):
`visionzip/main.py:5-28` (`dominant - 1` patches stored), `visionzip/utils.py:10-135` (layer 22's
head-mean keys), `visionzip/clip_encoder.py:31-85` (selection and merging),
`visionzip/llava_arch.py:42-135` (LLaVA-NeXT sequence); restated in
`shared/spec/baselines/visionzip.md`. Quirks kept in `faithful` mode: V1 ([CLS] sent), V2
(target + mean), V3 (targets by filtered index), V4 (64-d head-mean keys), V5 (no unpadding or
newline, crop [CLS] and contextual tokens appended), V9 (everything in the tower dtype; the
members' sum is accumulated in fp32 and rounded once, as a half-precision `bmm` does). `anyres`
mode drops V1 and V5 and keeps V2-V4. Changed here: the tower computes the [CLS] row and the
keys of layer 22 with SDPA kept, instead of every layer's attention maps; a single view (no
crops) never gets a trailing newline: as released for a 4-D batch (`encode_images_visionzip`),
while the released code adds one to a one-view image of a list under `spatial_unpad` (not
reached with AnyRes, whose images have 2 crops or more; the input change turns unpadding off
for every image). `faithful` mode refuses an unpadded crop geometry (its input has none).
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Literal

import torch

from llava.model.compression.common import (
    Budget, CropGeometry, Merge, crop_canvas, keep_everything, proportional_view_counts, view_image_areas,
    view_image_tokens,
)
from llava.model.compression.registry import arg, register

SCORE, KEYS, FEATURES = "cls_attn_heads_penultimate", "keys_head_mean_penultimate", "tower_features"
CONTEXTUAL_SHARE = Fraction(10, 64)  # the README's dominant=54, contextual=10 for 64 tokens


@dataclasses.dataclass(frozen=True)
class VisionZipArgs:
    mode: Literal["faithful", "anyres"] = arg(
        "faithful", "faithful: the official input and sequence (merge type spatial, every view's [CLS] sent, crop "
                    "[CLS] and contextual tokens appended); anyres: the model's own views, unpadding and newlines")
    budget: Literal["paper", "matched"] = arg(
        "paper", "paper: each view sends round(R x its cells), round(576 R) in faithful mode; matched (ours): "
                 "R of LLaVA-NeXT's image tokens spread over the views")

    def keeps_everything(self) -> bool:
        """Whether a full budget keeps everything without signals: not in `faithful` mode, which
        still sends [CLS] tokens and contextual tokens at R = 1."""
        return self.mode == "anyres"


def official_input(args: VisionZipArgs) -> dict:
    """The input change of `faithful` mode: the official sequence has no unpadding, no newline (V5)."""
    return {"mm_patch_merge_type": "spatial"} if args.mode == "faithful" else {}


def view_token_counts(geometry: CropGeometry, budget: Budget, args: VisionZipArgs) -> list[int]:
    """`N_v` for each view `[V]`, thumbnail first: every token it sends (in `faithful` mode its
    [CLS] token included). Host-side arithmetic in exact fractions (see the module's Budget)."""
    matched = args.budget == "matched"
    # The official code needs dominant >= 1 (the [CLS] token) and contextual >= 1.
    return proportional_view_counts(geometry, budget, matched, at_least=2 if args.mode == "faithful" else int(matched))


def split_view_tokens(tokens: int) -> tuple[int, int]:
    """`(dominant, contextual)` of a view's `tokens`: `contextual = max(1, round(10 tokens / 64))`,
    the rest dominant; `(0, 0)` for none."""
    if tokens == 0:
        return 0, 0
    contextual = max(1, round(CONTEXTUAL_SHARE * tokens))
    return tokens - contextual, contextual


def dominant_tokens(scores: torch.Tensor, image_areas: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Keep mask `[V, P]`: in view v the `counts[v]` patches of highest `scores` `[V, P]` among its
    image cells `image_areas` `[V, P]` bool. One `topk` with `k = max(counts)`, each view keeping
    the first `counts[v]` of its ranking: with every cell offered and equal counts (`faithful`)
    this is the released `topk(score, dominant - 1, dim=1)`, ties falling the same way."""
    largest = max(counts)
    ranked = torch.topk(scores.masked_fill(~image_areas, -torch.inf), k=largest, dim=1).indices  # [V, k], best first
    within_count = torch.arange(largest, device=scores.device) < torch.tensor(counts, device=scores.device)[:, None]
    return torch.zeros_like(image_areas).scatter_(1, ranked, within_count)


def filtered_tokens(dominant: torch.Tensor, image_areas: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The filtered list: each view's image cells that are not dominant, in raster order, as cell
    indices `[V, M]` (`M = max(counts)`; `counts[v]` of them in view v, the rest padding the row
    with other cells). A stable sort instead of `nonzero`, whose size would need a host sync."""
    filtered = image_areas & ~dominant
    return torch.argsort(filtered.logical_not().to(torch.int8), dim=1, stable=True)[:, :max(counts, default=0)]


def target_positions(filtered_counts: list[int], contextual: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets by index in the filtered list (V3), `clip_encoder.py:67-69`: view v's are
    `0, step, 2 step, ...`, the first `contextual[v]`, `step = max(1, M_v // contextual[v])`.
    Returns the positions `[V, K]` (`K = max(contextual)`; 0 past a view's count) and which are
    real `[V, K]` bool."""
    slots = torch.arange(max(contextual), device=device)
    steps = [max(1, length // count) if count else 1 for length, count in zip(filtered_counts, contextual)]
    steps = torch.tensor(steps, device=device)
    real = slots < torch.tensor(contextual, device=device)[:, None]
    return torch.where(real, slots * steps[:, None], 0), real


def assign_to_targets(keys: torch.Tensor, filtered: torch.Tensor, positions: torch.Tensor,
                      real_targets: torch.Tensor) -> torch.Tensor:
    """The target slot `[V, M]` whose key is most similar to each filtered token's (ties to the
    lower slot, as `argmax`), `clip_encoder.py:60-74`. `keys`: the patches' head-mean keys
    `[V, P, d]`; `filtered`: `[V, M]` cells; `positions`, `real_targets`: `[V, K]` from
    `target_positions`. Keys are L2-normalised per token and compared by one `bmm`, in their dtype."""
    normalized = keys / keys.norm(dim=-1, keepdim=True)
    filtered_keys = normalized.gather(1, filtered[..., None].expand(-1, -1, keys.shape[-1]))            # [V, M, d]
    target_keys = filtered_keys.gather(1, positions[..., None].expand(-1, -1, keys.shape[-1]))          # [V, K, d]
    similarity = torch.bmm(filtered_keys, target_keys.transpose(1, 2))                                  # [V, M, K]
    return similarity.masked_fill(~real_targets[:, None, :], -torch.inf).argmax(dim=2)


def contextual_features(features: torch.Tensor, member_slots: torch.Tensor, target_cells: torch.Tensor) -> torch.Tensor:
    """Contextual tokens `[V, K, C]`: each target's feature plus the mean of its members' (V2; a
    target without members is its own feature), `clip_encoder.py:71-80`.

    `features`: `[V, 1 + P, C]`, the tower's rows ([CLS] first); `member_slots`: `[V, P]`, the
    target slot each member patch joins, -1 for every other patch; `target_cells`: `[V, K]`. One
    `index_add_` over all rows (no gathered copy of the members); the sum is accumulated in fp32
    and rounded once to the features' dtype, as the released one-hot `bmm` in half precision
    does, then divided by the count in that dtype."""
    num_views, rows, width = features.shape
    num_slots = target_cells.shape[1]
    spare = num_views * num_slots  # the group of every row that is no member, [CLS] rows included
    first_slot = torch.arange(num_views, device=features.device)[:, None] * num_slots
    groups = torch.where(member_slots >= 0, first_slot + member_slots, spare)
    groups = torch.cat([groups.new_full((num_views, 1), spare), groups], dim=1).flatten()  # [V (1 + P)]
    flat = features.flatten(0, 1)  # a view: the tower's output is contiguous
    sums = torch.zeros(spare + 1, width, dtype=torch.float32, device=features.device)
    sums.index_add_(0, groups, flat.float())
    counts = torch.bincount(groups, minlength=spare + 1).clamp(min=1)
    means = sums[:spare].to(features.dtype) / counts[:spare, None].to(features.dtype)
    target_rows = (torch.arange(num_views, device=features.device)[:, None] * rows + 1 + target_cells).flatten()
    return (flat[target_rows] + means).view(num_views, num_slots, width)


def _official_sequence(dominant: torch.Tensor, target_cells: torch.Tensor, dominant_patches: int,
                       grid: tuple[int, int]) -> torch.Tensor:
    """The official LLaVA-NeXT order `[M]` (`llava_arch.py:42-80, 105-121`) as cells `view * P +
    patch` and extra tokens `V * P + v` (view v's [CLS]): thumbnail [CLS], its dominant patches
    (raster), its contextual tokens (target order); the crops' dominant patches on the padded
    crop canvas (canvas raster); the crops' [CLS] tokens; every crop's contextual tokens.
    `dominant`: `[V, P]` bool, `dominant_patches` per view; `target_cells`: `[V, K]`."""
    num_views, num_patches = dominant.shape
    device = dominant.device
    cell_ids = torch.arange(num_views * num_patches, device=device).view(num_views, num_patches)
    raster = torch.argsort(dominant.logical_not().to(torch.int8), dim=1, stable=True)[:, :dominant_patches]
    targets = target_cells + cell_ids[:, :1]
    cls_tokens = num_views * num_patches + torch.arange(num_views, device=device)
    parts = [cls_tokens[:1], raster[0], targets[0]]
    if num_views > 1:
        canvas = crop_canvas(torch.where(dominant[1:], cell_ids[1:], -1), grid).flatten()
        occupied = torch.argsort((canvas < 0).to(torch.int8), stable=True)[:(num_views - 1) * dominant_patches]
        parts += [canvas[occupied], cls_tokens[1:], targets[1:].flatten()]
    return torch.cat(parts)


def _checked_signals(signals: dict, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three signals on the views' device, after checking their shapes against `views` `[V, P, D]`."""
    num_views, num_patches = views.shape[:2]
    expected = {SCORE: (num_views, None, num_patches), KEYS: (num_views, 1 + num_patches, None),
                FEATURES: (num_views, 1 + num_patches, None)}
    for name, shape in expected.items():
        got = tuple(signals[name].shape)
        if len(got) != 3 or any(size is not None and size != dim for size, dim in zip(shape, got)):
            text = ", ".join("_" if size is None else str(size) for size in shape)
            raise ValueError(f"{name} must have shape [{text}] for views of shape {list(views.shape)}, got {list(got)}")
    return tuple(signals[name].to(views.device) for name in (SCORE, KEYS, FEATURES))


@register("visionzip", needs={SCORE, KEYS, FEATURES}, args=VisionZipArgs, input_changes=official_input)
def select(views: torch.Tensor, signals: dict, geometry: CropGeometry, budget: Budget,
           args: VisionZipArgs = VisionZipArgs()) -> Merge:
    """VisionZip for one image: `views` `[V, P, D]` (only their shape and device are used),
    `signals`: `cls_attn_heads_penultimate` `[V, H, P]`, `keys_head_mean_penultimate`
    `[V, 1 + P, d]`, `tower_features` `[V, 1 + P, C]`. Returns a `Merge` in the tower's space;
    `extra` records per view `view_tokens` (N_v), `view_dominant` (in `faithful` mode the
    official `dominant`, its [CLS] token included) and `view_contextual`."""
    faithful = args.mode == "faithful"
    if budget.keeps_all and not faithful:
        return keep_everything(geometry, views.device)
    if faithful and geometry.unpad and geometry.crop_boxes:
        raise ValueError("visionzip mode=faithful runs on its official input (merge type 'spatial', no unpadding); "
                         "got an unpadded crop geometry: use mode=anyres for the model's own views")
    head_scores, keys, tower_features = _checked_signals(signals, views)
    num_views, num_patches = views.shape[:2]
    device = views.device
    tokens = view_token_counts(geometry, budget, args)
    dominant_counts, contextual_counts = map(list, zip(*map(split_view_tokens, tokens)))
    dominant_patches = [count - int(faithful) for count in dominant_counts]  # faithful: the [CLS] token is no patch
    filtered_counts = [cells - count for cells, count in zip(view_image_tokens(geometry), dominant_patches)]
    image_areas = view_image_areas(geometry, device)

    dominant = dominant_tokens(head_scores.sum(dim=1), image_areas, dominant_patches)   # V9: summed in the tower dtype
    kept_counts = [count + contextual for count, contextual in zip(dominant_patches, contextual_counts)]
    extra = dict(view_tokens=tokens, view_dominant=dominant_counts, view_contextual=contextual_counts)
    if not max(contextual_counts):  # anyres with a budget that rounds every view to nothing: only newlines
        return Merge(geometry, torch.zeros(0, dtype=torch.long, device=device), dominant[1:], kept_counts[1:],
                     extra=extra, source_map=torch.full_like(dominant, -1, dtype=torch.long), feature_space="tower")
    filtered = filtered_tokens(dominant, image_areas, filtered_counts)                        # [V, M] cells
    positions, real_targets = target_positions(filtered_counts, contextual_counts, device)   # [V, K]
    slots = assign_to_targets(keys[:, 1:], filtered, positions, real_targets)                # [V, M]
    # Members: the filtered list's tokens that are not targets, in views that have targets.
    list_length = filtered.shape[1]
    is_target = torch.zeros(num_views, list_length + 1, dtype=torch.bool, device=device)
    is_target = is_target.scatter_(1, torch.where(real_targets, positions, list_length), True)[:, :list_length]
    in_list = torch.arange(list_length, device=device) < torch.tensor(filtered_counts, device=device)[:, None]
    members = in_list & ~is_target & real_targets[:, :1]
    target_cells = filtered.gather(1, positions)                                             # [V, K]
    member_slots = torch.full((num_views, num_patches + 1), -1, dtype=torch.long, device=device)
    member_slots.scatter_(1, torch.where(members, filtered, num_patches), slots)
    contextual = contextual_features(tower_features, member_slots[:, :num_patches], target_cells)   # [V, K, C]

    # Kept cells: the dominant patches and the targets, in canonical order (view by view,
    # raster), each target's cell holding its contextual token.
    is_kept_target = torch.zeros(num_views, num_patches + 1, dtype=torch.bool, device=device)
    is_kept_target.scatter_(1, torch.where(real_targets, target_cells, num_patches), True)
    keep = dominant | is_kept_target[:, :num_patches]
    flat_keep = keep.flatten()
    canonical = (flat_keep.cumsum(0) - 1).view(num_views, num_patches)
    total = sum(kept_counts)
    kept_cells = torch.argsort(flat_keep.logical_not().to(torch.int8), stable=True)[:total]
    target_rows = canonical.gather(1, target_cells)                                          # [V, K]
    kept_rows = kept_cells + kept_cells // num_patches + 1  # in the tower's rows, one [CLS] row per view
    features = tower_features.flatten(0, 1)[torch.cat([kept_rows, kept_rows[:1]])]  # and a spare last row
    features.index_copy_(0, torch.where(real_targets, target_rows, total).flatten(), contextual.flatten(0, 1))
    # Provenance: each kept cell is its own token, each member goes into its target's.
    source_map = torch.cat([torch.where(keep, canonical, -1), canonical.new_full((num_views, 1), -1)], dim=1)
    source_map.scatter_(1, torch.where(members, filtered, num_patches), target_rows.gather(1, slots))
    fields = dict(features=features[:total], source_map=source_map[:, :num_patches], feature_space="tower", extra=extra)
    if faithful:
        sequence = _official_sequence(dominant, target_cells, dominant_patches[0], geometry.grid)
        thumbnail = sequence[1:1 + kept_counts[0]]  # after the [CLS] token: dominant patches, then targets
        fields.update(extra_features=tower_features[:, 0], sequence=sequence)
    else:
        thumbnail = torch.argsort(keep[0].logical_not().to(torch.int8), stable=True)[:kept_counts[0]]
    return Merge(geometry, thumbnail, keep[1:], kept_counts[1:], **fields)
