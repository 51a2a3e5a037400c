"""DART (in-LLM): after layer K, keep pivot image tokens and the image tokens least like the pivots.

1. The image goes into the language model whole (vanilla LLaVA-NeXT: thumbnail, unpadded crops,
   newlines). The decoder mechanism (`llava.model.language_model.pruning`) runs layers 0..K-1 on
   every token; right after layer K-1, `pruning.dart_pivot_features` gives per token the L1 norm of
   layer K-1's keys (RoPE applied, every KV head flattened) and layer K-1's output through the
   model's final RMSNorm (spec `dart.md` 1). No attention map is needed.
2. `pivots`: per image, the `pivot_image` image tokens with the largest key norm, and the
   `pivot_text` tokens with the largest key norm among every token after the image (spec 2.2-2.3).
3. `pivot_order`: the order the official loop visits the pivots in: CPython's iteration order of
   `set(image_pivots + text_pivots).copy()` over their positions in the prompt (spec 2.5, 2.7).
4. `keep`: starting from a pool of every image token but the image pivots, each pivot in that
   order claims the `topk` pool tokens of lowest cosine similarity to it (final-normed states) and
   removes them from the pool; the image pivots and every claimed token are kept, the text pivots
   only steer (spec 2.5-2.6). Every text token stays.
5. The mechanism drops the rest from the input of layer K on, kept tokens keeping their original
   position ids (spec 3); layers >= K cache only the kept tokens; decode never re-ranks.

Budget: `schedule` maps the project's budget onto `topk`, out of the image's span `N` in the
sequence (newline tokens included, as the official `retain_token_num_for_llava_next`, a global
budget over the whole image: spec 4). First the target `b`, as FastV's (`fastv.kept_tokens`):
`convention=post` (default, DART's own counts are post-pruning ones, spec 4) gives `b = round(R N)`
and `--visual-tokens T` gives `b = min(T, N)`; `convention=average` the `b` whose layer average is
`R N` (or `T`). Then the official LLaVA-NeXT rule: `topk = min(b, N - pivot_image) // (pivot_image
+ pivot_text)`, keeping `pivot_image + (pivot_image + pivot_text) topk` tokens (not exactly `b`:
4 + 8 floor(b / 8), e.g. 324 for 320); the `min` keeps the pool from running out. R = 1 (or
`T >= N`, or a rule that would keep all N) schedules nothing: the vanilla model exactly. Both
counts (post-pruning and the layer average) are in the accounting.

Arguments: `k` (the pruning layer K, default 2 as `pruned_layer`), `pivot_image` (4), `pivot_text`
(4), `convention` (post|average).

Official source: ZichenWen1/DART (could not be fetched here; its README at 0c888673), the
`get_retained_image_token` function and `DART_K_norm` forward of its LLaVA module read from a
public verbatim copy, and the port in ModelTC/LightCompress (`token_reduction/dart.py`, PR #403);
restated in `spec/baselines/dart.md` (no line numbers could be given).

Kept: the pivots' visiting order from Python's set (2.7, reproduced by building the same set of the
same positions); the kept count `4 + 8 topk`, not the budget (2.6); `topk` from the min with
`N - pivot_image` (4); original position ids with gaps (3); pruned once at prefill (3).

What differs here: each image of a batch is handled on its own span, its own text suffix and its
own count, with positions relative to its row's first real token (the official code uses row 0 and
a fixed span, spec 5); the text after an image runs to the end of its row (with several images in a
row, later images count as text, as the official slice `K_states[0][start + length:]` would);
norms and cosines are taken in fp32 (the official code in the model's dtype), ties going to the
earlier token (`topk`'s tie order is unspecified); the L1 norm is taken over the KV heads before
GQA repetition (a constant factor, same ranking); keys are taken after RoPE, as LightCompress
does and as the cache holds them (the copy read does not show which, spec 1 (?)).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from llava.model.compression.common import Budget
from llava.model.compression.fastv import kept_tokens
from llava.model.compression.registry import arg, register

# Feature columns of `pruning.dart_pivot_features`, per token: key L1 norm, original position id, final-normed state.
NORM, POSITION, STATE = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class DARTArgs:
    k: int = arg(2, "the pruning layer K: layers 0..K-1 see every token, layer K-1's keys and output choose")
    pivot_image: int = arg(4, "image pivots: the image tokens of largest key L1 norm, always kept")
    pivot_text: int = arg(4, "text pivots: the tokens after the image of largest key L1 norm (steer, not kept)")
    convention: Literal["post", "average"] = arg("post", "what the budget counts: image tokens left after layer K "
                                                         "(post) or their average over all layers (average)")

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k must be at least 1 (layer K-1's keys and output choose), got {self.k}")
        if self.pivot_image < 1 or self.pivot_text < 0:
            raise ValueError(f"pivot_image must be at least 1 and pivot_text at least 0, got {self.pivot_image}, "
                             f"{self.pivot_text}")

    def keeps_everything(self) -> bool:
        return True

    def topk(self, budget_tokens: int, span_tokens: int) -> int:
        """Pool tokens each pivot claims: `min(b, N - pivot_image) // (pivot_image + pivot_text)`."""
        return max(0, min(budget_tokens, span_tokens - self.pivot_image)) // (self.pivot_image + self.pivot_text)

    def schedule(self, span_tokens: int, budget: Budget, num_layers: int) -> tuple[tuple[int, int], ...]:
        """`((K, pivot_image + (pivot_image + pivot_text) topk),)`, or `()` when nothing is dropped."""
        if budget.keeps_all and budget.tokens is None:
            return ()
        wanted = kept_tokens(span_tokens, budget, num_layers, self.k, self.convention)
        pivots_and_claims = self.pivot_image + (self.pivot_image + self.pivot_text) * self.topk(wanted, span_tokens)
        kept = min(span_tokens, pivots_and_claims)
        return ((self.k, kept),) if kept < span_tokens and self.k < num_layers else ()


def pivots(norms: torch.Tensor, image_tokens: torch.Tensor, present: torch.Tensor, args: DARTArgs):
    """Per image, the columns of its image pivots `[I, pivot_image]` and text pivots `[I, pivot_text]`
    (largest key norm first, ties to the earlier column) and whether each text pivot exists `[I,
    pivot_text]` (an image followed by fewer tokens has fewer). `norms` `[I, W]`: key L1 norms over
    the image span (the first `image_tokens[i]` columns) then the text after it; `present` `[I, W]`
    bool: the column is a token of the row."""
    columns = torch.arange(norms.shape[1], device=norms.device)
    in_image = columns < image_tokens[:, None]
    after = ~in_image & present
    by_image = norms.masked_fill(~in_image, float("-inf")).sort(dim=1, descending=True, stable=True).indices
    by_text = norms.masked_fill(~after, float("-inf")).sort(dim=1, descending=True, stable=True).indices
    text = by_text[:, :args.pivot_text]
    text_exists = torch.arange(text.shape[1], device=norms.device) < after.sum(1, keepdim=True)
    return by_image[:, :args.pivot_image], text, text_exists


def pivot_order(image_positions: list[int], text_positions: list[int]) -> list[int]:
    """The positions in the order the official loop visits them: `list(set(image + text).copy())`,
    CPython's iteration order for these ints (host side, a few ints per image; spec 2.5, 2.7)."""
    return list(set(image_positions + text_positions).copy())


