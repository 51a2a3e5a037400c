"""Composition of a pre-LLM and an in-LLM method (`registry`'s "Composition", `globalcom2+fastv`):
arguments addressed per part, the budget split by hand, and through the tiny checkpoint (2 decoder
layers, so FastV's K = 1): the in-LLM ratio at 1 is GlobalCom2 alone, the whole budget in-LLM is
FastV alone, the default split's counts, and the loader runner end to end."""

import math

import pytest
import torch

from llava.model.compression import get_method, parse_method_args
from llava.model.compression.common import Budget
from llava.model.compression.registry import (ComposedArgs, in_llm_part, method_args_dict, method_choices,
                                              non_default_args, row_args)
from tests.model.compression.test_fastv import _inputs

NAME = "globalcom2+fastv"


def test_arguments_are_addressed_per_part():
    args = parse_method_args(NAME, ["fastv.k=3", "globalcom2.alpha=0", "split=0.25"])
    assert isinstance(args, ComposedArgs) and (args.pre_name, args.in_llm_name) == ("globalcom2", "fastv")
    assert args.in_llm.k == 3 and args.pre.alpha == 0.0 and args.split == 0.25
    assert parse_method_args(NAME).split == 0.5 and parse_method_args(NAME).in_llm.k == 2  # each part's defaults
    assert non_default_args(args) == {"globalcom2.alpha": 0.0, "fastv.k": 3, "split": 0.25}
    assert row_args(parse_method_args(NAME)) == {"split": 0.5}  # the split always names a composed row
    flat = method_args_dict(args)
    assert flat["fastv.k"] == 3 and flat["split"] == 0.25 and flat["globalcom2.allocation"] == "softmax-sum"
    assert parse_method_args(NAME, [f"{key}={value}" for key, value in flat.items()]) == args  # round trip


@pytest.mark.parametrize("pairs, message", [
    (["k=3"], "has no argument 'k'"),                  # unaddressed: which part's?
    (["fastv.alpha=0"], "has no argument 'fastv.alpha'"),
    (["split=1.5"], "split must be in [0, 1]"),
    (["fastv.k=0"], "k must be at least 1"),           # the part's own check still holds
])
def test_bad_arguments_are_refused_in_one_line(pairs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_method_args(NAME, pairs)


def test_only_a_pre_llm_then_an_in_llm_method_compose():
    method = get_method(NAME)
    assert method.needs == get_method("globalcom2").needs  # the tower computes what the pre-LLM part needs
    assert in_llm_part(method, parse_method_args(NAME))[0] is get_method("fastv")
    assert in_llm_part(get_method("globalcom2"), parse_method_args("globalcom2")) is None
    for name in ("fastv+globalcom2", "globalcom2+random", "globalcom2+fastv+fastv", "nothing+fastv"):
        with pytest.raises(ValueError):
            get_method(name)
    assert NAME in method_choices() and "fastv+globalcom2" not in method_choices() and "fastv" in method_choices()


def test_budget_split_by_hand():
    quarter = Budget(0.25, 2880)
    # split 0.5: sqrt(0.25) = 0.5 for each stage; the in-LLM stage takes round(0.5 * 1000) of a 1000-token span
    args = parse_method_args(NAME)
    assert args.stage_ratios(0.25) == (0.5, 0.5)
    assert args.pre_budget(quarter) == Budget(0.5, 2880)
    assert args.schedule(1000, quarter, 32) == ((2, 500),)
    # split 1: the whole budget before the LLM, exactly R, and no in-LLM stage at all
    alone = parse_method_args(NAME, ["split=1"])
    assert alone.stage_ratios(0.1) == (0.1, 1.0) and alone.pre_budget(quarter) == quarter
    assert alone.schedule(1000, quarter, 32) == ()
    # split 0: the pre-LLM stage keeps everything, FastV gets R of the span
    assert parse_method_args(NAME, ["split=0"]).stage_ratios(0.1) == (1.0, 0.1)
    # split 0.25 at R = 0.1: 0.1 ** 0.25 = 0.5623 before the LLM, 0.1 ** 0.75 = 0.1778 inside; product 0.1
    pre, inside = parse_method_args(NAME, ["split=0.25"]).stage_ratios(0.1)
    assert pre == pytest.approx(0.56234, abs=1e-5) and inside == pytest.approx(0.17783, abs=1e-5)
    assert pre * inside == pytest.approx(0.1)
    # the in-LLM part's convention applies to its share: average over 32 layers of K = 2 then k = 0.5 of 1000
    average = parse_method_args(NAME, ["fastv.convention=average"])
    assert average.schedule(1000, quarter, 32) == ((2, math.floor((0.5 * 1000 * 32 - 2 * 1000) / 30)),)
    # the in-LLM part's own schedule parameters come at its share: PDrop with lam fixed at 0.5 on its
    # official layers; FastV has none
    pdrop = parse_method_args("globalcom2+pdrop", ["pdrop.lam=0.5"])
    assert pdrop.schedule_params(1000, quarter, 32) == dict(lam=0.5, layers=[8, 16, 24])
    assert args.schedule_params(1000, quarter, 32) == {}


def test_budget_split_on_a_downsampled_canvas_by_hand():
    """OneVision 2304x2304: 729 + 36 x 729 cells offered, 7290 image tokens sent by vanilla; R = 0.25 there is
    round(0.25 x 7290) = 1822 tokens of the cells, and the split is of the tokens vanilla sends: sqrt(0.25) = 0.5
    before the LLM, round(0.5 x 7290) = 3645 tokens, and 0.5 of the span inside it."""
    offered = 729 + 36 * 729
    total = Budget(1822 / offered, offered, 1822, 7290, sent_ratio=0.25)
    args = parse_method_args(NAME)
    pre = args.pre_budget(total)
    assert (pre.tokens, pre.sent_ratio, pre.ratio) == (3645, 0.5, 3645 / offered)
    assert args.in_llm_budget(total, 4000) == Budget(0.5, 4000)


def test_token_budget_split_by_hand():
    # --visual-tokens 300 of 2880: r = 300 / 2880; the pre-LLM stage keeps round(2880 sqrt(r)) = round(sqrt(300 * 2880))
    tokens = Budget(300 / 2880, 2880, 300)
    pre = parse_method_args(NAME).pre_budget(tokens)
    assert pre.tokens == round(math.sqrt(300 * 2880)) == 930 and pre.ratio == 930 / 2880
    assert parse_method_args(NAME, ["split=1"]).pre_budget(tokens) == tokens  # exactly N: GlobalCom2 alone
    many = Budget(1.0, 2880, 5000)  # more than vanilla: the pre-LLM stage keeps N as GlobalCom2 alone would
    assert parse_method_args(NAME).pre_budget(many) == many
    # the in-LLM stage: the ratio r ** (1 - split) of its span
    assert parse_method_args(NAME).in_llm_budget(tokens, 1000).ratio == pytest.approx(math.sqrt(300 / 2880))


# --- through the tiny checkpoint (2 decoder layers: K = 1) -------------------------------------

def _generate(model, inputs, **compression):
    ids, mask, pixel_values, sizes = inputs
    model.set_compression(**compression)
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, images=pixel_values, image_sizes=sizes, do_sample=False,
                                 max_new_tokens=5, output_logits=True, return_dict_in_generate=True)
        return out, [dict(record) for record in model.last_accounting]
    finally:
        model.set_compression()


