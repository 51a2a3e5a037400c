"""HoloV: cut the image's token sequence into Q slices, budget each slice by its score, keep its most-attended tokens.

Pure tensor functions, no model state. For one image with `V = 1 + C` views (thumbnail first,
then the crops row-major), each `side x side` patches (`P = side**2`, 576 for CLIP-336), from
the projected features `[V, P, D]` and the post-softmax attention of CLIP layer -2's [CLS] query
(signal `cls_attn_penultimate`, `[V, P]`, head mean in the tower dtype, then fp32, as released):

1. `flattened_cells`: the image as one flat sequence of `N` cells, as the official glue lays it
   out: the thumbnail in raster order, then the crop canvas row by row, unpadded as LLaVA-NeXT
   does, so `N = P + h w` (2880 for an unpadded 2x2 grid); no newline anywhere, single views
   included. With `partition=views`, view after view instead (each crop's image cells in its own
   raster order).
2. `partition_slices`: the sequence (or each view) cut into Q contiguous slices, `n // Q` tokens
   each and one more for the *first* `n % Q` (the released comment says "last"); empty slices
   are dropped. These are slices of the flattened sequence, not AnyRes crops (quirk Q5): with
   N = 2880 and Q = 16, slice 3 holds the thumbnail's last 36 tokens and the canvas's first 144,
   and the rest are bands 3.75 canvas rows high across all crops.
3. `slice_scores`: per slice of `m >= 2` tokens, unit features `u = F / (|F| + 1e-6)` (feature
   dtype), cosine similarities `S = u u^T` with the diagonal zeroed (fp32 from here), each token's
   mean `mu_i` over the other `m - 1` and variance `sum_j (S_ij - mu_i)^2 / (m - 1)` over all `j`,
   its own zeroed entry included (Q3); `a = 1000 A`, `gamma = mean|a| / (mean|var| + 1e-6)`,
   `h = a + 0.09 gamma var`; the slice scores `mean h`. A one-token slice scores its raw `A` (Q9).
4. `allocate_tokens`: weights `w = score / (sum score + 1e-6)`, quotas `floor(w K)`, the `K - sum`
   leftover one each to the largest weights (`topk`, at most one per slice). No sharpness
   exponent and no redistribution (Q2).
5. `slice_order`: a slice whose quota covers it is sent whole in sequence order; otherwise its
   `quota` tokens of highest attention, best first (attention alone: the variance decides how
   many, never which, Q2). Slices in sequence order, cut at K.
6. `holov` (the released function's name) runs steps 3-5 on one flat sequence; whatever the
   slices could not fill is sent as zero rows, so the image is always exactly K tokens (Q4).
   `select` turns this into a `Selection`: `sequence` is the official order, the zero rows are
   a `Merge`'s `extra_features` (in the projected space, last).

Note, from the formula itself: `mean h = mean(a) (1 + 0.09 v / (v + 1e-6))` with `v` the slice's
mean variance, so a slice's score is its mean attention times a factor between 1 and 1.09 that
only moves when `v` is within a few orders of 1e-6 (features mutually orthogonal); elsewhere the
quotas follow the slices' mean attention. This is the released computation, kept as is.

Cost: the similarities are the released algorithm's own work, `sum m^2 D` (2.5 GFLOP for a
1000x700 image at D = 4096, slices of 138): most of the ~85-100 ms per image on one CPU thread
here; everything else takes a few ms, and on a GPU the matmul is negligible.

Budget. `K` tokens per image, always exactly K rows (zero rows included). `budget=image`
(default): `K = int(R N)` of this image's `N` (vanilla LLaVA-NeXT's image tokens, newlines
excluded), so the realised ratio is K / N, and LLaVA-NeXT's newlines are saved on top.
`budget=paper`: `K = round(R 2880)` for every image (`5 P`, the paper's tables' "up to 2880";
R = 1/9 gives its 320), capped at N. `--visual-tokens N`: `K = min(N, image tokens)` under both.
The release hard-codes `K = 64` and `Q = 16` for every image; the paper's LLaVA-NeXT row (320)
needs an edited call. R = 1 in `faithful` mode sends all N tokens without newlines, in the
official order (a slice left a token short by the rounding is zero-padded): not vanilla.

Arguments (defaults are the released code's): `mode=faithful` sends the official order above;
`mode=anyres` sends the same tokens the way LLaVA-NeXT sends an image (raster order, the
unpadded canvas with a newline after each image row; zero rows, if any, last), and R = 1 is
then vanilla LLaVA-NeXT. `partitions` is Q (16, the only released value; the paper's appendix
suggests 1024 / K, ambiguous). `partition=sequence` slices the flattened image across view
boundaries (Q5); `partition=views` (a correction) slices each view on its own, Q slices per
view, the quotas shared over all of them: the release's LLaVA-1.5 behaviour (one view, Q bands)
applied to every AnyRes view. `overflow=zeros` keeps the zero rows (Q4); `overflow=refill`
(ours) gives those tokens to the slices with tokens left, by weight, capped at what each has
left (`common.apportion`), so no zero row is sent while K <= N.

Official source: `obananas/HoloV@1d2e65e` (restated in `shared/spec/baselines/holov.md`):
`llava/model/utils.py:22-151` (the function `HoloV`: partitions 32-50, slice scores 56-97,
allocation 103-112, selection 114-127, zero padding 138-146), `llava/model/llava_arch.py:141-145`
(head mean, `.float()`), `:147-236` (the flattening, newlines commented out at 192-199 and
215-222), `:239` (the call, `num_patches=16, new_image_token_num=64`),
`llava/model/multimodal_encoder/clip_encoder.py:35-63` (`attentions[-2][:, :, 0, 1:]`).

Quirks kept: Q2 (no tau, no redistribution, attention-only ranking), Q3 (the zeroed diagonal in
the variance), Q4 (zero rows), Q5 (slices across views), Q6 (layer 22, post-softmax, [CLS] key in
the softmax: the tower signal), Q8 (similarities in the feature dtype, the rest in fp32, zero rows
cast to the feature dtype), Q9 (a one-token slice scores its raw attention; reached only for
`n < 2Q`). Not reproduced: Q1 (two multi-view images in one batch crash the release): HoloV runs
per image, always. What differs: the tower computes the one attention row with SDPA kept instead
of every layer's maps; ties in a partly kept slice go to the earlier token (Q7: the release leaves
them to `torch.topk`'s backend); the leftover's `topk` over the weights is the released call.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import torch

from llava.model.compression.common import (
    Budget, CropGeometry, Merge, Selection, apportion, crop_canvas, crop_cells, keep_everything, selection_from_mask,
    view_image_tokens,
)
from llava.model.compression.registry import arg, register

SIGNAL = "cls_attn_penultimate"
ALPHA = 0.09             # the variance term's weight, hard-coded in the release
EPS = 1e-6               # the release's `esp`
ATTENTION_SCALE = 1e3    # attention is scaled before it meets the variance
PAPER_VIEWS = 5          # the paper's budget base, "up to 2880" = 5 views x 576 (thumbnail + 2x2 crops)
SCRATCH_ELEMENTS = 2**22  # features gathered at a time for the similarities (16 MB in fp32)


@dataclasses.dataclass(frozen=True)
class HoloVArgs:
    mode: Literal["faithful", "anyres"] = arg(
        "faithful", "faithful: the official order (slice by slice, a partly kept slice best first, no newline, "
                    "zero rows last); anyres: the same tokens in LLaVA-NeXT's raster order with its newlines")
    partitions: int = arg(16, "Q, slices of the sequence (of each view with partition=views); 16 as released")
    partition: Literal["sequence", "views"] = arg(
        "sequence", "sequence: slices of the flattened image, across view boundaries (Q5); views: Q slices of "
                    "each view on its own")
    budget: Literal["image", "paper"] = arg(
        "image", "image: K = int(R N) of this image's N tokens; paper: K = round(R 2880) for every image "
                 "(the paper's tables), at most N")
    overflow: Literal["zeros", "refill"] = arg(
        "zeros", "zeros: quota a slice cannot fill becomes zero rows (Q4); refill (ours): it goes to the slices "
                 "with tokens left, by weight")

    def __post_init__(self):
        if isinstance(self.partitions, bool) or not isinstance(self.partitions, int) or self.partitions < 1:
            raise ValueError(f"partitions must be a whole number >= 1, got {self.partitions!r}")

    def keeps_everything(self) -> bool:
        """A full budget is vanilla LLaVA-NeXT only in `anyres` mode: the official order drops the
        newlines and can leave a slice a token short (zero-padded) even at K = N."""
        return self.mode == "anyres"


class HoloVPlan(NamedTuple):
    """What `holov` keeps of one flat sequence."""

    cells: torch.Tensor        # [M] int64, the kept entries of `cells` in the official order
    zero_rows: int             # K - M, zero rows sent after them
    slice_lengths: list[int]   # [S] tokens per slice
    slice_quotas: list[int]    # [S] the released allocation (may exceed a slice's length)
    slice_kept: list[int]      # [S] tokens each slice sends


def token_budget(geometry: CropGeometry, budget: Budget, args: HoloVArgs) -> int:
    """K, the image's tokens (see Budget), at most its `N` image tokens."""
    available = geometry.vanilla_image_tokens
    if budget.tokens is not None:
        return min(budget.tokens, available)
    if args.budget == "paper":
        return min(available, round(budget.ratio * PAPER_VIEWS * geometry.side**2))
    return int(budget.ratio * available)


