"""`prepare_inputs_labels_for_multimodal` with compression off: upstream LLaVA-NeXT's sequence,
batches, several images per prompt, text-only prompts, padding sides, generation."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import anyres_visual_token_count, get_anyres_image_grid_shape, process_images, tokenizer_image_token, unpad_image
from llava.model.llava_arch import CACHE_KEY, PromptTooLongError
from llava.utils import LlavaWarning
from support import noise_image

pytestmark = pytest.mark.usefixtures("vanilla")


def _upstream_sequence(model, views, image_size):
    """Upstream's tensor ops for one AnyRes image, written out with their channel-first permute."""
    grid_w, grid_h = {(800, 500): (2, 2), (500, 900): (2, 2), (1000, 300): (3, 1), (20, 2000): (1, 3)}[image_size]
    base, crops = views[0], views[1:]
    crops = crops.view(grid_h, grid_w, 24, 24, -1).permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
    crops = unpad_image(crops, image_size)
    newline = model.get_model().image_newline[:, None, None].expand(*crops.shape[:-1], 1)
    crops = torch.cat((crops, newline), dim=-1).flatten(1, 2).transpose(0, 1)
    return torch.cat((base, crops), dim=0)


# 1000x300 on a 3x1 grid (24 x 72 patches): new_h = int(21.6) = 21, pad 1 -> rows [1, 23): 22 rows.
@pytest.mark.parametrize("size, tokens", [((800, 500), 2046), ((500, 900), 1872), ((1000, 300), 576 + 22 * 73), ((20, 2000), 648)])
def test_image_sequence_is_upstream(tiny, size, tokens):
    _, model, processor = tiny
    views = torch.randn(1 + {(800, 500): 4, (500, 900): 4, (1000, 300): 3, (20, 2000): 3}[size], 576, model.config.hidden_size)
    ours, _ = model.image_sequence(views, None, size)
    assert ours.shape == (tokens, model.config.hidden_size)
    assert torch.equal(ours, _upstream_sequence(model, views, size))


def _prompt_ids(tokenizer, text):
    return tokenizer_image_token(f"USER: {text} ASSISTANT:", tokenizer, return_tensors="pt")


def _pad(rows, pad_id, side):
    longest = max(len(row) for row in rows)
    ids = torch.full((len(rows), longest), pad_id)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for index, row in enumerate(rows):
        span = slice(longest - len(row), longest) if side == "left" else slice(0, len(row))
        ids[index, span], mask[index, span] = row, 1
    return ids, mask


def _single(model, ids, images, sizes):
    return model.prepare_inputs_labels_for_multimodal(ids[None], None, None, None, None, images, sizes)[4][0]


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_equals_single_samples(tiny, side):
    tokenizer, model, processor = tiny
    images = [noise_image((800, 500), 0), noise_image((500, 900), 1)]
    rows = [_prompt_ids(tokenizer, "<image>\nWhat is it?"), _prompt_ids(tokenizer, "<image>\nDescribe the picture in detail please.")]
    pixel_values = process_images(images, processor, model.config)
    sizes = [image.size for image in images]
    ids, mask = _pad(rows, tokenizer.pad_token_id, "right")
    with torch.no_grad():
        _, positions, new_mask, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(
            ids, None, mask, None, None, pixel_values, sizes, padding_side=side
        )
        singles = [_single(model, row, pixel_values[i:i + 1], sizes[i:i + 1]) for i, row in enumerate(rows)]
    lengths = [len(single) for single in singles]
    assert lengths == [len(rows[0]) - 1 + 2046, len(rows[1]) - 1 + 1872]
    assert embeds.shape[1] == max(lengths)
    for row, single in enumerate(singles):
        valid = new_mask[row].bool()
        assert valid.sum() == len(single)
        assert torch.equal(embeds[row][valid], single)
        assert valid[-1] if side == "left" else valid[0]
        assert positions[row][valid].tolist() == list(range(len(single)))


