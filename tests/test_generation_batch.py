"""Batched generation (`llava.generation.answer_batch`): one left-padded `generate` call gives each
prompt the answer and accounting it gets alone (greedy, CPU, fp32), for vanilla, a pre-LLM method
and an in-LLM one; the pure helpers by hand."""

import pytest
import torch

from llava.generation import _generated_lengths, _left_padded, answer, answer_batch, expected_visual_tokens
from support import noise_image

# Different text lengths and image sizes on different AnyRes grids (2x1, 1x2, 3x1; a 64x64 image takes the
# first pinpoint with least waste, 1x2), one prompt with two images and one without any.
PROMPTS = ["USER: <image>\nWhat is it? ASSISTANT:",
           "USER: <image>\nDescribe the picture in many more words than the first one does. ASSISTANT:",
           "USER: <image>\n<image>\nCompare. ASSISTANT:",
           "USER: No image here. ASSISTANT:"]
SIZES = [[(500, 300)], [(200, 600)], [(1000, 300), (64, 64)], []]


def _images():
    return [[noise_image(size, 10 * row + index) for index, size in enumerate(sizes)] for row, sizes in enumerate(SIZES)]


def _measures(reply):
    """What must not depend on the batch (timings are the batch's)."""
    return (reply.text, reply.image_sizes, reply.grids, reply.visual_tokens, reply.accounting, reply.compression,
            reply.prompt_tokens, reply.new_tokens)


@pytest.mark.parametrize("compression", [dict(retention_ratio=1.0), dict(retention_ratio=0.25, method="globalcom2"),
                                         dict(retention_ratio=0.25, method="fastv", method_args=["k=1"])],
                         ids=["vanilla", "globalcom2", "fastv"])
def test_batch_answers_equal_one_prompt_at_a_time(tiny, compression, monkeypatch):
    tokenizer, model, processor = tiny
    images = _images()
    # The random tiny model rarely says EOS: with every fifth token id an end too, rows finish at
    # different steps, and a finished row is padded while the others go on.
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tokenizer.eos_token_id, *range(3, 1024, 5)])
    model.set_compression(**compression)
    try:
        alone = [answer(model, tokenizer, processor, prompt, own, max_new_tokens=6)
                 for prompt, own in zip(PROMPTS, images)]
        together = answer_batch(model, tokenizer, processor, PROMPTS, images, max_new_tokens=6)
    finally:
        model.set_compression()
    assert [reply.grids for reply in together] == [[(2, 1)], [(1, 2)], [(3, 1), (1, 2)], []]
    assert len({reply.prompt_tokens for reply in together}) == len(PROMPTS)  # the batch is ragged
    assert [_measures(reply) for reply in together] == [_measures(reply) for reply in alone]
    assert len({reply.new_tokens for reply in together}) > 1


def test_left_padding_and_its_mask():
    ids, mask = _left_padded([torch.tensor([5, 6, 7]), torch.tensor([8])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    same, no_mask = _left_padded([torch.tensor([5, 6]), torch.tensor([7, 8])], pad_id=0)
    assert same.tolist() == [[5, 6], [7, 8]] and no_mask is None


def test_each_row_counts_its_tokens_up_to_its_first_eos():
    output_ids = torch.tensor([[4, 2, 0, 0], [4, 5, 6, 7], [2, 0, 0, 0], [4, 5, 9, 2]])
    assert _generated_lengths(output_ids, 2) == [2, 4, 1, 4]
    assert _generated_lengths(output_ids, [9, 2]) == [2, 4, 1, 3]


def test_expected_visual_tokens_from_the_size_and_budget(tiny):
    model = tiny[1]
    # 500x300 goes on the 672x336 pinpoint (2x1 crops; 560x336 of it is image), whose 48x24-patch
    # canvas unpads to 40 columns by 24 rows: 576 thumbnail + 960 crop tokens, 24 newlines.
    model.set_compression(retention_ratio=1.0)
    try:
        assert expected_visual_tokens(model, (500, 300)) == 576 + 960 + 24
        model.set_compression(retention_ratio=0.25, method="globalcom2")
        assert expected_visual_tokens(model, (500, 300)) == round(0.25 * (576 + 960))
        model.set_compression(visual_tokens=100, method="globalcom2")
        assert expected_visual_tokens(model, (500, 300)) == 100
        model.set_compression(retention_ratio=0.25, method="fastv", method_args=["k=1"])  # pruned inside the LLM
        assert expected_visual_tokens(model, (500, 300)) == 576 + 960 + 24
    finally:
        model.set_compression()
