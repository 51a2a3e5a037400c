"""CLIP vision tower: selected patch features plus the signals a compression method asks for.

One pass through the encoder returns both (`VisionTowerOutput`). Signals are computed only when
named (`llava.model.compression.registry.SIGNALS`), each from one layer's input with only the
projections it needs, so the tower never asks for `output_attentions` and keeps its fast
attention (SDPA/flash) everywhere:

- `cls_logits_last` (GlobalCom2): the last encoder layer's pre-softmax attention logits of the
  [CLS] query against the patch keys, `q.k / sqrt(head_dim)` averaged over heads.
- `cls_attn_penultimate` (FasterVLM): layer -2's post-softmax attention of the [CLS] query, the
  softmax taken over all `1 + P` keys ([CLS] included), the patch columns kept without
  renormalising, averaged over heads: the row HF's `output_attentions` would give.
- `cls_attn_heads_first`, `cls_attn_heads_penultimate`: the same row per head `[V, H, P]`, of
  layer 0 and layer -2 (HiRED sums the heads, VisionZip too; HoloV and VisPruner average them).
- `keys_head_mean_penultimate`: layer -2's keys of all `1 + P` tokens, averaged over the heads
  `[V, 1 + P, C / H]` (VisionZip's merge metric).
- `cls_attn_full_width_last`: the last layer's [CLS] row as one head over the full width,
  `softmax(q.k / sqrt(C))` over all `1 + P` keys, patch columns `[V, P]` (PruMerge's score).
- `keys_last`: the last layer's patch keys `[V, P, C]` (PruMerge's neighbours).
- `tower_features`: the selected layer's hidden state with its [CLS] row `[V, 1 + P, C]`, before
  the projector (for methods that merge in CLIP space).
- `neg_cos_mean`, `neg_attn`: the [CLS]-free scores (GlobalCom2 on encoders without [CLS]; here
  on CLIP for the paper's comparison with the [CLS] score): `-cos(x_i, g)` of the selected patch
  features against their view mean, and minus the mean attention each patch receives in the last
  layer (queries: every token, [CLS] included; softmax over all `1 + P` keys; patch columns).
  Both float32 `[V, P]`; the SigLIP tower offers them too (`siglip_encoder`).

Keys are the raw `k_proj` outputs (bias included, unscaled).

Tower numerics (`CLIPVisionTower.set_numerics`, `TOWER_NUMERICS`): 'sdpa' (default) runs transformers'
own attention (SDPA: scale applied inside, fp32 softmax). 'released' runs every attention layer as the
released GlobalCom2 code's patched CLIP attention does under transformers 4.37 (`released_attention_forward`:
`q_proj(x) * scale`, bias included, heads folded into the batch, `bmm` with the keys, softmax in the
tower dtype, `bmm` with the values), and takes the [CLS] signals from the same full products (the
GlobalCom2 score: the head mean of the last layer's full logits map, row 0, columns 1..). In fp32 the two
modes differ by rounding only; in fp16 'released' is the one that reproduces the paper's code bit for bit.
The CLIP text tower of text-conditioned methods (`clip_text`, CDPruner) follows the vision tower's mode, its
causal and padding masks added to the logits as 4.37 adds them.
"""

from __future__ import annotations

import functools
import json
import os
from typing import NamedTuple

import torch
from torch import nn
from transformers import AttentionInterface, CLIPVisionConfig, CLIPVisionModel

from llava.model.multimodal_encoder.image_processor import CLIPImagePreprocessor

# Public architecture settings of the OpenAI CLIP towers LLaVA uses. A v1.6 checkpoint carries
# its own tower weights, so with these no hub access is needed at all.
KNOWN_CLIP_TOWERS = {
    "openai/clip-vit-large-patch14-336": dict(image_size=336),
    "openai/clip-vit-large-patch14": dict(image_size=224),
}
_CLIP_VIT_L14 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_attention_heads=16,
    num_hidden_layers=24,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    num_channels=3,
)


class VisionTowerOutput(NamedTuple):
    features: torch.Tensor  # [V, P, C] hidden state `mm_vision_select_layer` (CLS dropped for 'patch')
    signals: dict           # name -> [V, P], only those asked for


def _local_tower_dir(name: str, model_path: str | None) -> str | None:
    """A CLIP directory given by path, absolute or relative to the working dir or the checkpoint."""
    candidates = [name] + ([os.path.join(model_path, name)] if model_path else [])
    return next((path for path in candidates if os.path.isfile(os.path.join(path, "config.json"))), None)


