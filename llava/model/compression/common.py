"""What every compression method shares: the budget, the crop geometry, what is kept
(`Selection`, or `Merge` for methods that merge), the arrangement into the language model's
sequence, and the accounting.

Pure tensor functions, no model state. Shapes: an AnyRes image has `V = 1 + C` views (thumbnail
first, then the `C = grid_w * grid_h` crops row-major), each `side x side` patches (`P = side**2`,
576 for CLIP-336, 729 for SigLIP-384) in raster order. A single-view image (LLaVA-1.5 style) has `C = 0`.

OneVision (`anyres_max_N`) sends a large unpadded crop canvas bilinearly downsampled
(`CropGeometry.downsampled_shape`): its vanilla sequence (`keep_everything`, arranged `downsampled`)
holds interpolated tokens, not cells. Methods still select cells of the full-resolution views; on a
downsampled canvas their budget is R of the tokens vanilla sends (`Budget.resolve`), and what they
keep is sent at its full-canvas position (the `raster` arrangement, a newline per image row).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from fractions import Fraction

import torch

from llava.mm_utils import downsample_canvas, downsampled_canvas_shape, unpadded_bounds

LAYOUTS = ("official", "spatial")


def check_retention_ratio(retention_ratio) -> float:
    """Return `retention_ratio` as a float if it is a number in (0, 1]; else raise `ValueError`."""
    if isinstance(retention_ratio, bool) or not isinstance(retention_ratio, numbers.Real):
        raise ValueError(f"retention_ratio must be a number in (0, 1], got {retention_ratio!r}")
    ratio = float(retention_ratio)
    if math.isnan(ratio) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"retention_ratio must be in (0, 1] (1 keeps every token), got {retention_ratio!r}")
    return ratio


def check_visual_tokens(visual_tokens) -> int:
    """Return `visual_tokens` as an int if it is a whole number >= 1; else raise `ValueError`."""
    if isinstance(visual_tokens, bool) or not isinstance(visual_tokens, numbers.Integral) or visual_tokens < 1:
        raise ValueError(f"visual_tokens must be a whole number >= 1 (image tokens per image), got {visual_tokens!r}")
    return int(visual_tokens)


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"token layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return layout


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CropGeometry:
    """Where the image lies in the crop canvas (`grid_h*side` rows by `grid_w*side` columns).

    `bounds`: rows `[top, bottom)` and columns `[left, right)` of the canvas that hold image.
    `crop_boxes[c]`: `(top, left, height, width)` of that area inside crop `c` (row-major),
    crop-local, in patches; `(0, 0, 0, 0)` for a crop that is all padding. A single-view image
    has grid `(0, 0)` and no crops. `max_num_patches`: N of OneVision's `anyres_max_N` (the unpadded
    canvas is downsampled when larger than about N views), None for LLaVA-NeXT's `anyres`.
    """

    side: int
    grid: tuple[int, int]  # (grid_w, grid_h)
    bounds: tuple[int, int, int, int]
    crop_boxes: tuple[tuple[int, int, int, int], ...]
    unpad: bool
    image_size: tuple[int, int] = (0, 0)  # PIL (width, height) of the image
    max_num_patches: int | None = None

    @property
    def num_crops(self) -> int:
        return len(self.crop_boxes)

    @property
    def downsampled_shape(self) -> tuple[int, int] | None:
        """`(rows, cols)` the vanilla model resizes the unpadded canvas to (`anyres_max_N` with
        unpadding, `mm_utils.downsampled_canvas_shape`); None when it sends the canvas as it is."""
        if not (self.unpad and self.crop_boxes and self.max_num_patches):
            return None
        top, bottom, left, right = self.bounds
        shape = downsampled_canvas_shape(bottom - top, right - left, self.side, self.max_num_patches)
        return None if shape == (bottom - top, right - left) else shape

    @property
    def vanilla_arrangement(self) -> str:
        """How the vanilla model lays the image out: `downsampled` or `raster` (`arrange_tokens`)."""
        return "raster" if self.downsampled_shape is None else "downsampled"

    @property
    def offered_image_tokens(self) -> int:
        """Cells holding image in the views (the thumbnail's and the crops' image areas): what a
        method selects from. Equal to `vanilla_image_tokens` unless the canvas is downsampled."""
        return self.side**2 + sum(self.valid_counts)

    @property
    def valid_counts(self) -> list[int]:
        return [height * width for _, _, height, width in self.crop_boxes]

    @property
    def vanilla_image_tokens(self) -> int:
        """Image tokens the vanilla model sends for this image (newlines excluded): the budget's base.
        The thumbnail's and the crops' image cells, or with a downsampled canvas its `rows * cols`."""
        if self.downsampled_shape is None:
            return self.offered_image_tokens
        rows, cols = self.downsampled_shape
        return self.side**2 + rows * cols

    @property
    def crop_dimensions(self) -> list[tuple[int, int]]:
        """`(width, height)` of each crop's image area, the released GlobalCom2 code's `crop_dimensions`."""
        return [(width, height) for _, _, height, width in self.crop_boxes]

    def with_unpad(self, unpad: bool) -> CropGeometry:
        """The same image with (or without) LLaVA-NeXT's unpadding: the geometry the model sends
        when a method's official input changes the merge type, or the one it replaces."""
        return self if unpad == self.unpad else crop_geometry(self.image_size, self.grid, self.side, unpad,
                                                              self.max_num_patches)

    def newline_count(self, arrangement: str) -> int:
        """Newline tokens in the sequence: one per `newline_rows` (per row of the downsampled
        canvas for `downsampled`), or for a single view the one `spatial_unpad` appends after it."""
        if arrangement == "downsampled":
            return self.downsampled_shape[0]
        return len(self.newline_rows(arrangement)) if self.crop_boxes else int(self.unpad)

    def newline_rows(self, arrangement: str) -> range:
        """Canvas rows that end with an `image_newline`: every row (`packed`, GlobalCom2's released
        sequence), the image rows (`raster`, as LLaVA-NeXT), or none without unpadding."""
        if not self.unpad or not self.crop_boxes:
            return range(0)
        if arrangement == "packed":
            return range(self.grid[1] * self.side)
        top, bottom, _, _ = self.bounds
        return range(top, bottom)


