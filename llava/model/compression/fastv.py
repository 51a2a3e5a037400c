"""FastV (in-LLM): after layer K, keep the image tokens the last prompt token attends to most.

1. The image goes into the language model whole (vanilla LLaVA-NeXT: thumbnail, unpadded crops,
   newlines). The decoder mechanism (`llava.model.language_model.pruning`) runs layers 0..K-1 on
   every token.
2. `last_query_attn`: the last prompt position's attention row of layer K-1 (0-based), recomputed
   from that layer's input under SDPA, softmax in fp32, mean over heads (spec `fastv.md` 1, 6).
3. `keep`: per image, the `k` best-scored tokens of its span (the official `torch.topk`; ties here to the
   earlier token, where topk's order is unspecified), back in original order;
   every text token stays (spec 2.1-2.2).
4. The mechanism drops the rest from the input of layer K on, kept tokens keeping their original
   position ids (spec 2.4); layers >= K cache only the kept tokens; decode never re-ranks (spec 5).

Budget: `schedule` maps the project's budget onto `k`, out of the image's span `N` in the
sequence (newline tokens included: the official code takes a fixed span and cannot tell them
apart; spec 3). `convention=post` (default): `k = round(R N)` (Python's half-to-even round, as
[HF]'s `round(N (1 - fastv_r))` with the dropped fraction `1 - R`), and `--visual-tokens T` gives
`k = min(T, N)`; layers before K still see all N tokens. `convention=average` (SparseVLM's
"equivalent tokens", `Gumpest/SparseVLMs#4`): the layer average `(K N + (L - K) k) / L` equals
the budget `R N` (or `T`): `k = floor((R L - K) N / (L - K))`, at least 0 (below `R = K / L` even
k = 0 overshoots: the accounting prints what was reached). Both counts are in the accounting
(`post_pruning_image_tokens`, `equivalent_image_tokens`, per layer `layer_image_tokens`). The
default is `post` because the GlobalCom2 table's "<= N tokens" labels read that way (spec 3).
R = 1 (or `k >= N`) schedules nothing: the vanilla model exactly.

Arguments: `k` (the FastV layer K, default 2 as the paper and its README latency table; the
lmms-eval numbers used 3), `convention` (post|average).

Official source: pkunlp-icler/FastV@d1659729, `src/FastV/llava-hf/transformers/src/transformers/
models/llama/modeling_llama.py` `fastv_forward` lines 955-1125 ([HF]), `src/transformers/src/
transformers/models/llama/modeling_llama.py` lines 715-811 ([ORIG]), `src/FastV/lmms-eval/
fastv_kvcache.py` lines 104-151 ([KV]); restated in `spec/baselines/fastv.md`.

Kept: the last position as the only query row (the paper says "average attention"; the code uses
`[-1]`, spec 1.3); no renormalisation over the span (1.6); original position ids with gaps (2.4);
pruned once at prefill with the layers >= K caching only kept tokens, layers < K everything (5).

What differs here: each row of a batch is scored on its own row, its own span and its own count
(the official code scores row 0 and applies its indices to every row, spec 1.5); the span is each
image's in the splice, not hard-coded (36:612); a row with several images keeps `k` per image; the
head mean is taken on fp32 probabilities (the official code rounds them to fp16 first, so near-ties
can differ); [KV]'s double run of layer K-1 and its RoPE patch are not reproduced (5).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch

from llava.model.compression.common import Budget
from llava.model.compression.registry import arg, register


@dataclasses.dataclass(frozen=True)
class FastVArgs:
    k: int = arg(2, "the FastV layer K: layers 0..K-1 see every token, layer K-1's attention scores them")
    convention: Literal["post", "average"] = arg("post", "what the budget counts: image tokens left after layer K "
                                                         "(post) or their average over all layers (average)")

    def __post_init__(self):
        if self.k < 1:  # K = 0 has no layer before it to score with ([ORIG] asserts K > 0 when dropping)
            raise ValueError(f"k must be at least 1 (a layer before the pruning layer scores), got {self.k}")

    def keeps_everything(self) -> bool:
        return True

    def schedule(self, span_tokens: int, budget: Budget, num_layers: int) -> tuple[tuple[int, int], ...]:
        """`((K, k),)`: from layer K on, keep `k` of the image's `span_tokens`; `()` when nothing is
        dropped (a full budget, or K past the last layer)."""
        kept = kept_tokens(span_tokens, budget, num_layers, self.k, self.convention)
        return ((self.k, kept),) if kept < span_tokens and self.k < num_layers else ()


def kept_tokens(span_tokens: int, budget: Budget, num_layers: int, layer: int, convention: str) -> int:
    """`k` for one image (host arithmetic; the module docstring's Budget section)."""
    if convention == "post":
        wanted = budget.tokens if budget.tokens is not None else round(budget.ratio * span_tokens)
        return max(0, min(span_tokens, wanted))
    target = budget.of_span(span_tokens)
    if target >= span_tokens:
        return span_tokens
    return max(0, min(span_tokens, math.floor((target * num_layers - layer * span_tokens) / (num_layers - layer))))


@register("fastv", stage="in-llm", needs={"last_query_attn"}, args=FastVArgs)
def keep(scores: torch.Tensor, image_tokens: torch.Tensor, targets: torch.Tensor, args: FastVArgs) -> torch.Tensor:
    """`[I, N]` bool: per image, its `targets[i]` best-scored tokens among the first `image_tokens[i]`
    columns of `scores` `[I, N]` (ties to the earlier token). `image_tokens`, `targets`: `[I]` long."""
    columns = torch.arange(scores.shape[1], device=scores.device)
    inside = columns < image_tokens[:, None]
    ranked = scores.float().masked_fill(~inside, float("-inf"))
    most = int(targets.max()) if targets.numel() else 0
    # A stable sort: ties go to the earlier token, whatever k and the padding (torch.topk's tie
    # order is unspecified and differs with k, length and device), so batched equals per-sample.
    top = ranked.sort(dim=1, descending=True, stable=True).indices[:, :most]  # [I, most], best first
    chosen = torch.arange(most, device=scores.device) < targets[:, None]
    kept = torch.zeros_like(inside)
    kept[torch.arange(scores.shape[0], device=scores.device)[:, None].expand_as(top)[chosen], top[chosen]] = True
    return kept & inside
