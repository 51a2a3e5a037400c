"""GlobalCom2 inside the model: the ratio's sources, batches, several images, merge types,
single views, dtypes and the accounting."""

import pytest
import torch

from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import anyres_visual_token_count, get_anyres_image_grid_shape, process_images, tokenizer_image_token
from llava.model import llava_arch
from llava.model.builder import load_pretrained_model
from llava.model.compression.globalcom2 import compress_image_features, compress_thumbnail, generate_scale_for_crop_features
from support import noise_image

SCORES = {"cls_logits_last"}


@pytest.fixture
def model(tiny):
    """The shared tiny model, with its own ratio/layout reset after each test."""
    model = tiny[1]
    yield model
    model.set_compression(None, None)


def _ids(tokenizer, text):
    return tokenizer_image_token(f"USER: {text} ASSISTANT:", tokenizer, return_tensors="pt")


def _embeds(model, ids, pixel_values, sizes, mask=None, padding_side=None):
    with torch.no_grad():
        out = model.prepare_inputs_labels_for_multimodal(ids, None, mask, None, None, pixel_values, sizes, padding_side=padding_side)
    return out[2], out[4]


def _expected_sequence(model, views, size, ratio, layout="official"):
    """The image's sequence straight from `compress_image_features`, with its own views' scores."""
    with torch.no_grad():
        features, signals = model.encode_images(views, SCORES)
    scores = signals["cls_logits_last"]
    grid = get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, 336)
    newline = model.get_model().image_newline
    return compress_image_features(features, scores, size, grid, newline, ratio, layout=layout)


def test_module_constant_is_read_at_call_time(tiny, model, monkeypatch):
    tokenizer, _, processor = tiny
    image = noise_image((800, 500), 0)
    ids, pixel_values = _ids(tokenizer, "<image>\nQ")[None], process_images([image], processor, model.config)
    lengths = {}
    for ratio in (1.0, 0.5, 0.1):
        monkeypatch.setattr(llava_arch, "retention_ratio", ratio)
        lengths[ratio] = _embeds(model, ids, pixel_values, [image.size])[1].shape[1]
        assert model.last_accounting[0]["tokens_after"] == lengths[ratio] - (ids.shape[1] - 1)
        assert model.last_accounting[0]["tokens_before"] == 2046
    assert lengths[1.0] == ids.shape[1] - 1 + 2046 and lengths[1.0] > lengths[0.5] > lengths[0.1]


def test_set_compression_wins_over_the_constant(tiny, model, monkeypatch):
    tokenizer, _, processor = tiny
    image = noise_image((800, 500), 0)
    ids, pixel_values = _ids(tokenizer, "<image>\nQ")[None], process_images([image], processor, model.config)
    monkeypatch.setattr(llava_arch, "retention_ratio", 0.5)
    model.set_compression(0.1, "spatial")
    _, embeds = _embeds(model, ids, pixel_values, [image.size])
    expected = _expected_sequence(model, pixel_values[0], image.size, 0.1, "spatial")
    image_at = (ids[0] == IMAGE_TOKEN_INDEX).nonzero().item()
    assert torch.equal(embeds[0, image_at:image_at + len(expected)], expected)
    settings = model.compression_settings()
    assert (settings.method, settings.retention_ratio, settings.token_layout) == ("globalcom2", 0.1, "spatial")


@pytest.mark.parametrize("bad", [0.0, 1.5, float("nan"), "0.25"])
def test_bad_ratio_is_refused_before_any_model_work(tiny, model, monkeypatch, bad):
    tokenizer, _, processor = tiny
    image = noise_image((64, 64), 1)
    pixel_values = process_images([image], processor, model.config)
    monkeypatch.setattr(llava_arch, "retention_ratio", bad)
    monkeypatch.setattr(model.get_model().vision_tower, "forward", lambda *a, **k: pytest.fail("the tower ran"))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        _embeds(model, _ids(tokenizer, "<image>\nQ")[None], pixel_values, [image.size])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        model.set_compression(bad)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_each_image_of_a_batch_uses_its_own_scores(tiny, model, padding_side):
    """Batched output equals per-sample output and each image's own compression (released bug Q1)."""
    tokenizer, _, processor = tiny
    model.set_compression(0.25)
    images = [noise_image((800, 500), 2), noise_image((500, 900), 3), noise_image((1000, 300), 4)]
    rows = [_ids(tokenizer, "<image>\nWhat is it?"), _ids(tokenizer, "<image>\nDescribe it in detail."), _ids(tokenizer, "<image>\nWhy?")]
    pixel_values = process_images(images, processor, model.config)
    sizes = [image.size for image in images]
    longest = max(len(row) for row in rows)
    ids = torch.full((3, longest), tokenizer.pad_token_id)
    mask = torch.zeros(3, longest, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, :len(row)], mask[index, :len(row)] = row, 1
    new_mask, embeds = _embeds(model, ids, pixel_values, sizes, mask, padding_side)
    batch_accounting = list(model.last_accounting)
    for index, row in enumerate(rows):
        _, single = _embeds(model, row[None], pixel_values[index:index + 1], sizes[index:index + 1])
        assert torch.equal(embeds[index][new_mask[index].bool()], single[0])
        assert model.last_accounting == batch_accounting[index:index + 1]
        image_at = (row == IMAGE_TOKEN_INDEX).nonzero().item()
        expected = _expected_sequence(model, pixel_values[index], sizes[index], 0.25)
        assert torch.equal(single[0, image_at:image_at + len(expected)], expected)
        assert batch_accounting[index]["tokens_before"] == anyres_visual_token_count(sizes[index], model.config.image_grid_pinpoints)


