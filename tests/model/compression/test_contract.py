"""The contract every registered method keeps, run over `method_names()` (timm's way: tests
driven by the registry). A method that cannot keep a point opts out here, with the reason.

Features are named: value `1000 * view + cell` (D = 1), newline -1, so a sequence reads as the
list of cells the language model receives.
"""

import dataclasses
import math

import pytest
import torch

from llava.mm_utils import get_anyres_image_grid_shape, process_images, tokenizer_image_token
from llava.model.compression import get_method, method_names, parse_method_args
from llava.model.compression.common import Budget, Merge, arrange_tokens, crop_geometry, keep_everything, project_merge
from llava.model.compression.registry import DECODER_SIGNALS, SIGNALS, argument_fields, example_signals
from llava.tiny import V16_PINPOINTS
from support import noise_image

# Methods that select before the language model get the checks below on views; those that prune
# inside it (stage in-llm: keep rules the decoder mechanism calls) get the in-LLM checks at the end.
PRE_LLM = method_names("pre-llm")
IN_LLM = method_names("in-llm")

NEWLINE = -1.0
SIZES = [(1000, 700), (700, 1000), (800, 500), (336, 336), (20, 2000), (5000, 2)]


def _inputs(size, side=24, dimension=1, seed=0, dtype=torch.float32, input_changes=None):
    """Named views, example signals and the geometry, on the input a method's official code
    makes (`input_changes`: its merge type, its pinpoints) or else LLaVA-NeXT's."""
    changes = input_changes or {}
    grid = get_anyres_image_grid_shape(size, changes.get("image_grid_pinpoints", V16_PINPOINTS), 336)
    views = 1 + grid[0] * grid[1]
    cells = torch.arange(side * side, dtype=torch.float32)
    named = torch.stack([1000 * view + cells for view in range(views)])[..., None].expand(-1, -1, dimension)
    generator = torch.Generator().manual_seed(seed)
    signals = example_signals(SIGNALS, views, side * side, width=8, heads=2, generator=generator, dtype=dtype)
    # The tower's features are the named cells themselves (a [CLS] row named -2 first), and the
    # projector below is the identity, so merged and extra tokens stay readable too.
    signals["tower_features"] = torch.cat([torch.full((views, 1, dimension), -2.0), named], dim=1).to(dtype)
    unpad = "unpad" in changes.get("mm_patch_merge_type", "spatial_unpad")
    return named.to(dtype).contiguous(), signals, crop_geometry(size, grid, side, unpad)


def _run(name, size, ratio=None, visual_tokens=None, layout="official", dtype=torch.float32, args=None):
    method = get_method(name)
    args = args or method.args()
    views, signals, geometry = _inputs(size, dtype=dtype, input_changes=method.input_changes(args))
    budget = Budget.resolve(geometry, ratio, visual_tokens)
    declared = {key: value for key, value in signals.items() if key in method.needs}
    selection = project_merge(method.select(views, declared, geometry, budget, args), lambda x: x)
    newline = torch.tensor([NEWLINE], dtype=dtype) if geometry.unpad else None
    return selection, arrange_tokens(views, selection, newline, layout)


@pytest.mark.parametrize("name", PRE_LLM)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("layout", ["official", "spatial"])
def test_full_budget_is_vanilla(name, size, layout):
    """At a full budget a method sends its input whole: LLaVA-NeXT's sequence, or where its
    official code changes the input (FasterVLM's: no unpadding), that input's."""
    method = get_method(name)
    if not getattr(method.args(), "keeps_everything", lambda: True)():
        pytest.skip(f"{name}'s default (its official code) is not vanilla at a full budget: its args say so")
    views, _, geometry = _inputs(size, input_changes=method.input_changes(method.args()))
    newline = torch.tensor([NEWLINE]) if geometry.unpad else None
    vanilla = arrange_tokens(views, keep_everything(geometry), newline, layout)
    _, sequence = _run(name, size, 1.0, layout=layout)
    assert torch.equal(sequence, vanilla)


