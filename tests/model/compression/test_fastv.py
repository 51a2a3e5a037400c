"""FastV (`llava.model.compression.fastv`): the budget's two conventions by hand (spec `fastv.md` 3),
the keep rule by hand and against the official selection restated, and through the tiny checkpoint
(2 layers, so K = 1): R = 1 is the vanilla model, a ragged batch equals each row alone, the accounting,
and the loader runner end to end."""

import math

import pytest
import torch

from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.compression import fastv, get_method, parse_method_args
from llava.model.compression.common import Budget
from support import noise_image


def _budget(ratio=1.0, tokens=None, vanilla=2880):
    return Budget(ratio, vanilla, tokens)


def test_post_pruning_count_by_hand():
    args = fastv.FastVArgs()
    assert args.schedule(2880, _budget(0.25), 32) == ((2, 720),)  # round(0.25 * 2880)
    assert args.schedule(5, _budget(0.5), 32) == ((2, 2),)        # round(2.5) = 2: half to even, as [HF]'s round
    assert args.schedule(2046, _budget(tokens=300), 32) == ((2, 300),)
    assert args.schedule(2046, _budget(tokens=5000), 32) == ()     # nothing dropped: no stage at all
    assert args.schedule(2880, _budget(1.0), 32) == ()
    assert fastv.FastVArgs(k=40).schedule(2880, _budget(0.25), 32) == ()  # K past the last layer


def test_layer_average_convention_matches_the_spec_numbers():
    # fastv.md 3: K = 2, L = 32, N = 2880: k = N (R L - K) / (L - K), floored
    args = fastv.FastVArgs(convention="average")
    assert [args.schedule(2880, _budget(ratio), 32)[0][1] for ratio in (0.5, 0.25, 0.1)] == [1344, 576, 115]
    assert args.schedule(2880, _budget(0.05), 32) == ((2, 0),)  # below K / L: unreachable, k = 0
    stage, = args.schedule(2000, _budget(tokens=500), 32)        # (2 * 2000 + 30 k) / 32 <= 500
    assert stage == (2, math.floor((500 * 32 - 2 * 2000) / 30))


def test_k_zero_is_refused():
    with pytest.raises(ValueError, match="k must be at least 1"):
        parse_method_args("fastv", ["k=0"])


def test_keep_rule_by_hand():
    # image 0: 5 tokens, keep 2 -> offsets 3 (0.9) and 1 (0.5); image 1: 3 tokens, keep 1 -> offset 2 (0.7);
    # its padding columns score 9 and must never be chosen
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.9, 0.0], [0.2, 0.2, 0.7, 9.0, 9.0]])
    kept = fastv.keep(scores, torch.tensor([5, 3]), torch.tensor([2, 1]), fastv.FastVArgs())
    assert kept.tolist() == [[False, True, False, True, False], [False, False, True, False, False]]
    none = fastv.keep(scores, torch.tensor([5, 3]), torch.tensor([0, 0]), fastv.FastVArgs())
    assert not none.any()


def _official_keep(score_row, start, count, kept, total):
    """fastv.md 2.1-2.2 restated: top-k of the span's columns (ties to the earlier column, the rule
    fastv.py documents for topk's unspecified tie order), then every text token, sorted."""
    values = score_row.tolist()
    top = sorted(range(start, start + count), key=lambda column: (-values[column], column))[:kept]
    return sorted(list(range(0, start)) + top + list(range(start + count, total)))


@pytest.mark.parametrize("seed", range(5))
def test_keep_rule_equals_the_official_selection(seed):
    generator = torch.Generator().manual_seed(seed)
    total, images = 40, 3
    starts, counts = torch.tensor([4, 2, 7]), torch.tensor([20, 31, 12])
    rows = torch.randint(0, 5, (images, total), generator=generator).float() / 4  # coarse values: ties happen
    targets = torch.tensor([5, 10, 12])
    span = torch.zeros(images, int(counts.max()))
    for image in range(images):
        span[image, :counts[image]] = rows[image, starts[image]:starts[image] + counts[image]]
    kept = fastv.keep(span, counts, targets, fastv.FastVArgs())
    for image in range(images):
        start, count = int(starts[image]), int(counts[image])
        ours = list(range(0, start)) + [start + int(offset) for offset in kept[image].nonzero().flatten()]
        ours = sorted(ours + list(range(start + count, total)))
        official = _official_keep(rows[image], start, count, int(targets[image]), total)
        assert ours == official


def test_registered_in_llm():
    method = get_method("fastv")
    assert method.stage == "in-llm" and method.needs == {"last_query_attn"}
    assert method.signals_for(fastv.FastVArgs(), False) == frozenset()  # the tower computes nothing for it


# --- through the tiny checkpoint (2 decoder layers: K = 1) -------------------------------------