def test_several_images_in_one_prompt(tiny):
    tokenizer, model, processor = tiny
    images = [noise_image((800, 500), 2), noise_image((20, 2000), 3)]
    ids = _prompt_ids(tokenizer, "<image>\nfirst and <image>\nsecond")
    pixel_values = process_images(images, processor, model.config)  # views differ: a list
    sizes = [image.size for image in images]
    with torch.no_grad():
        embeds = _single(model, ids, pixel_values, sizes)
        first, second = model.encode_image_sequences(pixel_values, sizes)
        text = model.get_model().embed_tokens(ids.clamp(min=0))
    at = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
    expected = torch.cat([text[:at[0]], first, text[at[0] + 1:at[1]], second, text[at[1] + 1:]])
    assert (len(first), len(second)) == (2046, 648) and torch.equal(embeds, expected)


def _two_image_prompt(tiny):
    """2046 + 2182 visual tokens and a few text tokens: over the tiny model's 4096."""
    tokenizer, model, processor = tiny
    images = [noise_image((800, 500), 2), noise_image((1000, 300), 3)]
    ids = _prompt_ids(tokenizer, "<image>\n<image>\ntwo")
    return ids, process_images(images, processor, model.config), [image.size for image in images]


def test_over_long_prompt_is_refused_naming_counts_and_a_ratio_that_fits(tiny):
    ids, pixel_values, sizes = _two_image_prompt(tiny)
    text_tokens = len(ids) - 2
    with pytest.raises(PromptTooLongError) as refused:
        _single(tiny[1], ids, pixel_values, sizes)
    message = str(refused.value)
    assert f"the prompt is {4228 + text_tokens} tokens (2 image(s), 4228 visual tokens)" in message
    assert "at most 4096" in message and "--allow-truncation" in message
    # R (4096 - text) / visual, rounded down to 2 decimals: 1 * (4096 - 12) / 4228 = 0.965... -> 0.96
    fits = int((4096 - text_tokens) / 4228 * 100) / 100
    assert f"a retention ratio of about {fits:g} or lower fits" in message


def test_allow_truncation_cuts_at_the_model_max_length_with_a_warning(tiny, monkeypatch):
    ids, pixel_values, sizes = _two_image_prompt(tiny)
    model = tiny[1]
    monkeypatch.setattr(model, "allow_truncation", True)
    with pytest.warns(LlavaWarning, match="cut to 4096 tokens"), torch.no_grad():
        embeds = _single(model, ids, pixel_values, sizes)
    assert model.config.tokenizer_model_max_length == 4096 and len(embeds) == 4096


def test_retention_ratio_that_keeps_no_thumbnail_token_warns(tiny, monkeypatch):
    tokenizer, model, processor = tiny
    image = noise_image((800, 500), 5)
    monkeypatch.setattr(model, "_compression_override", dict(retention_ratio=1 / 577))  # int(576 / 577) = 0
    with pytest.warns(LlavaWarning, match="below 1/576"), torch.no_grad():
        embeds = _single(model, _prompt_ids(tokenizer, "<image>\nhi"), process_images([image], processor, model.config),
                         [image.size])
    assert model.last_accounting[0]["thumbnail_kept"] == 0 and len(embeds) > 0


def test_manual_decoding_with_the_cache_keyword(tiny):
    """Decoding step by step passes the cache under transformers' own keyword (CACHE_KEY); the
    suite turns a deprecated keyword into an error, and the logits equal a full forward's."""
    tokenizer, model, processor = tiny
    image = noise_image((500, 900), 6)
    ids = _prompt_ids(tokenizer, "<image>\nWhat?")
    pixel_values = process_images([image], processor, model.config)
    with torch.no_grad():
        embeds = _single(model, ids, pixel_values, [image.size])[None]
        prefill = model(inputs_embeds=embeds, use_cache=True)
        next_token = prefill.logits[:, -1].argmax(-1, keepdim=True)
        step = model(input_ids=next_token, use_cache=True, **{CACHE_KEY: getattr(prefill, CACHE_KEY)})
        whole = model(inputs_embeds=torch.cat([embeds, model.get_model().embed_tokens(next_token)], dim=1))
    torch.testing.assert_close(step.logits[0, -1], whole.logits[0, -1], rtol=1e-4, atol=1e-4)