@pytest.mark.parametrize("name", PRE_LLM)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.1, 0.01])
@pytest.mark.parametrize("layout", ["official", "spatial"])
def test_sequence_matches_accounting_and_holds_distinct_image_cells(name, size, ratio, layout):
    selection, sequence = _run(name, size, ratio, layout=layout)
    record = selection.accounting(layout)
    assert sequence.shape[0] == record["tokens_after"] == record["image_tokens"] + record["newline_tokens"]
    assert record["image_tokens"] <= record["vanilla_image_tokens"]
    names = [int(value) for value in sequence[:, 0].tolist() if value != NEWLINE]
    if not isinstance(selection, Merge):  # merged features are means, not cell names
        assert len(set(names)) == len(names)
        geometry = selection.geometry
        side = geometry.side
        image_cells = set(range(side * side))
        for crop, (top, left, height, width) in enumerate(geometry.crop_boxes):
            image_cells |= {1000 * (crop + 1) + (top + y) * side + left + x for y in range(height) for x in range(width)}
        assert set(names) <= image_cells


@pytest.mark.parametrize("name", PRE_LLM)
@pytest.mark.parametrize("tokens", [1, 100, 700, 10**6])
def test_visual_tokens_budget_is_accepted_and_bounded(name, tokens):
    selection, sequence = _run(name, (1000, 700), visual_tokens=tokens)
    record = selection.accounting("official")
    assert 0 <= record["image_tokens"] <= record["vanilla_image_tokens"]
    if tokens >= record["vanilla_image_tokens"]:
        assert record["image_tokens"] == record["vanilla_image_tokens"]


@pytest.mark.parametrize("name", PRE_LLM)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtype_is_kept(name, dtype):
    _, sequence = _run(name, (800, 500), 0.25, dtype=dtype)
    assert sequence.dtype == dtype


@pytest.mark.parametrize("name", PRE_LLM)
def test_repeated_runs_are_identical(name):
    first, first_sequence = _run(name, (1000, 700), 0.25)
    second, second_sequence = _run(name, (1000, 700), 0.25)
    assert torch.equal(first_sequence, second_sequence)
    assert first.accounting("official") == second.accounting("official")


@pytest.mark.parametrize("name", PRE_LLM)
def test_arguments_round_trip_through_the_command_line_form(name):
    method = get_method(name)
    defaults = method.args()
    pairs = [f"{field}={default}" for field, _, default, _ in argument_fields(method)]
    assert parse_method_args(name, pairs) == defaults
    for field, _, _, help_text in argument_fields(method):
        assert help_text, f"{name}.{field} has no help"
    with pytest.raises(ValueError, match=f"method {name} has no argument 'no_such_knob'"):
        parse_method_args(name, ["no_such_knob=1"])


@pytest.mark.parametrize("name", PRE_LLM)
def test_reads_only_declared_signals(name):
    """`_run` hands each method only what it declared; here nothing at all for an undeclaring one."""
    method = get_method(name)
    assert method.needs <= set(SIGNALS)
    selection, _ = _run(name, (1000, 700), 0.25)  # a KeyError here would mean an undeclared read
    assert selection.image_tokens > 0


@pytest.mark.parametrize("name", PRE_LLM)
def test_module_documents_the_method_and_its_budget(name):
    method = get_method(name)
    module = __import__(method.select.__module__, fromlist=["_"])
    assert method.summary and "Budget" in module.__doc__
    assert dataclasses.is_dataclass(method.args) and method.args.__dataclass_params__.frozen


# --- through the model: batched equals per-sample, device and dtype of the real glue ----------

@pytest.mark.parametrize("name", PRE_LLM)
def test_batched_equals_per_sample_in_the_model(tiny, name):
    tokenizer, model, processor = tiny
    images = [noise_image((800, 500), 1), noise_image((500, 900), 2)]
    pixel_values = process_images(images, processor, model.config)
    sizes = [image.size for image in images]
    ids = tokenizer_image_token("USER: <image>\nWhat? ASSISTANT:", tokenizer, return_tensors="pt")
    model.set_compression(0.25, method=name)
    try:
        with torch.no_grad():
            # Each image's instruction text, for methods conditioned on it (CDPruner); others ignore it.
            instructions = ["What is shown?", "Which colour is the sky?"]
            batched = model.encode_image_sequences(pixel_values, sizes, instructions=instructions)
            batched_accounting = list(model.last_accounting)
            for index in range(2):
                single, = model.encode_image_sequences(pixel_values[index:index + 1], sizes[index:index + 1],
                                                       instructions=instructions[index:index + 1])
                assert torch.equal(single, batched[index])
                assert model.last_accounting == batched_accounting[index:index + 1]
            embeds = model.prepare_inputs_labels_for_multimodal(ids[None], None, None, None, None, pixel_values[:1],
                                                                sizes[:1], instructions=instructions[:1])[4]
    finally:
        model.set_compression()
    record = batched_accounting[0]
    assert record["method"] == name and embeds.shape[1] == len(ids) - 1 + record["tokens_after"]
    assert math.isclose(record["realised_ratio"], record["image_tokens"] / record["vanilla_image_tokens"])