def flattened_cells(geometry: CropGeometry, partition: str, device=None) -> tuple[torch.Tensor, list[int]]:
    """The image's cells (`view * P + patch`) `[N]` in the order HoloV reads them, and the lengths
    of the segments that are sliced on their own: `[N]` for `sequence` (the thumbnail, then the
    canvas's image rows), `[P, N_1, ..., N_C]` for `views` (the thumbnail, then each crop's image
    cells). Geometry only, built on the host."""
    num_patches = geometry.side**2
    thumbnail = torch.arange(num_patches)
    if not geometry.crop_boxes:
        return thumbnail.to(device), [num_patches]
    crop_ids = torch.arange(num_patches, num_patches * (1 + geometry.num_crops)).view(geometry.num_crops, num_patches)
    if partition == "views":
        image_area, _ = crop_cells(geometry, None)
        crops, segments = crop_ids[image_area], view_image_tokens(geometry)  # crop by crop, raster inside each
    else:
        top, bottom, left, right = geometry.bounds  # LLaVA-NeXT's unpadding (the whole canvas without it)
        crops = crop_canvas(crop_ids, geometry.grid)[top:bottom, left:right].flatten()
        segments = [geometry.vanilla_image_tokens]
    return torch.cat([thumbnail, crops]).to(device), segments


