"""LLaVA glue: vision tower + projector + compression method + splicing visual tokens into the text.

`LlavaMetaModel` adds the multimodal modules to a language model's backbone and
`LlavaMetaForCausalLM` turns `input_ids` with `IMAGE_TOKEN_INDEX` placeholders into
`inputs_embeds`: encode, ask the chosen method (`llava.model.compression`, GlobalCom2 by
default) what to keep, arrange, splice. The compression arithmetic lives in the methods; the
image geometry (grid shape, unpadding) in `llava.mm_utils`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import math
import typing
import warnings

import torch
from torch import nn
from transformers import LlamaForCausalLM

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.mm_utils import anyres_max_num_patches, get_anyres_image_grid_shape, is_anyres
from llava.model.compression import common, get_method, globalcom2, parse_method_args
from llava.model.compression.globalcom2 import interpolate_and_split_cls_attn_scores  # noqa: F401  (released name)
from llava.model.compression.registry import (
    INPUT_CHANGES, SIGNALS, ComposedArgs, argument_fields, in_llm_part, method_args_dict,
)
from llava.model.multimodal_encoder.clip_encoder import VisionTowerOutput, build_vision_tower
from llava.model.multimodal_encoder.clip_text import load_text_tower, resolve_text_tower
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

# The compression method (`python -m llava.model.compression --list`); its arguments are given
# with `--method-arg key=value` or `set_compression(method_args=...)`.
compression_method = "globalcom2"


@dataclasses.dataclass(frozen=True)
class CompressionSettings:
    """What compresses the images of one call: the method, its arguments, the budget, the layout."""

    method: str
    method_args: object       # the method's argument dataclass
    retention_ratio: float    # R in (0, 1]; with `visual_tokens`, each image's R is N / its vanilla image tokens
    token_layout: str
    visual_tokens: int | None = None

    @property
    def keeps_all(self) -> bool:
        return self.visual_tokens is None and self.retention_ratio == 1.0

    @property
    def signals(self) -> frozenset:
        """The signals these settings need (none when everything is kept unlooked)."""
        return get_method(self.method).signals_for(self.method_args, self.keeps_all)

    @property
    def needs_text_tower(self) -> bool:
        """Whether a needed signal comes from the CLIP text tower (`registry.SIGNALS` sources)."""
        return any(SIGNALS[name].source != "tower" for name in self.signals)

    @property
    def instruction_signals(self) -> frozenset:
        """The needed signals computed from each image's instruction text."""
        return frozenset(name for name in self.signals if SIGNALS[name].source == "instruction")

    def record(self) -> dict:
        """JSON-ready, for accounting and answer metadata."""
        return dict(method=self.method, method_args=method_args_dict(self.method_args),
                    retention_ratio=self.retention_ratio, visual_tokens=self.visual_tokens, layout=self.token_layout)


def generate_scale_for_crop_features(base_cls_attn_scores, num_patch_width, num_patch_height, base_scale=None,
                                     temperature=globalcom2.TEMPERATURE):
    """Per-crop retention ratios (the released function); `base_scale` defaults to the current
    module-level `retention_ratio`."""
    scale = retention_ratio if base_scale is None else base_scale
    return globalcom2.generate_scale_for_crop_features(base_cls_attn_scores, num_patch_width, num_patch_height,
                                                       scale, temperature)


