"""Pruning visual tokens inside the language model: the decoder mechanism every in-LLM method shares.

An in-LLM method (`llava.model.compression`, registered with `stage="in-llm"`) is a pure keep rule:
given the scores it declared (`registry.DECODER_SIGNALS`) for each image's span, it says which
image tokens survive. This module runs the decoder and does everything else
(spec: `baselines/in-llm-pruning.md`):

1. `PruningRequest`: what the glue (`llava_arch.splice_image_features`) hands the next prefill:
   each image's row, span start and span length in the padded sequence, and its schedule
   (the method's `args.schedule`: `(layer, image tokens kept from that layer on)` stages).
2. `decoder_forward` replaces the backbone's forward (Llama, Mistral, Qwen2: the same layer API) with a
   copy of its loop that stops before each pruning layer `l`. The layers before the first stage
   get the model's own causal mask and RoPE tables, so nothing changes until a prune happens,
   and a schedule with no stage (R = 1) is the vanilla model exactly.
3. `query_attention` computes the declared scores for the chosen query rows only: their queries
   from the scoring layer's input with that layer's own `input_layernorm`, `q_proj` and RoPE,
   against the keys that layer has just written to the KV cache (`cached_keys`; recomputed by
   `layer_keys` only where no cache holds them, e.g. PDrop, which scores a layer before running
   it), GQA heads repeated, padding masked, softmax in fp32, heads averaged. The model stays on SDPA:
   no `output_attentions`, no eager fallback. (`last_query_attn`: the last position's row at
   layer `l - 1`, FastV's "attention of layer K-1".)
4. `keep_positions` turns the rule's per-image keep masks into a keep mask over the sequence
   (text always kept, padding dropped); `shrink` gathers hidden states and position ids per row
   and re-pads LEFT to the longest new row. Ragged rows: each row keeps its own count; shorter
   rows get more left padding, masked as keys everywhere after; a padding query row sees only
   itself (finite, never read). Kept tokens keep their original position ids (FastV, DART); a
   method whose official code renumbers (PDrop) sets `renumber` on its args.
5. Later layers get a fresh mask (causal AND key-valid) and RoPE tables from the kept ids.
   Their KV caches only ever receive kept tokens; the layers already run keep the keys they
   computed on the full sequence (as the official cached FastV does), so the `DynamicCache`'s
   layers have different lengths. The per-stage key-valid masks ride on the cache object
   (`PrunedCache` state), so decode builds, for each layer, a mask whose key length is that
   layer's cache length, extended by the steps generated since.
6. Decode never re-ranks (pruned once at prefill, spec section 4); its positions are the ones
   `generate` derives from the original mask, i.e. continuing from the original prompt length
   (where the method renumbers, each stage's layers get them minus the row's tokens dropped before
   that stage, continuing the stage's compacted numbering: `PrunedCache.renumbered`).

Multi-stage methods (PDrop) give several stages; methods whose scores are not a softmax row
(DART's key norms) add a signal to `DECODER_SIGNALS` and its computation to `SCORERS`.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys

import torch
from torch.profiler import record_function
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast


# The KV cache's keyword in the installed transformers' decoders and outputs: `past_key_values` up to 5.17,
# `cache` in later 5.x releases (as `llava_arch.CACHE_KEY`).
CACHE_KEY = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"

# Profiler ranges around a prefill's scoring and its keep rule + shrink: `tools/benchmark_efficiency.py` reads
# their share of the prefill from one profiled run (a range costs microseconds when no profiler listens).
SCORES_RANGE, PRUNE_RANGE = "in_llm.scores", "in_llm.prune"


@dataclasses.dataclass
class PruningRequest:
    """Per image of a batch (index `I` over all images, in placeholder order).

    `rows`, `starts`, `counts`: `[I]` long, the image's row, first position and span length in the
    padded prefill sequence (newline tokens included: the language model cannot tell them apart);
    `schedules`: per image, `((layer, kept), ...)` ascending in layer; `method`: the registered in-LLM
    method (its `select` is the keep rule) and `args` its arguments."""

    rows: torch.Tensor
    starts: torch.Tensor
    counts: torch.Tensor
    schedules: list
    method: object
    args: object
    # Called after each stage with `(layer, kept)`, `kept` `[I, N]` bool over the images' current spans
    # (the glue's per-view accounting, llava_arch._in_llm_view_recorder); None: nothing is told.
    on_prune: object = None

    def stage_layers(self) -> list[int]:
        return sorted({layer for schedule in self.schedules for layer, _ in schedule})

    def targets(self, layer: int, current: torch.Tensor) -> torch.Tensor:
        """`[I]` image tokens to keep at `layer` (an image without a stage there keeps `current`)."""
        wanted = [dict(schedule).get(layer, -1) for schedule in self.schedules]
        wanted = torch.tensor(wanted, dtype=torch.long, device=current.device)
        return torch.where(wanted < 0, current, torch.minimum(wanted, current))


@dataclasses.dataclass
class PrunedCache:
    """Held on the KV cache after a pruned prefill: per stage, from which layer on it holds and the
    key-valid mask `[B, L_stage]` of its prefill keys; `prompt_length` is the unpruned prefill length."""

    stages: list
    prompt_length: int
    renumbered: bool = False  # positions renumbered at each prune (PDrop): decode shifts them per stage and row


def _rope(attention_module):
    """The RoPE function of the attention's own modelling module (Llama, Mistral and Qwen2 share it)."""
    return sys.modules[type(attention_module).__module__].apply_rotary_pos_emb