def resolve_vision_tower(name: str, model_path: str | None = None) -> tuple[CLIPVisionConfig, CLIPImagePreprocessor, str]:
    """Config, preprocessor and weight location of the tower named by `mm_vision_tower`.

    Order: a local directory; a known OpenAI CLIP id (built from constants, no network); else
    the local Hugging Face cache. Raises `FileNotFoundError` saying what was tried.
    """
    local_dir = _local_tower_dir(name, model_path)
    if local_dir is not None:
        config = CLIPVisionConfig.from_pretrained(local_dir)
        if os.path.isfile(os.path.join(local_dir, "preprocessor_config.json")):
            processor = CLIPImagePreprocessor.from_pretrained(local_dir)
        else:
            processor = CLIPImagePreprocessor(size=config.image_size, crop_size=config.image_size)
        return config, processor, local_dir
    if name in KNOWN_CLIP_TOWERS:
        config = CLIPVisionConfig(**_CLIP_VIT_L14, **KNOWN_CLIP_TOWERS[name])
        return config, CLIPImagePreprocessor(size=config.image_size, crop_size=config.image_size), name
    try:
        config = CLIPVisionConfig.from_pretrained(name, local_files_only=True)
    except OSError:
        raise FileNotFoundError(
            f"vision tower {name!r} (mm_vision_tower) is neither a local CLIP directory, nor a known "
            f"OpenAI CLIP id ({', '.join(KNOWN_CLIP_TOWERS)}), nor in the local Hugging Face cache"
        ) from None
    return config, CLIPImagePreprocessor(size=config.image_size, crop_size=config.image_size), name