def _same(ours, theirs):
    assert ours.sequences.tolist() == theirs.sequences.tolist()
    assert all(torch.equal(mine, other) for mine, other in zip(ours.logits, theirs.logits))


@pytest.mark.parametrize("budget", [dict(retention_ratio=0.25), dict(visual_tokens=60)])
def test_in_llm_ratio_one_is_globalcom2_alone(tiny, budget):
    """split=1 gives FastV the ratio 1: no stage, and the tokens and logits of GlobalCom2 at the same budget."""
    inputs = _inputs(tiny, [(800, 500), (400, 900)], ["What is shown?", "Which colour is the sky here?"])
    _, model, _ = tiny
    alone, alone_records = _generate(model, inputs, method="globalcom2", **budget)
    composed, records = _generate(model, inputs, method=NAME, method_args=["split=1", "fastv.k=1"], **budget)
    _same(composed, alone)
    for record, reference in zip(records, alone_records):
        assert record["tokens_after"] == reference["tokens_after"] < reference["tokens_before"]
        assert record["in_llm"]["stages"] == [] and record["post_pruning_image_tokens"] == reference["tokens_after"]
        assert record["composition"]["in_llm_ratio"] == 1.0


def test_whole_budget_in_llm_is_fastv_alone(tiny):
    """split=0: GlobalCom2 at R = 1 sends the vanilla sequence, FastV prunes it at the whole budget."""
    inputs = _inputs(tiny, [(800, 500)], ["What is shown?"])
    _, model, _ = tiny
    alone, alone_records = _generate(model, inputs, method="fastv", method_args=["k=1"], retention_ratio=0.25)
    composed, records = _generate(model, inputs, method=NAME, method_args=["split=0", "fastv.k=1"],
                                  retention_ratio=0.25)
    _same(composed, alone)
    assert records[0]["in_llm"]["stages"] == alone_records[0]["in_llm"]["stages"] != []


def test_default_split_counts(tiny):
    """R = 0.25, split 0.5: GlobalCom2 at 0.5 (the same tokens as alone at 0.5), then FastV keeps
    round(0.5 span) from layer 1; the two layers average to the equivalent tokens."""
    inputs = _inputs(tiny, [(800, 500)], ["What is shown?"])
    _, model, _ = tiny
    _, half = _generate(model, inputs, method="globalcom2", retention_ratio=0.5)
    composed, records = _generate(model, inputs, method=NAME, method_args=["fastv.k=1"], retention_ratio=0.25)
    record, span = records[0], half[0]["tokens_after"]
    assert record["tokens_after"] == record["in_llm"]["span_tokens"] == span
    kept = round(0.5 * span)
    assert record["in_llm"]["stages"] == [[1, kept]] and record["layer_image_tokens"] == [span, kept]
    assert record["post_pruning_image_tokens"] == kept and record["equivalent_image_tokens"] == (span + kept) / 2
    assert record["composition"] == dict(split=0.5, pre="globalcom2", in_llm="fastv", pre_ratio=0.5, in_llm_ratio=0.5)
    assert composed.sequences.shape[0] == 1


def test_loader_runner_end_to_end(loader_answers):
    rows = loader_answers([(80, 50), (50, 90)], "--method", NAME, "--method-arg", "fastv.k=1", "--retention-ratio", "0.25")
    assert len(rows) == 2
    meta = rows[0]["metadata"]
    image = meta["images"][0]
    assert meta["method"] == NAME and meta["method_args"]["fastv.k"] == 1 and meta["method_args"]["split"] == 0.5
    assert image["composition"]["in_llm_ratio"] == 0.5
    assert image["post_pruning_image_tokens"] == round(0.5 * image["in_llm"]["span_tokens"])