def partition_slices(segment_lengths: list[int], partitions: int) -> tuple[list[int], list[int]]:
    """Start and length of every slice (`[S]` each, positions in the flat sequence): each segment
    of `n` tokens in `partitions` contiguous slices of `n // Q`, the first `n % Q` one longer;
    empty slices dropped (released lines 32-50). Host arithmetic on at most V x Q numbers."""
    starts, lengths, offset = [], [], 0
    for segment_length in segment_lengths:
        base, remainder = divmod(segment_length, partitions)
        for index in range(partitions):
            length = base + (index < remainder)
            if length:
                starts.append(offset)
                lengths.append(length)
            offset += length
    return starts, lengths


def slice_scores(features: torch.Tensor, attention: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each slice's score `[S]` fp32 (released lines 56-97), the slices padded to a common width `L`.

    features: `[S, L, D]` (feature dtype; rows past a slice's length are filler, ignored), a
    scratch copy that is normalised in place (a second `[S, L, D]` temporary would cost as much
    as the gather); attention: `[S, L]` fp32; lengths: `[S]` int64 on the same device.
    """
    width = features.shape[1]
    valid = torch.arange(width, device=features.device) < lengths[:, None]                  # [S, L]
    units = features.div_(features.norm(dim=-1, keepdim=True) + EPS)                         # feature dtype (Q8)
    similarity = torch.bmm(units, units.transpose(1, 2))                                     # [S, L, L]
    pairs = valid[:, :, None] & valid[:, None, :] & ~torch.eye(width, dtype=torch.bool, device=features.device)
    similarity = similarity.float() * pairs      # the release multiplies by an fp32 off-diagonal mask
    others = (lengths - 1).clamp(min=1).float()[:, None]                                     # m - 1, [S, 1]
    mean = similarity.sum(dim=-1) / others                                                   # [S, L]
    # Over every j of the slice, the token's own zeroed entry included (Q3).
    variance = ((similarity - mean[..., None]).square() * valid[:, None, :]).sum(dim=-1) / others
    scaled = attention * ATTENTION_SCALE
    count = lengths.float()
    gamma = (scaled.abs() * valid).sum(dim=-1) / count / ((variance.abs() * valid).sum(dim=-1) / count + EPS)
    token_scores = scaled + ALPHA * (variance * gamma[:, None])
    scores = (token_scores * valid).sum(dim=-1) / count
    return torch.where(lengths == 1, attention[:, 0], scores)    # a one-token slice: its raw attention (Q9)


def allocate_tokens(scores: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quotas `[S]` int64 and weights `[S]` fp32 (released lines 103-112): `floor(w K)`, then the
    leftover one each to the largest weights (the released `topk`, so ties fall as its backend's)."""
    weights = scores / (scores.sum() + EPS)
    quotas = (weights * tokens).floor().long()
    leftover = tokens - int(quotas.sum())      # one host sync
    if leftover > 0:
        quotas[torch.topk(weights, k=min(leftover, weights.shape[0])).indices] += 1
    return quotas, weights


def slice_order(attention: torch.Tensor, lengths: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """`[S, L]` int64: the order in which each slice sends its first `kept` tokens (offsets inside
    the slice): sequence order where it is sent whole, else descending attention, ties to the
    earlier token (released lines 114-127). attention `[S, L]`, lengths and kept `[S]`."""
    offsets = torch.arange(attention.shape[1], device=attention.device)
    valid = offsets < lengths[:, None]
    ranked = attention.masked_fill(~valid, -torch.inf).sort(dim=1, descending=True, stable=True).indices
    return torch.where((kept >= lengths)[:, None], offsets, ranked)


def holov(features: torch.Tensor, attention: torch.Tensor, cells: torch.Tensor, segment_lengths: list[int],
          partitions: int, tokens: int, overflow: str = "zeros") -> HoloVPlan:
    """HoloV on the flat sequence `features[cells]` (the released function for one image).

    features: `[T, D]` (the views flattened, `T = V P`); attention: `[T]` fp32; cells: `[N]` int64,
    the sequence's rows of `features`, `segment_lengths` summing to N (each sliced on its own);
    `tokens`: K. Returns the kept entries of `cells` in the official order and the zero rows.
    """
    device = features.device
    starts, lengths = partition_slices(segment_lengths, partitions)
    lengths_tensor = torch.tensor(lengths, device=device)
    offsets = torch.arange(max(lengths), device=device)
    positions = (torch.tensor(starts, device=device)[:, None] + offsets).clamp(max=cells.shape[0] - 1)  # [S, L]
    slice_cells = cells[positions]              # filler past a slice's end points at a real token
    slice_attention = attention[slice_cells]
    # Scored a group of slices at a time: each gathered copy stays small enough for the allocator
    # to reuse its memory (one [S, L, D] copy of a 2x2 image, 36 MB in fp32, is mapped afresh on
    # every call and costs as much in page faults as the similarities themselves).
    group = max(1, SCRATCH_ELEMENTS // (offsets.shape[0] * features.shape[1]))
    scores = torch.cat([slice_scores(features[cells_part], attention_part, lengths_part)
                        for cells_part, attention_part, lengths_part in zip(
                            slice_cells.split(group), slice_attention.split(group), lengths_tensor.split(group))])
    quotas, weights = allocate_tokens(scores, tokens)
    quotas = quotas.tolist()
    kept = [min(quota, length) for quota, length in zip(quotas, lengths)]
    if overflow == "refill":
        room = [length - count for length, count in zip(lengths, kept)]
        kept = [count + more for count, more in zip(kept, apportion(tokens - sum(kept), weights.tolist(), room))]
    kept_tensor = torch.tensor(kept, device=device)
    ordered = slice_cells.gather(1, slice_order(slice_attention, lengths_tensor, kept_tensor))
    sent = offsets < kept_tensor[:, None]
    total = min(sum(kept), tokens)              # the release cuts at K (never needed)
    # The sent cells slice by slice, by a stable sort instead of a boolean mask (its size would
    # need a host sync; the count is known).
    chosen = ordered.flatten()[torch.argsort(sent.flatten().logical_not().to(torch.int8), stable=True)[:total]]
    return HoloVPlan(chosen, tokens - total, lengths, quotas, kept)


@register("holov", needs={SIGNAL}, args=HoloVArgs)
def select(views: torch.Tensor, signals: dict, geometry: CropGeometry, budget: Budget,
           args: HoloVArgs = HoloVArgs()) -> Selection:
    """HoloV for one image: `views` `[V, P, D]`, `signals["cls_attn_penultimate"]` `[V, P]`.
    Returns a `Selection` (a `Merge` carrying the zero rows as `extra_features` `[E, D]` when there
    are any); `extra` records K, each slice's length, released quota and tokens sent, the zero rows."""
    if budget.keeps_all and args.keeps_everything():
        return keep_everything(geometry, views.device)
    attention = signals[SIGNAL]
    if tuple(attention.shape) != tuple(views.shape[:2]):
        raise ValueError(f"{SIGNAL} must have shape {list(views.shape[:2])} ([V, P], as the views), "
                         f"got {list(attention.shape)}")
    num_views, num_patches, dim = views.shape
    cells, segments = flattened_cells(geometry, args.partition, views.device)
    tokens = token_budget(geometry, budget, args)
    plan = holov(views.flatten(0, 1), attention.to(views.device).flatten().float(), cells, segments,
                 args.partitions, tokens, args.overflow)
    keep = torch.zeros(num_views * num_patches, dtype=torch.bool, device=views.device)
    keep = keep.scatter_(0, plan.cells, True).view(num_views, num_patches)
    counts = torch.bincount(plan.cells // num_patches, minlength=num_views).tolist()
    fields = dict(extra=dict(budget_tokens=tokens, slice_lengths=plan.slice_lengths, slice_quotas=plan.slice_quotas,
                             slice_kept=plan.slice_kept, zero_rows=plan.zero_rows))
    if args.mode == "faithful":
        zero_rows = num_views * num_patches + torch.arange(plan.zero_rows, device=views.device)
        fields["sequence"] = torch.cat([plan.cells, zero_rows])
    if plan.zero_rows:
        return selection_from_mask(geometry, keep, counts, kind=Merge,
                                   extra_features=views.new_zeros(plan.zero_rows, dim), **fields)
    return selection_from_mask(geometry, keep, counts, **fields)