def test_text_only_prompt_and_mixed_batch(tiny):
    tokenizer, model, processor = tiny
    text_ids = _prompt_ids(tokenizer, "Hello there")
    batch = text_ids[None]
    untouched = model.prepare_inputs_labels_for_multimodal(batch, None, None, None, None, None)
    assert untouched[0] is batch and untouched[4] is None
    image = noise_image((800, 500), 4)
    rows = [text_ids, _prompt_ids(tokenizer, "<image>\nAnd this?")]
    ids, mask = _pad(rows, tokenizer.pad_token_id, "right")
    pixel_values = process_images([image], processor, model.config)
    with torch.no_grad():
        _, _, new_mask, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(ids, None, mask, None, None, pixel_values, [image.size])
        text_embeds = model.get_model().embed_tokens(text_ids)
    assert new_mask[0].sum() == len(text_ids) and torch.equal(embeds[0, :len(text_ids)], text_embeds)
    assert new_mask[1].sum() == len(rows[1]) - 1 + 2046


def test_placeholder_count_must_match_images(tiny):
    tokenizer, model, processor = tiny
    ids = _prompt_ids(tokenizer, "<image>\n<image>\ntwo placeholders")
    pixel_values = process_images([noise_image((800, 500), 5)], processor, model.config)
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        model.prepare_inputs_labels_for_multimodal(ids[None], None, None, None, None, pixel_values, [(800, 500)])


def test_labels_mask_image_tokens(tiny):
    tokenizer, model, processor = tiny
    ids = _prompt_ids(tokenizer, "<image>\nQ")
    labels = ids.clone()
    pixel_values = process_images([noise_image((800, 500), 6)], processor, model.config)
    with torch.no_grad():
        out = model.prepare_inputs_labels_for_multimodal(ids[None], None, None, None, labels[None], pixel_values, [(800, 500)])
    new_labels = out[5][0]
    at = int((ids == IMAGE_TOKEN_INDEX).nonzero())
    assert (new_labels[at:at + 2046] == -100).all()
    assert new_labels[:at].tolist() == ids[:at].tolist() and new_labels[at + 2046:].tolist() == ids[at + 1:].tolist()


def _left_padded_pair(tiny, sizes, seed, second_question):
    """Two one-image prompts of different lengths, left-padded: (rows, ids, mask, pixel_values)."""
    tokenizer, model, processor = tiny
    images = [noise_image(size, seed + index) for index, size in enumerate(sizes)]
    rows = [_prompt_ids(tokenizer, "<image>\nWhat?"), _prompt_ids(tokenizer, "<image>\n" + second_question)]
    ids, mask = _pad(rows, tokenizer.pad_token_id, "left")
    return rows, ids, mask, process_images(images, processor, model.config)


def test_batched_logits_equal_single(tiny):
    model = tiny[1]
    sizes = [(800, 500), (336, 336)]
    rows, ids, mask, pixel_values = _left_padded_pair(tiny, sizes, 7, "What colour is the sky today?")
    with torch.no_grad():
        _, positions, new_mask, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(
            ids, None, mask, None, None, pixel_values, sizes, padding_side="left")
        batched = model(inputs_embeds=embeds, attention_mask=new_mask, position_ids=positions).logits
        for row in range(2):
            single = model(rows[row][None], images=pixel_values[row:row + 1], image_sizes=sizes[row:row + 1]).logits[0]
            assert (batched[row][new_mask[row].bool()] - single).abs().max() < 1e-4


def test_generation_with_cache_and_batch(tiny):
    tokenizer, model = tiny[0], tiny[1]
    sizes = [(800, 500), (500, 900)]
    rows, ids, mask, pixel_values = _left_padded_pair(tiny, sizes, 9, "What is in the picture, please?")
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    cached = model.generate(ids, images=pixel_values, image_sizes=sizes, attention_mask=mask, use_cache=True, **greedy)
    uncached = model.generate(ids, images=pixel_values, image_sizes=sizes, attention_mask=mask, use_cache=False, **greedy)
    assert cached.shape == (2, 6)  # only new tokens: the prompt went in as embeddings
    assert torch.equal(cached, uncached)
    for row in range(2):
        single = model.generate(rows[row][None], images=pixel_values[row:row + 1], image_sizes=sizes[row:row + 1], **greedy)
        assert torch.equal(single[0], cached[row])
    text_only = model.generate(rows[0][None][:, :3], **greedy)
    assert text_only.shape == (1, 6)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 3000))
