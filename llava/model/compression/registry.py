"""The method registry: registration, lookup, listing, describing, and `key=value` arguments.

A method module registers its entry point with `@register(name, needs=..., args=...)`. The entry
point takes `(views, signals, geometry, budget, args)`:

- `views`: `[V, P, D]` projected features, thumbnail first (`V = 1 + C`);
- `signals`: the tower signals named in `needs` (see `SIGNALS` for their shapes), and nothing else;
- `geometry`: `common.CropGeometry` (grid, unpadding); `budget`: `common.Budget`, resolved;
- `args`: the method's frozen dataclass of arguments;

and returns a `common.Selection` (or a `common.Merge`). Arrangement into the language model's
sequence, newlines and accounting are shared code (`common.arrange_tokens`).

A method whose official code changes the model's input declares it (`input_changes`: its
arguments -> config overrides among `INPUT_CHANGES`); the glue applies them to the geometry and
to preprocessing for that method's runs.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from typing import Callable

import torch

# Signals a method can ask for; only the ones the chosen method needs are computed. `source` says
# from what: `tower` (the vision tower, from the views), `text_tower` (the views' features through
# the CLIP checkpoint's image side, loaded with its text tower: `--text-tower`), `instruction`
# (the image's instruction text through the CLIP text tower; one value per image, not per view).
SOURCES = ("tower", "text_tower", "instruction")


@dataclasses.dataclass(frozen=True)
class Signal:
    shape: tuple[str, ...]  # dimension names: V views, H heads, P patches, C tower width, d = C / H,
    help: str               # E CLIP embedding width, M 77-token text segments
    source: str = "tower"


SIGNALS = {
    "cls_logits_last": Signal(("V", "P"), "last CLIP layer's pre-softmax [CLS]->patch logits, head mean (GlobalCom2)"),
    "cls_attn_penultimate": Signal(("V", "P"), "layer -2's post-softmax [CLS] attention (softmax over all keys, [CLS] "
                                               "included), patch columns not renormalised, head mean (FasterVLM)"),
    "cls_attn_heads_first": Signal(("V", "H", "P"), "layer 0's post-softmax [CLS] attention per head (HiRED)"),
    "cls_attn_heads_penultimate": Signal(("V", "H", "P"), "layer -2's post-softmax [CLS] attention per head "
                                                          "(VisionZip, HiRED, HoloV, VisPruner)"),
    "keys_head_mean_penultimate": Signal(("V", "1+P", "d"), "layer -2's keys of every token, head mean (VisionZip)"),
    "cls_attn_full_width_last": Signal(("V", "P"), "last layer's [CLS] attention as one full-width head, "
                                                   "softmax(q.k / sqrt(C)) over all keys (PruMerge)"),
    "keys_last": Signal(("V", "P", "C"), "last layer's patch keys (PruMerge)"),
    "tower_features": Signal(("V", "1+P", "C"), "the selected hidden state with its [CLS] row, before the projector "
                                                "(methods that merge in CLIP space)"),
    "patch_embeds": Signal(("V", "P", "E"), "the selected layer's patches through the tower's post_layernorm, then in "
                                            "float32 through CLIP's visual projection (CDPruner)", source="text_tower"),
    "instruction_embeds": Signal(("M", "E"), "CLIP text embeddings of the image's instruction, one per 77-token "
                                             "segment, float32 (CDPruner)", source="instruction"),
}


def example_signals(names, num_views: int, num_patches: int, width: int = 64, heads: int = 4,
                    generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                    segments: int = 2) -> dict:
    """Random positive tensors of the declared shapes for the signals `names` (tests and
    benchmarks: no tower needed); the CLIP embedding width E is `width`."""
    sizes = {"V": num_views, "H": heads, "P": num_patches, "1+P": 1 + num_patches, "C": width, "d": width // heads,
             "E": width, "M": segments}
    return {name: torch.rand([sizes[dim] for dim in SIGNALS[name].shape], generator=generator).to(dtype)
            for name in names}


# Signals an in-LLM method (`stage="in-llm"`) can ask for: the decoder mechanism
# (`llava.model.language_model.pruning.SCORERS`) computes them inside the language model, at the
# layer the method's schedule names, under SDPA. I: images of the batch, N: the longest image span.
DECODER_SIGNALS = {
    "last_query_attn": Signal(("I", "N"), "the last prompt position's post-softmax attention to each image token at "
                                          "the layer before the pruning layer, head mean, fp32 (FastV)", "decoder"),
}

# Input changes a method may declare (its official code alters the model's input): config keys
# the glue overrides for that method's runs (`image_grid_pinpoints`: the preprocessing's too).
INPUT_CHANGES = {"mm_patch_merge_type", "image_grid_pinpoints"}


@dataclasses.dataclass(frozen=True)
class NoArgs:
    """A method without arguments."""


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    select: Callable
    needs: frozenset
    args: type
    stage: str
    summary: str
    input_changes: Callable[[object], dict]  # args -> {config key: value}

    def signals_for(self, args, budget_keeps_all: bool) -> frozenset:
        """What the tower must compute for one run: nothing when the method keeps everything at a
        full budget without looking (its `keeps_everything` says so), else `needs`; never anything
        for an in-LLM method (its signals are the decoder's)."""
        if self.stage == "in-llm":
            return frozenset()
        if budget_keeps_all and getattr(args, "keeps_everything", lambda: True)():
            return frozenset()
        return self.needs


_METHODS: dict[str, Method] = {}


def register(name: str, needs=(), args: type = NoArgs, stage: str = "pre-llm",
             input_changes: Callable[[object], dict] | None = None):
    """Decorator registering a method's entry point under `name` (the module's name).

    `stage="pre-llm"`: the entry point selects from the views (see the module docstring).
    `stage="in-llm"`: it is a keep rule `(scores [I, N], image_tokens [I], targets [I], args) ->
    [I, N] bool` over each image's span, called by the decoder mechanism
    (`llava.model.language_model.pruning`) at the layers of `args.schedule(span_tokens, budget,
    num_layers)`; its `needs` are `DECODER_SIGNALS`, and the image goes in whole before the LLM."""
    if stage not in ("pre-llm", "in-llm"):
        raise ValueError(f"method {name}: stage must be 'pre-llm' or 'in-llm', got {stage!r}")
    known = SIGNALS if stage == "pre-llm" else DECODER_SIGNALS
    unknown = set(needs) - set(known)
    if unknown:
        raise ValueError(f"method {name}: unknown signals {sorted(unknown)}; known: {sorted(known)}")

    def decorate(select: Callable) -> Callable:
        module_doc = (sys.modules[select.__module__].__doc__ or "").strip()
        _METHODS[name] = Method(name, select, frozenset(needs), args, stage, module_doc.split("\n")[0],
                                input_changes or (lambda method_args: {}))
        return select

    return decorate


def method_names(stage: str | None = None) -> list[str]:
    """Every registered name, or those of one stage (`pre-llm`, `in-llm`)."""
    return sorted(name for name, method in _METHODS.items() if stage is None or method.stage == stage)


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise ValueError(f"unknown compression method {name!r}; choose one of: {', '.join(method_names())}")
    return _METHODS[name]


def argument_fields(method: Method) -> list[tuple[str, type, object, str]]:
    """`(name, type, default, help)` of each argument of `method`."""
    hints = typing.get_type_hints(method.args)
    return [(field.name, hints[field.name], field.default, field.metadata.get("help", ""))
            for field in dataclasses.fields(method.args)]


def parse_method_args(name: str, pairs: list[str] | None = None):
    """The method's argument dataclass from `key=value` strings; a ValueError in one line naming
    the valid keys (with their defaults) on an unknown key or a bad value."""
    method = get_method(name)
    fields = {field_name: (kind, default) for field_name, kind, default, _ in argument_fields(method)}
    valid = ", ".join(f"{key}={default!r}" for key, (_, default) in fields.items()) or "none"
    values = {}
    for pair in pairs or []:
        key, separator, text = pair.partition("=")
        if not separator or key not in fields:
            raise ValueError(f"method {name} has no argument {key!r} (expected key=value; its arguments: {valid})")
        values[key] = _convert(name, key, text, fields[key][0])
    try:
        return method.args(**values)
    except ValueError as error:
        raise ValueError(f"method {name}: {error} (its arguments: {valid})") from None


def _convert(method: str, key: str, text: str, kind):
    choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
    try:
        if choices:
            if text not in choices:
                raise ValueError
            return text
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        return kind(text)
    except ValueError:
        expected = f"one of {', '.join(choices)}" if choices else kind.__name__
        raise ValueError(f"method {method}: {key}={text!r} is not {expected}") from None


def method_args_dict(args) -> dict:
    """The arguments as a JSON-ready dict (for answer metadata and selection records)."""
    return dataclasses.asdict(args)


def non_default_args(args) -> dict:
    """Only the arguments that differ from their defaults (what names a run)."""
    return {field.name: getattr(args, field.name) for field in dataclasses.fields(args)
            if getattr(args, field.name) != field.default}


def row_args(args) -> dict:
    """The arguments that name a results row: the non-default ones, and `mode` always for a
    method that has one (whether a row ran the official input or the model's must show)."""
    shown = non_default_args(args)
    if "mode" in {field.name for field in dataclasses.fields(args)}:
        shown = {"mode": args.mode, **shown}
    return dict(sorted(shown.items()))


def describe(name: str) -> str:
    """Several lines: the method's name, stage, summary, signals and arguments with defaults."""
    method = get_method(name)
    lines = [f"{method.name} ({method.stage}): {method.summary}",
             f"  signals: {', '.join(sorted(method.needs)) or 'none'}"]
    for field_name, kind, default, help_text in argument_fields(method):
        choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
        kind_text = "|".join(choices) if choices else kind.__name__
        lines.append(f"  {field_name}={default!r} ({kind_text}): {help_text}")
    return "\n".join(lines)


def arg(default, help: str):  # noqa: A002  (the dataclass field's help text)
    """A method argument: its default (the official code's value) and one line of help."""
    return dataclasses.field(default=default, metadata={"help": help})