def crop_geometry(image_size: tuple[int, int], grid: tuple[int, int], side: int, unpad: bool = True,
                  max_num_patches: int | None = None) -> CropGeometry:
    """Geometry of an image of PIL size `(width, height)` on a `(grid_w, grid_h)` crop grid.

    With `unpad` the letterbox padding is located as LLaVA-NeXT's `unpad_image` does; without
    it (merge type `spatial`) the whole canvas counts as image. Grid `(0, 0)`: a single view.
    `max_num_patches`: N of `anyres_max_N` (OneVision), whose unpadded canvas may be downsampled.
    """
    grid_w, grid_h = grid
    if grid_w * grid_h == 0:
        return CropGeometry(side, (0, 0), (0, 0, 0, 0), (), unpad, tuple(image_size), max_num_patches)
    if unpad:
        top, bottom, left, right = unpadded_bounds(image_size, grid_h * side, grid_w * side)
    else:
        top, bottom, left, right = 0, grid_h * side, 0, grid_w * side
    boxes = []
    for row in range(grid_h):
        for col in range(grid_w):
            box_top, box_left = max(top - row * side, 0), max(left - col * side, 0)
            height = max(min(bottom - row * side, side) - box_top, 0)
            width = max(min(right - col * side, side) - box_left, 0)
            boxes.append((box_top, box_left, height, width) if height and width else (0, 0, 0, 0))
    return CropGeometry(side, (grid_w, grid_h), (top, bottom, left, right), tuple(boxes), unpad, tuple(image_size),
                        max_num_patches)


