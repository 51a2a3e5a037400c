"""The method registry: registration, lookup, listing, describing, and `key=value` arguments.

A method module registers its entry point with `@register(name, needs=..., args=...)`. The entry
point takes `(views, signals, geometry, budget, args)`:

- `views`: `[V, P, D]` projected features, thumbnail first (`V = 1 + C`);
- `signals`: the tower signals named in `needs` (see `SIGNALS` for their shapes), and nothing else
  (where the args choose among them, `args.signals()`, only the chosen ones);
- `geometry`: `common.CropGeometry` (grid, unpadding); `budget`: `common.Budget`, resolved;
- `args`: the method's frozen dataclass of arguments;

and returns a `common.Selection` (or a `common.Merge`). Arrangement into the language model's
sequence, newlines and accounting are shared code (`common.arrange_tokens`).

A method whose official code changes the model's input declares it (`input_changes`: its
arguments -> config overrides among `INPUT_CHANGES`); the glue applies them to the geometry and
to preprocessing for that method's runs.

Composition (`get_method("globalcom2+fastv")`, any `<pre-LLM>+<in-LLM>` pair): the pre-LLM method
selects from the views, then the in-LLM method prunes the sequence it sent inside the language
model. Arguments are addressed per part, `<part>.<key>=<value>` (`--method-arg fastv.k=3`,
`--method-arg globalcom2.alpha=0`), and the composition's own `split` (`ComposedArgs`):

- Budget split. The GlobalCom2 paper combines FastV and SparseVLM with GlobalCom2 at R = 10%
  without saying how (spec `paper.md` 5.5); here the total budget R is split multiplicatively,
  `split` in [0, 1] being the pre-LLM stage's share in log space: the pre-LLM method runs at
  `R_pre = R ** split` of the vanilla image tokens and the in-LLM method at `R_in = R ** (1 - split)`
  of the span it receives (newline tokens included, as every in-LLM method counts its span), so
  the tokens left after the last prune are `R_pre R_in = R` of vanilla whatever the split
  (newlines aside). `split=1` is the pre-LLM method alone (`R_in = 1`: no stage), `split=0` the
  in-LLM method alone on the vanilla sequence. Default 0.5: each stage keeps sqrt(R) (R = 0.25:
  50% then 50%; R = 0.1: 31.6% then 31.6%), neither stage favoured, since the paper gives no split.
  The in-LLM part's own `convention` decides what its share counts (`fastv.convention=average`
  makes the layer average, SparseVLM's "equivalent tokens", equal `R_in` of its span, so the
  composition's equivalent tokens equal R of vanilla).
- `--visual-tokens N` (the image's ratio `r = min(N / vanilla, 1)`): the pre-LLM method keeps
  `max(N, round(vanilla r ** split))` image tokens (as its own `--visual-tokens`), the in-LLM
  method the ratio `r ** (1 - split)` of its span.
- The accounting (`llava_arch`) records both stages: the pre-LLM selection's counts, then the
  in-LLM per-layer counts, post-pruning and equivalent tokens, and `composition` (split and
  the two ratios).
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from typing import Callable

import torch

from llava.model.compression.common import Budget

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
    "neg_cos_mean": Signal(("V", "P"), "-cos(x_i, g) of each patch's tower output feature (the selected hidden state, "
                                       "before the projector) against g, its view's mean patch feature; float32 "
                                       "(GlobalCom2 without [CLS], the paper's s_i^sim)"),
    "neg_attn": Signal(("V", "P"), "minus the mean attention a patch receives in the last encoder layer (SigLIP: the "
                                   "last kept one), over every query and head, softmax over all tokens; float32, no "
                                   "full maps (GlobalCom2 without [CLS], the paper's s_i^attn)"),
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
    "next_layer_query_attn": Signal(("I", "N"), "the last prompt position's post-softmax attention to each image "
                                                "token as the pruning layer would compute it (its norm, q/k, RoPE on "
                                                "its input), head mean, fp32 (PDrop)", "decoder"),
    "dart_pivot_features": Signal(("I", "W", "2+D"), "per token of each image's span and the text after it (W): "
                                                     "the L1 norm of layer K-1's RoPE'd keys, the original position "
                                                     "id, layer K-1's output through the final norm (DART)", "decoder"),
    "rater_attn": Signal(("I", "N"), "the mean over each image's text raters (chosen once from the layer-0 input) of "
                                     "their post-softmax attention to its image tokens at the sparse layer, head mean, "
                                     "fp32; that layer's output is pruned (SparseVLM)", "decoder"),
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
    parts: tuple = ()  # a composition's (pre-LLM, in-LLM) methods; () for a registered method

    def signals_for(self, args, budget_keeps_all: bool) -> frozenset:
        """What the tower must compute for one run: nothing when the method keeps everything at a
        full budget without looking (its `keeps_everything` says so), else the signals its args
        choose (`args.signals()`, a subset of `needs`, where the args define it: GlobalCom2's
        `score`) or else `needs`; a composition's pre-LLM part's; never anything for an in-LLM
        method (its signals are the decoder's)."""
        if self.parts:
            return self.parts[0].signals_for(args.pre, budget_keeps_all)
        if self.stage == "in-llm":
            return frozenset()
        if budget_keeps_all and getattr(args, "keeps_everything", lambda: True)():
            return frozenset()
        chosen = getattr(args, "signals", None)
        if chosen is None:
            return self.needs
        signals = frozenset(chosen())
        if not signals <= self.needs:
            raise ValueError(f"method {self.name}: its arguments ask for {sorted(signals - self.needs)}, which it "
                             f"did not register (needs: {sorted(self.needs)})")
        return signals


_METHODS: dict[str, Method] = {}


def register(name: str, needs=(), args: type = NoArgs, stage: str = "pre-llm",
             input_changes: Callable[[object], dict] | None = None):
    """Decorator registering a method's entry point under `name` (the module's name).

    `needs`: every signal the entry point may read; where its args pick among them per run
    (a `signals()` method, as GlobalCom2's `score`), the glue computes only the picked ones
    (`Method.signals_for`).
    `stage="pre-llm"`: the entry point selects from the views (see the module docstring).
    `stage="in-llm"`: it is a keep rule `(scores [I, N], image_tokens [I], targets [I], args) ->
    [I, N] bool` over each image's span, called by the decoder mechanism
    (`llava.model.language_model.pruning`) at the layers of `args.schedule(span_tokens, budget,
    num_layers)`; its `needs` are `DECODER_SIGNALS`, and the image goes in whole before the LLM. Its args
    may also define `schedule_params(span_tokens, budget, num_layers) -> dict`: the method's own
    parameters behind that schedule (PDrop's lam and layers), JSON-ready, kept in each image's record."""
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
    if COMPOSE in name:
        return _composition(name)
    if name not in _METHODS:
        raise ValueError(f"unknown compression method {name!r}; choose one of: {', '.join(method_names())}")
    return _METHODS[name]


def argument_fields(method: Method) -> list[tuple[str, type, object, str]]:
    """`(name, type, default, help)` of each argument of `method` (a composition's: each part's
    as `<part>.<name>`, then `split`)."""
    if method.parts:
        fields = [(f"{part.name}.{field_name}", kind, default, help_text) for part in method.parts
                  for field_name, kind, default, help_text in argument_fields(part)]
        split = dataclasses.fields(ComposedArgs)[-1]
        return fields + [(split.name, float, split.default, split.metadata["help"])]
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
        if method.parts:
            return _composed_args(method, values)
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
    """The arguments as a JSON-ready dict (for answer metadata and selection records); a
    composition's flat, `<part>.<name>` keys and `split`."""
    if isinstance(args, ComposedArgs):
        return {"split": args.split, **{f"{name}.{key}": value for name, part in args.named_parts()
                                        for key, value in method_args_dict(part).items()}}
    return dataclasses.asdict(args)


def non_default_args(args) -> dict:
    """Only the arguments that differ from their defaults (what names a run)."""
    if isinstance(args, ComposedArgs):
        changed = {f"{name}.{key}": value for name, part in args.named_parts()
                   for key, value in non_default_args(part).items()}
        default_split = dataclasses.fields(ComposedArgs)[-1].default
        return {**changed, **({"split": args.split} if args.split != default_split else {})}
    return {field.name: getattr(args, field.name) for field in dataclasses.fields(args)
            if getattr(args, field.name) != field.default}


def row_args(args) -> dict:
    """The arguments that name a results row: the non-default ones, and `mode` always for a
    method that has one (whether a row ran the official input or the model's must show)."""
    if isinstance(args, ComposedArgs):  # the split always: it is what a composed row is
        return dict(sorted({"split": args.split, **{f"{name}.{key}": value for name, part in args.named_parts()
                                                    for key, value in row_args(part).items()}}.items()))
    shown = non_default_args(args)
    if "mode" in {field.name for field in dataclasses.fields(args)}:
        shown = {"mode": args.mode, **shown}
    return dict(sorted(shown.items()))


def describe(name: str) -> str:
    """Several lines: the method's name, stage, summary, signals and arguments with defaults."""
    method = get_method(name)
    chosen = f" (its arguments choose; by default {', '.join(sorted(method.args().signals()))})" \
        if hasattr(method.args, "signals") else ""
    lines = [f"{method.name} ({method.stage}): {method.summary}",
             f"  signals: {', '.join(sorted(method.needs)) or 'none'}{chosen}"]
    for field_name, kind, default, help_text in argument_fields(method):
        choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
        kind_text = "|".join(choices) if choices else kind.__name__
        lines.append(f"  {field_name}={default!r} ({kind_text}): {help_text}")
    return "\n".join(lines)


def arg(default, help: str):  # noqa: A002  (the dataclass field's help text)
    """A method argument: its default (the official code's value) and one line of help."""
    return dataclasses.field(default=default, metadata={"help": help})


# --- composition: a pre-LLM method, then an in-LLM one (module docstring, "Composition") ---------

COMPOSE = "+"
COMPOSED = "pre-llm+in-llm"  # a composition's stage


@dataclasses.dataclass(frozen=True)
class ComposedArgs:
    """A composition's arguments: each part's own dataclass and the budget `split`."""

    pre_name: str
    pre: object     # the pre-LLM method's arguments
    in_llm_name: str
    in_llm: object  # the in-LLM method's arguments
    split: float = arg(0.5, "the pre-LLM stage's share of the budget in log space: it keeps R ** split of vanilla, "
                            "the in-LLM stage R ** (1 - split) of what it receives (1: pre-LLM alone, 0: in-LLM alone)")

    def __post_init__(self):
        if not 0.0 <= self.split <= 1.0:
            raise ValueError(f"split must be in [0, 1] (1: all of the budget to the pre-LLM stage), got {self.split}")

    def named_parts(self) -> tuple[tuple[str, object], tuple[str, object]]:
        return (self.pre_name, self.pre), (self.in_llm_name, self.in_llm)

    def keeps_everything(self) -> bool:
        return getattr(self.pre, "keeps_everything", lambda: True)()

    def stage_ratios(self, ratio: float) -> tuple[float, float]:
        """`(R_pre, R_in)` of a total ratio R: `R ** split`, `R ** (1 - split)` (exactly R and 1 at split = 1)."""
        return ratio ** self.split, ratio ** (1.0 - self.split)

    def pre_budget(self, budget: Budget) -> Budget:
        """The pre-LLM method's budget for one image, from the image's total `budget`. On a downsampled
        (OneVision) canvas the split is of the tokens vanilla sends (`Budget.sent_ratio`)."""
        if budget.sent_ratio is not None:
            pre_sent = self.stage_ratios(budget.sent_ratio)[0]
            tokens = max(1, round(pre_sent * budget.model_vanilla_image_tokens))
            return dataclasses.replace(budget, ratio=min(tokens / budget.vanilla_image_tokens, 1.0), tokens=tokens,
                                       sent_ratio=pre_sent)
        pre_ratio, _ = self.stage_ratios(budget.ratio)
        if budget.tokens is None:
            return dataclasses.replace(budget, ratio=pre_ratio)
        tokens = max(budget.tokens, round(budget.vanilla_image_tokens * pre_ratio))
        return dataclasses.replace(budget, ratio=min(tokens / budget.vanilla_image_tokens, 1.0), tokens=tokens)

    def in_llm_budget(self, budget: Budget, span_tokens: int) -> Budget:
        """The in-LLM method's budget: the ratio `R_in` of the `span_tokens` the pre-LLM stage sent."""
        return Budget(self.stage_ratios(budget.vanilla_ratio)[1], span_tokens)

    def schedule(self, span_tokens: int, budget: Budget, num_layers: int) -> tuple[tuple[int, int], ...]:
        """The in-LLM part's `(layer, kept)` stages over the span, at its share of `budget` (the image's total)."""
        return tuple(self.in_llm.schedule(span_tokens, self.in_llm_budget(budget, span_tokens), num_layers))

    def schedule_params(self, span_tokens: int, budget: Budget, num_layers: int) -> dict:
        """The in-LLM part's `schedule_params` at its share of `budget` ({} where it has none)."""
        params = getattr(self.in_llm, "schedule_params", None)
        return params(span_tokens, self.in_llm_budget(budget, span_tokens), num_layers) if params else {}

    def accounting(self, budget: Budget) -> dict:
        """What the split gave this image (JSON-ready, for its record)."""
        pre_ratio, in_llm_ratio = self.stage_ratios(budget.ratio)
        return dict(split=self.split, pre=self.pre_name, in_llm=self.in_llm_name, pre_ratio=pre_ratio,
                    in_llm_ratio=in_llm_ratio)


def _composition(name: str) -> Method:
    """The Method of `<pre-LLM>+<in-LLM>`: it selects with the pre-LLM part at its share of the
    budget; the glue hands the in-LLM part (`in_llm_part`) to the decoder."""
    parts = name.split(COMPOSE)
    if len(parts) != 2:
        raise ValueError(f"a composition is <pre-LLM method>+<in-LLM method>, got {name!r}")
    pre, in_llm = (get_method(part) for part in parts)
    if pre.stage != "pre-llm" or in_llm.stage != "in-llm":
        raise ValueError(f"compose a pre-LLM method ({', '.join(method_names('pre-llm'))}) with an in-LLM one "
                         f"({', '.join(method_names('in-llm'))}), in that order: got {name!r}")

    def select(views, signals, geometry, budget, args):
        return pre.select(views, signals, geometry, args.pre_budget(budget), args.pre)

    return Method(name, select, pre.needs, ComposedArgs, COMPOSED,
                  f"{pre.name}, then {in_llm.name} inside the language model, the budget split between them",
                  lambda args: pre.input_changes(args.pre), parts=(pre, in_llm))


def _composed_args(method: Method, values: dict) -> ComposedArgs:
    """`ComposedArgs` from converted `{<part>.<key> or split: value}`."""
    pre, in_llm = method.parts
    per_part = {part.name: {key.partition(".")[2]: value for key, value in values.items()
                            if key.startswith(part.name + ".")} for part in method.parts}
    split = {"split": values["split"]} if "split" in values else {}
    return ComposedArgs(pre.name, pre.args(**per_part[pre.name]), in_llm.name, in_llm.args(**per_part[in_llm.name]),
                        **split)


class MethodChoices(list):
    """The registered names (listed by a command line's help), membership also true for any valid
    composition (`argparse` `choices=method_choices()`)."""

    def __contains__(self, name) -> bool:
        try:
            get_method(name)
        except ValueError:
            return False
        return True


def method_choices() -> MethodChoices:
    return MethodChoices(method_names())


def in_llm_part(method: Method, args) -> tuple[Method, object] | None:
    """`(method, args)` of what prunes inside the language model in a run of `method` with `args`:
    the method itself (in-LLM), a composition's in-LLM part, or None (pre-LLM)."""
    if method.parts:
        return method.parts[1], args.in_llm
    return (method, args) if method.stage == "in-llm" else None