def _inputs(tiny, sizes, questions):
    tokenizer, model, processor = tiny
    images = [noise_image(size, index) for index, size in enumerate(sizes)]
    pixel_values = process_images(images, processor, model.config)
    rows = [tokenizer_image_token(f"USER: <image>\n{question} ASSISTANT:", tokenizer, return_tensors="pt")
            for question in questions]
    longest = max(len(row) for row in rows)
    ids = torch.full((len(rows), longest), tokenizer.pad_token_id or 0)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, longest - len(row):], mask[index, longest - len(row):] = row, 1
    return ids, mask, pixel_values, [image.size for image in images]


def _generate(model, ids, mask, pixel_values, sizes, **compression):
    model.set_compression(**compression)
    try:
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, images=pixel_values, image_sizes=sizes, do_sample=False,
                                  max_new_tokens=6, output_logits=True, return_dict_in_generate=True)
    finally:
        model.set_compression()


def assert_full_budget_is_vanilla(tiny, method, method_args=None):
    """At R = 1 the in-LLM `method` schedules nothing: the greedy tokens and every step's logits are the
    vanilla model's exactly (shared by the in-LLM methods' tests)."""
    _, model, _ = tiny
    ids, mask, pixel_values, sizes = _inputs(tiny, [(800, 500)], ["What is shown?"])
    vanilla = _generate(model, ids, mask, pixel_values, sizes, retention_ratio=1.0, method="globalcom2")
    full = _generate(model, ids, mask, pixel_values, sizes, retention_ratio=1.0, method=method,
                     method_args=method_args)
    assert full.sequences.tolist() == vanilla.sequences.tolist()
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(full.logits, vanilla.logits))


def test_full_budget_is_the_vanilla_model(tiny):
    assert_full_budget_is_vanilla(tiny, "fastv", ["k=1"])


def test_pruning_changes_the_model_and_is_accounted(tiny):
    _, model, _ = tiny
    ids, mask, pixel_values, sizes = _inputs(tiny, [(800, 500)], ["What is shown?"])
    vanilla = _generate(model, ids, mask, pixel_values, sizes, retention_ratio=1.0, method="globalcom2")
    pruned = _generate(model, ids, mask, pixel_values, sizes, retention_ratio=0.1, method="fastv",
                       method_args=["k=1"])
    record = model.last_accounting[0]
    span = record["in_llm"]["span_tokens"]
    assert record["tokens_after"] == record["tokens_before"] == span  # the image goes in whole
    assert record["post_pruning_image_tokens"] == round(0.1 * span)
    assert record["in_llm"]["stages"] == [[1, round(0.1 * span)]]
    assert record["layer_image_tokens"] == [span, round(0.1 * span)]
    assert record["equivalent_image_tokens"] == (span + round(0.1 * span)) / 2
    assert not torch.equal(pruned.logits[0], vanilla.logits[0])
    cache = getattr(pruned, "cache", None) or pruned.past_key_values
    text = ids.shape[1] - 1
    assert [layer.keys.shape[2] for layer in cache.layers] == [text + span + 5, text + round(0.1 * span) + 5]


@pytest.mark.parametrize("budget", [dict(retention_ratio=0.25), dict(visual_tokens=100)])
def test_ragged_batch_equals_each_row_alone(tiny, budget):
    """Two images of different shapes (different spans, different kept counts) and questions of
    different lengths, left-padded: every row's greedy tokens equal its run alone."""
    _, model, _ = tiny
    sizes, questions = [(800, 500), (400, 900)], ["What is shown?", "Which colour is the sky in this picture?"]
    ids, mask, pixel_values, image_sizes = _inputs(tiny, sizes, questions)
    batched = _generate(model, ids, mask, pixel_values, image_sizes, method="fastv", method_args=["k=1"], **budget)
    spans = [record["in_llm"]["span_tokens"] for record in model.last_accounting]
    assert spans[0] != spans[1]
    for row in range(2):
        alone_ids, alone_mask, alone_pixels, alone_sizes = _inputs(tiny, sizes[row:row + 1], questions[row:row + 1])
        alone_pixels = pixel_values[row:row + 1]  # the same preprocessing
        alone = _generate(model, alone_ids, alone_mask, alone_pixels, image_sizes[row:row + 1], method="fastv",
                          method_args=["k=1"], **budget)
        assert batched.sequences[row].tolist() == alone.sequences[0].tolist()
        assert torch.allclose(batched.logits[0][row], alone.logits[0][0], atol=1e-4)


def test_loader_runner_end_to_end(loader_answers):
    rows = loader_answers([(80, 50), (50, 90)], "--method", "fastv", "--method-arg", "k=1", "--retention-ratio", "0.25")
    assert len(rows) == 2
    image = rows[0]["metadata"]["images"][0]
    assert image["method"] == "fastv"
    assert image["post_pruning_image_tokens"] == round(0.25 * image["in_llm"]["span_tokens"])
