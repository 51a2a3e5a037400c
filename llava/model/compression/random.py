"""Random: keep a uniformly random share of each view's image tokens (the floor any method must beat).

1. `view_counts`: the budget's `round(R x vanilla image tokens)` (or N) shared between the views
   in proportion to their image tokens (`common.apportion`: thumbnail P, crop c its N_c).
2. `select`: in each view, that many image cells drawn uniformly without replacement from a
   generator seeded by the run's `seed` and the image's size, so a rerun, a batch and a single
   sample all draw the same cells, and another seed draws others. Two images of the same size
   share a draw: the draw cannot depend on content without reading the features back to the host.

Budget: exactly `round(R x vanilla image tokens)` image tokens (or N), newlines as LLaVA-NeXT
(one per image row). No official code; the layout is raster (`official` = `spatial`).
"""

from __future__ import annotations

import dataclasses
import zlib

import torch

from llava.model.compression.common import (
    Budget, CropGeometry, Selection, apportion, keep_everything, selection_from_mask, view_image_areas, view_image_tokens,
)
from llava.model.compression.registry import arg, register


@dataclasses.dataclass(frozen=True)
class RandomArgs:
    seed: int = arg(0, "run seed; each image's draw is seeded by it and the image's size")


def view_counts(geometry: CropGeometry, budget: Budget) -> list[int]:
    """Tokens kept per view `[V]`, thumbnail first, summing to the budget's image tokens."""
    caps = view_image_tokens(geometry)
    return apportion(budget.image_tokens, [float(cap) for cap in caps], caps)


def image_seed(seed: int, image_size: tuple[int, int]) -> int:
    """A 63-bit seed from the run seed and the image's size (stable across processes, unlike `hash`)."""
    return zlib.crc32(f"{seed}:{image_size[0]}x{image_size[1]}".encode()) | (seed % 2**31) << 32


@register("random", args=RandomArgs)
def select(views: torch.Tensor, signals: dict, geometry: CropGeometry, budget: Budget,
           args: RandomArgs = RandomArgs()) -> Selection:
    """`views` `[V, P, D]` (only its device is used); no signals."""
    if budget.keeps_all:
        return keep_everything(geometry, views.device)
    counts = view_counts(geometry, budget)
    generator = torch.Generator().manual_seed(image_seed(args.seed, geometry.image_size))
    priority = torch.rand(len(counts), geometry.side**2, generator=generator).to(views.device)  # [V, P]
    priority = priority.masked_fill(~view_image_areas(geometry, views.device), 2.0)  # padding is never drawn
    rank = priority.argsort(dim=1).argsort(dim=1)                                  # each cell's rank in its view
    keep = rank < torch.tensor(counts, device=views.device)[:, None]
    return selection_from_mask(geometry, keep, counts)