class CLIPVisionHolder(nn.Module):
    """Keeps the CLIP model under `vision_model`, the name in original checkpoints
    (`model.vision_tower.vision_tower.vision_model.*`); transformers 5's `CLIPVisionModel` no
    longer has that level itself."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionModel(config)


class VisionTowerBase(nn.Module):
    """What every tower module exposes about its model, which it keeps at `vision_tower.vision_model`
    (the original checkpoints' key level): dtype, device, config, widths and patch geometry; and what
    the glue asks of it: the signals it can compute (`offered_signals`, None: every registered one)
    under a name for messages (`kind`), and `set_numerics`."""

    kind = "CLIP"
    offered_signals: frozenset | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.vision_model.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.vision_model.device

    @property
    def config(self):
        return self.vision_tower.vision_model.config

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side**2

    @property
    def dummy_feature(self) -> torch.Tensor:
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)


class CLIPVisionTower(VisionTowerBase):
    """Upstream LLaVA's tower module (same attribute names, so checkpoint keys match).

    The CLIP model is built from its config, not loaded: inside `from_pretrained` of the LLaVA
    model the checkpoint's own tower weights (`model.vision_tower.vision_tower.*`) fill it.
    Checkpoints without tower weights (LLaVA-1.5) call `load_model()` afterwards.
    """

    def __init__(self, vision_tower: str, args, model_path: str | None = None):
        super().__init__()
        self.vision_tower_name = vision_tower
        self.select_layer = args.mm_vision_select_layer
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        if self.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"unexpected mm_vision_select_feature: {self.select_feature!r}")
        vision_config, self.image_processor, self.weights_location = resolve_vision_tower(vision_tower, model_path)
        self.vision_tower = CLIPVisionHolder(vision_config)
        self.vision_tower.requires_grad_(False)

    def load_model(self) -> None:
        """Replace the tower's weights with the CLIP checkpoint's (for LLaVA checkpoints without them)."""
        loaded = CLIPVisionModel.from_pretrained(self.weights_location, dtype=self.dtype)
        self.vision_tower.vision_model.load_state_dict(loaded.state_dict())
        self.vision_tower.requires_grad_(False)

    def forward(self, images: torch.Tensor, signals=frozenset()) -> VisionTowerOutput:
        """`images` `[V, 3, S, S]` -> features `[V, P, C]` (P = (S/14)^2) and the named `signals`."""
        offered = {*SIGNAL_LAYERS, TOWER_FEATURES, NEG_COS_MEAN}
        unknown = set(signals) - offered
        if unknown:
            raise ValueError(f"the CLIP tower cannot compute {sorted(unknown)}; it offers {sorted(offered)}")
        vision_model = self.vision_tower.vision_model
        layers = vision_model.encoder.layers
        num_layers = len(layers)
        select_index = self.select_layer % (num_layers + 1)  # index into the hidden_states tuple
        signal_layer = {name: SIGNAL_LAYERS[name] % num_layers for name in signals if name in SIGNAL_LAYERS}
        hidden = vision_model.pre_layrnorm(vision_model.embeddings(images.to(device=self.device, dtype=self.dtype)))
        states = {0: hidden}
        for index in range(1, max(select_index, *signal_layer.values(), 0) + 1):
            hidden = layers[index - 1](hidden, None)
            if index == select_index or index in signal_layer.values():
                states[index] = hidden
        features = states[select_index]
        if self.select_feature == "patch":
            features = features[:, 1:]
        functions = RELEASED_SIGNAL_FUNCTIONS if self.numerics == "released" else SIGNAL_FUNCTIONS
        computed = {name: functions[name](layers[layer], states[layer]) for name, layer in signal_layer.items()}
        if TOWER_FEATURES in signals:
            computed[TOWER_FEATURES] = states[select_index]
        if NEG_COS_MEAN in signals:
            computed[NEG_COS_MEAN] = negative_cosine_to_mean(states[select_index][:, 1:])
        return VisionTowerOutput(features, computed)

    def set_numerics(self, numerics: str) -> None:
        """Run the tower's attention as `numerics` says (`TOWER_NUMERICS`): 'sdpa' or 'released'."""
        if numerics not in TOWER_NUMERICS:
            raise ValueError(f"unknown tower numerics {numerics!r}; choose from {', '.join(TOWER_NUMERICS)}")
        self.vision_tower.vision_model.set_attn_implementation(
            RELEASED_ATTENTION if numerics == "released" else "sdpa")

    @property
    def numerics(self) -> str:
        """'released' while the released attention is set, else 'sdpa' (read from the config, so a
        later `set_attn_implementation` on the whole model is seen)."""
        implementation = self.vision_tower.vision_model.config._attn_implementation
        return "released" if implementation == RELEASED_ATTENTION else "sdpa"


def cls_head_logits(layer: nn.Module, layer_input: torch.Tensor, first_key: int) -> torch.Tensor:
    """Per-head pre-softmax logits `[V, H, K]` of the [CLS] query of one CLIP encoder layer
    against the keys of rows `first_key..` (1: the patches only; 0: [CLS] too).

    layer_input: [V, 1 + P, C], the layer's input (before its `layer_norm1`). Only the [CLS]
    row is projected to a query, and only the needed rows to keys. The query is scaled before
    the product, as the released codes' transformers (4.37) does, so fp16 logits round the same way.
    """
    attention = layer.self_attn
    normed = layer.layer_norm1(layer_input)
    num_views, _, width = normed.shape
    num_heads = attention.num_heads
    head_dim = width // num_heads
    query = attention.q_proj(normed[:, :1]) * attention.scale                 # [V, 1, C]
    keys = attention.k_proj(normed[:, first_key:])                            # [V, K, C]
    query = query.view(num_views, 1, num_heads, head_dim).transpose(1, 2)      # [V, H, 1, d]
    keys = keys.view(num_views, -1, num_heads, head_dim).permute(0, 2, 3, 1)   # [V, H, d, K]
    return torch.matmul(query, keys).squeeze(2)                                # [V, H, K]


def cls_patch_scores(layer: nn.Module, layer_input: torch.Tensor) -> torch.Tensor:
    """Head-averaged pre-softmax [CLS]->patch logits `[V, P]` of one CLIP encoder layer
    (GlobalCom2's score), in the input dtype; the head mean follows the released code's order."""
    return cls_head_logits(layer, layer_input, first_key=1).mean(dim=1)


def _patch_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax of [CLS] logits `[..., 1 + P]` over all keys, patch columns `[..., P]`, in the
    logits' dtype. Transformers 4.37's eager attention takes the softmax in the tower dtype (fp16
    in evaluation); PyTorch's half softmax accumulates in fp32 and rounds its output, so an fp32
    softmax rounded back gives the same probabilities (up to the last bit of `exp`)."""
    return logits.float().softmax(dim=-1).to(logits.dtype)[..., 1:]


def cls_attention_heads(layer: nn.Module, layer_input: torch.Tensor) -> torch.Tensor:
    """Post-softmax attention `[V, H, P]` of the [CLS] query over the patch keys of one CLIP
    encoder layer, per head, without the full maps: the softmax of the [CLS] row over all `1 + P`
    keys (the [CLS] key belongs to the denominator), columns `1..P` not renormalised."""
    return _patch_probabilities(cls_head_logits(layer, layer_input, first_key=0))


def cls_attention_probabilities(layer: nn.Module, layer_input: torch.Tensor, heads=cls_attention_heads) -> torch.Tensor:
    """`heads` (`cls_attention_heads`, or its released-numerics twin) averaged over the heads `[V, P]`
    (FasterVLM's score): the mean of the same rounded values the official code averages."""
    return heads(layer, layer_input).mean(dim=1)


def head_mean_keys(layer: nn.Module, layer_input: torch.Tensor) -> torch.Tensor:
    """Keys of all `1 + P` tokens of one CLIP encoder layer, split into heads and averaged over
    them `[V, 1 + P, C / H]` (VisionZip's metric: raw `k_proj`, bias included, unscaled)."""
    attention = layer.self_attn
    keys = attention.k_proj(layer.layer_norm1(layer_input))                  # [V, 1 + P, C]
    return keys.view(*keys.shape[:2], attention.num_heads, -1).mean(dim=2)


def full_width_cls_attention(layer: nn.Module, layer_input: torch.Tensor) -> torch.Tensor:
    """The [CLS] query's attention over the patch keys `[V, P]` of one CLIP encoder layer, taken
    as a single head over the full width C (PruMerge's score, which no head of the ViT computes):
    `softmax(q.k / sqrt(C))` over all `1 + P` keys, scaled after the product as released, patch
    columns not renormalised."""
    attention = layer.self_attn
    normed = layer.layer_norm1(layer_input)
    query = attention.q_proj(normed[:, :1])                                   # [V, 1, C]
    keys = attention.k_proj(normed)                                           # [V, 1 + P, C]
    logits = torch.matmul(query, keys.transpose(1, 2)).squeeze(1) * normed.shape[-1] ** -0.5
    return _patch_probabilities(logits)                                       # [V, P]


def patch_keys(layer: nn.Module, layer_input: torch.Tensor) -> torch.Tensor:
    """Raw keys `[V, P, C]` of the patch tokens of one CLIP encoder layer (bias included)."""
    return layer.self_attn.k_proj(layer.layer_norm1(layer_input[:, 1:]))


def negative_cosine_to_mean(features: torch.Tensor) -> torch.Tensor:
    """`-cos(x_i, g)` `[V, P]` float32 of each patch feature `x_i` of `features` `[V, P, C]`
    against `g`, the mean of its view's P patch features (the paper's score for encoders without
    [CLS]: patches least like the view's average score highest). float32, since fp16 sums of
    squares over C = 1152 lose the last digits that separate near-equal patches."""
    features = features.float()
    return -torch.nn.functional.cosine_similarity(features, features.mean(dim=1, keepdim=True), dim=-1)


# Query rows per block of `mean_received_attention` are chosen so one block's probabilities hold
# at most this many float32 values (64 MiB): 37 views of SigLIP so400m (16 heads, 729 tokens)
# take 38 rows per block, instead of the 1.26 GB of the full maps.
RECEIVED_ATTENTION_BLOCK_ELEMENTS = 2**24


def mean_received_attention(queries: torch.Tensor, keys: torch.Tensor, scale: float,
                            block_elements: int = RECEIVED_ATTENTION_BLOCK_ELEMENTS) -> torch.Tensor:
    """The attention each key receives, averaged over queries and heads: `[V, T]` float32 with
    entry j the mean over heads h and queries i of `softmax_j(scale q_hi . k_hj)`.

    queries, keys: `[V, H, T, d]`. The logits are taken in the inputs' dtype, scaled after the
    product and soft-maxed in float32, as transformers' eager attention does. Queries go in blocks
    of B rows (`B = block_elements // (V H T)`, at least 1), each block's `[V, H, B, T]`
    probabilities summed over its rows at once, so peak extra memory is about
    `max(block_elements, V H T)` floats, never the `[V, H, T, T]` maps.
    """
    num_views, num_heads, num_tokens, _ = queries.shape
    rows_per_block = max(1, block_elements // (num_views * num_heads * num_tokens))
    received = torch.zeros(num_views, num_heads, num_tokens, dtype=torch.float32, device=queries.device)
    keys_transposed = keys.transpose(-1, -2)                                     # [V, H, d, T]
    for first_row in range(0, num_tokens, rows_per_block):
        logits = torch.matmul(queries[:, :, first_row:first_row + rows_per_block], keys_transposed) * scale
        received += logits.float().softmax(dim=-1).sum(dim=2)                    # [V, H, T]
    return received.mean(dim=1) / num_tokens


def negative_received_attention(layer: nn.Module, layer_input: torch.Tensor, first_patch: int) -> torch.Tensor:
    """Minus the mean attention `[V, P]` float32 each patch receives in one encoder layer (CLIP's
    or SigLIP's: `layer_norm1`, `self_attn.{q,k}_proj`), over all its queries and heads, the
    softmax over all tokens; the patches are the tokens `first_patch..` (1: CLIP, 0: SigLIP).

    layer_input: `[V, T, C]`, the layer's input (before its `layer_norm1`)."""
    queries, keys = head_queries_and_keys(layer, layer_input)
    return -mean_received_attention(queries, keys, layer.self_attn.scale)[:, first_patch:]


def head_queries_and_keys(layer: nn.Module, layer_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token's unscaled queries and keys `[V, H, T, d]` of one encoder layer (CLIP's or SigLIP's:
    `layer_norm1`, `self_attn.{q,k}_proj`), for its input `layer_input` `[V, T, C]`."""
    attention = layer.self_attn
    normed = layer.layer_norm1(layer_input)
    heads_shape = (*normed.shape[:2], attention.num_heads, -1)
    return (attention.q_proj(normed).view(heads_shape).transpose(1, 2),
            attention.k_proj(normed).view(heads_shape).transpose(1, 2))


def cls_model_negative_attention(layer: nn.Module, layer_input: torch.Tensor) -> torch.Tensor:
    """`negative_received_attention` of the patches of a CLIP layer (its token 0 is [CLS])."""
    return negative_received_attention(layer, layer_input, first_patch=1)


# The attention implementation name of the released numerics (`AttentionInterface`, registered below).
RELEASED_ATTENTION = "llava_released_clip"
TOWER_NUMERICS = ("sdpa", "released")


def released_attention_logits(queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Pre-softmax logits `[V * H, T, S]`, in the inputs' dtype, computed as transformers 4.37's CLIP
    attention (and the released GlobalCom2 patch of it) does: the query scaled before the product, the
    heads folded into the batch of contiguous `[V * H, T, d]` operands, one `bmm`.

    queries: `[V, H, T, d]`, keys `[V, H, S, d]`: unscaled projections (bias included) split into heads.
    Scaling the split query is element-wise the same as scaling `q_proj(x)` before the split."""
    num_views, num_heads, _, head_dim = queries.shape
    folded = (num_views * num_heads, -1, head_dim)
    return torch.bmm((queries * scale).reshape(folded), keys.reshape(folded).transpose(1, 2))


def released_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                               is_causal: bool = False, **kwargs) -> tuple[torch.Tensor, None]:
    """Transformers attention interface (`RELEASED_ATTENTION`) with the released code's numerics:
    `softmax(released_attention_logits)` in the tower dtype (fp16 softmax in fp16, not fp32), then
    `bmm` with the values. query, key, value: `[V, H, T, d]`; returns `[V, T, H, d]` and no weights.
    The text tower's masks (`is_causal`; an additive or boolean `attention_mask` `[V, 1, T, S]`) are
    added to the logits as 4.37 adds its own: a masked logit's probability is 0 either way, and an
    unmasked one gets + 0, so the bits are 4.37's."""
    num_views, num_heads, num_tokens, head_dim = query.shape
    logits = released_attention_logits(query, key, scaling)                                 # [V * H, T, S]
    if is_causal or attention_mask is not None:
        logits = logits.view(num_views, num_heads, num_tokens, -1)
        if is_causal:
            later = torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device).triu(1)
            logits = logits.masked_fill(later, float("-inf"))
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attention_mask, float("-inf"))
        elif attention_mask is not None:
            logits = logits + attention_mask
        logits = logits.view(num_views * num_heads, num_tokens, -1)
    probabilities = torch.softmax(logits, dim=-1)
    probabilities = nn.functional.dropout(probabilities, p=dropout, training=module.training)
    output = torch.bmm(probabilities, value.reshape(num_views * num_heads, -1, head_dim))    # [V * H, T, d]
    return output.view(num_views, num_heads, num_tokens, head_dim).transpose(1, 2), None


