"""LLaVA glue: vision tower + projector + splicing visual tokens into the text embeddings.

`LlavaMetaModel` adds the multimodal modules to a language model's backbone and
`LlavaMetaForCausalLM` turns `input_ids` with `IMAGE_TOKEN_INDEX` placeholders into
`inputs_embeds`. The image geometry (grid shape, unpadding) comes from `llava.mm_utils`.
"""

from __future__ import annotations

import torch
from torch import nn

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.mm_utils import get_anyres_image_grid_shape, unpadded_bounds
from llava.model.multimodal_encoder.clip_encoder import VisionTowerOutput, build_vision_tower
from llava.model.multimodal_projector.builder import build_vision_projector


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
    """Mixin for the causal LM (listed before it in the bases): image encoding, splicing, and
    `forward`/`generate` that accept `images` and `image_sizes`."""

    def get_model(self):
        return self.model

    def get_vision_tower(self):
        return self.get_model().get_vision_tower()

    def encode_images(self, images: torch.Tensor) -> VisionTowerOutput:
        """`[V, 3, S, S]` -> projected features `[V, P, D]` and [CLS] scores `[V, P]`."""
        features, cls_scores = self.get_vision_tower()(images)
        return VisionTowerOutput(self.get_model().mm_projector(features), cls_scores)

    def image_sequence(self, views: torch.Tensor, image_size: tuple[int, int] | None) -> torch.Tensor:
        """Visual tokens `[M, D]` of one image from its projected views `[V, P, D]` (upstream layout).

        AnyRes with `spatial_unpad`: the thumbnail's P tokens, then the crop canvas
        (`grid_h*side` rows by `grid_w*side` columns) with its letterbox padding removed and one
        `image_newline` after every remaining row, row-major.
        """
        config = self.config
        merge_type = getattr(config, "mm_patch_merge_type", "flat")
        if merge_type == "flat":
            return views.flatten(0, 1)
        if not merge_type.startswith("spatial"):
            raise ValueError(f"unknown mm_patch_merge_type: {merge_type!r}")
        unpad = "unpad" in merge_type
        newline = self.get_model().image_newline.to(views.dtype) if unpad else None
        if views.shape[0] == 1:
            return torch.cat([views[0], newline[None]]) if unpad else views[0]
        if getattr(config, "image_aspect_ratio", None) != "anyres":
            raise ValueError("several views per image need image_aspect_ratio 'anyres'")
        if image_size is None:
            raise ValueError("image_sizes are required for AnyRes images (PIL (width, height) of each image)")
        tower = self.get_vision_tower()
        side = tower.num_patches_per_side
        grid_w, grid_h = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, tower.config.image_size)
        thumbnail, crops = views[0], views[1:]
        if crops.shape[0] != grid_w * grid_h:
            raise ValueError(
                f"image of size {tuple(image_size)} needs {grid_w}x{grid_h} crops but got {crops.shape[0]}: "
                "are image_sizes the PIL (width, height) of the images given to process_images?"
            )
        canvas = crops.view(grid_h, grid_w, side, side, -1).permute(0, 2, 1, 3, 4).flatten(2, 3).flatten(0, 1)  # [H, W, D]
        if not unpad:
            return torch.cat([thumbnail, canvas.flatten(0, 1)])
        top, bottom, left, right = unpadded_bounds(image_size, canvas.shape[0], canvas.shape[1])
        canvas = canvas[top:bottom, left:right]
        rows = torch.cat([canvas, newline.expand(canvas.shape[0], 1, -1)], dim=1)  # [h, w + 1, D]
        return torch.cat([thumbnail, rows.flatten(0, 1)])

    def encode_image_sequences(self, images, image_sizes) -> list[torch.Tensor]:
        """One `[M_i, D]` visual sequence per image.

        `images`: a 5-D tensor `[N, V, 3, S, S]` or a list of `[V_i, 3, S, S]` (AnyRes), or a
        4-D tensor `[N, 3, S, S]` (one view per image, LLaVA-1.5 style).
        """
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            return list(self.encode_images(images).features)
        views_per_image = [image.unsqueeze(0) if image.ndim == 3 else image for image in images]
        features = self.encode_images(torch.cat(views_per_image)).features
        per_image = features.split([views.shape[0] for views in views_per_image])
        sizes = image_sizes if image_sizes is not None else [None] * len(per_image)
        if len(sizes) != len(per_image):
            raise ValueError(f"got {len(per_image)} images but {len(sizes)} image_sizes")
        return [self.image_sequence(views, size) for views, size in zip(per_image, sizes)]

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
        image_features = self.encode_image_sequences(images, image_sizes)
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
        rows_embeds, rows_labels = [], []
        for ids, keep, embeds, row_labels in zip(input_ids, attention_mask, text_embeds, labels):
            ids, embeds, row_labels = ids[keep], embeds[keep], row_labels[keep]
            placeholders = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
            pieces, piece_labels, start = [], [], 0
            for position in placeholders:
                feature = next(images_left).to(embeds.dtype)
                pieces += [embeds[start:position], feature]
                piece_labels += [row_labels[start:position], row_labels.new_full((feature.shape[0],), IGNORE_INDEX)]
                start = position + 1
            pieces.append(embeds[start:])
            piece_labels.append(row_labels[start:])
            rows_embeds.append(torch.cat(pieces))
            rows_labels.append(torch.cat(piece_labels))

        max_length = getattr(self.config, "tokenizer_model_max_length", None)
        if max_length is not None:
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

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        images=None,
        image_sizes=None,
        **kwargs,
    ):
        if inputs_embeds is None and images is not None:
            input_ids, position_ids, attention_mask, past_key_values, inputs_embeds, labels = (
                self.prepare_inputs_labels_for_multimodal(
                    input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes
                )
            )
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            **kwargs,
        )

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