def test_several_images_in_one_prompt(tiny, model):
    tokenizer, _, processor = tiny
    model.set_compression(0.25, "spatial")
    images = [noise_image((800, 500), 5), noise_image((20, 2000), 6)]
    ids = _ids(tokenizer, "<image>\nfirst and <image>\nsecond")
    pixel_values = process_images(images, processor, model.config)
    _, embeds = _embeds(model, ids[None], pixel_values, [image.size for image in images])
    first, second = (_expected_sequence(model, views, image.size, 0.25, "spatial") for views, image in zip(pixel_values, images))
    text = model.get_model().embed_tokens(ids.clamp(min=0)).detach()
    at = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
    assert torch.equal(embeds[0], torch.cat([text[:at[0]], first, text[at[0] + 1:at[1]], second, text[at[1] + 1:]]))
    assert [record["tokens_after"] for record in model.last_accounting] == [len(first), len(second)]


def test_spatial_merge_without_unpad_compresses(tiny, model, monkeypatch):
    """Merge type 'spatial' (released code: RuntimeError, Q4): the whole canvas, no newlines."""
    tokenizer, _, processor = tiny
    monkeypatch.setattr(model.config, "mm_patch_merge_type", "spatial")
    model.set_compression(0.5)
    image = noise_image((1000, 700), 7)
    pixel_values = process_images([image], processor, model.config)
    ids = _ids(tokenizer, "<image>\nQ")
    _, embeds = _embeds(model, ids[None], pixel_values, [image.size])
    with torch.no_grad():
        scores = model.encode_images(pixel_values[0], SCORES).signals["cls_logits_last"]
    kept = sum(int(576 * ratio) for ratio in generate_scale_for_crop_features(scores[0], 2, 2, 0.5))
    assert embeds.shape[1] == len(ids) - 1 + 288 + kept
    assert model.last_accounting[0]["tokens_before"] == 5 * 576


def test_single_view_images_keep_their_best_tokens(tiny, model):
    """A 4-D batch (one view per image, LLaVA-1.5 style) keeps int(576 R) tokens by score."""
    tokenizer, _, processor = tiny
    model.set_compression(0.25, "spatial")
    pixels = torch.stack([processor.preprocess(noise_image((336, 336), 8), return_tensors="pt")["pixel_values"][0]])
    with torch.no_grad():
        features, signals = model.encode_images(pixels, SCORES)
        sequence, = model.encode_image_sequences(pixels, None)
    keep = compress_thumbnail(signals["cls_logits_last"][0], 0.25).sort().values
    assert sequence.shape[0] == 144 and torch.equal(sequence, features[0][keep])
    assert model.last_accounting[0]["tokens_before"] == 576


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_model_dtype_is_kept(tiny_checkpoint, tiny, dtype):
    tokenizer, _, _ = tiny
    _, half_model, processor, _ = load_pretrained_model(tiny_checkpoint, device="cpu", torch_dtype=dtype)
    half_model.set_compression(0.25)
    image = noise_image((800, 500), 9)
    pixel_values = process_images([image], processor, half_model.config).to(dtype)
    _, embeds = _embeds(half_model, _ids(tokenizer, "<image>\nQ")[None], pixel_values, [image.size])
    assert embeds.dtype == dtype
    with torch.no_grad():
        output = half_model.generate(_ids(tokenizer, "<image>\nQ")[None], images=pixel_values, image_sizes=[image.size],
                                     max_new_tokens=2, do_sample=False)
    assert output.shape == (1, 2)


def test_generation_with_compression_batched_equals_single(tiny, model):
    tokenizer, _, processor = tiny
    model.set_compression(0.1)
    images = [noise_image((800, 500), 10), noise_image((500, 900), 11)]
    rows = [_ids(tokenizer, "<image>\nWhat is it?"), _ids(tokenizer, "<image>\nTell me more about it.")]
    pixel_values = process_images(images, processor, model.config)
    sizes = [image.size for image in images]
    longest = max(len(row) for row in rows)
    ids = torch.full((2, longest), tokenizer.pad_token_id)
    mask = torch.zeros(2, longest, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, longest - len(row):], mask[index, longest - len(row):] = row, 1
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    batched = model.generate(ids, images=pixel_values, image_sizes=sizes, attention_mask=mask, **settings)
    for index, row in enumerate(rows):
        single = model.generate(row[None], images=pixel_values[index:index + 1], image_sizes=sizes[index:index + 1], **settings)
        assert batched[index].tolist() == single[0].tolist()


def test_released_helpers_are_importable_with_their_meaning(monkeypatch):
    from llava.model.llava_arch import generate_scale_for_crop_features as scales
    from llava.model.llava_arch import interpolate_and_split_cls_attn_scores as split

    monkeypatch.setattr(llava_arch, "retention_ratio", 0.5)  # the default base_scale, read at call time
    assert scales(torch.ones(576), 2, 2) == [0.5] * 4 and scales(torch.ones(576), 2, 2, base_scale=0.1) == [0.1] * 4
    pieces = split(torch.arange(16.0), 4, 4, 2, 2, [(2, 2)] * 4)  # same size: no resampling
    assert [piece.tolist() for piece in pieces] == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