AttentionInterface.register(RELEASED_ATTENTION, released_attention_forward)


def released_layer_logits(layer: nn.Module, layer_input: torch.Tensor) -> torch.Tensor:
    """The full pre-softmax logits `[V, H, T, T]` of one CLIP encoder layer with released numerics:
    every token projected (as the released code does), so the products are those its attention makes.
    layer_input: `[V, T, C]`, before the layer's `layer_norm1`."""
    queries, keys = head_queries_and_keys(layer, layer_input)
    num_views, num_heads, num_tokens, _ = queries.shape
    return released_attention_logits(queries, keys, layer.self_attn.scale).view(num_views, num_heads, num_tokens,
                                                                                 num_tokens)


def released_cls_patch_scores(layer: nn.Module, layer_input: torch.Tensor) -> torch.Tensor:
    """GlobalCom2's score `[V, P]` as the released code takes it: the head mean of the full logits map
    `[V, T, T]` (in the tower dtype, over the map as it does), then row 0 ([CLS]), columns 1.. (patches)."""
    return released_layer_logits(layer, layer_input).mean(dim=1)[:, 0, 1:]


def released_cls_attention_heads(layer: nn.Module, layer_input: torch.Tensor) -> torch.Tensor:
    """`cls_attention_heads` `[V, H, P]` with released numerics: row 0 of the full logits, soft-maxed in
    the tower dtype (a softmax is per row, so row 0 alone equals row 0 of the full map's softmax)."""
    return torch.softmax(released_layer_logits(layer, layer_input)[:, :, 0], dim=-1)[..., 1:]