@register("dart", stage="in-llm", needs={"dart_pivot_features"}, args=DARTArgs)
def keep(features: torch.Tensor, image_tokens: torch.Tensor, targets: torch.Tensor, args: DARTArgs) -> torch.Tensor:
    """`[I, W]` bool: per image, its image pivots and the tokens its pivots claim.

    `features` `[I, W, 2 + D]`: per column (the image's span, then the text after it up to its row's
    end, zero past it) the key L1 norm, the original position id and the final-normed state;
    `image_tokens` `[I]` the span lengths; `targets` `[I]` the kept counts of the schedule
    (`pivot_image + (pivot_image + pivot_text) topk`, or the whole span)."""
    images, width = features.shape[:2]
    columns = torch.arange(width, device=features.device)
    in_image = columns < image_tokens[:, None]
    norms, states = features[..., NORM].float(), features[..., STATE:].float()  # no copy from the scorer's fp32
    present = norms > 0  # a real token's keys have a positive L1 norm; columns past the row's end are zero
    image_pivots, text_pivots, text_exists = pivots(norms, image_tokens, present, args)
    whole = targets >= image_tokens
    topk = (targets - args.pivot_image).clamp(min=0) // (args.pivot_image + args.pivot_text)

    # The visiting order: per image, pivot columns in the official set's order (text pivots that do
    # not exist are left out; the loop then has fewer rounds for that image).
    positions = features[..., POSITION].round().long()
    image_cols, image_positions = image_pivots.tolist(), positions.gather(1, image_pivots).tolist()
    text_cols, text_positions = text_pivots.tolist(), positions.gather(1, text_pivots).tolist()
    ordered = []
    for image, exists in enumerate(text_exists.tolist()):
        texts = [(column, position) for column, position, real in
                 zip(text_cols[image], text_positions[image], exists) if real]
        column_at = dict(zip(image_positions[image], image_cols[image])) | {p: c for c, p in texts}
        ordered.append([column_at[position] for position in
                        pivot_order(image_positions[image], [position for _, position in texts])])
    rounds = max((len(order) for order in ordered), default=0)
    order = torch.full((images, rounds), -1, dtype=torch.long)
    for image, columns_in_order in enumerate(ordered):
        order[image, :len(columns_in_order)] = torch.tensor(columns_in_order, dtype=torch.long)
    order = order.to(features.device)

    # Every round's cosines at once (one pass over the states): [I, W, rounds].
    pivot_states = states.gather(1, order.clamp(min=0)[..., None].expand(-1, -1, states.shape[-1]))  # [I, R, D]
    lengths = states.norm(dim=-1)
    cosines = (states @ pivot_states.transpose(1, 2)) / (lengths[..., None] * pivot_states.norm(dim=-1)[:, None]
                                                         ).clamp(min=1e-8)
    kept = torch.zeros(images, width, dtype=torch.bool, device=features.device)
    kept[torch.arange(images, device=features.device)[:, None].expand_as(image_pivots), image_pivots] = True
    kept &= in_image
    pool = in_image & ~kept
    rank = torch.arange(width, device=features.device)
    for step in range(rounds):
        active = order[:, step] >= 0
        candidates = cosines[..., step].masked_fill(~pool, float("inf"))
        least_similar = candidates.sort(dim=1, stable=True).indices  # lowest cosine first, ties to the earlier token
        claimed_rank = (rank < topk[:, None]) & active[:, None]
        claimed = torch.zeros_like(pool)
        claimed[torch.arange(images, device=features.device)[:, None].expand_as(least_similar)[claimed_rank],
                least_similar[claimed_rank]] = True
        claimed &= pool
        kept |= claimed
        pool &= ~claimed
    return torch.where(whole[:, None], in_image, kept)