class TowerOutputCache:
    """The vision tower's output for the current batch of images, kept for the next call that encodes
    the same batch (`LlavaMetaForCausalLM.reusing_tower_outputs`: a sweep answers one batch under
    several settings).

    Keyed by exact objects, never by value: `pixel_values(sources, make)` gives the same batched
    pixel tensor for the same per-image tensors `sources` (elementwise `is`; `make()` builds it on a
    miss), and `output` keeps the tower's output for that tensor object (so it must not be edited in
    place meanwhile). One batch at a time: a new one replaces the old. `signals`: tower
    signals computed on every run besides those asked for, so that a later setting asking for them
    finds them (the features do not depend on the signals asked for: `CLIPVisionTower.forward`).
    """

    def __init__(self, signals=frozenset()):
        self.signals = frozenset(signals)
        self._sources: tuple = ()
        self._pixel_values = None
        self._images = None               # the pixel tensor object the output belongs to
        self._output: VisionTowerOutput | None = None

    def pixel_values(self, sources, make):
        sources = tuple(sources)
        if len(sources) != len(self._sources) or any(new is not old for new, old in zip(sources, self._sources)):
            self._sources, self._pixel_values = sources, make()
        return self._pixel_values

    def output(self, images, signals, run) -> VisionTowerOutput:
        """The tower's output for `images` with (at least) the tower `signals`: kept, or `run(names)`
        with the signals wanted now, those of the kept output and `self.signals`."""
        fresh = self._images is not images
        if fresh or not set(signals) <= set(self._output.signals):
            kept = set() if fresh else set(self._output.signals)
            self._images, self._output = images, run(frozenset(signals) | self.signals | kept)
        # A new dict: callers add the text tower's signals to it.
        return VisionTowerOutput(self._output.features, {name: self._output.signals[name] for name in signals})


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

    _compression_override: dict = {}
    # The CLIP checkpoint whose text tower text-conditioned methods read (`--text-tower`); None:
    # the CLIP the vision tower came from. Loaded on first use, kept outside the module tree (its
    # weights are no part of the LLaVA checkpoint).
    text_tower_path: str | None = None
    _text_tower = None
    last_accounting: list[dict] = []
    last_selections: list = []  # per image of the last call, its `common.Selection` (None for merge type `flat`)
    last_schedules: list = []  # per image of the last call, an in-LLM method's `(layer, kept)` stages (else ())
    last_image_spans: tuple = ([], [], [])  # rows, starts, lengths of the last splice's images (padded sequence)
    last_row_lengths: list = []  # the last splice's unpadded row lengths
    # Upstream cuts over-long prompts silently (losing the question); here they are refused unless
    # this is set (`--allow-truncation`), and then cut with a warning.
    allow_truncation: bool = False
    _tower_cache: TowerOutputCache | None = None  # set within `reusing_tower_outputs`

    def get_model(self):
        return self.model

    def get_vision_tower(self):
        return self.get_model().get_vision_tower()

    def set_compression(self, retention_ratio: float | None = None, token_layout: str | None = None,
                        method: str | None = None, method_args=None, visual_tokens: int | None = None) -> None:
        """Fix this model's compression; None follows the module-level defaults. `method_args`: the
        method's argument dataclass, a dict, or `key=value` strings. `visual_tokens` (N image tokens
        per image) replaces the ratio."""
        if retention_ratio is not None and visual_tokens is not None:
            raise ValueError("give a retention ratio or a number of visual tokens, not both")
        if retention_ratio is not None:
            common.check_retention_ratio(retention_ratio)
        if visual_tokens is not None:
            common.check_visual_tokens(visual_tokens)
        if token_layout is not None:
            common.check_layout(token_layout)
        if method is not None or method_args is not None:
            method_args = _method_args(method or compression_method, method_args)
        previous = self._compression_override
        self._compression_override = dict(retention_ratio=retention_ratio, token_layout=token_layout, method=method,
                                          method_args=method_args, visual_tokens=visual_tokens)
        if all(value is None for value in self._compression_override.values()):
            return  # back to the module defaults, checked when used (at R < 1 GlobalCom2's are refused on SigLIP)
        try:
            self.compression_settings()  # a method the tower cannot serve is refused now, not mid-run
        except ValueError:
            self._compression_override = previous
            raise

    def compression_settings(self) -> CompressionSettings:
        """The settings in force now, validated. The module globals are looked up here, at call
        time, so edits and run-time assignments both count."""
        override = self._compression_override
        method = override.get("method") or compression_method
        method_args = override.get("method_args")
        if method_args is None or type(method_args) is not get_method(method).args:
            method_args = _method_args(method, None)
        visual_tokens = override.get("visual_tokens")
        ratio = override.get("retention_ratio")
        ratio = 1.0 if visual_tokens is not None else (retention_ratio if ratio is None else ratio)
        layout = override.get("token_layout") or token_layout
        settings = CompressionSettings(method, method_args, common.check_retention_ratio(ratio),
                                       common.check_layout(layout), visual_tokens)
        self.check_tower_signals(settings)
        return settings

    def check_tower_signals(self, settings: CompressionSettings) -> None:
        """Refuse, in one line, settings whose method needs signals this model's vision tower cannot
        give (its `offered_signals`): the SigLIP tower (OneVision, no [CLS]) offers only
        `siglip_encoder.OFFERED_SIGNALS`, and its features are no CLIP text tower's input either. CLIP
        towers serve every registered signal.

        A method whose arguments choose its signal (GlobalCom2's `score`, default `cls` as released)
        is refused too, never switched silently: the message names the arguments that choose an
        offered one (`--method-arg score=neg_cos_mean`, the paper's score without [CLS]), so the
        choice is in the run's arguments, its metadata and its results row name."""
        tower = self.get_vision_tower()
        if tower.offered_signals is None:
            return
        missing = settings.signals - tower.offered_signals
        if missing:
            choosers = [f"--method-arg {name}={signal}"
                        for name, kind, _, _ in argument_fields(get_method(settings.method))
                        for signal in sorted(tower.offered_signals) if signal in typing.get_args(kind)]
            remedy = f"; pass {' or '.join(choosers)}" if choosers else ""
            raise ValueError(f"method {settings.method} needs {', '.join(sorted(missing))}, which the {tower.kind} "
                             f"vision tower ({tower.vision_tower_name}) does not offer; it offers "
                             f"{', '.join(sorted(tower.offered_signals))} (R = 1 needs none){remedy}")

    def set_tower_numerics(self, numerics: str) -> None:
        """The towers' attention numerics (`clip_encoder.TOWER_NUMERICS`): 'sdpa' (default) or 'released',
        transformers 4.37's CLIP rounding, the released codes' (CLIP towers only); the text tower of
        text-conditioned methods follows the vision tower."""
        self.get_vision_tower().set_numerics(numerics)
        if self._text_tower is not None:
            self._text_tower.set_numerics(numerics)

    def set_text_tower(self, path: str | None) -> None:
        """Use the CLIP checkpoint `path` (a directory, or a hub id in the local cache) for the text
        tower; None: the CLIP the vision tower came from (`mm_vision_tower`). Loads nothing."""
        if path != self.text_tower_path:
            self.text_tower_path, self._text_tower = path, None

    def get_text_tower(self, needed_by: str = "this method"):
        """The CLIP text tower (`clip_text.CLIPTextTower`), loaded on first use in float32 on the
        vision tower's device; `needed_by` names the method in the error when there is none."""
        vision_tower = self.get_vision_tower()
        if self._text_tower is None:
            name = self.text_tower_path or getattr(self.config, "mm_vision_tower", None)
            directory = resolve_text_tower(name, getattr(self.config, "_name_or_path", None), needed_by)
            self._text_tower = load_text_tower(directory, vision_tower.device, vision_width=vision_tower.hidden_size)
            self._text_tower.set_numerics(vision_tower.numerics)
        if self._text_tower.device != vision_tower.device:
            self._text_tower.to(vision_tower.device)
        return self._text_tower

    @contextlib.contextmanager
    def reusing_tower_outputs(self, *settings: CompressionSettings):
        """Within: the vision tower runs once for a batch of images that several calls encode, e.g.
        one batch answered at several ratios (`TowerOutputCache`; off by default). Each run computes
        every tower signal any of `settings` needs, so that later settings reuse it. The text
        tower's and the instruction's signals are computed at every call as usual."""
        signals = {name for each in settings for name in each.signals if SIGNALS[name].source == "tower"}
        previous, self._tower_cache = self._tower_cache, TowerOutputCache(signals)
        try:
            yield self._tower_cache
        finally:
            self._tower_cache = previous

    def encode_images(self, images: torch.Tensor, signals=frozenset(), source=None) -> VisionTowerOutput:
        """`[V, 3, S, S]` -> projected features `[V, P, D]` and the named signals of the views
        (shapes in `registry.SIGNALS`, each with the views first): the vision tower's, and those
        the text tower computes from the tower's features. Signals of the instruction text are
        per image: `encode_image_sequences` computes them. `source`: the tensor `images` was made
        from, which keys the tower cache (`reusing_tower_outputs`; default `images` itself)."""
        sources = {name: SIGNALS[name].source for name in signals}
        if "instruction" in sources.values():
            raise ValueError(f"signals {sorted(name for name, source in sources.items() if source == 'instruction')} "
                             "come from each image's instruction: use encode_image_sequences(..., instructions=...)")
        tower_signals = {name for name in signals if sources[name] == "tower"}
        if self._tower_cache is None:
            features, computed = self.get_vision_tower()(images, tower_signals)
        else:
            features, computed = self._tower_cache.output(images if source is None else source, tower_signals,
                                                          lambda names: self.get_vision_tower()(images, names))
        text_tower_signals = {name for name in signals if sources[name] == "text_tower"}
        if text_tower_signals:
            computed.update(self.get_text_tower().image_signals(text_tower_signals, features, self.get_vision_tower()))
        return VisionTowerOutput(self.get_model().mm_projector(features), computed)

    def signals_from_instructions(self, settings: CompressionSettings, instructions, num_images: int) -> list[dict]:
        """Per image, the signals its instruction text gives (`instructions`: one text per image),
        for the signals `settings` need; empty dicts when none is needed. A method that needs them
        without a text for every image is an error in one line naming it and what is missing."""
        names = settings.instruction_signals
        if not names:
            return [{} for _ in range(num_images)]
        if instructions is None or any(text is None for text in instructions):
            raise ValueError(f"{settings.method} conditions on the instruction text ({', '.join(sorted(names))}) "
                             "but no instruction was given for "
                             f"{'the images' if instructions is None else 'every image'}: pass instructions=[one text "
                             "per image] (run_llava, the runners and the chat CLI do)")
        if len(instructions) != num_images:
            raise ValueError(f"got {num_images} images but {len(instructions)} instructions (one per image)")
        text_tower = self.get_text_tower(settings.method)
        return [text_tower.instruction_signals(names, text) for text in instructions]

    def input_config(self, settings: CompressionSettings | None = None):
        """The config the model's input follows: its own, with the input changes the method's
        official code makes (merge type, pinpoints) applied; preprocessing reads it too
        (`process_images(images, processor, model.input_config())`)."""
        settings = settings or self.compression_settings()
        changes = get_method(settings.method).input_changes(settings.method_args)
        unknown = set(changes) - INPUT_CHANGES
        if unknown:
            raise ValueError(f"method {settings.method} changes {sorted(unknown)}, which the glue does not apply "
                             f"(it applies {sorted(INPUT_CHANGES)})")
        if not changes:
            return self.config
        config = copy.copy(self.config)
        for key, value in changes.items():
            setattr(config, key, value)
        return config

    def image_geometry(self, num_views: int, image_size: tuple[int, int] | None,
                       merge_type: str, config=None) -> common.CropGeometry:
        """The crop geometry of one image with `num_views` views (1: a single view, no crops);
        `config`: the input's (`input_config`), default the model's."""
        side = self.get_vision_tower().num_patches_per_side
        unpad = "unpad" in merge_type
        if num_views == 1:
            return common.crop_geometry(image_size or (0, 0), (0, 0), side, unpad)
        config = config or self.config
        aspect_ratio = getattr(config, "image_aspect_ratio", None)
        if not is_anyres(aspect_ratio):
            raise ValueError("several views per image need image_aspect_ratio 'anyres' or 'anyres_max_N'")
        if image_size is None:
            raise ValueError("image_sizes are required for AnyRes images (PIL (width, height) of each image)")
        grid = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, self.get_vision_tower().config.image_size)
        if num_views != 1 + grid[0] * grid[1]:
            raise ValueError(
                f"image of size {tuple(image_size)} needs {grid[0]}x{grid[1]} crops but got {num_views - 1}: "
                "are image_sizes the PIL (width, height) of the images given to process_images?"
            )
        return common.crop_geometry(image_size, grid, side, unpad, anyres_max_num_patches(aspect_ratio))

    def merge_type(self, settings: CompressionSettings) -> str:
        """The config's `mm_patch_merge_type`, unless the method's official code changes it."""
        merge_type = getattr(self.input_config(settings), "mm_patch_merge_type", "flat")
        if merge_type != "flat" and not merge_type.startswith("spatial"):
            raise ValueError(f"unknown mm_patch_merge_type: {merge_type!r}")
        return merge_type

    def image_sequence(self, views: torch.Tensor, signals: dict | None = None, image_size: tuple[int, int] | None = None,
                       settings: CompressionSettings | None = None,
                       merge_type: str | None = None) -> tuple[torch.Tensor, common.Selection | None]:
        """Visual tokens `[M, D]` of one image and what the method kept (None for merge type `flat`).

        `views`: projected `[V, P, D]`, thumbnail first; `signals`: this image's tower signals,
        each `[V, P]` (empty when the budget keeps everything). With everything kept, AnyRes with
        `spatial_unpad` is upstream LLaVA-NeXT: the thumbnail's P tokens, then the unpadded crop
        canvas with an `image_newline` after each row; the method keeps a share of them.
        `settings`: default the model's; `merge_type`: instead of the config's (and the method's
        input changes).
        """
        settings = settings or self.compression_settings()
        merge_type = merge_type or self.merge_type(settings)
        if merge_type == "flat":  # no spatial structure to compress against, as released
            return views.flatten(0, 1), None
        geometry = self.image_geometry(views.shape[0], image_size, merge_type, self.input_config(settings))
        newline = self.get_model().image_newline.to(views.dtype) if geometry.unpad else None
        budget = common.Budget.resolve(geometry, settings.retention_ratio, settings.visual_tokens,
                                       self.vanilla_geometry(geometry).vanilla_image_tokens)
        method = get_method(settings.method)
        if method.stage == "in-llm":  # the image goes in whole; the decoder prunes (language_model.pruning)
            selection = common.keep_everything(geometry, views.device)
        else:
            selection = method.select(views, signals or {}, geometry, budget, settings.method_args)
        selection = common.project_merge(selection, self.get_model().mm_projector)
        return common.arrange_tokens(views, selection, newline, settings.token_layout), selection

    def vanilla_geometry(self, geometry: common.CropGeometry, one_view_each: bool = False) -> common.CropGeometry:
        """The geometry the model sends for the same image uncompressed (its own config), which
        differs from `geometry` where a method's official input changed the merge type or grid."""
        unpad = not one_view_each and "unpad" in getattr(self.config, "mm_patch_merge_type", "flat")
        if not geometry.crop_boxes:
            return geometry.with_unpad(unpad)
        grid = get_anyres_image_grid_shape(geometry.image_size, self.config.image_grid_pinpoints,
                                           self.get_vision_tower().config.image_size)
        return common.crop_geometry(geometry.image_size, grid, geometry.side, unpad,
                                    anyres_max_num_patches(getattr(self.config, "image_aspect_ratio", None)))

    def encode_image_sequences(self, images, image_sizes, settings: CompressionSettings | None = None,
                               instructions=None) -> list[torch.Tensor]:
        """One `[M_i, D]` visual sequence per image, each compressed with its own signals.

        `images`: a 5-D tensor `[N, V, 3, S, S]` or a list of `[V_i, 3, S, S]` (AnyRes), or a
        4-D tensor `[N, 3, S, S]` (one view per image, LLaVA-1.5 style). `settings`: default
        the model's (`compression_settings`). `instructions`: one text per image, for methods
        conditioned on it (the question, not the chat prompt: `llava.eval.instructions`).
        Sets `last_accounting` and `last_selections`.
        """
        if settings is None:
            settings = self.compression_settings()
        else:
            self.check_tower_signals(settings)
        # A 4-D batch is one view per image (LLaVA-1.5 style): upstream sends its features as they
        # are, without the merge step, so without a newline.
        one_view_each = isinstance(images, torch.Tensor) and images.ndim == 4
        if one_view_each:
            views_per_image = list(images.unsqueeze(1))
        else:
            views_per_image = [image.unsqueeze(0) if image.ndim == 3 else image for image in images]
        counts = [views.shape[0] for views in views_per_image]
        sizes = image_sizes if image_sizes is not None else [None] * len(counts)
        if len(sizes) != len(counts):
            raise ValueError(f"got {len(counts)} images but {len(sizes)} image_sizes")
        from_instructions = self.signals_from_instructions(settings, instructions, len(counts))
        view_signals = settings.signals - settings.instruction_signals
        features, computed = self.encode_images(torch.cat(views_per_image), view_signals, source=images)
        per_signal = {name: values.split(counts) for name, values in computed.items()}
        per_image = [self.image_sequence(views, {**{name: parts[index] for name, parts in per_signal.items()},
                                                 **from_instructions[index]},
                                         size, settings, "spatial" if one_view_each else None)
                     for index, (views, size) in enumerate(zip(features.split(counts), sizes))]
        ratio = settings.retention_ratio
        if settings.method == "globalcom2" and ratio < 1.0 and int(features.shape[-2] * ratio) == 0:
            warnings.warn(f"retention ratio {ratio:g} is below 1/{features.shape[-2]}: int({features.shape[-2]} R) = 0, so "
                          "the thumbnail (or single view) keeps no token and the crops keep almost none; the language "
                          "model sees little more than newline tokens", LlavaWarning, stacklevel=2)
        # Accounting is against the model's own vanilla sequence, also where the method's official
        # input changed it (FasterVLM's sends the letterbox padding).
        self.last_selections = [selection for _, selection in per_image]
        self.last_accounting = [dict(selection.accounting(settings.token_layout,
                                                          self.vanilla_geometry(selection.geometry, one_view_each))
                                     if selection is not None else common.uncompressed_accounting(tokens.shape[0]),
                                     **settings.record())
                                for tokens, selection in per_image]
        self.last_schedules = [()] * len(per_image)
        if in_llm_part(get_method(settings.method), settings.method_args) is not None:  # in-LLM, or composed
            self.last_schedules = [self._in_llm_accounting(settings, tokens.shape[0], selection, record)
                                   for (tokens, selection), record in zip(per_image, self.last_accounting)]
        return [tokens for tokens, _ in per_image]

    def _in_llm_accounting(self, settings: CompressionSettings, span_tokens: int, selection, record: dict):
        """An in-LLM method's schedule for one image (`(layer, kept)` stages over its span of
        `span_tokens`, newlines included), and its counts added to `record`: the image tokens at
        every layer, after the last prune ("post-pruning") and their layer average ("equivalent"), and
        the method's own parameters behind the schedule (`schedule_params`, e.g. PDrop's lam), if any."""
        layers = self.config.num_hidden_layers
        geometry = selection.geometry if selection is not None else None
        budget = (common.Budget.resolve(geometry, settings.retention_ratio, settings.visual_tokens) if geometry
                  else common.Budget(settings.retention_ratio, span_tokens, settings.visual_tokens))
        schedule = tuple(settings.method_args.schedule(span_tokens, budget, layers))
        if isinstance(settings.method_args, ComposedArgs):  # the budget's split between the two stages
            record["composition"] = settings.method_args.accounting(budget)
        per_layer = [span_tokens] * layers
        for layer, kept in schedule:
            per_layer[layer:] = [kept] * (layers - layer)
        record.update(layer_image_tokens=per_layer, post_pruning_image_tokens=per_layer[-1],
                      equivalent_image_tokens=sum(per_layer) / layers,
                      in_llm=dict(stages=[list(stage) for stage in schedule], span_tokens=span_tokens,
                                  counts_newlines=True))
        params = getattr(settings.method_args, "schedule_params", None)
        if params is not None:
            record["in_llm"]["schedule_params"] = params(span_tokens, budget, layers)
        return schedule

    def prepare_inputs_labels_for_multimodal(
        self, input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes=None,
        padding_side=None, instructions=None,
    ):
        """Replace every `IMAGE_TOKEN_INDEX` in `input_ids` `[B, L]` by that image's visual tokens.

        Images are taken in order of their placeholders (row by row, left to right). Padding
        given by `attention_mask` is removed, the rows are spliced, truncated to
        `tokenizer_model_max_length` and padded again on `padding_side` (default: the config's
        `tokenizer_padding_side`, upstream's 'right'; generation uses 'left'). `instructions`: one
        text per image, for methods conditioned on it (`encode_image_sequences`).
        Returns `(None, position_ids, attention_mask, past_key_values, inputs_embeds [B, L', D], labels)`.
        """
        if self.get_vision_tower() is None or images is None or input_ids.shape[1] == 1:
            return input_ids, position_ids, attention_mask, past_key_values, None, labels
        settings = self.compression_settings()  # refuses a bad setting before any model work
        image_features = self.encode_image_sequences(images, image_sizes, settings, instructions)
        spliced = self.splice_image_features(input_ids, position_ids, attention_mask, past_key_values, labels,
                                             image_features, padding_side)
        self._request_in_llm_pruning(settings, padding_side)
        return (None, *spliced)

    def _request_in_llm_pruning(self, settings: CompressionSettings, padding_side) -> None:
        """For an in-LLM method, hand the next prefill of the language model its images' spans and
        schedules (`language_model.pruning.PruningRequest`); it serves that one prefill."""
        from llava.model.language_model.pruning import PruningRequest
        part = in_llm_part(get_method(settings.method), settings.method_args)  # a composition's in-LLM part
        self.get_model().pruning_request = None
        if part is None or not any(self.last_schedules):
            return
        method, method_args = part
        rows, starts, counts = self.last_image_spans
        side = padding_side or getattr(self.config, "tokenizer_padding_side", "right")
        if side != "left" and len(set(self.last_row_lengths)) > 1:
            raise ValueError(f"{settings.method} prunes inside the language model and needs left padding for a "
                             f"batch of rows of different lengths, got padding_side={side!r}")
        device = self.get_model().embed_tokens.weight.device
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        self.get_model().pruning_request = PruningRequest(as_tensor(rows), as_tensor(starts), as_tensor(counts),
                                                          list(self.last_schedules), method, method_args,
                                                          self._in_llm_view_recorder(settings.token_layout, counts))

    def _in_llm_view_recorder(self, layout: str, counts: list[int]):
        """The `PruningRequest.on_prune` callback for the last splice's images (`counts`: each one's span
        length): each image's record gets, in `in_llm`, its span's tokens per view (`view_tokens` `[V]`,
        thumbnail then the crops in the order sent, and `view_newlines`) and, after every stage,
        `views_kept`: `{"layer", "kept" [V], "newlines"}`, what survives from that layer on (the
        positional-bias tool reads them, `tools/positional_bias.py`). Host work once per stage."""
        span_views = [None if selection is None else _span_views(selection, layout)[:count]
                      for selection, count in zip(self.last_selections, counts)]
        surviving = [torch.arange(count) for count in counts]  # each image's original span offsets still present

        def per_view(views: torch.Tensor, num_views: int) -> tuple[list[int], int]:
            counted = torch.bincount(views + 1, minlength=num_views + 1).tolist()
            return counted[1:], counted[0]

        for record, views, selection in zip(self.last_accounting, span_views, self.last_selections):
            if views is not None:
                record["in_llm"]["view_tokens"], record["in_llm"]["view_newlines"] = per_view(
                    views, 1 + selection.geometry.num_crops)
                record["in_llm"]["views_kept"] = []

        def on_prune(layer: int, kept: torch.Tensor) -> None:
            kept = kept.cpu()
            for image, (record, views, selection) in enumerate(zip(self.last_accounting, span_views,
                                                                    self.last_selections)):
                surviving[image] = surviving[image][kept[image, :surviving[image].shape[0]]]
                if views is not None:
                    kept_per_view, newlines = per_view(views[surviving[image]], 1 + selection.geometry.num_crops)
                    record["in_llm"]["views_kept"].append(dict(layer=layer, kept=kept_per_view, newlines=newlines))
        return on_prune

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
        rows_embeds, rows_labels, rows_images, rows_starts = [], [], [], []
        for ids, keep, embeds, row_labels in zip(input_ids, attention_mask, text_embeds, labels):
            ids, embeds, row_labels = ids[keep], embeds[keep], row_labels[keep]
            placeholders = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
            pieces, piece_labels, start = [], [], 0
            rows_images.append([])  # visual tokens of each image in this row
            rows_starts.append([])  # where each image starts in the unpadded row
            for position in placeholders:
                feature = next(images_left).to(embeds.dtype)
                rows_starts[-1].append(sum(piece.shape[0] for piece in pieces) + position - start)
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
        # Each image's row, start and (truncation-clipped) length in the padded sequence: what an
        # in-LLM method prunes (language_model.pruning).
        self.last_row_lengths = [row.shape[0] for row in rows_embeds]
        self.last_image_spans = ([], [], [])
        for row, (starts, counts) in enumerate(zip(rows_starts, rows_images)):
            pad = longest - self.last_row_lengths[row] if padding_side == "left" else 0
            for start, count in zip(starts, counts):
                for values, value in zip(self.last_image_spans,
                                         (row, pad + start, max(0, min(count, self.last_row_lengths[row] - start)))):
                    values.append(value)
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
        ratio = self.compression_settings().retention_ratio
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
    def generate(self, inputs: torch.Tensor | None = None, images=None, image_sizes=None, instructions=None, **kwargs):
        """Generate from `inputs` `[B, L]` and images, or from ready `inputs_embeds`.

        The prompt always goes in as `inputs_embeds` (so the output holds only new tokens),
        left-padded; transformers derives positions from the mask and keeps the KV cache.
        `instructions`: one text per image, for methods conditioned on it.
        """
        kwargs.pop("position_ids", None)
        if images is not None:
            _, _, kwargs["attention_mask"], _, kwargs["inputs_embeds"], _ = self.prepare_inputs_labels_for_multimodal(
                inputs, None, kwargs.get("attention_mask"), None, None, images, image_sizes, padding_side="left",
                instructions=instructions,
            )
        elif kwargs.get("inputs_embeds") is None:
            kwargs["inputs_embeds"] = self.get_model().embed_tokens(inputs)
        return super().generate(**kwargs)