# Each signal: the encoder layer it is computed in (negative: from the end; -2 is layer 22 of
# 24, whose output is LLaVA's feature layer) and how.
SIGNAL_LAYERS = {"cls_logits_last": -1, "cls_attn_penultimate": -2, "cls_attn_heads_first": 0,
                 "cls_attn_heads_penultimate": -2, "keys_head_mean_penultimate": -2, "cls_attn_full_width_last": -1,
                 "keys_last": -1, "neg_attn": -1}
SIGNAL_FUNCTIONS = {"cls_logits_last": cls_patch_scores, "cls_attn_penultimate": cls_attention_probabilities,
                    "cls_attn_heads_first": cls_attention_heads, "cls_attn_heads_penultimate": cls_attention_heads,
                    "keys_head_mean_penultimate": head_mean_keys, "cls_attn_full_width_last": full_width_cls_attention,
                    "keys_last": patch_keys, "neg_attn": cls_model_negative_attention}
# Released numerics: the [CLS] signals from the released attention's products; the others as above.
RELEASED_SIGNAL_FUNCTIONS = {
    **SIGNAL_FUNCTIONS, "cls_logits_last": released_cls_patch_scores,
    "cls_attn_heads_first": released_cls_attention_heads, "cls_attn_heads_penultimate": released_cls_attention_heads,
    "cls_attn_penultimate": functools.partial(cls_attention_probabilities, heads=released_cls_attention_heads)}
