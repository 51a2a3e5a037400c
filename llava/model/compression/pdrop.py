"""PyramidDrop (PDrop, in-LLM): after each stage, keep the image tokens the last instruction token attends to most.

1. The image goes into the language model whole (vanilla LLaVA-NeXT: thumbnail, unpadded crops,
   newlines). `PDropArgs.schedule` gives the stages: boundaries `b_1 < b_2 < b_3` (layers already
   run) and, from `b_s` on, `int(N0 lam^s)` of the image's `N0` span tokens, each truncated from the
   ORIGINAL count, not from the previous stage's (spec `pdrop.md` 2).
2. `next_layer_query_attn` (the decoder mechanism, `llava.model.language_model.pruning`): after
   layer `b_s - 1` has run, the attention that layer `b_s` WOULD compute (its own input_layernorm,
   q/k projections and RoPE at the current position ids) of the last prompt token over every key,
   softmax in fp32, mean over heads (spec 3), recomputed for that one row under SDPA.
3. `keep`: per image, the `int(N0 lam^s)` best-scored tokens of its current span (topk; ties here to
   the earlier token, where topk's order is unspecified), back in original order; text always kept (spec 4.1-4.2).
4. The mechanism drops the rest from layer `b_s` on and RENUMBERS the position ids `0..len' - 1`
   after the padding at every stage (spec 4.5, `renumber`); decode continues each stage's compacted
   numbering, per row (spec 5); layers of stage `s` cache only their kept set; no re-ranking at decode.

Budget: the official code is configured by `lam` and the layers, not by a ratio; the paper compares
by the layer-averaged image-token count ("equivalent tokens", spec 6: `(1 + lam + lam^2 + lam^3) / 4`
with [8,16,24] of 32 layers). `convention=average` (default, the paper's and the issue's mapping):
`lam` solves `(b_1 + sum_s (b_{s+1} - b_s) lam^s) / L = R` (bisection, `b_4 = L`), with R the
retention ratio or `--visual-tokens T` as `T / N0`. `layers=auto` (default) takes the official
boundaries (`L/4, L/2, 3L/4`: [8,16,24] on a 32-layer LLM) while the solved `lam` is at least the
official 0.5 (R >= 0.46875 at 32 layers: 50% gives lam = 0.5437); below that it moves the first
boundary to FastV's K (`L/16`: [2,12,22] at 32 layers, the spec's sketch; the later two split the
remaining layers evenly), which reaches down to `R = 2/32`; below that floor `lam = 0` (nothing left
after the first boundary) and the accounting prints what was reached. The 0.5 switch keeps `lam`
continuous-ish across it (0.5 on the official layers, about 0.6 on the moved ones) instead of letting
the official layers degenerate to `lam -> 0` near their 25% floor. `convention=post`: the count
after the last stage is the budget: `lam = R^(1/3)` on the official boundaries, the last stage
keeping `int(R N0)` (or `min(T, N0)`); R = 0.125 is the official `[0.5, 0.25, 0.125]` exactly.
`lam > 0` fixes lam (the official scripts' 0.5) and then the budget is not used. Counts include the
newline tokens, as the official counts do (spec 1). Both counts are in the accounting
(`post_pruning_image_tokens`, `equivalent_image_tokens` from the integer stage counts, per layer
`layer_image_tokens`). R = 1 (lam = 1) schedules nothing: the vanilla model exactly.

Arguments: `convention` (average|post), `layers` (auto, or boundaries such as `8,16,24`: any number
of stages, lam^s per stage), `lam` (0: solved from the budget), `renumber` (true: the official
compaction of position ids; false keeps original ids with gaps, as FastV).

Official source: Cooperx521/PyramidDrop@6444f304, `llava/model/modeling_llama_pdrop.py`
`pdrop_forward` lines 1106-1288 and `pdrop_rank_drop` lines 1290-1466, `llava/model/llava_arch.py`
lines 326-480 (image position, prompt length, image-token count), eval scripts
`scripts/v1_6/pdrop_eval` ([8,16,24], [0.5,0.25,0.125]); restated in `spec/baselines/pdrop.md`.

Kept: the next layer's projections score (3.1); the last instruction token as the only query row at
inference (3.3); post-softmax, not renormalised over the span (3.4-3.5); counts from the original
`N0` truncated per stage (2); newlines ranked like any image token (1); renumbered positions at every
stage and the matching decode positions (4.5, 5).

What differs here: the KV heads are repeated for GQA (quirk 3.6: the official code fails to
broadcast on Mistral-7B's 8 KV heads); each row of a batch is scored on its own, left-padded and
re-padded left (the official code only runs right padding, spec 8); every image of a row is pruned
with its own counts (the official code prunes the first image only); the head mean is taken on fp32
probabilities (the official code casts them to fp16 first, so near-ties can differ); `layers=auto`
scales the boundaries with the model's depth (the official 13B scripts keep [8,16,24] on 40 layers:
give `layers=8,16,24`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from llava.model.compression import fastv
from llava.model.compression.common import Budget
from llava.model.compression.registry import arg, register

OFFICIAL_LAMBDA = 0.5  # every official script: image_token_ratio_list [0.5, 0.25, 0.125]
OFFICIAL_STAGES = 3


@dataclasses.dataclass(frozen=True)
class PDropArgs:
    convention: Literal["average", "post"] = arg("average", "what the budget counts: the image tokens averaged "
                                                            "over all layers (average) or left after the last stage "
                                                            "(post)")
    layers: str = arg("auto", "stage boundaries (layers already run), e.g. 8,16,24; auto: the official L/4, L/2, "
                              "3L/4, the first moved to L/16 when the budget needs lam below the official 0.5")
    lam: float = arg(0.0, "the ratio lam between stages (kept: int(N0 lam^s)); 0 solves it from the budget")
    renumber: bool = arg(True, "renumber position ids 0.. after each stage (official); false keeps original ids")

    def __post_init__(self):
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1] (0: solved from the budget), got {self.lam}")
        if self.layers != "auto":
            try:
                bounds = [int(text) for text in self.layers.split(",")]
            except ValueError:
                raise ValueError(f"layers must be 'auto' or comma-separated layers, got {self.layers!r}") from None
            if not bounds or bounds != sorted(set(bounds)) or bounds[0] < 1:
                raise ValueError(f"layers must ascend strictly from 1 or more (a layer runs before the first "
                                 f"drop), got {self.layers!r}")

    def keeps_everything(self) -> bool:
        return True

    def schedule(self, span_tokens: int, budget: Budget, num_layers: int) -> tuple[tuple[int, int], ...]:
        """`((b_s, kept_s), ...)`: from layer `b_s` on, keep `kept_s` of the image's `span_tokens`;
        stages that drop nothing, or lie past the last layer, are left out (`()`: the vanilla model)."""
        bounds, lam = self.plan(span_tokens, budget, num_layers)
        # int() as the official code; the 1e-9 only absorbs float noise of a solved lam (lam^3 = 1/2 as 0.49999...)
        counts = [int(span_tokens * lam ** stage + 1e-9) for stage in range(1, len(bounds) + 1)]
        if self.convention == "post" and self.lam == 0.0 and counts:  # the last stage is the budget itself
            counts[-1] = final_count(span_tokens, budget)
        stages = {}
        for bound, count in zip(bounds, counts):
            if bound < num_layers:
                stages[bound] = min(count, span_tokens)  # a boundary given twice (shallow models): the later wins
        return tuple((bound, count) for bound, count in stages.items() if count < span_tokens)

    def schedule_params(self, span_tokens: int, budget: Budget, num_layers: int) -> dict:
        """The boundaries and lam `schedule` used (for the image's record: lam is solved per budget)."""
        bounds, lam = self.plan(span_tokens, budget, num_layers)
        return dict(lam=lam, layers=bounds)

    def plan(self, span_tokens: int, budget: Budget, num_layers: int) -> tuple[list[int], float]:
        """The boundaries (clamped into `1..L`, ascending) and lam for one image (host arithmetic)."""
        if self.layers != "auto":
            bounds = [min(bound, num_layers) for bound in map(int, self.layers.split(","))]
        else:
            bounds = evenly_after(max(1, num_layers // 4), num_layers)
        if self.lam > 0.0:
            return bounds, self.lam
        if self.convention == "post":
            return bounds, (final_count(span_tokens, budget) / max(span_tokens, 1)) ** (1 / len(bounds))
        target = budget_fraction(span_tokens, budget)
        lam = solve_lambda(bounds, num_layers, target)
        if self.layers == "auto" and lam < OFFICIAL_LAMBDA - 1e-9:  # a solved 0.5 can come out as 0.49999...
            bounds = evenly_after(max(1, num_layers // 16), num_layers)
            lam = solve_lambda(bounds, num_layers, target)
        return bounds, lam


def budget_fraction(span_tokens: int, budget: Budget) -> float:
    """The budget as a fraction of the image's span: R, or `--visual-tokens T` as `T / N0` (at most 1)."""
    if budget.tokens is not None:
        return min(1.0, budget.tokens / max(span_tokens, 1))
    return min(1.0, budget.ratio)


def final_count(span_tokens: int, budget: Budget) -> int:
    """convention=post: the tokens after the last stage, `int(R N0)` (the official truncation) or `min(T, N0)`."""
    if budget.tokens is not None:
        return max(0, min(span_tokens, budget.tokens))
    return min(span_tokens, int(budget.ratio * span_tokens))


def evenly_after(first: int, num_layers: int, stages: int = OFFICIAL_STAGES) -> list[int]:
    """Boundaries `first + s (L - first) // stages` for `s < stages`: the first stage ends at `first`,
    the others share the remaining layers evenly (8 on 32 layers: [8, 16, 24]; 2: [2, 12, 22])."""
    return [min(num_layers, first + stage * (num_layers - first) // stages) for stage in range(stages)]


def average_fraction(bounds: list[int], num_layers: int, lam: float) -> float:
    """The layer-averaged fraction of image tokens: layers before `b_1` see all, `[b_s, b_{s+1})` see `lam^s`."""
    ends = list(bounds[1:]) + [num_layers]
    seen = bounds[0] + sum((end - start) * lam ** stage for stage, (start, end) in enumerate(zip(bounds, ends), 1))
    return seen / num_layers


def solve_lambda(bounds: list[int], num_layers: int, target: float) -> float:
    """lam in [0, 1] with `average_fraction(bounds, L, lam) = target` (increasing in lam: bisection);
    0 when the target is below the floor `b_1 / L`, 1 at a full budget."""
    if target >= 1.0:
        return 1.0
    low, high = 0.0, 1.0
    if average_fraction(bounds, num_layers, low) >= target:
        return 0.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if average_fraction(bounds, num_layers, middle) < target else (low, middle)
    return high


@register("pdrop", stage="in-llm", needs={"next_layer_query_attn"}, args=PDropArgs)
def keep(scores: torch.Tensor, image_tokens: torch.Tensor, targets: torch.Tensor, args: PDropArgs) -> torch.Tensor:
    """`[I, N]` bool: per image, its `targets[i]` best-scored tokens among the first `image_tokens[i]`
    columns of `scores` `[I, N]` (the official topk, ties to the earlier token), the rule FastV's
    `keep` implements; called once per stage on the current spans."""
    return fastv.keep(scores, image_tokens, targets, args)
