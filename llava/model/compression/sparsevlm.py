"""SparseVLM (in-LLM): text raters score the image tokens at a few layers; the dropped ones are recycled.

The version the GlobalCom2 paper compares with is taken to be v1.5 (the released default:
fixed per-stage budgets, token recycling, renumbered positions; spec `sparsevlm.md` 4-6, 8).

1. The image goes into the language model whole (vanilla LLaVA-NeXT: thumbnail, unpadded crops,
   newlines). `text_raters` (run by the decoder mechanism `llava.model.language_model.pruning`
   once per prefill, on the layer-0 input): per image, the raw dot products of its span's input
   embeddings with every token after the image (question and `ASSISTANT:` suffix), a softmax over
   those text tokens, the mean over the image's rows; the raters are the text tokens scoring above
   their mean (spec 2). They never change; the mechanism tracks their positions as the image shrinks.
2. At each sparse layer `l` (default 2, 6, 15) layer `l` runs on every current token; `rater_attn`
   recomputes its attention (from its input, its own q/k and RoPE, SDPA kept) for the raters' rows
   only, heads and raters averaged: one score per image token (spec 3, 9).
3. `keep`: the `k` best-scored tokens of the span survive the output of layer `l` (stable order:
   ties to the earlier token), at most `v - 1` of the `v` current ones (the official
   `min(budget, v_num - 1)`).
4. `recycle`: of the dropped tokens, the `int(0.3 d) + 1` best-scored (layer `l` output states)
   are clustered by `cluster_and_merge` (DPC-kNN, `c = int(m / 10) + 1` centres, spec 5) and the
   `c` cluster means are inserted right after the kept image tokens; the image now has `k + c`.
5. Positions are renumbered contiguously after every stage (`renumber`, spec 6); the layers
   after a stage cache only the kept and merged tokens, and decode continues each stage's
   numbering from that layer's cache length (spec 8), which is what the mechanism does for
   renumbering methods.

Budget: the official budget is a triple of per-stage counts for LLaVA-1.5's 576 tokens, chosen so
that the "equal tokens" (the mean over all layers of the image tokens *after* each layer, a sparse
layer counted at its pruned size, recycled tokens included: spec 4) hit 192/128/96/64.
`stage_totals` maps that onto an image span of `N` tokens (newline tokens included, as FastV) and
a target `R N` (or `--visual-tokens T`, at most `N`): the official triple whose 576-ratio is
nearest to the target's ratio (the larger on a tie), multiplied by a factor `s` (stage top-k
counts `floor(s b)`, exactly) chosen so that the equal tokens come nearest to the target
(`convention=average`, default: the official accounting); with `convention=post` the tokens left
after the last stage come nearest instead. The candidates are the largest factor counting at most
the target and the smallest counting more, the lower count on a tie. At N = 576 and
R = 1/3 this gives the official 300/200/110 (576 -> 309 -> 204 -> 113, equal tokens 192.03).
The schedule hands the mechanism the image tokens after each stage (`k + c`, so the glue's
per-layer accounting includes the recycled tokens); the rule recovers `k` as the largest top-k
count that gives that total. The glue's `equivalent_image_tokens` counts a sparse layer at its
input size (layer `l` sees every token), so it reads a little above the official equal tokens;
below about `R = 0.07` even `k = 0` overshoots (the recycled tokens remain): the accounting
prints what was reached. R = 1 (or `T >= N`) schedules nothing: the vanilla model exactly.

Arguments: `layers` (the sparse layers, 0-based, comma separated; default "2,6,15"; at most three;
a layer past the second-to-last has nothing after it to prune for: it moves to the second-to-last, merged
with any other there, so a 2-layer model prunes after layer 0), `convention`
(average|post), `recycling` (default true; false: dropped tokens are gone, as v2.0).

Official source: Gumpest/SparseVLMs@26a5f488 (HEAD, default `USE_VERSION` = the v1.5 logic):
`llava/model/language_model/modelling_sparse_llama.py` lines 70-393 (raters, sparse layers,
recycling, positions) and 618-715 (decode positions), `score.py` lines 1-55 (budgets, topk),
`utils.py` `cluster_and_merge` lines 179-240; restated in `spec/baselines/sparsevlm.md`.

Kept: the raters from the raw (unscaled) dot products of the layer-0 input, every token after the
image rating; the output of the sparse layer pruned (its own cache full); `min(k, v - 1)`; the
recycled tokens (top 30% + 1 of the dropped, DPC-kNN, cluster means with the official
`1 / (count + 1e-6)` weights) inserted after the kept tokens and counted in the next stage's span;
renumbered positions; equal tokens counted at output size.

What differs here: rows are scored on their own raters, span and budget (the official code is
batch size 1 and LLaVA-1.5 only: 576 tokens from a fixed start); several images in a row each get
the raters after their own span (other images' tokens excluded); the official density noise
(`torch.rand * 1e-6`, unseeded) is left out, ties going to the earlier token instead (of two equal
densities the earlier token is the denser: the closest pair always ties, and without a rule both would
become centres), so runs are deterministic and batched equals per-sample; the rater softmax, attention
and clustering are computed in float32 (the official code works in the model's dtype, fp16), the clustering's
distances from the Gram matrix (the official takes the norms of all `[m, m, D]` differences); an image with no rater
(a single text token, or none after it) scores every token 0 (the official mean over no rows is
NaN); the budget triple is scaled to LLaVA-NeXT's spans (no official LLaVA-NeXT code exists).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch

from llava.model.compression.common import Budget
from llava.model.compression.registry import arg, register

# score.py: the per-stage budgets (v1.5) of each official equal-token target on 576 tokens
OFFICIAL_BUDGETS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
OFFICIAL_TOKENS = 576
RECYCLED_SHARE = 0.3  # the top 30% (+1) of the dropped tokens are clustered
CLUSTER_SIZE = 10  # one centre per 10 recycled tokens (+1)


@dataclasses.dataclass(frozen=True)
class SparseVLMArgs:
    layers: str = arg("2,6,15", "the sparse layers (0-based, comma separated, at most three): each one's output is "
                                "pruned, scored by its own attention from the text raters")
    convention: Literal["average", "post"] = arg("average", "what the budget counts: the official equal tokens "
                                                            "(mean over layers, sparse layers at output size) or the "
                                                            "image tokens left after the last stage (post)")
    recycling: bool = arg(True, "merge the best 30 percent of the dropped tokens into cluster means kept after "
                                "the image (v1, v1.5); false drops them (v2.0)")

    renumber = True  # v1/v1.5 positions: contiguous after every stage (the mechanism's renumbering)

    def __post_init__(self):
        try:
            layers = [int(text) for text in self.layers.split(",") if text.strip()]
        except ValueError:
            raise ValueError(f"layers must be comma-separated integers, got {self.layers!r}") from None
        if not layers or len(layers) > 3 or layers != sorted(set(layers)) or layers[0] < 0:
            raise ValueError(f"layers must be one to three distinct ascending layers >= 0, got {self.layers!r}")

    def sparse_layers(self) -> list[int]:
        return [int(text) for text in self.layers.split(",") if text.strip()]

    def keeps_everything(self) -> bool:
        return True

    def schedule(self, span_tokens: int, budget: Budget, num_layers: int) -> tuple[tuple[int, int], ...]:
        """`((l + 1, k + c), ...)` per sparse layer `l`: from layer `l + 1` on, the image has `k + c`
        tokens; `()` when nothing is dropped (a full budget, or a model of one layer)."""
        layers, target = self.effective_layers(num_layers), budget.of_span(span_tokens)
        if not layers or target >= span_tokens:
            return ()
        totals = stage_totals(span_tokens, target, layers, num_layers, self.convention, self.recycling)
        return tuple((layer + 1, total) for layer, total in zip(layers, totals))

    def effective_layers(self, num_layers: int) -> list[int]:
        """The sparse layers on a model of `num_layers`: one past the second-to-last moves there (a
        sparse layer needs a layer after it; a small model)."""
        return sorted({min(layer, num_layers - 2) for layer in self.sparse_layers()} - {-1})

    def schedule_params(self, span_tokens: int, budget: Budget, num_layers: int) -> dict:
        """The official 576-token triple `schedule` scaled (its equal-token target and stage budgets)
        and the sparse layers it ran at (for the image's record)."""
        tokens = nearest_official_tokens(span_tokens, budget.of_span(span_tokens))
        return dict(official_tokens=tokens, official_budgets=list(OFFICIAL_BUDGETS[tokens]),
                    layers=self.effective_layers(num_layers))

    def recycle(self, hidden_states, rows, positions, span_scores, kept, inside):
        """The mechanism's hook (`pruning`): `recycle` below, or nothing when recycling is off."""
        if not self.recycling:
            return hidden_states.new_zeros(kept.shape[0], 0, hidden_states.shape[2]), kept.new_zeros(kept.shape[0], 0)
        return recycle(hidden_states, rows, positions, span_scores, kept, inside)


def merged_count(dropped, recycling: bool = True):
    """`c`, the cluster means made from `dropped` tokens (int or long tensor): `m = int(0.3 d) + 1`
    recycled into `int(m / 10) + 1` centres; 0 when nothing is dropped or recycling is off."""
    if isinstance(dropped, torch.Tensor):
        recycled = (dropped * RECYCLED_SHARE).long() + 1
        return torch.where(dropped > 0, recycled // CLUSTER_SIZE + 1, 0) if recycling else torch.zeros_like(dropped)
    if dropped <= 0 or not recycling:
        return 0
    return (int(dropped * RECYCLED_SHARE) + 1) // CLUSTER_SIZE + 1


def nearest_official_tokens(span_tokens: int, target: float) -> int:
    """The official equal-token target (a key of `OFFICIAL_BUDGETS`) whose share of 576 is nearest
    to `target / span_tokens`, the larger on a tie."""
    # |tokens / 576 - target / span| scaled by 576 span: exact for an integer target (dict order on a tie)
    return min(OFFICIAL_BUDGETS, key=lambda tokens: abs(tokens * span_tokens - OFFICIAL_TOKENS * target))


def stage_totals(span_tokens: int, target: float, layers: list[int], num_layers: int, convention: str,
                 recycling: bool = True) -> list[int]:
    """The image tokens after each stage (host arithmetic; the module docstring's Budget section):
    the official triple nearest to `target / span_tokens` (the larger on a tie), its first `len(layers)`
    entries times the factor whose counts come nearest to `target`: of the largest factor counting at
    most `target` and the smallest counting more, the lower on a tie."""
    base = OFFICIAL_BUDGETS[nearest_official_tokens(span_tokens, target)][:len(layers)]
    # factors as steps / grid: every factor where a stage's top-k count changes (k / b) lies on this grid, so the
    # counts are exact integer floors (a float factor puts two stages stepping at the same k / b apart)
    grid = math.lcm(*base)

    def totals_at(steps: int) -> list[int]:
        current, totals = span_tokens, []
        for stage_budget in base:
            kept = max(0, min(steps * stage_budget // grid, current - 1))  # official min(b, v - 1)
            current = kept + merged_count(current - kept, recycling)
            totals.append(current)
        return totals

    def counted(totals: list[int]) -> int:
        """The last stage's tokens (post), or the equal tokens times the layers, an integer (layers
        before the first sparse one see every token; a sparse layer counts at its output)."""
        if convention == "post":
            return totals[-1]
        bounds = layers + [num_layers]
        return layers[0] * span_tokens + sum((bounds[i + 1] - bounds[i]) * total for i, total in enumerate(totals))

    goal = target * (1 if convention == "post" else num_layers)
    # counted(totals_at(s)) never decreases with s; at `high` every stage keeps v - 1 (+1 merged): span > target
    low, high = 0, span_tokens * grid // min(base) + grid
    if counted(totals_at(low)) > goal:
        return totals_at(low)  # unreachable: every stage keeps nothing, the recycled tokens remain
    while high - low > 1:  # the largest step counting at most the goal, and the next
        middle = (low + high) // 2
        low, high = (middle, high) if counted(totals_at(middle)) <= goal else (low, middle)
    below, above = totals_at(low), totals_at(high)
    return above if abs(counted(above) - goal) < abs(counted(below) - goal) else below


def top_k_for_totals(image_tokens: torch.Tensor, totals: torch.Tensor, recycling: bool = True) -> torch.Tensor:
    """`[I]` long: the largest `k <= v - 1` whose `k + c(v - k)` is at most `totals` (the stage's
    image tokens after recycling) for `v = image_tokens`; 0 where even `k = 0` exceeds it."""
    width = int(image_tokens.max()) if image_tokens.numel() else 0
    candidates = torch.arange(width, device=image_tokens.device)[None]  # [1, N]: k = 0 .. N - 1
    resulting = candidates + merged_count((image_tokens[:, None] - candidates).clamp(min=0), recycling)
    fits = (candidates < image_tokens[:, None]) & (resulting <= totals[:, None])
    return torch.where(fits, candidates, 0).max(1).values if width else image_tokens.clone()


@register("sparsevlm", stage="in-llm", needs={"rater_attn"}, args=SparseVLMArgs)
def keep(scores: torch.Tensor, image_tokens: torch.Tensor, targets: torch.Tensor, args: SparseVLMArgs) -> torch.Tensor:
    """`[I, N]` bool: per image, its `k` best-scored tokens among the first `image_tokens[i]`
    columns of `scores` `[I, N]` (ties to the earlier token), `k` the top-k count behind the stage's
    total `targets[i]` (`top_k_for_totals`). `image_tokens`, `targets`: `[I]` long."""
    columns = torch.arange(scores.shape[1], device=scores.device)
    inside = columns < image_tokens[:, None]
    kept_counts = top_k_for_totals(image_tokens, targets, args.recycling)
    ranked = scores.float().masked_fill(~inside, float("-inf"))
    order = ranked.sort(dim=1, descending=True, stable=True).indices  # [I, N], best first
    rank = torch.empty_like(order).scatter_(1, order, columns.expand_as(order))
    return (rank < kept_counts[:, None]) & inside


def pairwise_distances(points: torch.Tensor) -> torch.Tensor:
    """`[I, M, M]`: `|x_i - x_j| / sqrt(D)` between the rows of each image's `points` `[I, M, D]`
    (float32), from their Gram matrix (one matrix product; the official differences `[M, M, D]`
    would take gigabytes), its diagonal the squared norms. Exactly symmetric (the two tokens of a pair
    tie in density) and exactly 0 on the diagonal (every token is its own nearest neighbour)."""
    gram = points @ points.transpose(1, 2)
    gram = (gram + gram.transpose(1, 2)) / 2
    norms = gram.diagonal(dim1=1, dim2=2)
    squared = norms[:, :, None] + norms[:, None, :] - 2 * gram  # n + n - 2n is exactly 0
    return squared.clamp(min=0).sqrt() / math.sqrt(points.shape[2])


def cluster_and_merge(tokens: torch.Tensor, valid: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
    """DPC-kNN as the official `cluster_and_merge`, per image and without its density noise:
    `tokens` `[I, M, D]` (the first `valid[i]`-many rows real, `valid` `[I, M]` bool, a prefix),
    `clusters` `[I]` long (`c <= m`). Returns the cluster means `[I, C, D]` float32 (C = max c;
    rows past `c` are zero), cluster `j` the one of the `j`-th centre by score.

    Distances `|x_i - x_j| / sqrt(D)`; density `exp(-mean of the c smallest squared distances)`
    (self included); each token's distance to the nearest denser token (the largest distance when
    none is denser; of equal densities the earlier token is the denser, standing in for the noise);
    centres the top-c of distance times density; every token joins its nearest
    centre (the first on a tie), each centre its own; means with weights `1 / (count + 1e-6)`."""
    width = tokens.shape[1]
    points = tokens.float()
    distances = pairwise_distances(points)
    pair_valid = valid[:, :, None] & valid[:, None, :]
    most = int(clusters.max()) if clusters.numel() else 0
    nearest = distances.masked_fill(~valid[:, None, :], float("inf")).topk(most, largest=False).values  # ascending
    within = torch.arange(most, device=tokens.device) < clusters[:, None, None]
    density = torch.exp(-(nearest.square().masked_fill(~within, 0).sum(-1) / clusters.clamp(min=1)[:, None]))
    # [i, a, b]: b denser than a; an equal density counts the earlier token as denser (the official noise
    # breaks these ties at random: without one, both tokens of the closest pair would be centres)
    earlier = torch.arange(width, device=tokens.device)
    tied = (density[:, None, :] == density[:, :, None]) & (earlier[None, :] < earlier[:, None])
    denser = ((density[:, None, :] > density[:, :, None]) | tied) & pair_valid
    largest = distances.masked_fill(~pair_valid, float("-inf")).flatten(1).max(1).values
    to_denser = torch.where(denser, distances, largest[:, None, None]).min(-1).values
    centre_score = (to_denser * density).masked_fill(~valid, float("-inf"))
    centres = centre_score.sort(dim=1, descending=True, stable=True).indices[:, :most]  # [I, C]
    centre_valid = torch.arange(most, device=tokens.device) < clusters[:, None]
    to_centres = distances.gather(1, centres[..., None].expand(-1, -1, width))  # [I, C, M]
    assignment = to_centres.masked_fill(~centre_valid[..., None], float("inf")).argmin(1)  # [I, M]
    own = torch.where(centre_valid, torch.arange(most, device=tokens.device), assignment.gather(1, centres))
    assignment.scatter_(1, centres, own)  # each centre its own cluster (past an image's c: no centre)
    members = torch.nn.functional.one_hot(assignment, max(most, 1)).float() * valid[..., None]  # [I, M, C]
    weights = 1.0 / (members.sum(1) + 1e-6)  # [I, C]
    return torch.einsum("imc,imd->icd", members * weights[:, None, :], points) * centre_valid[..., None]


def recycle(hidden_states: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, span_scores: torch.Tensor,
            kept: torch.Tensor, inside: torch.Tensor):
    """The merged tokens of one stage per image: of the dropped tokens (`inside & ~kept`, `[I, N]`
    bool), the `int(0.3 d) + 1` best by `span_scores` `[I, N]` (ties to the earlier), taken from
    `hidden_states` `[B, L, D]` (the sparse layer's output; image `i`'s span token `j` is at row
    `rows[i]`, position `positions[i, j]`: only the recycled rows are gathered) and clustered
    (`cluster_and_merge`). Returns `(merged [I, C, D] in hidden_states' dtype, merged_valid [I, C] bool)`."""
    dropped = inside & ~kept
    dropped_counts = dropped.sum(1)
    recycled = torch.where(dropped_counts > 0, (dropped_counts * RECYCLED_SHARE).long() + 1, 0)
    clusters = merged_count(dropped_counts)
    width = int(recycled.max()) if recycled.numel() else 0
    if width == 0:
        return hidden_states.new_zeros(kept.shape[0], 0, hidden_states.shape[2]), kept.new_zeros(kept.shape[0], 0)
    ranked = span_scores.float().masked_fill(~dropped, float("-inf"))
    best = ranked.sort(dim=1, descending=True, stable=True).indices[:, :width]  # [I, m] in score order, as topk
    valid = torch.arange(width, device=kept.device) < recycled[:, None]
    members = hidden_states[rows[:, None], positions.gather(1, best)]  # [I, m, D]
    merged = cluster_and_merge(members, valid, clusters)
    return merged.to(hidden_states.dtype), torch.arange(merged.shape[1], device=kept.device) < clusters[:, None]