def layer_keys(layer, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
    """`[B, Hkv, L, d]`: `layer`'s keys for its input `hidden_states` `[B, L, D]` (its own norm,
    `k_proj` and RoPE, `position_embeddings` `(cos, sin)` each `[B or 1, L, d]`), as its attention makes them."""
    attention = layer.self_attn
    batch, length, _ = hidden_states.shape
    keys = attention.k_proj(layer.input_layernorm(hidden_states)).view(batch, length, -1, attention.head_dim)
    cos, sin = position_embeddings
    keys = keys.transpose(1, 2)
    return _rope(attention)(keys, keys, cos, sin)[1]


def cached_keys(cache, index: int, length: int) -> torch.Tensor | None:
    """Layer `index`'s keys for the last `length` positions as that layer has just written them to
    `cache` (`[B, Hkv, length, d]`), so a scorer run right after the layer needs no `k_proj` of its
    own; None when the cache does not hold them all (no cache, a sliding window shorter than the
    prompt, a quantised layer)."""
    layers = getattr(cache, "layers", None)
    if layers is None or index >= len(layers) or type(layers[index]) not in (DynamicLayer, DynamicSlidingWindowLayer):
        return None
    keys = layers[index].keys
    return keys[:, :, -length:] if keys is not None and keys.dim() == 4 and keys.shape[2] >= length else None


def query_attention(layer, hidden_states: torch.Tensor, position_embeddings, key_valid: torch.Tensor,
                    query_index: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
    """Head-mean post-softmax attention of the query positions `query_index` `[B, Q]` (long) over all
    keys, as `layer`'s self-attention computes it, for its input `hidden_states` `[B, L, D]`
    (`position_embeddings` `(cos, sin)` each `[B or 1, L, d]`, `key_valid` `[B, L]` bool). `keys`
    `[B, Hkv, L, d]`: the layer's own (from the cache it just wrote); None recomputes them.
    Causal: a query sees keys up to its own position. Returns `[B, Q, L]` float32, zero on hidden keys."""
    attention = layer.self_attn
    batch, length, width = hidden_states.shape
    query_states = layer.input_layernorm(hidden_states.gather(1, query_index[..., None].expand(-1, -1, width)))
    queries = attention.q_proj(query_states).view(batch, query_index.shape[1], -1, attention.head_dim).transpose(1, 2)
    if keys is None:
        keys = layer_keys(layer, hidden_states, position_embeddings)
    cos, sin = position_embeddings
    query_gather = query_index[..., None].expand(-1, -1, cos.shape[-1])
    cos, sin = cos.expand(batch, -1, -1).gather(1, query_gather), sin.expand(batch, -1, -1).gather(1, query_gather)
    queries = _rope(attention)(queries, queries, cos, sin)[0]
    keys = keys.repeat_interleave(queries.shape[1] // keys.shape[1], dim=1)  # GQA: [B, H, L, d]
    logits = (queries.float() @ keys.float().transpose(-1, -2)) * attention.scaling  # [B, H, Q, L]
    visible = key_valid[:, None, :] & (torch.arange(length, device=hidden_states.device) <= query_index[..., None])
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    return logits.softmax(-1).mean(1)


def last_query_attn(layer, hidden_states, position_embeddings, key_valid, keys=None) -> torch.Tensor:
    """`[B, L]`: the last position's attention row (left padding: every row's last real token)."""
    last = torch.full((hidden_states.shape[0], 1), hidden_states.shape[1] - 1, device=hidden_states.device)
    return query_attention(layer, hidden_states, position_embeddings, key_valid, last, keys)[:, 0]


# name -> (offset of the scoring layer from the pruning layer, function(layer, h, position_embeddings, key_valid,
# keys=None)). Offset -1 runs right after that layer, on its input, reading the keys it has just cached.
SCORERS = {"last_query_attn": (-1, last_query_attn),
           "next_layer_query_attn": (0, last_query_attn)}  # PDrop: the pruning layer's own q/k on its input



def dart_pivot_features(model, layer, layer_input, layer_output, position_embeddings, key_valid,
                        keys=None) -> torch.Tensor:
    """`[B, L, 2 + D]` float32 per token (DART, `compression.dart`): the L1 norm of `layer`'s keys
    (`keys` `[B, Hkv, L, d]` from the cache it just wrote, or `layer_keys` on `layer_input`; every KV
    head flattened), the original position id (from the row's first real token) and `layer_output`
    `[B, L, D]` through the model's final norm."""
    if keys is None:
        keys = layer_keys(layer, layer_input, position_embeddings)
    norms = keys.float().abs().sum((1, 3))  # [B, L]
    positions = (key_valid.long().cumsum(1) - 1).clamp(min=0).float()
    return torch.cat([norms[..., None], positions[..., None], model.norm(layer_output).float()], dim=-1)


# Scorers that also need the scoring layer's output, run right after layer K-1: name -> function(model, layer,
# layer_input, layer_output, position_embeddings, key_valid, keys=None) -> [B, L, F]. Their keep rule sees, per
# image, its span and then the text after it (`image_scores(..., through_end=True)`).
AFTER_LAYER_SCORERS = {"dart_pivot_features": dart_pivot_features}


def text_raters(inputs_embeds: torch.Tensor, key_valid: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor,
                counts: torch.Tensor):
    """SparseVLM's text raters, once per prefill from the layer-0 input `inputs_embeds` `[B, L, D]`
    (`key_valid` `[B, L]`; image `i` in row `rows[i]` spans `starts[i]`.. for `counts[i]`): the text
    after the image (valid, in no image's span) scored by a softmax over it of the raw dot products
    with the image's rows, averaged over those rows; raters score above the mean of that text.
    Returns `(positions [I, Q], valid [I, Q])`, each image's raters in ascending order (spec
    `sparsevlm.md` 2; float32 here)."""
    length = inputs_embeds.shape[1]
    columns = torch.arange(length, device=inputs_embeds.device)
    in_image = torch.zeros_like(key_valid)
    _, positions, inside = image_scores(key_valid.float(), rows, starts, counts)
    in_image[rows[:, None].expand_as(positions)[inside], positions[inside]] = True
    text = (columns >= (starts + counts)[:, None]) & key_valid[rows] & ~in_image[rows]  # [I, L]
    text_width = int(text.sum(1).max()) if text.numel() else 0
    text_positions = torch.where(text, columns, length).sort(dim=1).values[:, :text_width]  # [I, T], ascending
    text_valid = text_positions < length
    text_positions = text_positions.clamp(max=length - 1)
    states = inputs_embeds.float()
    visual = states[rows[:, None], positions]  # [I, N, D]
    logits = visual @ states[rows[:, None], text_positions].transpose(1, 2)  # [I, N, T]
    relevance = logits.masked_fill(~text_valid[:, None, :], float("-inf")).softmax(-1).nan_to_num(0.0)
    relevance = (relevance * inside[..., None]).sum(1) / counts.clamp(min=1)[:, None]  # [I, T]: mean over the rows
    mean = relevance.sum(1) / text_valid.sum(1).clamp(min=1)
    raters = text_valid & (relevance > mean[:, None])
    width = int(raters.sum(1).max()) if raters.numel() else 0
    ordered = torch.where(raters, text_positions, length).sort(dim=1).values[:, :width]
    return ordered.clamp(max=length - 1), ordered < length


def rater_attn(layer, hidden_states, position_embeddings, key_valid, raters, keys=None) -> torch.Tensor:
    """`[I, L]`: per image, the mean over its raters (`raters`: `(rows [I], positions [I, Q],
    valid [I, Q])`) of their head-mean attention rows at `layer` (SparseVLM's score; 0 for an image
    without raters). `keys`: as `query_attention`'s, per batch row."""
    rows, positions, valid = raters
    if positions.shape[1] == 0:
        return hidden_states.new_zeros(rows.shape[0], hidden_states.shape[1], dtype=torch.float32)
    cos, sin = position_embeddings
    per_image = (cos[rows] if cos.shape[0] > 1 else cos, sin[rows] if sin.shape[0] > 1 else sin)
    attention = query_attention(layer, hidden_states[rows], per_image, key_valid[rows], positions,
                                None if keys is None else keys[rows])  # [I, Q, L]
    return (attention * valid[..., None]).sum(1) / valid.sum(1).clamp(min=1)[:, None]


# SparseVLM: the sparse layer l's own attention from the text raters, pruning its output (stage at l + 1);
# the scorer takes the raters as a fifth argument and returns per-image rows [I, L]
SCORERS["rater_attn"] = (-1, rater_attn)


def image_scores(row_scores: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor,
                 through_end: bool = False):
    """Each image's span of its row's scores: `row_scores` `[B, L]` (or `[B, L, F]`) -> `[I, N]` (or
    `[I, N, F]`; N the longest span, columns past an image's count are 0) and the span's positions
    `[I, N]` (clamped into the row). `through_end`: each span runs on to the end of its row (the text
    after the image too: DART's text pivots), N the longest such, 0 past the row's end."""
    length = row_scores.shape[1]
    width = (int((length - starts).max()) if through_end else int(counts.max())) if counts.numel() else 0
    offsets = torch.arange(width, device=row_scores.device)
    positions = (starts[:, None] + offsets).clamp(max=length - 1)
    inside = offsets < counts[:, None]
    filled = (starts[:, None] + offsets < length) if through_end else inside
    gathered = row_scores[rows[:, None], positions]
    return gathered.masked_fill(~filled.view(*filled.shape, *[1] * (gathered.dim() - 2)), 0.0), positions, inside


def keep_positions(key_valid: torch.Tensor, rows, positions, inside, kept_images: torch.Tensor) -> torch.Tensor:
    """`[B, L]` bool: the positions to keep (valid and not a dropped image token), from the rule's
    `kept_images` `[I, N]` over each image's span `positions` `[I, N]` (`inside`: within the span)."""
    keep = key_valid.clone()
    dropped = inside & ~kept_images
    keep[rows[:, None].expand_as(positions)[dropped], positions[dropped]] = False
    return keep


def shrink(keep: torch.Tensor, *tensors: torch.Tensor):
    """Gather the kept positions of each row and re-pad on the left: `keep` `[B, L]` bool; each
    tensor `[B, L, ...]`. Returns the new key-valid mask `[B, L']`, the index map `[B, L]` (new
    position of each old one, -1 where dropped) and the tensors `[B, L', ...]` (zero padding)."""
    lengths = keep.sum(1)
    new_length = int(lengths.max())
    destination = (new_length - lengths)[:, None] + keep.long().cumsum(1) - 1
    destination = torch.where(keep, destination, torch.full_like(destination, -1))
    rows, old = keep.nonzero(as_tuple=True)
    new = destination[rows, old]
    shrunk = []
    for tensor in tensors:
        out = tensor.new_zeros((tensor.shape[0], new_length, *tensor.shape[2:]))
        out[rows, new] = tensor[rows, old]
        shrunk.append(out)
    valid = torch.arange(new_length, device=keep.device) >= (new_length - lengths)[:, None]
    return valid, destination, shrunk


def pruned_mask(key_valid: torch.Tensor, queries: int) -> torch.Tensor | None:
    """4-D bool mask `[B, 1, Q, K]` for the last `queries` positions over `K` keys: causal AND
    key-valid, a padding query row seeing itself so no row is all masked; None (SDPA's causal
    path) when no key is padding."""
    if bool(key_valid.all()):
        return None
    keys = key_valid.shape[1]
    query_positions = torch.arange(keys - queries, keys, device=key_valid.device)[:, None]
    key_positions = torch.arange(keys, device=key_valid.device)
    causal = key_positions <= query_positions  # [Q, K]
    mask = causal & key_valid[:, None, :]
    mask = mask | (key_positions == query_positions)
    return mask[:, None]


def _prune(request: PruningRequest, layer_index, hidden_states, position_ids, key_valid, spans, scores):
    """One stage: the rule's keep masks from `scores` `[B, L]`, then the shrunk state.
    `spans`: current `(starts, counts)` per image. Returns the new state and spans."""
    starts, counts = spans
    through_end = bool(request.method.needs & AFTER_LAYER_SCORERS.keys())  # DART: the text after each image too
    span_scores, positions, inside = image_scores(scores, request.rows, starts, counts, through_end)
    if span_scores.shape[1] == 0:  # every image already pruned to nothing (a schedule's later stages)
        if request.on_prune is not None:
            request.on_prune(layer_index, inside)
        return hidden_states, position_ids, key_valid, spans
    targets = request.targets(layer_index, counts)
    kept_images = request.method.select(span_scores, counts, targets, request.args) & inside
    if request.on_prune is not None:
        request.on_prune(layer_index, kept_images)
    keep = keep_positions(key_valid, request.rows, positions, inside, kept_images)
    new_valid, destination, (hidden_states, position_ids) = shrink(keep, hidden_states, position_ids)
    if getattr(request.args, "renumber", False):  # renumber 0.. after the padding (PDrop)
        position_ids = (new_valid.long().cumsum(1) - 1).clamp(min=0)
    # The kept tokens of an image are contiguous again: its new start is its first kept token's.
    first_kept = torch.where(kept_images, positions, torch.full_like(positions, scores.shape[1])).min(1).values
    new_starts = destination[request.rows, first_kept.clamp(max=scores.shape[1] - 1)]
    new_counts = kept_images.sum(1)
    return hidden_states, position_ids, new_valid, (torch.where(new_counts > 0, new_starts, 0), new_counts)


def shrink_and_insert(keep: torch.Tensor, rows: torch.Tensor, after: torch.Tensor, extra: torch.Tensor,
                      extra_valid: torch.Tensor, hidden_states: torch.Tensor):
    """`shrink` that also inserts new tokens: image `i`'s `extra[i]` `[C, D]` (the first
    `extra_valid[i]` `[C]` rows, a prefix) go into row `rows[i]` right after the kept positions up to
    `after[i]` (its span's last position). `keep` `[B, L]`, `hidden_states` `[B, L, D]`. Returns the
    key-valid mask `[B, L']`, the index map `[B, L]` (-1 where dropped), the hidden states
    `[B, L', D]` (left padded) and, per image, the new position right after its kept and inserted
    tokens `[I]`."""
    inserted = extra_valid.sum(1)
    slots = keep.long()
    extra_slots = torch.zeros_like(slots).index_put_((rows, after), inserted, accumulate=True)
    filled = (slots + extra_slots).cumsum(1)  # [B, L]: slots up to each position, its inserted tokens included
    lengths = filled[:, -1]
    new_length = int(lengths.max())
    shift = (new_length - lengths)[:, None]
    destination = torch.where(keep, shift + filled - extra_slots - 1, torch.full_like(filled, -1))
    image_ends = shift[rows, 0] + filled[rows, after]
    extra_positions = (image_ends - inserted)[:, None] + torch.arange(extra.shape[1], device=keep.device)  # [I, C]
    kept_rows, old = keep.nonzero(as_tuple=True)
    out = hidden_states.new_zeros((hidden_states.shape[0], new_length, hidden_states.shape[2]))
    out[kept_rows, destination[kept_rows, old]] = hidden_states[kept_rows, old]
    image_rows = rows[:, None].expand_as(extra_positions)
    out[image_rows[extra_valid], extra_positions[extra_valid]] = extra[extra_valid].to(out.dtype)
    valid = torch.arange(new_length, device=keep.device) >= shift
    return valid, destination, out, image_ends


def _prune_by_raters(request: PruningRequest, layer_index, hidden_states, key_valid, spans, scores, raters):
    """One SparseVLM stage on the output of the sparse layer (`hidden_states` `[B, L, D]`): the rule's
    keep masks from the per-image rater scores `[I, L]`, the args' `recycle` merges inserted after
    each image's kept tokens, positions renumbered. Images without a stage here are left whole.
    Returns the new state, spans and raters (`(rows, positions [I, Q], valid)`, tracked)."""
    starts, counts = spans
    images = torch.arange(request.rows.shape[0], device=scores.device)
    span_scores, positions, inside = image_scores(scores, images, starts, counts)
    staged = torch.tensor([layer_index in dict(schedule) for schedule in request.schedules], device=scores.device)
    targets = request.targets(layer_index, counts)
    kept_images = (request.method.select(span_scores, counts, targets, request.args) | ~staged[:, None]) & inside
    if request.on_prune is not None:
        request.on_prune(layer_index, kept_images)
    extra, extra_valid = request.args.recycle(hidden_states, request.rows, positions, span_scores, kept_images, inside)
    extra_valid = extra_valid & staged[:, None]
    keep = keep_positions(key_valid, request.rows, positions, inside, kept_images)
    span_end = (starts + counts - 1).clamp(min=0, max=key_valid.shape[1] - 1)
    new_valid, destination, hidden_states, image_ends = shrink_and_insert(keep, request.rows, span_end, extra,
                                                                          extra_valid, hidden_states)
    position_ids = (new_valid.long().cumsum(1) - 1).clamp(min=0)  # renumbered (v1, v1.5)
    new_counts = kept_images.sum(1) + extra_valid.sum(1)
    new_starts = image_ends - new_counts  # the image's kept then merged tokens are contiguous
    rows, rater_positions, rater_valid = raters
    rater_positions = destination[rows[:, None], rater_positions].clamp(min=0)  # text is always kept
    return (hidden_states, position_ids, new_valid, (torch.where(new_counts > 0, new_starts, 0), new_counts),
            (rows, rater_positions, rater_valid))


def decoder_forward(model, vanilla_forward, input_ids=None, attention_mask=None, position_ids=None,
                    inputs_embeds=None, use_cache=None, **kwargs):
    """The backbone's forward (the transformers 5 Llama/Mistral/Qwen2 loop) with in-LLM pruning, at a
    prefill with a pending `model.pruning_request` and at the decode steps after a pruned prefill
    (the cache carries `PrunedCache`); otherwise `vanilla_forward`, the model's own."""
    cache = kwargs.pop(CACHE_KEY, None)
    request = getattr(model, "pruning_request", None)
    state = getattr(cache, "pruned", None)
    length = (inputs_embeds if inputs_embeds is not None else input_ids).shape[1]
    pruning_now = request is not None and length > 1 and bool(request.stage_layers())
    if pruning_now and "sliding_attention" in (getattr(model.config, "layer_types", None) or ()):
        # The loop below gives every layer the full causal mask, and a sliding layer's cache drops old keys.
        raise NotImplementedError("in-LLM pruning is not supported on sliding-window attention layers "
                                  "(Qwen2's use_sliding_window); LLaVA-OneVision's configs have none")
    if length > 1:
        model.pruning_request = None  # a request serves one prefill
    if not pruning_now and (state is None or length > 1):
        return vanilla_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, use_cache=use_cache, **{CACHE_KEY: cache}, **kwargs)
    use_cache = model.config.use_cache if use_cache is None else use_cache
    if inputs_embeds is None:
        inputs_embeds = model.embed_tokens(input_ids)
    if use_cache and cache is None:
        cache = DynamicCache(config=model.config)
    past = cache.get_seq_length() if cache is not None else 0
    if position_ids is None:
        position_ids = (torch.arange(length, device=inputs_embeds.device) + past)[None]
    causal_mask = create_causal_mask(model.config, inputs_embeds, attention_mask, cache, position_ids=position_ids)
    hidden_states = inputs_embeds
    position_embeddings = model.rotary_emb(hidden_states, position_ids=position_ids)
    layers = model.layers[: model.config.num_hidden_layers]
    batch = hidden_states.shape[0]
    full_valid = (attention_mask.bool() if attention_mask is not None
                  else torch.ones(batch, past + length, dtype=torch.bool, device=hidden_states.device))
    run = dict(use_cache=use_cache, **{CACHE_KEY: cache}, **kwargs)

    if pruning_now:
        stage_layers = request.stage_layers()
        scorers = [SCORERS[name] for name in sorted(request.method.needs) if name in SCORERS]
        after = [AFTER_LAYER_SCORERS[name] for name in sorted(request.method.needs) if name in AFTER_LAYER_SCORERS]
        key_valid = full_valid[:, -length:]
        positions = position_ids.expand(batch, -1)
        spans, scores, stages = (request.starts, request.counts), None, []
        raters = None  # SparseVLM's text raters, from the layer-0 input
        if "rater_attn" in request.method.needs:
            with record_function(SCORES_RANGE):
                raters = (request.rows, *text_raters(inputs_embeds, key_valid, request.rows, *spans))

        def rater_rows():
            return (raters,) if raters is not None else ()

        for index, decoder_layer in enumerate(layers):
            if index in stage_layers:
                with record_function(SCORES_RANGE):
                    for offset, scorer in scorers:  # scored on the pruning layer's own input (PDrop)
                        if offset == 0:
                            scores = scorer(decoder_layer, hidden_states, position_embeddings, key_valid,
                                            *rater_rows())
                with record_function(PRUNE_RANGE):
                    if raters is not None:  # SparseVLM: rater scores, recycled tokens inserted
                        hidden_states, positions, key_valid, spans, raters = _prune_by_raters(
                            request, index, hidden_states, key_valid, spans, scores, raters)
                    else:
                        hidden_states, positions, key_valid, spans = _prune(request, index, hidden_states, positions,
                                                                            key_valid, spans, scores)
                causal_mask = pruned_mask(key_valid, key_valid.shape[1])
                position_embeddings = model.rotary_emb(hidden_states, position_ids=positions)
                stages.append((index, key_valid))
            layer_input = hidden_states
            hidden_states = decoder_layer(hidden_states, attention_mask=causal_mask,
                                          position_embeddings=position_embeddings, position_ids=positions, **run)
            if index + 1 in stage_layers:  # scored on the layer before the pruning layer (FastV: K - 1)
                with record_function(SCORES_RANGE):
                    keys = cached_keys(cache, index, layer_input.shape[1])
                    for offset, scorer in scorers:
                        if offset == -1:
                            scores = scorer(decoder_layer, layer_input, position_embeddings, key_valid, *rater_rows(),
                                            keys=keys)
                    for scorer in after:  # DART: also the layer's output
                        scores = scorer(model, decoder_layer, layer_input, hidden_states, position_embeddings,
                                        key_valid, keys=keys)
        if cache is not None:
            cache.pruned = PrunedCache(stages, length, getattr(request.args, "renumber", False))
    else:  # a decode step after a pruned prefill: each stage's layers see their own cache length
        stage_at = dict(state.stages)
        for index, decoder_layer in enumerate(layers):
            if index in stage_at:
                grown = full_valid[:, state.prompt_length:]  # the steps since the prefill, this one included
                causal_mask = pruned_mask(torch.cat([stage_at[index], grown], dim=1), length)
                if state.renumbered:  # continue the stage's compacted numbering: minus the row's tokens dropped so far
                    dropped = full_valid[:, :state.prompt_length].sum(1) - stage_at[index].sum(1)
                    position_embeddings = model.rotary_emb(hidden_states, position_ids=position_ids - dropped[:, None])
            hidden_states = decoder_layer(hidden_states, attention_mask=causal_mask,
                                          position_embeddings=position_embeddings, position_ids=position_ids, **run)
    return BaseModelOutputWithPast(last_hidden_state=model.norm(hidden_states), **{CACHE_KEY: cache})
