"""LLaVA glue: vision tower + projector + GlobalCom2 + splicing visual tokens into the text.

`LlavaMetaModel` adds the multimodal modules to a language model's backbone and
`LlavaMetaForCausalLM` turns `input_ids` with `IMAGE_TOKEN_INDEX` placeholders into
`inputs_embeds`. The compression arithmetic lives in `llava.model.globalcom2`; the image
geometry (grid shape, unpadding) in `llava.mm_utils`.
"""

from __future__ import annotations

import inspect
import math
import warnings

import torch
from torch import nn
from transformers import LlamaForCausalLM

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.mm_utils import get_anyres_image_grid_shape
from llava.model import globalcom2
from llava.model.globalcom2 import interpolate_and_split_cls_attn_scores  # noqa: F401  (released name)
from llava.model.multimodal_encoder.clip_encoder import VisionTowerOutput, build_vision_tower
from llava.model.multimodal_projector.builder import build_vision_projector
from llava.utils import LlavaWarning

# GlobalCom2's retention ratio R, in (0, 1]; 1 gives vanilla LLaVA-NeXT. Read at every call, so
# editing this line or assigning `llava.model.llava_arch.retention_ratio` both take effect;
# `--retention-ratio` (or `model.set_compression(...)`) wins over it.
retention_ratio = 0.25  # default 0.25

# The KV cache's keyword in the installed transformers' forward and in its outputs: `past_key_values`
# in earlier 5.x releases, `cache` in later ones (the old name is deprecated there).
CACHE_KEY = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"

# How the kept tokens are laid out: "official" (the released code's sequence) or "spatial".
token_layout = "official"


def generate_scale_for_crop_features(base_cls_attn_scores, num_patch_width, num_patch_height, base_scale=None,
                                     temperature=globalcom2.TEMPERATURE):
    """Per-crop retention ratios (the released function); `base_scale` defaults to the current
    module-level `retention_ratio`."""
    scale = retention_ratio if base_scale is None else base_scale
    return globalcom2.generate_scale_for_crop_features(base_cls_attn_scores, num_patch_width, num_patch_height,
                                                       scale, temperature)


class PromptTooLongError(ValueError):
    """The spliced prompt is longer than the model's maximum length (`tokenizer_model_max_length`)."""


class LlavaMetaModel:
    """Mixin for the backbone (`LlamaModel`, `MistralModel`): owns tower, projector, newline."""

    def __init__(self, config):
        super().__init__(config)
        if getattr(config, "mm_vision_tower", None) is not None:
            self.vision_tower = build_vision_tower(config, model_path=getattr(config, "_name_or_path", None))
            self.mm_projector = build_vision_projector(config)
            if "unpad" in getattr(config, "mm_patch_merge_type", ""):
                # Learned separator appended after every row of the crop canvas.
                self.image_newline = nn.Parameter(torch.randn(config.hidden_size) * config.hidden_size**-0.5)

    def get_vision_tower(self):
        return getattr(self, "vision_tower", None)