def crop_cells(geometry: CropGeometry, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For every crop cell `[C, P]`: whether it holds image, and its packed index (its rank in
    raster order among the crop's image cells; meaningless outside the image area)."""
    side = geometry.side
    if not geometry.crop_boxes:
        empty = torch.zeros(0, side * side, dtype=torch.bool, device=device)
        return empty, empty.long()
    top, left, height, width = torch.tensor(geometry.crop_boxes, device=device).T[..., None, None]  # each [C, 1, 1]
    rows = torch.arange(side, device=device)[:, None]
    cols = torch.arange(side, device=device)[None, :]
    image_area = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)
    packed = (rows - top) * width + (cols - left)
    return image_area.flatten(1), packed.flatten(1)


def crop_canvas(per_crop: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per-crop values `[C, P]` or `[C * P]` (crops row-major, patches raster) laid out as the crop
    canvas `[grid_h * side, grid_w * side]`: crop `(i, j)` cell `(y, x)` lands at `(i*side + y, j*side + x)`."""
    grid_w, grid_h = grid
    side = math.isqrt(per_crop.numel() // (grid_w * grid_h))
    return per_crop.view(grid_h, grid_w, side, side).permute(0, 2, 1, 3).reshape(grid_h * side, grid_w * side)


# ----------------------------------------------------------------------------------------------
# The budget
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Budget:
    """One image's budget, resolved before the method runs.

    `ratio`: the fraction R of vanilla LLaVA-NeXT's image tokens (newlines excluded) to keep,
    in (0, 1]. Given as `--visual-tokens N`, it is `min(N / vanilla, 1)` and `tokens` keeps N.
    `vanilla_image_tokens`: the image tokens of the geometry the method runs on (its official
    input's, where it changes the input). `model_vanilla_image_tokens` (`N_van`): those the model
    itself sends uncompressed, the base of the methods' `budget=matched` modes; they differ where
    a method's official input drops unpadding or forces a grid. Each method's docstring says how
    it maps the budget onto its own counts. On a downsampled OneVision canvas the method's cells
    outnumber the tokens vanilla sends: R there means `N = round(R N_van)` tokens kept of the
    cells offered (`vanilla_image_tokens` is then `CropGeometry.offered_image_tokens`), and
    `sent_ratio` keeps the budget as a fraction of the tokens vanilla sends (R as stated, or `N /
    N_van`) for methods whose published rule is written in R (GlobalCom2's `int(P R)`).
    """

    ratio: float
    vanilla_image_tokens: int
    tokens: int | None = None  # the absolute budget N, when stated so
    model_vanilla_image_tokens: int | None = None  # N_van; None: LLaVA-NeXT's on the method's grid
    sent_ratio: float | None = None  # on a downsampled canvas: R of the tokens vanilla sends; else None (= ratio)

    @classmethod
    def resolve(cls, geometry: CropGeometry, retention_ratio: float | None = None,
                visual_tokens: int | None = None, model_vanilla_image_tokens: int | None = None) -> Budget:
        """`model_vanilla_image_tokens`: given by the glue (the model's own geometry); default
        the vanilla image tokens on `geometry`'s grid (unpadded). A ratio below 1 on a downsampled
        canvas becomes `N = max(1, round(R N_van))` tokens, as `visual_tokens` would; there
        `sent_ratio` is R, or `min(N / N_van, 1)` for a stated N."""
        vanilla = geometry.offered_image_tokens
        model_vanilla = model_vanilla_image_tokens or geometry.with_unpad(True).vanilla_image_tokens
        ratio = 1.0 if retention_ratio is None else check_retention_ratio(retention_ratio)
        downsampled = geometry.downsampled_shape is not None
        sent_ratio = None
        if downsampled and visual_tokens is not None:
            sent_ratio = min(check_visual_tokens(visual_tokens) / model_vanilla, 1.0)
        elif downsampled:
            sent_ratio = ratio
            visual_tokens = max(1, round(ratio * model_vanilla)) if ratio < 1.0 else None
        if visual_tokens is not None:
            tokens = check_visual_tokens(visual_tokens)
            return cls(min(tokens / vanilla, 1.0), vanilla, tokens, model_vanilla, sent_ratio)
        return cls(ratio, vanilla, model_vanilla_image_tokens=model_vanilla, sent_ratio=sent_ratio)

    @property
    def keeps_all(self) -> bool:
        return self.ratio >= 1.0

    @property
    def vanilla_ratio(self) -> float:
        """The budget as a fraction of the image tokens the vanilla model sends: `sent_ratio` on a
        downsampled canvas, else `ratio`."""
        return self.ratio if self.sent_ratio is None else self.sent_ratio

    @property
    def image_tokens(self) -> int:
        """The budget in image tokens: N, or `round(R * vanilla)`."""
        return self.tokens if self.tokens is not None else round(self.ratio * self.vanilla_image_tokens)

    def of_span(self, span_tokens: int) -> float:
        """The budget over an in-LLM method's span of `span_tokens` (newlines included): N, or
        `R * span_tokens` unrounded (each method rounds as its official code does)."""
        return self.tokens if self.tokens is not None else self.ratio * span_tokens


def apportion(total: int, weights: list[float], caps: list[int]) -> list[int]:
    """`total` whole units shared in proportion to `weights`, none above its cap (largest
    remainder; what a capped part cannot take goes to the others; ties to the lower index).
    All-zero weights share equally. Host-side arithmetic on a handful of numbers."""
    counts = [0] * len(weights)
    remaining = min(total, sum(caps))
    active = [index for index, cap in enumerate(caps) if cap > 0]
    while remaining > 0 and active:
        weight_sum = sum(weights[index] for index in active)
        shares = {index: remaining * (weights[index] / weight_sum if weight_sum > 0 else 1 / len(active))
                  for index in active}
        capped = [index for index in active if counts[index] + shares[index] >= caps[index]]
        if capped:  # fill those to their caps, then share the rest among the others
            for index in capped:
                remaining -= caps[index] - counts[index]
                counts[index] = caps[index]
            active = [index for index in active if index not in capped]
            continue
        floors = {index: math.floor(shares[index]) for index in active}
        for index in active:
            counts[index] += floors[index]
        remaining -= sum(floors.values())
        by_remainder = sorted(active, key=lambda index: (-(shares[index] - floors[index]), index))
        for index in by_remainder[:remaining]:
            counts[index] += 1
        remaining = 0
    return counts


# ----------------------------------------------------------------------------------------------
# What is kept
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Selection:
    """What a method keeps of one image; `arrange_tokens` turns it into the LLM's sequence.

    `thumbnail_indices` are in the order the method's own (official) sequence sends them
    (raster for most methods; GlobalCom2: best score first). `arrangement` is what the
    `official` layout means for this method: `raster` (kept tokens in canvas order, as
    LLaVA-NeXT) or `packed` (GlobalCom2's released sequence). `extra` holds the method's own
    accounting (JSON-ready), passed through to reports unchanged.

    `sequence` (`[M]` int64): for a method whose official code sends its own order (tokens in
    score order, views one after another, no newlines, tokens that are no patch), that order for
    the `official` layout: entry `view * P + patch` is a kept cell, `V * P + e` the e-th of a
    `Merge`'s `extra_features`, -1 an `image_newline`. Every kept cell appears exactly once. The
    `spatial` layout then sends the raster arrangement followed by the extra tokens.
    """

    geometry: CropGeometry
    thumbnail_indices: torch.Tensor  # [k_t] int64
    crop_keep_mask: torch.Tensor     # [C, P] bool, kept crop tokens at their real positions
    crop_kept_counts: list[int]      # kept tokens per crop, known on the host
    keeps_all: bool = False          # everything kept: LLaVA-NeXT's own sequence
    arrangement: str = "raster"
    send_crops: bool = True          # False: the crops, their newlines included, are not sent at all
    extra: dict = dataclasses.field(default_factory=dict)
    sequence: torch.Tensor | None = None  # [M] int64, the method's own official order (see above)

    @property
    def kept_cells(self) -> int:
        """Kept patches, thumbnail and crops."""
        return int(self.thumbnail_indices.shape[0]) + sum(self.crop_kept_counts)

    @property
    def extra_tokens(self) -> int:
        """Tokens sent that are no patch (a `Merge`'s `extra_features`)."""
        return 0

    @property
    def image_tokens(self) -> int:
        """Visual tokens sent other than newlines: kept patches plus extra tokens (everything kept on
        a downsampled canvas: the thumbnail and the downsampled canvas's tokens)."""
        if self.keeps_all and self.geometry.downsampled_shape is not None:
            return self.geometry.vanilla_image_tokens
        return self.kept_cells + self.extra_tokens

    def resolved_arrangement(self, layout: str) -> str:
        """For the `official` layout the method's own: `sequence` when it gives one, else `packed`
        or `raster`; `raster` for the `spatial` layout. When everything is kept, always the vanilla
        model's own sequence (`raster`, or `downsampled` for OneVision's downsampled canvas)."""
        check_layout(layout)
        if self.keeps_all:
            return self.geometry.vanilla_arrangement
        if layout != "official":
            return "raster"
        return "sequence" if self.sequence is not None else self.arrangement

    def newline_tokens(self, layout: str) -> int:
        arrangement = self.resolved_arrangement(layout)
        if arrangement == "sequence":
            return int((self.sequence < 0).sum())
        if not self.send_crops and self.geometry.crop_boxes:
            return 0
        return self.geometry.newline_count(arrangement)

    def tokens_after(self, layout: str) -> int:
        """Length of `arrange_tokens`'s output: kept image tokens plus newlines."""
        return self.image_tokens + self.newline_tokens(layout)

    def accounting(self, layout: str, vanilla: CropGeometry | None = None) -> dict:
        """One image's record (JSON-ready): visual tokens before (the vanilla model's, newlines
        included) and after; image and newline tokens kept; vanilla image tokens and the realised
        ratio of image tokens (extra tokens, which are no patch, included); per crop (row-major)
        its image tokens and kept tokens; `extra`.

        `vanilla`: the geometry the model sends without compression, when the method changed
        the model's input (FasterVLM's official input has no unpadding); default `geometry`.
        """
        geometry = self.geometry
        vanilla = vanilla or geometry
        before = vanilla.vanilla_image_tokens + vanilla.newline_count(vanilla.vanilla_arrangement)
        after = self.tokens_after(layout)
        record = dict(tokens_before=before, tokens_after=after, retained=after / max(before, 1),
                      image_tokens=self.image_tokens, newline_tokens=self.newline_tokens(layout),
                      extra_tokens=self.extra_tokens,
                      vanilla_image_tokens=vanilla.vanilla_image_tokens,
                      realised_ratio=self.image_tokens / max(vanilla.vanilla_image_tokens, 1),
                      grid=list(geometry.grid) if geometry.crop_boxes else None,
                      thumbnail_kept=int(self.thumbnail_indices.shape[0]), crop_valid=geometry.valid_counts,
                      crop_kept=list(self.crop_kept_counts))
        if self.resolved_arrangement(layout) == "downsampled":
            record["downsampled_canvas"] = list(geometry.downsampled_shape)
        return dict(record, **self.extra)


def uncompressed_accounting(tokens: int) -> dict:
    """The record of an image sent whole without spatial structure (merge type `flat`)."""
    return dict(tokens_before=tokens, tokens_after=tokens, retained=1.0, image_tokens=tokens, newline_tokens=0,
                extra_tokens=0, vanilla_image_tokens=tokens, realised_ratio=1.0, grid=None, thumbnail_kept=tokens,
                crop_valid=[], crop_kept=[])


@dataclasses.dataclass
class Merge(Selection):
    """A selection whose kept tokens carry merged features instead of their own, and that may
    send tokens that are no patch.

    `features`: `[K, D]` for the `K = kept_cells` kept tokens in canonical order (thumbnail
    kept cells in raster order, then each crop's kept cells in raster order); None: their own.
    `source_map`: `[V, P]` int64, for every patch the canonical index of the kept token it was
    merged into, -1 if none (the provenance). `extra_features`: `[E, D]` tokens that are no
    patch (a view's [CLS] token, a token summing the dropped ones, zero padding), placed by
    `sequence`. `feature_space`: `projected` (the LLM's width D) or `tower` (the vision tower's
    width, before the projector: methods that merge in CLIP space, as their official code
    does); `project_merge` maps a `tower` merge through the projector.
    """

    features: torch.Tensor | None = None
    source_map: torch.Tensor | None = None
    extra_features: torch.Tensor | None = None
    feature_space: str = "projected"

    @property
    def extra_tokens(self) -> int:
        return 0 if self.extra_features is None else int(self.extra_features.shape[0])


def project_merge(selection: Selection, projector) -> Selection:
    """`selection` with a `tower`-space merge's features (and extra features) passed through
    `projector` (`[N, C] -> [N, D]`, token by token, as LLaVA's MLP); anything else unchanged."""
    if not isinstance(selection, Merge) or selection.feature_space != "tower":
        return selection
    project = (lambda features: None if features is None else projector(features))
    return dataclasses.replace(selection, features=project(selection.features),
                               extra_features=project(selection.extra_features), feature_space="projected")


def keep_everything(geometry: CropGeometry, device=None) -> Selection:
    """Every thumbnail patch and every crop token in the image area: vanilla LLaVA-NeXT."""
    image_area, _ = crop_cells(geometry, device)
    every_patch = torch.arange(geometry.side**2, device=device)
    return Selection(geometry, every_patch, image_area, geometry.valid_counts, keeps_all=True)


def selection_from_mask(geometry: CropGeometry, keep: torch.Tensor, kept_counts: list[int], kind: type = None,
                        **fields) -> Selection:
    """A raster-order selection (or `kind`, e.g. `Merge`) from a keep mask `[V, P]` (thumbnail
    first) whose per-view counts `kept_counts` (`[V]`, thumbnail first) the caller knows on the host."""
    thumbnail_indices = _first_true(keep[0], kept_counts[0])
    return (kind or Selection)(geometry, thumbnail_indices, keep[1:], list(kept_counts[1:]), **fields)


def view_image_areas(geometry: CropGeometry, device) -> torch.Tensor:
    """`[V, P]` bool: the cells of each view that hold image (all of the thumbnail's)."""
    crops, _ = crop_cells(geometry, device)
    return torch.cat([torch.ones(1, geometry.side**2, dtype=torch.bool, device=device), crops])


def view_image_tokens(geometry: CropGeometry) -> list[int]:
    """Image tokens of each view `[V]`, thumbnail first: the caps of any per-view count."""
    return [geometry.side**2, *geometry.valid_counts]


def proportional_view_counts(geometry: CropGeometry, budget: Budget, matched: bool, at_least: int = 0) -> list[int]:
    """`T_v = min(c_v, max(at_least, round(R' c_v)))` tokens for each view `[V]`, thumbnail first,
    of the `c_v` cells it offers (`view_image_tokens`): `R' = N / sum c_v` for `--visual-tokens N`,
    else `R` (the per-view rule of FasterVLM's, VisionZip's and VisPruner's papers), or with
    `matched` `R N_van / sum c_v` (R of the model's own image tokens spread over the cells offered).
    Host arithmetic in exact fractions, so a rule written per view (`round(576 R)`) or per image
    (`round(R N_van / V)`) gives the same count, halves included (Python's `round`: half to even)."""
    cells = view_image_tokens(geometry)
    offered = sum(cells)
    if budget.tokens is not None:
        kept_per_cell = Fraction(budget.tokens, offered)
    elif matched:
        kept_per_cell = Fraction(budget.ratio) * budget.model_vanilla_image_tokens / offered
    else:
        kept_per_cell = Fraction(budget.ratio)
    return [min(view_cells, max(at_least, round(kept_per_cell * view_cells))) for view_cells in cells]


def keep_mask(selection: Selection) -> torch.Tensor:
    """The selection as a `[V, P]` bool mask, thumbnail first."""
    thumbnail = torch.zeros(1, selection.geometry.side**2, dtype=torch.bool, device=selection.thumbnail_indices.device)
    thumbnail[0, selection.thumbnail_indices] = True
    return torch.cat([thumbnail, selection.crop_keep_mask.to(thumbnail.device)])


# ----------------------------------------------------------------------------------------------
# The language model's sequence
# ----------------------------------------------------------------------------------------------

def arrange_tokens(image_feature: torch.Tensor, selection: Selection, image_newline: torch.Tensor | None,
                   layout: str = "official") -> torch.Tensor:
    """The kept tokens of `image_feature` `[1 + C, P, D]` as the sequence `[M, D]` the LLM reads.

    `raster` arrangement (the `spatial` layout, and `official` for most methods): thumbnail
    tokens in raster order, kept crop tokens at their real canvas positions, one newline per
    image row (LLaVA-NeXT's layout). `packed` (GlobalCom2's `official`): thumbnail tokens in the
    selection's order (best score first), then the crop canvas row by row with one newline per
    canvas row, each kept crop token placed at the cell numbered by its *packed* index (the
    released code's sequence, quirks Q2, Q3, Q12). `downsampled` (everything kept on OneVision's
    downsampled canvas): the thumbnail's tokens, then the unpadded crop canvas bilinearly resized
    (`downsampled_tokens`), one newline per row. A single view gets its kept tokens, then one
    newline if `image_newline` is given. A `Merge` puts its merged features in place of the kept
    tokens' own. `sequence` (a method's own order): the cells, extra tokens and newlines it
    names; the `spatial` layout of such a selection is the raster arrangement, then its extra
    tokens. `image_newline`: `[D]`, or None (no unpadding, no newlines).
    """
    if isinstance(selection, Merge) and selection.feature_space != "projected":
        raise ValueError("a merge in the tower's feature space must be projected first (project_merge)")
    if selection.resolved_arrangement(layout) == "sequence":
        return _sequence_tokens(image_feature, selection, image_newline)
    tokens = _arranged_tokens(image_feature, selection, image_newline, layout)
    if selection.extra_tokens:
        return torch.cat([tokens, selection.extra_features.to(tokens.dtype)])
    return tokens


def _sequence_tokens(image_feature: torch.Tensor, selection: Selection,
                     image_newline: torch.Tensor | None) -> torch.Tensor:
    """The tokens `[M, D]` a selection's own `sequence` names."""
    sequence = selection.sequence
    num_cells = image_feature.shape[0] * image_feature.shape[1]
    tokens = _gather(image_feature, selection, sequence.clamp(0, num_cells - 1))
    if selection.extra_tokens:
        extra_rows = (sequence - num_cells).clamp(0, selection.extra_tokens - 1)
        extra = selection.extra_features.to(tokens.dtype)[extra_rows]
        tokens = torch.where((sequence >= num_cells)[:, None], extra, tokens)
    if image_newline is not None:
        tokens = torch.where((sequence < 0)[:, None], image_newline.to(tokens.dtype), tokens)
    return tokens


def _arranged_tokens(image_feature: torch.Tensor, selection: Selection, image_newline: torch.Tensor | None,
                     layout: str) -> torch.Tensor:
    """The kept cells in the `raster` or `packed` arrangement (see `arrange_tokens`)."""
    geometry = selection.geometry
    arrangement = selection.resolved_arrangement(layout)
    if geometry.unpad and image_newline is None:
        raise ValueError("an unpadded selection needs image_newline")
    if arrangement == "downsampled":
        return downsampled_tokens(image_feature, geometry, image_newline)
    thumbnail_indices = selection.thumbnail_indices
    if arrangement == "raster":
        thumbnail_indices = thumbnail_indices.sort().values
    if not geometry.crop_boxes:
        tokens = _gather(image_feature, selection, thumbnail_indices)
        return torch.cat([tokens, image_newline[None].to(tokens.dtype)]) if geometry.unpad else tokens
    if not selection.send_crops:
        return _gather(image_feature, selection, thumbnail_indices)
    num_crop_tokens = (image_feature.shape[0] - 1) * image_feature.shape[1]  # C * P
    keep = selection.crop_keep_mask
    token_ids = torch.arange(num_crop_tokens, device=keep.device).view(keep.shape)
    if arrangement == "packed":
        # Move each kept token to the crop cell numbered by its packed index; unkept tokens
        # are scattered to a spare slot at the end, so no host sync is needed.
        _, packed = crop_cells(geometry, keep.device)
        target = torch.where(keep, packed + token_ids - token_ids % packed.shape[1], num_crop_tokens)
        placed = torch.full((num_crop_tokens + 1,), -1, dtype=torch.long, device=keep.device)
        cells = placed.scatter_(0, target.flatten(), torch.where(keep, token_ids, -1).flatten())[:-1]
    else:
        cells = torch.where(keep, token_ids, -1)
    newline_rows = geometry.newline_rows(arrangement)
    canvas = crop_canvas(cells, geometry.grid)
    if len(newline_rows):
        rows = canvas[newline_rows.start:newline_rows.stop]
        canvas = torch.cat([rows, rows.new_full((rows.shape[0], 1), num_crop_tokens)], dim=1)
    sequence = canvas.flatten()
    newline_count = len(newline_rows)
    crop_count = sum(selection.crop_kept_counts) + newline_count
    # Occupied cells in order via stable sorts rather than `nonzero`, whose output size would
    # need a host sync; the counts are already known on the host.
    sequence = sequence[_first_true(sequence >= 0, crop_count)]
    # One gather for the whole sequence (crop rows follow the thumbnail's P rows): separate
    # [M, D] temporaries joined by `cat` would cost more than the copies themselves.
    num_patches = image_feature.shape[1]
    rows = torch.cat([thumbnail_indices, num_patches + sequence.clamp(max=num_crop_tokens - 1)])
    tokens = _gather(image_feature, selection, rows)
    if newline_count:
        newline_positions = thumbnail_indices.shape[0] + _first_true(sequence == num_crop_tokens, newline_count)
        tokens.index_put_((newline_positions,), image_newline.to(tokens.dtype))
    return tokens


def downsampled_tokens(image_feature: torch.Tensor, geometry: CropGeometry,
                       image_newline: torch.Tensor) -> torch.Tensor:
    """OneVision's vanilla sequence `[side**2 + rows * (cols + 1), D]` for a downsampled canvas: the
    thumbnail's tokens, then the unpadded crop canvas `[D, H, W]` resized to `(rows, cols) =
    geometry.downsampled_shape` (`mm_utils.downsample_canvas`: bilinear, as LLaVA-VL's `llava_arch`)
    with `image_newline` `[D]` after each row, row by row.

    An integer `image_feature` (cell numbers `view * P + patch` in a `[V, P, 1]` tensor, as the
    selection records and view counts use) is not interpolated: each token gets the cell its
    sampling point (the centre of its output pixel, mapped onto the canvas) falls in."""
    grid_w, grid_h = geometry.grid
    side, dim = geometry.side, image_feature.shape[-1]
    top, bottom, left, right = geometry.bounds
    canvas = (image_feature[1:].reshape(grid_h, grid_w, side, side, dim).permute(4, 0, 2, 1, 3)
              .reshape(dim, grid_h * side, grid_w * side)[:, top:bottom, left:right])
    if canvas.is_floating_point():
        canvas = downsample_canvas(canvas, side, geometry.max_num_patches)
    else:
        rows, cols = geometry.downsampled_shape
        sampled_rows = _sampled_cells(rows, bottom - top, canvas.device)
        canvas = canvas[:, sampled_rows][:, :, _sampled_cells(cols, right - left, canvas.device)]
    newlines = image_newline.to(canvas.dtype)[:, None, None].expand(dim, canvas.shape[1], 1)
    rows_with_newlines = torch.cat([canvas, newlines], dim=2).flatten(1).T
    return torch.cat([image_feature[0], rows_with_newlines])


def _sampled_cells(size: int, full: int, device) -> torch.Tensor:
    """`[size]`: for each of `size` outputs resized from `full` inputs, the input its centre falls in."""
    return ((torch.arange(size, device=device) + 0.5) * (full / size)).long()


def _gather(image_feature: torch.Tensor, selection: Selection, cells: torch.Tensor) -> torch.Tensor:
    """The features `[len(cells), D]` of the flat cells `cells` (`view * P + patch`): the cells' own,
    or for a `Merge` the merged token each kept cell stands for (looked up, not copied in place,
    so no `[V * P, D]` temporary is made)."""
    if not isinstance(selection, Merge) or selection.features is None:
        return image_feature.flatten(0, 1)[cells]
    positions = _first_true(keep_mask(selection).flatten(), selection.kept_cells)  # canonical order
    canonical = torch.zeros(image_feature.shape[0] * image_feature.shape[1], dtype=torch.long, device=cells.device)
    canonical[positions] = torch.arange(selection.kept_cells, device=cells.device)
    return selection.features.to(image_feature.dtype)[canonical[cells]]


def check_shapes(image_feature: torch.Tensor, cls_attn_scores: torch.Tensor, grid: tuple[int, int],
                 image_newline: torch.Tensor | None) -> None:
    """Raise `ValueError` naming the expected shape when the inputs disagree with the grid."""
    grid_w, grid_h = grid
    if image_feature.ndim != 3:
        raise ValueError(f"image_feature must be [1 + C, P, D], got shape {tuple(image_feature.shape)}")
    views, num_patches, dim = image_feature.shape
    if views != 1 + grid_w * grid_h:
        raise ValueError(f"a {grid_w}x{grid_h} grid needs image_feature of shape [{1 + grid_w * grid_h}, P, D] "
                         f"(thumbnail + crops), got {tuple(image_feature.shape)}")
    if math.isqrt(num_patches) ** 2 != num_patches:
        raise ValueError(f"each view must have a square number of patches, got P = {num_patches}")
    if tuple(cls_attn_scores.shape) != (views, num_patches):
        raise ValueError(f"cls_attn_scores must have shape [{views}, {num_patches}] to match image_feature, "
                         f"got {tuple(cls_attn_scores.shape)}")
    if image_newline is not None and tuple(image_newline.shape) != (dim,):
        raise ValueError(f"image_newline must have shape [{dim}], got {tuple(image_newline.shape)}")


def _first_true(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the first `count` True entries of the 1-D `mask`, in order."""
    return torch.argsort(mask.logical_not().to(torch.int8), stable=True)[:count]


# ----------------------------------------------------------------------------------------------
# Selection records
# ----------------------------------------------------------------------------------------------

def selection_record(selection: Selection, layout: str) -> dict:
    """What the language model receives of one image, JSON-ready: `image_size` (PIL `(w, h)`),
    `grid` (`(grid_w, grid_h)`, None for a single view), `side`, `unpad`, `layout`, the resolved
    `arrangement`, `send_crops`, and `kept[v]`: the patch indices (`0..P-1`) of view `v` (thumbnail
    first) in the order the sequence holds them; `image_tokens` and `newline_tokens` counted in
    that sequence. A `Merge` adds `sources[v][i]`: the cells (`view * P + patch`) merged into the
    i-th kept token of view `v`. `max_num_patches`: OneVision's N (None otherwise); for the
    `downsampled` arrangement each interpolated token is recorded as the cell its sampling point
    falls in (`downsampled_tokens`). `selection_from_record` inverts it (without merged features).
    """
    geometry = selection.geometry
    num_views, num_patches = 1 + geometry.num_crops, geometry.side**2
    device = selection.thumbnail_indices.device
    # The arrangement run on cell numbers instead of features (a plain copy of a Merge, whose
    # merged features would hide them), so the record is by construction the sequence sent.
    arrangement = selection.resolved_arrangement(layout)
    if arrangement == "sequence":
        sequence = selection.sequence
    else:
        plain = Selection(**{field.name: getattr(selection, field.name) for field in dataclasses.fields(Selection)})
        cells = torch.arange(num_views * num_patches, device=device).view(num_views, num_patches, 1)
        sequence = arrange_tokens(cells, plain, torch.tensor([-1], device=device), layout)[:, 0]
    image_cells = sequence[(sequence >= 0) & (sequence < num_views * num_patches)]
    # Per view in sequence order: a stable sort by view keeps each view's tokens in their order.
    by_view = image_cells[torch.argsort(image_cells // num_patches, stable=True)]
    per_view = torch.bincount(image_cells // num_patches, minlength=num_views).tolist()
    kept_cells = by_view.split(per_view)
    record = dict(image_size=list(geometry.image_size), grid=list(geometry.grid) if geometry.crop_boxes else None,
                  side=geometry.side, unpad=geometry.unpad, max_num_patches=geometry.max_num_patches, layout=layout,
                  arrangement=arrangement, send_crops=selection.send_crops,
                  kept=[(view_cells % num_patches).tolist() for view_cells in kept_cells],
                  image_tokens=int(image_cells.shape[0]) + selection.extra_tokens,
                  newline_tokens=int((sequence < 0).sum()), extra_tokens=selection.extra_tokens)
    if arrangement == "sequence":
        record["sequence"] = sequence.tolist()
    if isinstance(selection, Merge) and selection.source_map is not None:
        record["sources"] = _merge_sources(selection, kept_cells)
    return record


def _merge_sources(merge: Merge, kept_cells: tuple[torch.Tensor, ...]) -> list[list[list[int]]]:
    """Per view, per kept cell in `kept_cells` (`[k_v]` each): the cells `source_map` merged into it."""
    source_map = merge.source_map.flatten().to(kept_cells[0].device)
    canonical = keep_mask(merge).flatten().cumsum(0) - 1  # each kept cell's index among the merged tokens
    # Cells grouped by the token they went into (unmerged cells, -1, first), in cell order.
    grouped = torch.argsort(source_map, stable=True)
    group_sizes = torch.bincount(source_map + 1, minlength=merge.kept_cells + 1).tolist()
    sources = [group.tolist() for group in grouped.split(group_sizes)[1:]]
    return [[sources[token] for token in canonical[view_cells].tolist()] for view_cells in kept_cells]


def selection_from_record(record: dict, device=None) -> Selection:
    """The `Selection` a `selection_record` describes: arranged, it gives the recorded sequence
    (a `Merge` comes back as a plain selection of its kept cells, without merged or extra
    features: its `sequence` still names the extra tokens)."""
    side = record["side"]
    geometry = crop_geometry(tuple(record["image_size"]), tuple(record["grid"] or (0, 0)), side, record["unpad"],
                             record.get("max_num_patches"))
    if record["arrangement"] == "downsampled":  # only ever the vanilla sequence
        return keep_everything(geometry, device)
    thumbnail, *crops = record["kept"]
    crop_keep_mask = torch.zeros(geometry.num_crops, side**2, dtype=torch.bool, device=device)
    for crop, patches in enumerate(crops):
        crop_keep_mask[crop, patches] = True
    sequence = record.get("sequence")
    return Selection(geometry, torch.tensor(thumbnail, dtype=torch.long, device=device), crop_keep_mask,
                     [len(patches) for patches in crops],
                     arrangement="raster" if record["arrangement"] == "sequence" else record["arrangement"],
                     send_crops=record["send_crops"],
                     sequence=None if sequence is None else torch.tensor(sequence, dtype=torch.long, device=device))