@pytest.mark.parametrize("name", PRE_LLM)
@pytest.mark.parametrize("budget", [dict(retention_ratio=1.0), dict(retention_ratio=0.5), dict(retention_ratio=0.25),
                                    dict(retention_ratio=0.1), dict(visual_tokens=300)])
def test_runs_on_the_tiny_checkpoint(tiny, name, budget):
    tokenizer, model, processor = tiny
    image = noise_image((1000, 700), 3)
    pixel_values = process_images([image], processor, model.config)
    model.set_compression(method=name, **budget)
    try:
        with torch.no_grad():
            sequence, = model.encode_image_sequences(pixel_values, [image.size], instructions=["What is shown?"])
    finally:
        model.set_compression()
    record = model.last_accounting[0]
    assert sequence.shape[0] == record["tokens_after"] and record["method"] == name
    assert record["vanilla_image_tokens"] == 576 + 4 * 408
    if budget.get("retention_ratio") == 1.0:
        # A full budget sends the method's input whole: LLaVA-NeXT's image tokens, or where its
        # official code changes the input (no unpadding: FasterVLM, VisionZip), every cell of it.
        method = get_method(name)
        _, _, input_geometry = _inputs(image.size, input_changes=method.input_changes(method.args()))
        assert record["image_tokens"] == input_geometry.vanilla_image_tokens
    else:
        assert 0 < record["image_tokens"] < record["vanilla_image_tokens"]


# --- in-LLM methods: keep rules called inside the decoder (llava.model.language_model.pruning) ---

@pytest.mark.parametrize("name", IN_LLM)
def test_in_llm_arguments_and_documentation(name):
    method = get_method(name)
    module = __import__(method.select.__module__, fromlist=["_"])
    assert method.summary and "Budget" in module.__doc__
    assert dataclasses.is_dataclass(method.args) and method.args.__dataclass_params__.frozen
    assert method.needs <= set(DECODER_SIGNALS) and method.signals_for(method.args(), False) == frozenset()
    pairs = [f"{field}={default}" for field, _, default, _ in argument_fields(method)]
    assert parse_method_args(name, pairs) == method.args()
    assert all(help_text for _, _, _, help_text in argument_fields(method))


@pytest.mark.parametrize("name", IN_LLM)
@pytest.mark.parametrize("budget", [dict(retention_ratio=1.0), dict(retention_ratio=0.5), dict(retention_ratio=0.1),
                                    dict(visual_tokens=300)])
def test_in_llm_runs_on_the_tiny_checkpoint(tiny, name, budget):
    """The image goes in whole; the schedule prunes at a layer of the model (its first layers
    whatever the default, the tiny model having 2), and a full budget is the vanilla model."""
    tokenizer, model, processor = tiny
    image = noise_image((1000, 700), 3)
    pixel_values = process_images([image], processor, model.config)
    ids = tokenizer_image_token("USER: <image>\nWhat? ASSISTANT:", tokenizer, return_tensors="pt")[None]
    args = [f"{field}=1" for field, kind, _, _ in argument_fields(get_method(name)) if field == "k"]
    logits = {}
    for key, settings in (("vanilla", dict(method="globalcom2", retention_ratio=1.0)),
                          ("method", dict(method=name, method_args=args, **budget))):
        model.set_compression(**settings)
        try:
            with torch.no_grad():
                logits[key] = model(ids, images=pixel_values, image_sizes=[image.size]).logits[0, -1]
        finally:
            model.set_compression()
    record = model.last_accounting[0]
    assert record["method"] == name and record["image_tokens"] == record["vanilla_image_tokens"] == 576 + 4 * 408
    assert len(record["layer_image_tokens"]) == model.config.num_hidden_layers
    assert record["post_pruning_image_tokens"] == record["layer_image_tokens"][-1] <= record["in_llm"]["span_tokens"]
    if budget.get("retention_ratio") == 1.0:
        assert torch.equal(logits["method"], logits["vanilla"]) and record["in_llm"]["stages"] == []
    else:
        assert record["post_pruning_image_tokens"] < record["in_llm"]["span_tokens"]