TOWER_FEATURES = "tower_features"  # the selected hidden state itself, [CLS] row included
NEG_COS_MEAN = "neg_cos_mean"      # from the selected hidden state's patches, not from a layer's input


CLIP_MODEL_TYPES = ("clip", "clip_vision_model")


def build_vision_tower(config, model_path: str | None = None) -> nn.Module:
    """The tower `mm_vision_tower` names: SigLIP (`siglip_encoder.SigLipVisionTower`) for a local
    directory whose config is SigLIP's or, as the LLaVA-OneVision code dispatches, a name containing
    `siglip`; CLIP otherwise. A local directory of another model type is refused."""
    from llava.model.multimodal_encoder.siglip_encoder import SIGLIP_MODEL_TYPES, SigLipVisionTower  # imports us

    name = getattr(config, "mm_vision_tower", getattr(config, "vision_tower", None))
    if name is None:
        raise ValueError("config has no mm_vision_tower")
    local_dir = _local_tower_dir(name, model_path)
    if local_dir is None:
        is_siglip = "siglip" in name.lower()
    else:
        with open(os.path.join(local_dir, "config.json")) as handle:
            model_type = json.load(handle).get("model_type")
        if model_type not in (*CLIP_MODEL_TYPES, *SIGLIP_MODEL_TYPES):
            raise ValueError(f"vision tower {local_dir!r} (mm_vision_tower) has model_type {model_type!r}; "
                             f"supported: {', '.join((*CLIP_MODEL_TYPES, *SIGLIP_MODEL_TYPES))}")
        is_siglip = model_type in SIGLIP_MODEL_TYPES
    tower_class = SigLipVisionTower if is_siglip else CLIPVisionTower
    return tower_class(name, args=config, model_path=model_path)