class LlavaMetaForCausalLM:
    """Mixin for the causal LM (listed before it in the bases): image encoding, compression,
    splicing, and `forward`/`generate` that accept `images` and `image_sizes`.

    After each call that encodes images, `last_accounting` holds one dict per image: visual
    tokens before (vanilla LLaVA-NeXT) and after compression, and the per-crop ratios.
    """

    _compression_override: tuple[float | None, str | None] = (None, None)
    last_accounting: list[dict] = []
    # Upstream cuts over-long prompts silently (losing the question); here they are refused unless
    # this is set (`--allow-truncation`), and then cut with a warning.
    allow_truncation: bool = False

    def get_model(self):
        return self.model

    def get_vision_tower(self):
        return self.get_model().get_vision_tower()

    def set_compression(self, retention_ratio: float | None = None, token_layout: str | None = None) -> None:
        """Fix this model's ratio and/or layout; None follows the module-level defaults."""
        if retention_ratio is not None:
            globalcom2.check_retention_ratio(retention_ratio)
        if token_layout is not None:
            globalcom2.check_layout(token_layout)
        self._compression_override = (retention_ratio, token_layout)

    def compression_settings(self) -> tuple[float, str]:
        """`(retention_ratio, token_layout)` in force now, validated. The module globals are
        looked up here, at call time, so edits and run-time assignments both count."""
        ratio, layout = self._compression_override
        ratio = retention_ratio if ratio is None else ratio
        layout = token_layout if layout is None else layout
        return globalcom2.check_retention_ratio(ratio), globalcom2.check_layout(layout)

    def encode_images(self, images: torch.Tensor, with_scores: bool = True) -> VisionTowerOutput:
        """`[V, 3, S, S]` -> projected features `[V, P, D]` and [CLS] scores `[V, P]` (or None)."""
        features, cls_scores = self.get_vision_tower()(images, with_scores=with_scores)
        return VisionTowerOutput(self.get_model().mm_projector(features), cls_scores)

    def image_sequence(self, views: torch.Tensor, cls_scores: torch.Tensor | None, image_size: tuple[int, int] | None,
                       ratio: float = 1.0, layout: str = "official") -> tuple[torch.Tensor, dict]:
        """Visual tokens `[M, D]` of one image and their accounting.

        `views`: projected `[V, P, D]`, thumbnail first; `cls_scores`: `[V, P]` (None if
        `ratio == 1`). AnyRes with `spatial_unpad` at `ratio == 1` is upstream LLaVA-NeXT: the
        thumbnail's P tokens, then the unpadded crop canvas with an `image_newline` after each
        row. Below 1, GlobalCom2 keeps a share of them (`globalcom2.compress_image_features`).
        """
        config = self.config
        merge_type = getattr(config, "mm_patch_merge_type", "flat")
        if merge_type == "flat":  # no spatial structure to compress against, as released
            tokens = views.flatten(0, 1)
            return tokens, globalcom2.token_accounting(tokens.shape[0], tokens.shape[0], tokens.shape[0])
        if not merge_type.startswith("spatial"):
            raise ValueError(f"unknown mm_patch_merge_type: {merge_type!r}")
        newline = self.get_model().image_newline.to(views.dtype) if "unpad" in merge_type else None
        if views.shape[0] == 1:
            return _single_view_sequence(views[0], None if cls_scores is None else cls_scores[0], ratio, layout, newline)
        if getattr(config, "image_aspect_ratio", None) != "anyres":
            raise ValueError("several views per image need image_aspect_ratio 'anyres'")
        if image_size is None:
            raise ValueError("image_sizes are required for AnyRes images (PIL (width, height) of each image)")
        grid = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, self.get_vision_tower().config.image_size)
        if views.shape[0] != 1 + grid[0] * grid[1]:
            raise ValueError(
                f"image of size {tuple(image_size)} needs {grid[0]}x{grid[1]} crops but got {views.shape[0] - 1}: "
                "are image_sizes the PIL (width, height) of the images given to process_images?"
            )
        side = self.get_vision_tower().num_patches_per_side
        unpad = newline is not None
        if ratio == 1.0:
            selection = globalcom2.keep_everything(globalcom2.crop_geometry(image_size, grid, side, unpad), views.device)
        else:
            selection = globalcom2.select_tokens(cls_scores, image_size, grid, ratio, unpad=unpad)
        return globalcom2.arrange_tokens(views, selection, newline, layout), selection.accounting(layout)

    def encode_image_sequences(self, images, image_sizes, ratio: float = 1.0, layout: str = "official") -> list[torch.Tensor]:
        """One `[M_i, D]` visual sequence per image, each compressed with its own scores.

        `images`: a 5-D tensor `[N, V, 3, S, S]` or a list of `[V_i, 3, S, S]` (AnyRes), or a
        4-D tensor `[N, 3, S, S]` (one view per image, LLaVA-1.5 style). Sets `last_accounting`.
        """
        with_scores = ratio < 1.0
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            features, scores = self.encode_images(images, with_scores)
            per_image = [_single_view_sequence(feature, None if scores is None else scores[index], ratio, layout, None)
                         for index, feature in enumerate(features)]
        else:
            views_per_image = [image.unsqueeze(0) if image.ndim == 3 else image for image in images]
            counts = [views.shape[0] for views in views_per_image]
            features, scores = self.encode_images(torch.cat(views_per_image), with_scores)
            sizes = image_sizes if image_sizes is not None else [None] * len(counts)
            if len(sizes) != len(counts):
                raise ValueError(f"got {len(counts)} images but {len(sizes)} image_sizes")
            scores = scores.split(counts) if scores is not None else [None] * len(counts)
            per_image = [self.image_sequence(views, views_scores, size, ratio, layout)
                         for views, views_scores, size in zip(features.split(counts), scores, sizes)]
        if ratio < 1.0 and int(features.shape[-2] * ratio) == 0:
            warnings.warn(f"retention ratio {ratio:g} is below 1/{features.shape[-2]}: int({features.shape[-2]} R) = 0, so "
                          "the thumbnail (or single view) keeps no token and the crops keep almost none; the language "
                          "model sees little more than newline tokens", LlavaWarning, stacklevel=2)
        self.last_accounting = [dict(accounting, retention_ratio=ratio, layout=layout) for _, accounting in per_image]
        return [tokens for tokens, _ in per_image]

    def prepare_inputs_labels_for_multimodal(
        self, input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes=None, padding_side=None
    ):
        """Replace every `IMAGE_TOKEN_INDEX` in `input_ids` `[B, L]` by that image's visual tokens.

        Images are taken in order of their placeholders (row by row, left to right). Padding
        given by `attention_mask` is removed, the rows are spliced, truncated to
        `tokenizer_model_max_length` and padded again on `padding_side` (default: the config's
        `tokenizer_padding_side`, upstream's 'right'; generation uses 'left').
        Returns `(None, position_ids, attention_mask, past_key_values, inputs_embeds [B, L', D], labels)`.
        """
        if self.get_vision_tower() is None or images is None or input_ids.shape[1] == 1:
            return input_ids, position_ids, attention_mask, past_key_values, None, labels
        ratio, layout = self.compression_settings()  # refuses a bad ratio before any model work
        image_features = self.encode_image_sequences(images, image_sizes, ratio, layout)
        return (None, *self.splice_image_features(input_ids, position_ids, attention_mask, past_key_values, labels, image_features, padding_side))

    def splice_image_features(self, input_ids, position_ids, attention_mask, past_key_values, labels, image_features, padding_side=None):
        """The text/image splice of `prepare_inputs_labels_for_multimodal`, given the visual sequences."""
        given_position_ids, given_attention_mask, given_labels = position_ids, attention_mask, labels
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        labels = torch.full_like(input_ids, IGNORE_INDEX) if labels is None else labels
        num_placeholders = int((input_ids[attention_mask] == IMAGE_TOKEN_INDEX).sum())
        if num_placeholders != len(image_features):
            raise ValueError(f"the prompts hold {num_placeholders} <image> placeholders but {len(image_features)} images were given")

        text_embeds = self.get_model().embed_tokens(input_ids.clamp(min=0))  # placeholder rows are replaced below
        images_left = iter(image_features)
        rows_embeds, rows_labels, rows_images = [], [], []
        for ids, keep, embeds, row_labels in zip(input_ids, attention_mask, text_embeds, labels):
            ids, embeds, row_labels = ids[keep], embeds[keep], row_labels[keep]
            placeholders = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
            pieces, piece_labels, start = [], [], 0
            rows_images.append([])  # visual tokens of each image in this row
            for position in placeholders:
                feature = next(images_left).to(embeds.dtype)
                rows_images[-1].append(feature.shape[0])
                pieces += [embeds[start:position], feature]
                piece_labels += [row_labels[start:position], row_labels.new_full((feature.shape[0],), IGNORE_INDEX)]
                start = position + 1
            pieces.append(embeds[start:])
            piece_labels.append(row_labels[start:])
            rows_embeds.append(torch.cat(pieces))
            rows_labels.append(torch.cat(piece_labels))

        max_length = getattr(self.config, "tokenizer_model_max_length", None)
        if max_length is not None and any(row.shape[0] > max_length for row in rows_embeds):
            self._refuse_or_warn_truncation(rows_embeds, rows_images, max_length)
            rows_embeds = [row[:max_length] for row in rows_embeds]
            rows_labels = [row[:max_length] for row in rows_labels]

        padding_side = padding_side or getattr(self.config, "tokenizer_padding_side", "right")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        batch, longest = len(rows_embeds), max(row.shape[0] for row in rows_embeds)
        inputs_embeds = text_embeds.new_zeros(batch, longest, text_embeds.shape[-1])
        new_labels = labels.new_full((batch, longest), IGNORE_INDEX)
        new_attention_mask = torch.zeros(batch, longest, dtype=torch.bool, device=input_ids.device)
        new_position_ids = torch.zeros(batch, longest, dtype=torch.long, device=input_ids.device)
        for row, (embeds, row_labels) in enumerate(zip(rows_embeds, rows_labels)):
            length = embeds.shape[0]
            span = slice(longest - length, longest) if padding_side == "left" else slice(0, length)
            inputs_embeds[row, span] = embeds
            new_labels[row, span] = row_labels
            new_attention_mask[row, span] = True
            new_position_ids[row, span] = torch.arange(length, device=input_ids.device)

        # Upstream drops the mask and positions the caller did not pass; keep them when rows
        # were padded, or the model would attend to (and count positions over) padding.
        padded = any(row.shape[0] < longest for row in rows_embeds)
        if given_attention_mask is not None:
            attention_mask = new_attention_mask.to(given_attention_mask.dtype)
        else:
            attention_mask = new_attention_mask if padded else None
        position_ids = new_position_ids if (given_position_ids is not None or padded) else None
        return position_ids, attention_mask, past_key_values, inputs_embeds, new_labels if given_labels is not None else None

    def _refuse_or_warn_truncation(self, rows_embeds, rows_images, max_length: int) -> None:
        """Raise PromptTooLongError for the longest row, or warn when `allow_truncation` is set.
        `rows_images`: per row, the visual token count of each of its images."""
        row = max(range(len(rows_embeds)), key=lambda index: rows_embeds[index].shape[0])
        length, visual = rows_embeds[row].shape[0], sum(rows_images[row])
        what = (f"the prompt is {length} tokens ({len(rows_images[row])} image(s), {visual} visual tokens) but the "
                f"model takes at most {max_length} (tokenizer_model_max_length)")
        if self.allow_truncation:
            warnings.warn(f"{what}: cut to {max_length} tokens, losing the end of the prompt", LlavaWarning, stacklevel=3)
            return
        ratio = self.compression_settings()[0]
        fitting = ratio * (max_length - (length - visual)) / visual if visual else 0.0
        hint = f"a retention ratio of about {math.floor(fitting * 100) / 100:g} or lower fits, " if fitting >= 0.01 else ""
        raise PromptTooLongError(f"{what}: {hint}or use fewer images, or pass --allow-truncation to cut it as "
                                 "upstream LLaVA does")

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                images=None, image_sizes=None, **kwargs):
        """The language model's forward, with `images` spliced into `input_ids` first.

        The KV cache travels in `kwargs` under whatever name the installed transformers uses
        (`past_key_values` in earlier 5.x releases, `cache` in later ones), so no deprecated argument is ever passed.
        """
        if inputs_embeds is None and images is not None:
            _, position_ids, attention_mask, _, inputs_embeds, labels = self.prepare_inputs_labels_for_multimodal(
                input_ids, position_ids, attention_mask, None, labels, images, image_sizes
            )
            input_ids = None
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, images=None, image_sizes=None, **kwargs):
        """Generate from `inputs` `[B, L]` and images, or from ready `inputs_embeds`.

        The prompt always goes in as `inputs_embeds` (so the output holds only new tokens),
        left-padded; transformers derives positions from the mask and keeps the KV cache.
        """
        kwargs.pop("position_ids", None)
        if images is not None:
            _, _, kwargs["attention_mask"], _, kwargs["inputs_embeds"], _ = self.prepare_inputs_labels_for_multimodal(
                inputs, None, kwargs.get("attention_mask"), None, None, images, image_sizes, padding_side="left"
            )
        elif kwargs.get("inputs_embeds") is None:
            kwargs["inputs_embeds"] = self.get_model().embed_tokens(inputs)
        return super().generate(**kwargs)


def _single_view_sequence(feature: torch.Tensor, scores: torch.Tensor | None, ratio: float, layout: str,
                          newline: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    """One view `[P, D]` (no crops): keep `int(P * R)` tokens by [CLS] score (the thumbnail rule),
    then the newline that `spatial_unpad` appends (None: none)."""
    num_patches = feature.shape[0]
    if ratio < 1.0:
        keep = globalcom2.compress_thumbnail(scores, ratio)
        feature = feature[keep if layout == "official" else keep.sort().values]
    tokens = feature if newline is None else torch.cat([feature, newline[None]])
    newlines = tokens.shape[0] - feature.shape[0]
    return tokens, globalcom2.token_accounting(num_patches + newlines, tokens.shape[0], feature.shape[0])