def _span_views(selection: common.Selection, layout: str) -> torch.Tensor:
    """`[M]` long on the CPU: the view (0 the thumbnail, c the c-th crop sent) of each token of the
    image's sequence as `image_sequence` arranges it, -1 for a newline (or a token that is no patch)."""
    geometry = selection.geometry
    num_patches, device = geometry.side**2, selection.thumbnail_indices.device
    plain = common.Selection(**{field.name: getattr(selection, field.name)
                                for field in dataclasses.fields(common.Selection)})
    cells = torch.arange((1 + geometry.num_crops) * num_patches, device=device).view(-1, num_patches, 1)
    newline = torch.tensor([-1], device=device) if geometry.unpad else None
    sequence = common.arrange_tokens(cells, plain, newline, layout)[:, 0].cpu()
    return torch.where((sequence >= 0) & (sequence < cells.shape[0] * num_patches), sequence // num_patches, -1)


def _method_args(method: str, given):
    """A method's argument dataclass from None (defaults), a dict, `key=value` strings or itself."""
    if isinstance(given, dict):
        given = [f"{key}={value}" for key, value in given.items()]
    if given is None or isinstance(given, (list, tuple)):
        return parse_method_args(method, list(given or []))
    if type(given) is not get_method(method).args:
        raise ValueError(f"method {method} takes {get_method(method).args.__name__}, got {type(given).__name__}")
    return given