def test_sequence_length_matches_the_token_count_rule(tiny, width, height):
    """For every image size, the model's sequence has `anyres_visual_token_count` tokens."""
    model = tiny[1]
    pinpoints = model.config.image_grid_pinpoints
    grid_w, grid_h = get_anyres_image_grid_shape((width, height), pinpoints, 336)
    views = torch.zeros(1 + grid_w * grid_h, 576, model.config.hidden_size)
    model_sequence, _ = model.image_sequence(views, None, (width, height))
    assert model_sequence.shape[0] == anyres_visual_token_count((width, height), pinpoints)


# --- a method that changes the model's input (its official code does) -------------------------

@pytest.fixture
def square_grid_method():
    """A method registered for this test only: `random`'s selection, declaring the input changes
    VisPruner's and CDPruner's official codes make (every image on the 672x672 grid, no unpadding)."""
    from llava.model.compression import random as random_method
    from llava.model.compression.registry import _METHODS, register

    register("test-square-grid", args=random_method.RandomArgs, input_changes=lambda args: {
        "image_grid_pinpoints": [[672, 672]], "mm_patch_merge_type": "spatial"})(random_method.select)
    yield "test-square-grid"
    del _METHODS["test-square-grid"]


def test_input_changes_reach_preprocessing_geometry_and_accounting(tiny, square_grid_method):
    from llava.generation import answer

    tokenizer, model, processor = tiny
    image = noise_image((1000, 300), 3)  # LLaVA-NeXT's own grid for it: 3 crops in a row
    assert get_anyres_image_grid_shape(image.size, model.config.image_grid_pinpoints, 336) == (3, 1)
    model.set_compression(0.5, method=square_grid_method)
    try:
        config = model.input_config()
        assert config.image_grid_pinpoints == [[672, 672]] and config.mm_patch_merge_type == "spatial"
        assert model.config.image_grid_pinpoints != [[672, 672]]  # the model's own config is untouched
        reply = answer(model, tokenizer, processor, "USER: <image>\nWhat? ASSISTANT:", [image], max_new_tokens=1)
    finally:
        model.set_compression()
    selection, record = model.last_selections[0], reply.accounting[0]
    assert selection.geometry.grid == (2, 2) and not selection.geometry.unpad  # 5 views, padding cells count
    assert record["crop_valid"] == [576] * 4 and record["newline_tokens"] == 0
    # Counted against what the model itself sends for this image: 576 + 3 unpadded crops, newlines.
    own_tokens = anyres_visual_token_count(image.size, model.config.image_grid_pinpoints, 336, 24)
    assert record["tokens_before"] == own_tokens
    # Its 1008x336 canvas (3 crops in a row, 72 columns) holds the image in 22 of 24 rows.
    assert record["vanilla_image_tokens"] == 576 + 22 * 72 == own_tokens - 22
    assert record["image_tokens"] == round(0.5 * 5 * 576)


def test_an_input_change_the_glue_cannot_apply_is_refused(tiny, square_grid_method):
    from llava.model.compression.registry import get_method

    model = tiny[1]
    method = get_method(square_grid_method)
    original = method.input_changes
    object.__setattr__(method, "input_changes", lambda args: {"image_aspect_ratio": "pad"})
    model.set_compression(method=square_grid_method)
    try:
        with pytest.raises(ValueError, match=r"changes \['image_aspect_ratio'\], which the glue does not apply"):
            model.input_config()
    finally:
        object.__setattr__(method, "input_changes", original)
        model.set_compression()


def test_matched_budgets_count_the_models_own_vanilla_tokens_under_a_forced_grid(tiny):
    """VisPruner's official input forces the 2x2 grid; `budget=matched` still spends R of what the
    model itself sends for the image (its 3x1 grid: 2160 image tokens), not of the forced grid's."""
    from llava.generation import answer

    tokenizer, model, processor = tiny
    image = noise_image((1000, 300), 4)
    model.set_compression(0.25, method="vispruner", method_args=["budget=matched"])
    try:
        reply = answer(model, tokenizer, processor, "USER: <image>\nWhat? ASSISTANT:", [image], max_new_tokens=1)
    finally:
        model.set_compression()
    record = reply.accounting[0]
    assert model.last_selections[0].geometry.grid == (2, 2) and record["vanilla_image_tokens"] == 2160
    # R' = 0.25 * 2160 / 2880 of each view's 576 cells: 108 per view, 540 = round(0.25 * 2160).
    assert record["view_tokens"] == [108] * 5 and record["image_tokens"] == 540 == round(0.25 * 2160)
